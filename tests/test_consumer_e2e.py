"""End to end: real broker (``run_broker``), real simulator, consumers as separate processes.

The seed scenario (A leases ticker KRW-BTC; B leases KRW-ETH and KRW-XRP; B drops KRW-XRP; A is
SIGKILLed -> after its TTL only KRW-ETH is subscribed upstream) is played twice: through
``BrokerClient`` and through ``WebSocketClientProxy``, each consumer in its own OS process, the
upstream set read from the simulator's own state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.service import Broker
from broker.testing import scaled, wait_for
from consumers import BrokerClient, Gap, StreamMessage, Ticker, WebSocketClientProxy
from simulator import Simulator
from tests.support.broker_env import fast_settings, started_broker

ROOT = Path(__file__).resolve().parents[1]
NS = "t"  # fast_settings' namespace

# A consumer process driven by stdin lines: "sub TYPE CODE..." / "unsub TYPE CODE..." ->
# prints "ok" once done; every message received prints one JSON line {"code": ..., "type": ...}.
# argv: redis_url client_id ttl mode(client|proxy)
CONSUMER = r"""
import asyncio, json, signal, sys
from consumers import BrokerClient, WebSocketClientProxy

def out(obj):
    print(json.dumps(obj), flush=True)

async def main():
    url, client_id, ttl, mode = sys.argv[1:5]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    seen = set()

    def on_message(message):  # the proxy hands the typed model
        if message.code not in seen:
            seen.add(message.code)
            out({"code": message.code, "type": message.type, "price": message.trade_price})

    if mode == "proxy":
        api = WebSocketClientProxy(client_id, redis_url=url, namespace="t", lease_ttl=float(ttl))
        await api.start()
        sub = lambda codes: api.subscribe_ticker_realtime(codes, on_message)
        unsub = api.unsubscribe_ticker
        close = api.close
    else:
        client = BrokerClient(redis_url=url, client_id=client_id, namespace="t",
                              lease_ttl=float(ttl))
        await client.start()
        sub = lambda codes: client.subscribe("ticker", codes, lambda item: on_message(item.message))
        unsub = lambda codes: client.unsubscribe("ticker", codes)
        close = client.close

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands():
        while line := await reader.readline():
            verb, *codes = line.decode().split()
            await (sub(codes) if verb == "sub" else unsub(codes))
            seen.difference_update(codes)
            out({"ok": verb})

    task = asyncio.create_task(commands())
    await stop.wait()
    task.cancel()
    await close()
    out({"bye": True})

