"""cryptofeed's Upbit feed with its Redis backends, pointed at the simulator (benchmark 8).

Run as ``python -m benchmarks.cryptofeed_runner --port SIM --redis-port R --codes-file F``;
measured from outside (CPU and memory from ``/proc``, frames sent from the simulator's state,
frames handled from Redis's ``ZADD`` count). What the harness changes, and why (see
``shared/notes/cryptofeed.md``):

* the websocket and REST addresses point at the simulator; cryptofeed refuses any address that
  is not ``wss://``, so that one check is bypassed (the simulator speaks plain ``ws://``);
* the REST market list comes from the simulator's ``/v1/market/all``;
* with its default uvloop, ``FeedHandler.run()`` needs a current event loop set first;
* callbacks are its own ``TradeRedis``/``BookRedis`` backends (async; ``ZADD NX`` per frame).

Everything else is cryptofeed 2.4 as shipped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cryptofeed on the simulator")
    parser.add_argument("--port", type=int, required=True, help="simulator port")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--codes-file", required=True, help="Upbit codes, one per line")
    args = parser.parse_args(argv)

    from cryptofeed import FeedHandler
    from cryptofeed.backends.redis import BookRedis, TradeRedis
    from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint, WSAsyncConn
    from cryptofeed.defines import L2_BOOK, TRADES
    from cryptofeed.exchanges.upbit import Upbit

    original_init = WSAsyncConn.__init__

    def plain_ws_init(self, address, conn_id, authentication=None, subscription=None, **kw):  # type: ignore[no-untyped-def]
        # Pass the wss:// check, then keep the simulator's real ws:// address.
        wss = "wss://" + address.removeprefix("ws://")
        original_init(self, wss, conn_id, authentication, subscription, **kw)
        self.address = address

    WSAsyncConn.__init__ = plain_ws_init

    class SimUpbit(Upbit):  # type: ignore[misc]
        websocket_endpoints = [  # noqa: RUF012
            WebsocketEndpoint(f"ws://127.0.0.1:{args.port}/websocket/v1")
        ]
        rest_endpoints = [  # noqa: RUF012
            RestEndpoint(f"http://127.0.0.1:{args.port}", routes=Routes("/v1/market/all"))
        ]

    with open(args.codes_file) as f:
        codes = [line.strip() for line in f if line.strip()]
    # cryptofeed names symbols BASE-QUOTE; Upbit codes are QUOTE-BASE.
    symbols = ["{1}-{0}".format(*code.split("-")) for code in codes]
    logging.basicConfig(level=logging.WARNING)
    fh = FeedHandler(config={"log": {"filename": "/dev/null", "level": "WARNING"}})
    fh.add_feed(
        SimUpbit(
            symbols=symbols,
            channels=[TRADES, L2_BOOK],
            callbacks={
                TRADES: TradeRedis(host="127.0.0.1", port=args.redis_port),
                L2_BOOK: BookRedis(host="127.0.0.1", port=args.redis_port),
            },
        )
    )
    asyncio.set_event_loop(asyncio.new_event_loop())
    fh.run()


if __name__ == "__main__":
    main()
