"""The lease contract as a consumer in another language meets it (README, "The lease contract").

README's script and commands are run word for word (``redis-cli --eval``, and a Node.js
consumer with the npm ``redis`` client) against a real redis-server, the simulator and a
broker; the holder of a partial, invalid or lapsed lease is told so on ``{ns}:events``; and the
connection the broker opens to shrink its set to nothing is no reconnect.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.leases import LEASE_LUA, RELEASE_LUA, LeaseStore
from broker.testing import RedisServer, scaled, wait_for
from tests.support.broker_env import EventTap, fast_settings, started_broker
from tests.support.processes import sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NODE_DIR = ROOT / "tests" / "node"
NS = "upbit"  # README's namespace, so its commands run unchanged


# -- the README quotes the shipped script ---------------------------------------------------


def test_readme_quotes_the_shipped_lease_script_and_no_other() -> None:
    blocks = re.findall(r"^```lua\n(.*?)^```$", README.read_text(), re.S | re.M)
    shipped = (ROOT / "broker" / "lease.lua").read_text()
    assert blocks == [shipped]
    # the library runs those very files
    assert (shipped, (ROOT / "broker" / "lease_release.lua").read_text()) == (
        LEASE_LUA,
        RELEASE_LUA,
    )


def test_the_scripts_are_package_data() -> None:
    """A non-editable install (a wheel, the Docker image) must carry the .lua files."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"].get("package-data", {}).get("broker", [])
    assert any(Path(name).match(p) for name in ("lease.lua", "lease_release.lua") for p in patterns)


def readme_command(script: str) -> list[str]:
    """README's ``redis-cli --eval broker/<script> ...`` line, as argv."""
    for line in README.read_text().splitlines():
        text = line.strip()
        if text.startswith(f"redis-cli --eval broker/{script} "):
            return shlex.split(text)
    raise AssertionError(f"README has no redis-cli line running broker/{script}")