asyncio.run(main())
"""


class ConsumerProcess:
    """One consumer process; ``command()`` sends a line and waits for its "ok"."""

    def __init__(self, redis_url: str, client_id: str, ttl: float, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, redis_url, client_id, str(ttl), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.prices: dict[str, float] = {}

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), scaled(15))
        assert line, self.proc.stderr.read().decode() if self.proc.stderr else "no output"
        return dict(json.loads(line))

    async def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        while "ok" not in (msg := await self._line()):
            self._note(msg)

    async def until_prices(self, codes: set[str]) -> None:
        """Read lines until a real ticker of every code in ``codes`` arrived."""
        while not codes <= set(self.prices):
            self._note(await self._line())

    def _note(self, msg: dict[str, Any]) -> None:
        if "code" in msg:
            assert msg["type"] == "ticker" and msg["price"] > 0
            self.prices[msg["code"]] = msg["price"]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(self.proc.communicate, timeout=scaled(10))
        assert self.proc.returncode == 0, err.decode()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def upstream(sim: Simulator) -> dict[str, set[str]] | None:
    """The broker's one upstream connection's subscriptions, as the simulator holds them."""
    conns: list[Any] = sim.state()["connections"]
    if len(conns) != 1:
        return None
    return {t: set(c) for t, c in conns[0]["subscriptions"].items() if c}


async def wait_upstream(sim: Simulator, expected: dict[str, set[str]], within: float = 10) -> None:
    await wait_for(lambda: upstream(sim) == expected, within, message=f"upstream {expected}")


@asynccontextmanager
async def system(redis_url: str, **sim_config: Any) -> AsyncIterator[tuple[Simulator, Broker]]:
    # UP frames every second keep an idle broker (nothing leased) under its stall timeout
    sim_config.setdefault("up_interval", 1.0)
    async with (
        Simulator(port=0, seed=sim_config.pop("seed", 1), **sim_config) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
    ):
        yield sim, broker


@pytest.mark.parametrize("mode", ["client", "proxy"])
async def test_seed_scenario_with_consumer_processes(
    redis_url: str, redis_client: aioredis.Redis, mode: str
) -> None:
    async with system(redis_url, rate=300) as (sim, _):
        a = ConsumerProcess(redis_url, f"a-{mode}", 1.0, mode)
        b = ConsumerProcess(redis_url, f"b-{mode}", 10.0, mode)
        try:
            await a.command("sub KRW-BTC")
            await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
            await b.command("sub KRW-ETH KRW-XRP")
            await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH", "KRW-XRP"}})
            # real frames through the broker reach each process, only for its own codes
            await asyncio.gather(
                a.until_prices({"KRW-BTC"}), b.until_prices({"KRW-ETH", "KRW-XRP"})
            )
            assert set(a.prices) == {"KRW-BTC"}

            await b.command("unsub KRW-XRP")
            await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH"}})
            subs = await redis_client.hget(f"{NS}:lease:b-{mode}", "subs")  # type: ignore[misc]
            assert json.loads(subs) == {"ticker": ["KRW-ETH"]}

            a.kill()  # no release: the broker notices when A's 1 s lease expires
            killed = time.monotonic()
            await wait_upstream(sim, {"ticker": {"KRW-ETH"}}, within=5)
            assert time.monotonic() - killed < scaled(1.0 + 2.0)
            assert await redis_client.exists(f"{NS}:lease:a-{mode}") == 0

            await b.terminate()  # clean exit: released at once
            assert await redis_client.exists(f"{NS}:lease:b-{mode}") == 0
        finally:
            a.cleanup()
            b.cleanup()


async def test_library_receives_typed_frames_snapshots_and_broker_gaps(redis_url: str) -> None:
    async with system(redis_url, rate=300) as (sim, _):
        gaps: list[Gap] = []
        async with BrokerClient(redis_url=redis_url, namespace=NS, on_gap=gaps.append) as client:
            # a snapshot of a stream nobody leases: fetched upstream by the leader
            snap = await client.snapshot("ticker", ["KRW-BTC", "KRW-ETH"], timeout=5)
            assert set(snap) == {"KRW-BTC", "KRW-ETH"}
            assert all(isinstance(t, Ticker) and t.trade_price > 0 for t in snap.values())

            await client.subscribe("ticker", ["KRW-BTC"])
            await client.subscribe("orderbook", ["KRW-ETH.5"])
            seen: dict[str, StreamMessage] = {}
            while len(seen) < 2:
                item = await client.next_message(timeout=scaled(10))
                assert isinstance(item, StreamMessage), item
                seen[item.type] = item
            assert isinstance(seen["ticker"].message, Ticker)
            assert seen["ticker"].message.code == "KRW-BTC"
            assert len(seen["orderbook"].message.orderbook_units) == 5  # type: ignore[union-attr]

            # the upstream connection breaks: the broker reconnects and publishes a gap event
            sim.drop()
            await wait_for(lambda: gaps, timeout=10, message="broker gap event")
            assert gaps[0].source == "broker" and gaps[0].reason == "reconnect"
            assert gaps[0].epoch is not None and gaps[0].epoch >= 2

            proxy = WebSocketClientProxy(redis_url=redis_url, namespace=NS)
            async with proxy:
                books = await proxy.subscribe_orderbook_snapshot(["KRW-BTC"], timeout=5)
                assert books["KRW-BTC"].code == "KRW-BTC"


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        cwd=ROOT,
        env=env,
    )


async def test_cli_against_the_real_broker(redis_url: str, redis_client: aioredis.Redis) -> None:
    async with system(redis_url, rate=300):
        tail, status, check = await asyncio.gather(
            asyncio.to_thread(
                run_cli, "tail", "ticker", "KRW-BTC", "--count", "3", "--json",
                "--redis-url", redis_url, "--namespace", NS,
            ),
            asyncio.to_thread(
                run_cli, "status", "--json", "--redis-url", redis_url, "--namespace", NS
            ),
            asyncio.to_thread(run_cli, "check", "--redis-url", redis_url, "--namespace", NS),
        )  # fmt: skip
        assert tail.returncode == 0, tail.stderr
        frames = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(frames) == 3
        assert all(f["type"] == "ticker" and f["code"] == "KRW-BTC" for f in frames)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["connected"] is True and info["leader"]
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith("ok: leader")
        assert await redis_client.zcard(f"{NS}:leases") == 0  # tail released its lease

        async with BrokerClient(redis_url=redis_url, namespace=NS) as client:
            await client.subscribe("trade", ["KRW-ETH"])
            resub = await asyncio.to_thread(
                run_cli, "resubscribe", "--json", "--redis-url", redis_url, "--namespace", NS
            )
        assert resub.returncode == 0, resub.stderr
        reply = json.loads(resub.stdout)
        assert reply["ok"] is True and reply["epoch"] >= 1
        assert "KRW-ETH" in reply["upstream"].get("trade", [])


def test_demo_runs_end_to_end_and_exits_zero() -> None:
    start = time.monotonic()
    try:
        result = run_cli("demo", "--duration", "3", timeout=40)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError((exc.output or b"")[-1500:].decode(errors="replace")) from None
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "redis: started" in out and "simulator: ws://" in out
    assert "demo finished" in out
    assert "leases" in out and "demo-board" in out
    assert time.monotonic() - start < scaled(30)
