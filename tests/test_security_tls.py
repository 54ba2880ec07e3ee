"""TLS to Redis (``rediss://``): broker, consumers and CLI against a TLS-only redis-server.

A throwaway CA signs the server's certificate (:mod:`tests.support.tls`); clients trust it
through redis-py's URL option ``?ssl_ca_certs=...``. The server has no plaintext port, so a
working broker proves every one of its connections (commands, pub/sub, and the raw-RESP
publisher) speaks TLS. A client that does not trust the CA, or speaks plaintext to the TLS
port, fails with one line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from broker.testing import RedisServer as AuthRedis
from broker.testing import arun_cli, broker_process, consumer_process, wait_for
from broker.testing import read_status as redis_status
from tests.support.processes import sim_upstream
from tests.support.sim import running_simulator
from tests.support.tls import make_certificates, redis_tls_unsupported

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        redis_tls_unsupported() is not None, reason=f"no TLS: {redis_tls_unsupported()}"
    ),
]

PASSWORD = "tls-Secret-9f3a"


@pytest_asyncio.fixture
async def tls_redis(tmp_path: Any) -> AsyncIterator[AuthRedis]:
    files = make_certificates(tmp_path / "certs")
    server = AuthRedis(("--requirepass", PASSWORD), tls=(files.cert, files.key, files.ca))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.stop()


async def test_broker_consumer_and_cli_over_tls(tls_redis: AuthRedis, tmp_path: Any) -> None:
    url = tls_redis.url_for(password=PASSWORD)
    subs = {"trade": ["KRW-BTC"], "ticker": ["KRW-ETH"]}
    client = aioredis.Redis.from_url(url)
    try:
        async with (
            running_simulator(seed=101, rate=200) as sim,
            broker_process(url, sim.url, "tls-b", tmp_path) as broker,
            consumer_process(
                url, "tls-c", subs, tmp_path, snapshot=["ticker", ["KRW-ETH"]]
            ) as consumer,
        ):
            expected = {t: set(c) for t, c in subs.items()}
            await wait_for(lambda: sim_upstream(sim) == expected, 20, message="union over TLS")
            await wait_for(lambda: len(consumer.messages()) >= 5, 10, message="frames over TLS")
            await wait_for(
                lambda: any(r["k"] == "snapshot" for r in consumer.records()), 10, message="snap"
            )
            status = await redis_status(client)
            cli = {
                "status": await arun_cli(
                    "status", "--json", "--redis-url", url, "--namespace", "t"
                ),
                "check": await arun_cli("check", "--redis-url", url, "--namespace", "t"),
                "leases": await arun_cli(
                    "leases", "--json", "--redis-url", url, "--namespace", "t"
                ),
                "snapshot": await arun_cli(
                    "snapshot", "trade", "KRW-BTC", "--json", "--redis-url", url, "--namespace", "t"
                ),
                "tail": await arun_cli(
                    "tail",
                    "trade",
                    "KRW-BTC",
                    "--count",
                    "2",
                    "--json",
                    "--duration",
                    "10",
                    "--redis-url",
                    url,
                    "--namespace",
                    "t",
                ),
                "resubscribe": await arun_cli(
                    "resubscribe", "--json", "--redis-url", url, "--namespace", "t"
                ),
            }
            assert broker.alive
            status = await redis_status(client)
            info = await client.info("server")
    finally:
        await client.aclose()
    print(
        f"\n[figures] TLS: redis {info['redis_version']} tls-port only, broker publishes="
        f"{status['frames_published']}, consumer_frames={len(consumer.messages())}, "
        f"cli={ {name: r.code for name, r in cli.items()} }"
    )
    for name, result in cli.items():
        assert result.code == 0, (name, result.stderr)
    assert json.loads(cli["status"].stdout)["leader"] == "tls-b"
    assert len(cli["tail"].stdout.splitlines()) == 2
    assert "KRW-BTC" in json.loads(cli["snapshot"].stdout)
    assert PASSWORD not in "".join(r.output for r in cli.values()) + broker.output()


async def test_tls_misconfigurations_fail_in_one_line(tls_redis: AuthRedis) -> None:
    plain = f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    untrusted = f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    results = {
        "plaintext-to-tls/status": await arun_cli("status", "--redis-url", plain, timeout=30),
        "untrusted-ca/status": await arun_cli("status", "--redis-url", untrusted),
        "untrusted-ca/tail": await arun_cli(
            "tail", "ticker", "KRW-BTC", "--redis-url", untrusted, "--duration", "2"
        ),
    }
    print("\n[figures] TLS misconfigurations:")
    for name, r in results.items():
        print(f"  {name:<26} exit={r.code} {r.stderr.strip()[:120]}")
    for name, r in results.items():
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.code != 0, name
        assert len(lines) == 1 and "Traceback" not in r.output, (name, r.stderr)
        assert PASSWORD not in r.output, name
    assert "certificate" in results["untrusted-ca/status"].stderr.lower()