def redis_cli(port: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` (a redis-cli command line) against the test's server, from the repository."""
    assert argv[0] == "redis-cli"
    return subprocess.run(
        ["redis-cli", "-p", str(port), *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(10),
    )


def lease_command(client_id: str, subs: Any, ttl_ms: int = 30_000) -> list[str]:
    """README's lease line with another id, subs and TTL (same keys, same argument order)."""
    argv = readme_command("lease.lua")
    keys = [f"{NS}:lease:{client_id}", f"{NS}:leases"]
    comma = argv.index(",")
    host, pid = argv[comma + 4 :]
    return [*argv[:3], *keys, ",", client_id, str(ttl_ms), json.dumps(subs), host, pid]


async def eval_lease(server: RedisServer, argv: list[str]) -> list[int]:
    result = await asyncio.to_thread(redis_cli, server.port, argv)
    assert result.returncode == 0 and result.stderr == "", result
    assert not result.stdout.startswith("(error)") and "ERR" not in result.stdout, result.stdout
    return [int(x) for x in result.stdout.split()]


async def next_frame(pubsub: Any, channel: str, timeout: float = 10.0) -> dict[str, Any]:
    async def get() -> dict[str, Any] | None:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None and msg["channel"].decode() == channel:
            frame: dict[str, Any] = json.loads(msg["data"])
            return frame
        return None

    return await wait_for(get, timeout, interval=0, message=f"a frame on {channel}")


# -- a hand-written lease, word for word -----------------------------------------------------


async def test_a_lease_written_as_the_readme_says_receives_data_and_leaves_cleanly(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=31, rate=20) as sim,
        started_broker(fast_settings(redis_server.url, sim.url, namespace=NS)) as running,
        EventTap(redis_client, NS) as tap,
    ):
        epoch = running.epoch
        pubsub = redis_client.pubsub()
        try:
            # 1. SUBSCRIBE first: the first frame, Upbit's SNAPSHOT, is then not missed
            await pubsub.subscribe(f"{NS}:ticker:KRW-BTC")
            # 2. README's line, verbatim
            renewed, created, deadline = await eval_lease(redis_server, readme_command("lease.lua"))
            assert renewed == created and deadline == renewed + 30_000
            first = await next_frame(pubsub, f"{NS}:ticker:KRW-BTC")
            assert first["code"] == "KRW-BTC" and first["stream_type"] == "SNAPSHOT"
            second = await next_frame(pubsub, f"{NS}:ticker:KRW-BTC")
            assert second["code"] == "KRW-BTC" and second["stream_type"] == "REALTIME"
        finally:
            await pubsub.aclose()
        lease = await LeaseStore(redis_client, NS).read("my-bot")
        assert lease is not None and lease.pid == 4242 and lease.host == "my-host"
        assert lease.rejected == ()

        # leaving: README's release line; the set shrinks to nothing on a fresh connection,
        # which is no reconnect: same epoch, no `connected` event, no gap
        result = await asyncio.to_thread(
            redis_cli, redis_server.port, readme_command("lease_release.lua")
        )
        assert result.returncode == 0 and result.stdout.strip() == "1", result
        await wait_for(lambda: sim_upstream(sim) == {}, 10, message="the set to shrink")
        upstream = running.upstream
        assert upstream is not None
        await wait_for(lambda: upstream.stats.fresh_connection_switches == 1, 5)
        await wait_for(running.ready.is_set, 5, message="ready on the fresh connection")
        assert running.epoch == epoch and upstream.stats.reconnects == 0
        assert tap.of("connected") == [] and tap.of("gap") == []
        assert tap.of("lease") == []  # a lease fine from the start, and a release: no news


# -- what a holder is told ---------------------------------------------------------------------


async def test_a_partial_invalid_or_expired_lease_is_told_once_per_change(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=32, rate=20) as sim,
        started_broker(fast_settings(redis_server.url, sim.url, namespace=NS)),
        EventTap(redis_client, NS) as tap,
    ):

        def told(client_id: str) -> list[dict[str, Any]]:
            return [e for e in tap.of("lease") if e["client_id"] == client_id]

        # one bad code among good ones: the good one is served, the bad one reported
        await eval_lease(redis_server, lease_command("partly", {"ticker": ["KRW-BTC", "krw-eth"]}))
        [partial] = await wait_for(lambda: told("partly"), 10, message="the partial event")
        assert partial["state"] == "partial"
        assert partial["rejected"] == {"ticker": ["krw-eth"]} and partial["rejected_count"] == 1
        assert "invalid market code 'krw-eth'" in partial["why"]
        await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 10)

        # nothing servable: invalid as a whole
        await eval_lease(redis_server, lease_command("wrong", {"ticker": ["krw-eth"]}))
        [invalid] = await wait_for(lambda: told("wrong"), 10, message="the invalid event")
        assert invalid["state"] == "invalid" and "nothing in subs can be served" in invalid["why"]

        # never renewed: expired, and its stream stops
        await eval_lease(redis_server, lease_command("brief", {"trade": ["KRW-ETH"]}, 2000))
        await wait_for(lambda: (sim_upstream(sim) or {}).get("trade") == {"KRW-ETH"}, 10)
        [expired] = await wait_for(lambda: told("brief"), 10, message="the expired event")
        assert expired["state"] == "expired" and "not renewed" in expired["why"]
        await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 10)

        status = await redis_client.hgetall(f"{NS}:status")  # type: ignore[misc]
        counts = {k: int(status[k.encode()]) for k in ("partial_leases", "rejected_streams")}
        assert counts == {"partial_leases": 1, "rejected_streams": 1}
        assert int(status[b"invalid_leases"]) == 1

        # heartbeats of the same leases say nothing new; a fix says `ok` once
        for _ in range(3):
            await eval_lease(
                redis_server, lease_command("partly", {"ticker": ["KRW-BTC", "krw-eth"]})
            )
            await eval_lease(redis_server, lease_command("wrong", {"ticker": ["krw-eth"]}))
        await eval_lease(redis_server, lease_command("partly", {"ticker": ["KRW-BTC"]}))
        await wait_for(lambda: len(told("partly")) == 2, 10, message="the ok event")
        assert [e["state"] for e in told("partly")] == ["partial", "ok"]
        assert [e["state"] for e in told("wrong")] == ["invalid"]
        assert [e["state"] for e in told("brief")] == ["expired"]
        assert all(e["broker"] and e["ts_ms"] for e in tap.of("lease"))


# -- a consumer in Node.js -------------------------------------------------------------------

_NODE = shutil.which("node")


@pytest.mark.skipif(
    _NODE is None or not (NODE_DIR / "node_modules" / "redis").is_dir(),
    reason="needs node and tests/node/node_modules (npm ci --prefix tests/node)",
)
async def test_a_nodejs_consumer_following_the_readme_receives_data(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    assert _NODE is not None
    async with (
        running_simulator(seed=33, rate=20) as sim,
        started_broker(fast_settings(redis_server.url, sim.url, namespace=NS)),
    ):
        result = await asyncio.to_thread(
            subprocess.run,
            [_NODE, "tests/node/lease.mjs", redis_server.url, NS, "node-bot", "trade", "KRW-ETH"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=scaled(30),
        )
        assert result.returncode == 0, result.stderr
        frame = json.loads(result.stdout.splitlines()[0])
        assert (frame["type"], frame["code"]) == ("trade", "KRW-ETH")
        assert "lease node-bot written" in result.stderr
        # it released its lease on the way out
        assert await redis_client.exists(f"{NS}:lease:node-bot") == 0
        assert await redis_client.zscore(f"{NS}:leases", "node-bot") is None
