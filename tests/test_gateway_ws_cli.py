"""``upbit-broker gateway`` as a real process: serving, wss://, SIGTERM (clients closed with
1001, leases released), SIGKILL (leases expire within their TTL + 1 s), flags and errors."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from broker.leases import LeaseStore
from broker.testing import (
    ManagedProcess,
    arun_cli,
    broker_process,
    clean_env,
    read_status,
    scaled,
    wait_for,
)
from broker.testing.processes import CLI, spawn
from simulator import Simulator
from tests.support.sim import client, read_until, running_simulator, subscribe
from tests.support.tls import make_certificates

NS = "t"
TTL = 2.0


class GatewayProcess(ManagedProcess):
    url: str = ""


@asynccontextmanager
async def gateway_process(
    redis_url: str, tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> AsyncIterator[GatewayProcess]:
    """``upbit-broker gateway --port 0 ...``, serving once this yields."""
    log = tmp_path / f"gateway-{time.monotonic_ns()}.log"
    environment = clean_env(
        UPBIT_BROKER_REDIS_URL=redis_url,  # the broker's variables, as documented
        UPBIT_BROKER_NAMESPACE=NS,
        UPBIT_GATEWAY_LEASE_TTL=str(TTL),
        **(env or {}),
    )
    proc = spawn([*CLI, "gateway", "--port", "0", *flags], log, environment)
    handle = GatewayProcess(proc, "gateway", log)

    def serving() -> str:
        if not handle.alive:
            raise RuntimeError(f"gateway exited: {handle.output()}")
        for line in handle.output().splitlines():
            if line.startswith("serving "):
                return line.split()[1]
        return ""

    try:
        handle.url = await wait_for(serving, 20, message="gateway serving")
        yield handle
    finally:
        await handle.stop()


@asynccontextmanager
async def upstream(redis_url: str, tmp_path: Path) -> AsyncIterator[Simulator]:
    async with (
        running_simulator(rate=300, seed=5) as sim,
        broker_process(redis_url, sim.url, "b1", tmp_path),
    ):
        redis = aioredis.Redis.from_url(redis_url)
        try:

            async def leading() -> bool:
                return bool((await read_status(redis, NS)).get("leader"))

            await wait_for(leading, 20, message="a broker leading")
        finally:
            await redis.aclose()
        yield sim


def streams_upstream(sim: Simulator) -> set[str]:
    """Every ``type:code`` any simulator connection holds."""
    return {
        f"{t}:{c}"
        for conn in sim.state()["connections"]
        for t, codes in conn["subscriptions"].items()
        for c in codes
    }


async def test_sigterm_closes_clients_and_releases_their_leases(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    store = LeaseStore(redis_client, NS)
    async with (
        upstream(redis_url, tmp_path) as sim,
        gateway_process(redis_url, tmp_path, "--gateway-id", "gwcli") as gw,
    ):
        async with client(gw.url) as ws:
            await subscribe(ws, {"type": "ticker", "codes": ["KRW-BTC"]}, fmt="SIMPLE")
            frames = await read_until(ws, lambda f: len(f) >= 3, within=20)
            assert [f["st"] for f in frames[:2]] == ["SNAPSHOT", "REALTIME"]
            lease = await store.read("gwcli.1")
            assert lease is not None and lease.subscriptions.by_type() == {"ticker": ["KRW-BTC"]}
            assert lease.host == "{}:{}".format(*ws.local_address)
            gw.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(scaled(15)):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1001  # going away
        assert await asyncio.to_thread(gw.proc.wait, scaled(15)) == 0
        assert await store.read("gwcli.1") is None  # released, not left to expire
        await wait_for(lambda: not streams_upstream(sim), TTL + 1, message="union empty")
        assert "lease(s) released" in gw.output()


async def test_a_killed_gateway_lets_its_leases_expire(redis_url: str, tmp_path: Path) -> None:
    async with (
        upstream(redis_url, tmp_path) as sim,
        gateway_process(redis_url, tmp_path, env={"UPBIT_GATEWAY_GATEWAY_ID": "gwkill"}) as gw,
        client(gw.url + "/") as ws,
    ):
        await subscribe(
            ws, {"type": "trade", "codes": ["KRW-BTC"]}, {"type": "ticker", "codes": ["KRW-ETH"]}
        )
        await read_until(ws, lambda f: len(f) >= 2, within=20)
        assert streams_upstream(sim) == {"trade:KRW-BTC", "ticker:KRW-ETH"}
        gw.kill()
        await wait_for(lambda: not streams_upstream(sim), TTL + 1, message="leases expired")


async def test_wss_with_a_certificate(redis_url: str, tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "tls")
    async with (
        upstream(redis_url, tmp_path),
        gateway_process(
            redis_url, tmp_path, "--tls-cert", str(files.cert), "--tls-key", str(files.key)
        ) as gw,
    ):
        assert gw.url.startswith("wss://")
        context = ssl.create_default_context(cafile=str(files.ca))
        async with client(gw.url, ssl=context) as ws:
            await subscribe(ws, {"type": "orderbook", "codes": ["KRW-BTC.1"]})
            frames = await read_until(ws, lambda f: len(f) >= 2, within=20)
            assert len(frames[0]["orderbook_units"]) == 1


async def test_help_shows_every_flag_with_its_variable_and_default() -> None:
    result = await arun_cli("gateway", "--help", env={"COLUMNS": "200"})
    assert result.code == 0
    for flag, variable in [
        ("--host", "UPBIT_GATEWAY_HOST"),
        ("--port", "UPBIT_GATEWAY_PORT"),
        ("--redis-url", "UPBIT_BROKER_REDIS_URL"),
        ("--namespace", "UPBIT_BROKER_NAMESPACE"),
        ("--tls-cert", "UPBIT_GATEWAY_TLS_CERT"),
        ("--tls-key", "UPBIT_GATEWAY_TLS_KEY"),
        ("--emulate-limits", "UPBIT_GATEWAY_EMULATE_LIMITS"),
        ("--on-gap", "UPBIT_GATEWAY_ON_GAP"),
        ("--gateway-id", "UPBIT_GATEWAY_GATEWAY_ID"),
        ("--upstream-rest-url", "UPBIT_GATEWAY_UPSTREAM_REST_URL"),
    ]:
        assert flag in result.stdout and variable in result.stdout, flag
    assert "default: 8080" in result.stdout and "default: snapshot" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "code", "says"),
    [
        (["--on-gap", "retry"], {}, 2, "--on-gap must be one of snapshot, close"),
        (["--port", "70000"], {}, 2, "--port"),
        (["--tls-cert", "x.pem"], {}, 2, "tls_cert and tls_key go together"),
        ([], {"UPBIT_GATEWAY_LEASE_TTL": "nan"}, 2, "UPBIT_GATEWAY_LEASE_TTL"),
        (["--redis-url", "redis://127.0.0.1:1/0"], {}, 1, "cannot reach redis"),
    ],
)
async def test_errors_are_one_line(
    args: list[str], env: dict[str, str], code: int, says: str
) -> None:
    result = await arun_cli("gateway", "--port", "0", *args, env=env)
    assert result.code == code, result.output
    assert says in result.stderr
    assert "Traceback" not in result.output
