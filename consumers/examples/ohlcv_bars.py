"""One-minute OHLCV bars from the trade stream, written as JSON lines (example).

    python -m consumers.examples.ohlcv_bars --codes KRW-BTC,KRW-ETH --output bars.jsonl
    python -m consumers.examples.ohlcv_bars --codes KRW-BTC --redis-list bars:KRW

A bar is keyed by the minute of each trade's ``trade_timestamp`` (exchange time). It is
finished when a trade of a later minute arrives for the code, or when the wall clock passes
the end of its minute by ``--grace`` seconds (a quiet market still gets its bar). Trades seen
twice (same ``sequential_id``, e.g. the snapshot sent on subscribe) count once; trades for a
minute already written are late, counted and dropped. A bar that overlaps a gap (the broker
or this consumer lost data) is written with ``"complete": false``. Bars still open at exit
are not written.

Options also come from ``UPBIT_BROKER_REDIS_URL``, ``UPBIT_BROKER_NAMESPACE``,
``OHLCV_CODES``, ``OHLCV_OUTPUT`` and ``OHLCV_REDIS_LIST``. Ctrl-C / SIGTERM exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import redis.asyncio as aioredis

from broker.redis_client import redis_client
from consumers import BrokerClient, BrokerError, Gap, StreamMessage, Trade

MINUTE_MS = 60_000


@dataclass(slots=True)
class Bar:
    code: str
    start_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0
    value: float = 0.0
    trades: int = 0
    complete: bool = True

    def add(self, price: float, volume: float) -> None:
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.close = price
        self.volume += volume
        self.value += price * volume
        self.trades += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "start": datetime.fromtimestamp(self.start_ms / 1000, UTC).isoformat(),
            "start_ms": self.start_ms,
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            "volume": round(self.volume, 12),
            "value": round(self.value, 4),
            "trades": self.trades,
            "complete": self.complete,
        }


class BarBuilder:
    """Pure bar logic: feed trades and clock ticks, collect finished bars."""

    def __init__(self, grace_ms: int = 5_000) -> None:
        self.grace_ms = grace_ms
        self.open: dict[str, Bar] = {}
        self.closed_until: dict[str, int] = {}  # code -> end of its last written minute
        self.late = 0
        self.duplicates = 0
        self._seen: dict[str, tuple[set[int], deque[int]]] = {}

    def trade(
        self, code: str, ts_ms: int, price: float, volume: float, seq: int | None = None
    ) -> list[Bar]:
        """Add one trade; returns the bars it finished."""
        if seq is not None and self._seen_before(code, seq):
            self.duplicates += 1
            return []
        start = ts_ms - ts_ms % MINUTE_MS
        if start < self.closed_until.get(code, 0):
            self.late += 1
            return []
        done: list[Bar] = []
        bar = self.open.get(code)
        if bar is not None and bar.start_ms != start:
            done.append(self._close(code))
            bar = None
        if bar is None:
            bar = self.open[code] = Bar(code, start, price, price, price, price)
        bar.add(price, volume)
        return done

    def tick(self, now_ms: int) -> list[Bar]:
        """Finish bars whose minute ended more than ``grace_ms`` ago."""
        due = [c for c, b in self.open.items() if b.start_ms + MINUTE_MS + self.grace_ms <= now_ms]
        return [self._close(code) for code in sorted(due)]

    def gap(self) -> None:
        """Data may be missing: every open bar is incomplete."""
        for bar in self.open.values():
            bar.complete = False

    def _close(self, code: str) -> Bar:
        bar = self.open.pop(code)
        self.closed_until[code] = bar.start_ms + MINUTE_MS
        return bar

    def _seen_before(self, code: str, seq: int) -> bool:
        seen, order = self._seen.setdefault(code, (set(), deque()))
        if seq in seen:
            return True
        seen.add(seq)
        order.append(seq)
        if len(order) > 1000:
            seen.discard(order.popleft())
        return False


class Sink:
    """Where finished bars go: a JSON-lines file or a Redis list."""

    def __init__(self, path: str | None, redis: aioredis.Redis | None, key: str | None) -> None:
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._redis = redis
        self._key = key
        self.written = 0

    async def write(self, bars: list[Bar]) -> None:
        if not bars:
            return
        lines = [json.dumps(b.to_json(), separators=(",", ":")) for b in bars]
        if self._file is not None:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
        if self._redis is not None and self._key is not None:
            async with asyncio.timeout(10):
                await self._redis.rpush(self._key, *lines)
        self.written += len(bars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


async def main(args: argparse.Namespace) -> int:
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    builder = BarBuilder(int(args.grace * 1000))
    # asyncio.timeout around each write (broker.redis_client says why there is no socket timeout)
    redis = redis_client(args.redis_url, name="ohlcv-bars") if args.redis_list else None
    sink = Sink(args.output, redis, args.redis_list)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with BrokerClient(redis_url=args.redis_url, namespace=args.namespace) as client:
            await client.subscribe("trade", codes)
            print(f"# building 1m bars of {', '.join(codes)} as {client.client_id}", flush=True)
            waiter = asyncio.create_task(stop.wait())
            try:
                async with asyncio.timeout(args.duration or None):
                    while not stop.is_set():
                        getter = asyncio.create_task(client.next_message(timeout=1.0))
                        await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                        if not getter.done():
                            getter.cancel()
                            break
                        item = getter.result()
                        if isinstance(item, Gap):
                            builder.gap()
                        elif isinstance(item, StreamMessage):
                            await sink.write(on_trade(builder, item))
                        await sink.write(builder.tick(time.time_ns() // 1_000_000))
            except TimeoutError:
                pass
            finally:
                waiter.cancel()
    finally:
        sink.close()
        if redis is not None:
            await redis.aclose()
    print(
        f"# wrote {sink.written} bars ({builder.late} late, {builder.duplicates} duplicate "
        f"trades; {len(builder.open)} open bars not written)",
        flush=True,
    )
    return 0


def on_trade(builder: BarBuilder, item: StreamMessage) -> list[Bar]:
    trade = item.message
    if not isinstance(trade, Trade):
        return []
    return builder.trade(
        trade.code,
        trade.trade_timestamp,
        trade.trade_price,
        trade.trade_volume,
        trade.sequential_id,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", default=env.get("OHLCV_CODES", "KRW-BTC"))
    parser.add_argument(
        "--redis-url", default=env.get("UPBIT_BROKER_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--namespace", default=env.get("UPBIT_BROKER_NAMESPACE", "upbit"))
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", default=env.get("OHLCV_OUTPUT"), help="JSON-lines file")
    out.add_argument("--redis-list", default=env.get("OHLCV_REDIS_LIST"), help="Redis list key")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds after a minute ends")
    parser.add_argument("--duration", type=float, default=0.0, help="exit after S seconds")
    args = parser.parse_args(argv)
    if not args.output and not args.redis_list:
        parser.error("one of --output or --redis-list is required")
    return args


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (ValueError, BrokerError, OSError) as exc:  # a bad code, Redis unreachable ...
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ValueError) else 1)
