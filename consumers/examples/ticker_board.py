"""A ticker board: the latest price of each code, printed as it changes (example).

    python -m consumers.examples.ticker_board --codes KRW-BTC,KRW-ETH \
        --redis-url redis://127.0.0.1:6379/0

Options also come from ``UPBIT_BROKER_REDIS_URL``, ``UPBIT_BROKER_NAMESPACE`` and
``TICKER_BOARD_CODES``. Ctrl-C or SIGTERM leaves cleanly: the lease is released at once.
Uses only the public API of ``consumers``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from consumers import BrokerClient, BrokerError, Gap, StreamMessage, Ticker


class Board:
    """The latest ticker per code and one printed line per change (at most ``every`` s)."""

    def __init__(self, codes: list[str], every: float = 0.0) -> None:
        self.codes = codes
        self.every = every
        self.latest: dict[str, Ticker] = {}
        self._last_print = 0.0

    def on_ticker(self, item: StreamMessage) -> None:
        ticker = item.message
        if not isinstance(ticker, Ticker):
            return
        self.latest[item.code] = ticker
        now = time.monotonic()
        if now - self._last_print >= self.every:
            self._last_print = now
            print(self.line(), flush=True)

    def on_gap(self, gap: Gap) -> None:
        print(f"# gap: {gap.reason} ({gap.source}); prices may have skipped", flush=True)

    def line(self) -> str:
        cells = []
        for code in self.codes:
            t = self.latest.get(code)
            if t is None:
                cells.append(f"{code} -")
            else:
                price = f"{t.trade_price:,.8f}".rstrip("0").rstrip(".")
                cells.append(f"{code} {price} ({t.signed_change_rate * 100:+.2f}%)")
        return time.strftime("%H:%M:%S ") + " | ".join(cells)


async def main(args: argparse.Namespace) -> int:
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    board = Board(codes, args.every)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with BrokerClient(
        redis_url=args.redis_url, namespace=args.namespace, on_gap=board.on_gap
    ) as client:
        await client.subscribe("ticker", codes, board.on_ticker)
        print(f"# watching {', '.join(codes)} as {client.client_id}", flush=True)
        try:
            async with asyncio.timeout(args.duration or None):
                await stop.wait()
        except TimeoutError:
            pass
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", default=env.get("TICKER_BOARD_CODES", "KRW-BTC,KRW-ETH"))
    parser.add_argument(
        "--redis-url", default=env.get("UPBIT_BROKER_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--namespace", default=env.get("UPBIT_BROKER_NAMESPACE", "upbit"))
    parser.add_argument("--every", type=float, default=0.0, help="print at most every S seconds")
    parser.add_argument("--duration", type=float, default=0.0, help="exit after S seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (ValueError, BrokerError, OSError) as exc:  # a bad code, Redis unreachable ...
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ValueError) else 1)
