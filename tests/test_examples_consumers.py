"""The consumer examples: the bar logic, and both examples run as processes against Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from broker.testing import scaled, wait_for
from consumers.examples.ohlcv_bars import MINUTE_MS, BarBuilder

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z, a minute boundary


def trade_frame(code: str, ts_ms: int, price: float, volume: float, seq: int) -> bytes:
    return json.dumps(
        {
            "type": "trade",
            "code": code,
            "timestamp": ts_ms + 5,
            "trade_date": "2024-01-01",
            "trade_time": "00:00:00",
            "trade_timestamp": ts_ms,
            "trade_price": price,
            "trade_volume": volume,
            "ask_bid": "BID",
            "prev_closing_price": 100.0,
            "change": "RISE",
            "change_price": 1.0,
            "sequential_id": seq,
            "stream_type": "REALTIME",
        },
        separators=(",", ":"),
    ).encode()


def ticker_frame(code: str, price: float) -> bytes:
    path = ROOT / "tests" / "data" / "upbit_examples" / "ticker.default.json"
    frame = json.loads(path.read_text()) if path.exists() else {}
    frame.update({"code": code, "trade_price": price})
    return json.dumps(frame).encode()


def test_bar_builder() -> None:
    b = BarBuilder(grace_ms=2_000)
    assert b.trade("KRW-BTC", T0 + 1_000, 100, 1, seq=1) == []
    assert b.trade("KRW-BTC", T0 + 2_000, 105, 2, seq=2) == []
    assert b.trade("KRW-BTC", T0 + 2_000, 105, 2, seq=2) == []  # the same trade twice
    assert b.trade("KRW-BTC", T0 + 59_999, 95, 1, seq=3) == []
    assert b.trade("KRW-ETH", T0 + 10_000, 10, 1, seq=1) == []
    [bar] = b.trade("KRW-BTC", T0 + MINUTE_MS, 99, 1, seq=4)
    assert (bar.code, bar.start_ms, bar.open, bar.high, bar.low, bar.close) == (
        "KRW-BTC",
        T0,
        100,
        105,
        95,
        95,
    )
    assert bar.volume == 4 and bar.trades == 3 and bar.complete
    assert bar.to_json()["start"] == "2024-01-01T00:00:00+00:00"
    assert b.duplicates == 1
    assert b.trade("KRW-BTC", T0 + 30_000, 1, 1, seq=5) == []  # late for a written minute
    assert b.late == 1
    b.gap()
    # the wall clock finishes quiet bars after the grace period
    assert b.tick(T0 + MINUTE_MS + 1_999) == []
    [eth] = b.tick(T0 + MINUTE_MS + 2_000)
    assert eth.code == "KRW-ETH" and not eth.complete
    [btc] = b.tick(T0 + 2 * MINUTE_MS + 2_000)
    assert btc.start_ms == T0 + MINUTE_MS and not btc.complete


def spawn(module: str, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPBIT_BROKER_", "OHLCV_"))}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def stop(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(proc.communicate, timeout=scaled(10))
    assert proc.returncode == 0, err.decode()
    return out, err


async def leases(redis: aioredis.Redis) -> list[bytes]:
    return list(await redis.zrange("upbit:leases", 0, -1))


async def test_ohlcv_bars_to_file_and_redis_list(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    output = tmp_path / "bars.jsonl"
    to_file = spawn(
        "consumers.examples.ohlcv_bars",
        "--codes", "KRW-BTC,KRW-ETH", "--redis-url", redis_url, "--output", str(output),
        "--grace", "1e9",
    )  # fmt: skip
    to_list = spawn(
        "consumers.examples.ohlcv_bars",
        "--codes", "KRW-BTC", "--redis-url", redis_url, "--redis-list", "bars:KRW",
    )  # fmt: skip
    try:
        await wait_for(lambda: len_of(redis_client), timeout=10, message="both leases")
        trades = [
            ("KRW-BTC", T0 + 1_000, 100.0, 1.0, 1),
            ("KRW-BTC", T0 + 30_000, 110.0, 0.5, 2),
            ("KRW-ETH", T0 + 40_000, 5.0, 3.0, 1),
            ("KRW-BTC", T0 + 59_000, 90.0, 0.5, 3),
            ("KRW-BTC", T0 + MINUTE_MS + 1, 95.0, 1.0, 4),  # finishes BTC's first minute
        ]
        for code, ts, price, volume, seq in trades:
            await redis_client.publish(
                f"upbit:trade:{code}", trade_frame(code, ts, price, volume, seq)
            )
        await wait_for(lambda: output.exists() and output.read_text(), message="a bar in file")
        [line] = output.read_text().splitlines()
        bar = json.loads(line)
        assert bar == {
            "code": "KRW-BTC",
            "start": "2024-01-01T00:00:00+00:00",
            "start_ms": T0,
            "open": 100.0,
            "high": 110.0,
            "low": 90.0,
            "close": 90.0,
            "volume": 2.0,
            "value": 100.0 + 55.0 + 45.0,
            "trades": 3,
            "complete": True,
        }

        # with the default grace (5 s) the wall clock finishes these 2024 minutes at once:
        # the first bar holds only the first trade (the next two come late) and the clock
        # finishes the second minute too
        async def two_bars() -> bool:
            return await redis_client.llen("bars:KRW") >= 2  # type: ignore[misc]

        await wait_for(two_bars, message="bars in the redis list")
        listed = [json.loads(x) for x in await redis_client.lrange("bars:KRW", 0, -1)]  # type: ignore[misc]
        assert [(b["start_ms"], b["trades"]) for b in listed] == [(T0, 1), (T0 + MINUTE_MS, 1)]
        out_file, _ = await stop(to_file)
        out_list, _ = await stop(to_list)
    finally:
        for proc in (to_file, to_list):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert b"wrote 1 bars" in out_file and b"open bars not written" in out_file
    assert b"wrote 2 bars" in out_list
    assert await leases(redis_client) == []


async def len_of(redis: aioredis.Redis) -> bool:
    return len(await leases(redis)) == 2


async def test_ticker_board_prints_prices_and_exits_cleanly(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    proc = spawn(
        "consumers.examples.ticker_board", "--codes", "KRW-BTC,KRW-ETH", "--redis-url", redis_url
    )
    try:
        assert proc.stdout is not None
        header = await asyncio.to_thread(proc.stdout.readline)
        assert header.startswith(b"# watching KRW-BTC, KRW-ETH")
        await redis_client.publish("upbit:ticker:KRW-ETH", ticker_frame("KRW-ETH", 4321.5))
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"KRW-BTC -" in line and b"KRW-ETH 4,321.5 (+1.27%)" in line
        await stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert await leases(redis_client) == []


def test_examples_report_bad_input_in_one_line(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumers.examples.ticker_board", "--codes", "btc",
         "--redis-url", redis_url],
        capture_output=True, text=True, cwd=ROOT, timeout=scaled(20),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "error: invalid market code 'btc' (expected e.g. 'KRW-BTC')"
