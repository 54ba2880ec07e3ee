"""``broker.testing``, the harness shipped for users' tests: README's example runs as written,
and the Redis launchers do what their docstrings say."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, WaitTimeout, wait_for
from broker.testing.fake_redis import FakeRedisServer, unavailable

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Testing your own consumers", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README's testing section has no python example"
    return match.group(1)


async def test_readme_testing_example_runs_as_written(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    await tests[0](tmp_path)


async def test_redis_server_restarts_empty_on_the_same_port() -> None:
    async with RedisServer() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("k", "v")
            port = server.port
            await asyncio.to_thread(server.restart)
            assert server.port == port
            assert await client.get("k") is None  # redis-py reconnects; the data is gone
        finally:
            await client.aclose()
    assert server.proc is None


def test_a_password_server_is_ready_and_its_urls_carry_the_credentials() -> None:
    with RedisServer(("--requirepass", "s3cret")) as server:
        assert server.url_for(password="s3cret") == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        assert server.url_for("bot", "pw", 2) == f"redis://bot:pw@127.0.0.1:{server.port}/2"
        assert server.pid > 0


async def test_wait_for_fails_as_an_assertion_and_a_timeout() -> None:
    with pytest.raises(AssertionError, match="waiting for never"):
        await wait_for(lambda: False, 0.05, message="never")
    with pytest.raises(TimeoutError):
        await wait_for(lambda: 0, 0.05)
    assert issubclass(WaitTimeout, AssertionError) and issubclass(WaitTimeout, TimeoutError)


@pytest.mark.skipif(unavailable() is not None, reason="fakeredis with Lua is not installed")
async def test_fake_redis_runs_the_lease_script() -> None:
    from broker.leases import LeaseStore
    from broker.upbit.types import SubscriptionSet

    async with FakeRedisServer() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            store = LeaseStore(client, "t")
            subs = SubscriptionSet.of({"ticker": ["KRW-BTC"]})
            await store.write("c1", subs, ttl_ms=5000, host="h", pid=1)
            listing = await store.list_all()
            assert [lease.client_id for lease in listing.leases] == ["c1"]
        finally:
            await client.aclose()
