"""The Upbit simulator service: a websockets server plus the market, candle and UP clocks.

Simulator layer, I/O. Lifecycle in phases (uvicorn-style): ``start()`` builds the market and
listens; ``aclose()`` stops the clocks, closes connections (1001) and waits for handlers.
Use it as ``async with Simulator(port=0, rate=500, seed=1) as sim: ... sim.url ...``.

Clocks: the market clock wakes every ``tick`` and applies ``rate * elapsed`` events (at most
ten ticks' worth at once; a CPU-bound run falls behind instead of spiralling, counted as
``events_skipped``). It starts with the first data subscription, so a seeded run is
repeatable from its first request. The candle clock pushes changed candles once per
wall-clock second; the UP clock sends ``{"status":"UP"}`` every ``up_interval`` seconds,
aligned to the wall clock, to connections that sent a text PING (one cycle however many PINGs).

Plain HTTP GETs on the same port reach :mod:`simulator.http` (operator and REST endpoints;
REST limited per client IP and group, ``rest_rate`` a second). WebSocket upgrades on
``/websocket/v1`` are limited per client IP (``connect_rate`` a second, HTTP 429 beyond).

What the market does does not depend on who listens: once started, it makes its events
whether or not anyone is subscribed, connected, stalled or muted, and every trade goes to the
code's trade log (``/v1/trades/ticks``, ``/_sim/trades``) as it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from broker.upbit.ratelimit import ClientLimiter, RateBudget
from simulator import http
from simulator.config import SimulatorConfig
from simulator.connection import WRITE_LIMIT, Peer, SimConnection
from simulator.encode import UP_FRAME, Encoder
from simulator.hub import Hub
from simulator.market import Market
from simulator.sends import SendLog
from simulator.session import Stream
from simulator.universe import Listing, build_universe

logger = logging.getLogger(__name__)

WS_PATH = "/websocket/v1"

#: The counters of ``/_sim/state`` (``totals``), besides ``connections_open``.
TOTALS = (
    "connections_opened", "requests", "errors", "rate_limited_messages", "rate_limited_connects",
    "frames_sent", "idle_drops", "operator_drops", "overflow_drops", "stalls", "events_skipped",
    "rate_limited_rest",
)  # fmt: skip


class Simulator:
    """A faithful local Upbit quotation WebSocket (see ``simulator/__init__.py``)."""

    def __init__(self, config: SimulatorConfig | None = None, **overrides: Any) -> None:
        self.config = SimulatorConfig.build(config, **overrides)
        self.seed = (
            self.config.seed if self.config.seed is not None else int.from_bytes(os.urandom(4))
        )
        self.listings: dict[str, Listing] = {
            lst.code: lst for lst in build_universe(self.config.markets, self.seed)
        }
        self.totals: Counter[str] = Counter()
        self.peers: dict[int, Peer] = {}
        self.send_log = SendLog() if self.config.record_sends else None
        self.stall_ended = 0.0
        self._market: Market | None = None
        self._hub: Hub | None = None
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._market_go = asyncio.Event()
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._stall_handle: asyncio.TimerHandle | None = None
        self._connect_budgets: dict[str, RateBudget] = {}
        self.rest_limiter = ClientLimiter(self.config.rest_rate)
        self.port = self.config.port

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the market and start listening (``port=0`` picks a free port)."""
        now_ms = time.time_ns() // 1_000_000
        self._market = Market(
            list(self.listings.values()),
            seed=self.seed,
            trade_share=self.config.trade_share,
            now_ms=now_ms,
            trade_log_size=self.config.trade_log_size,
            candle_history=self.config.candle_history,
        )
        self._hub = Hub(self._market, Encoder(self.config.exponent_numbers))
        self._server = await serve(
            self._handler,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            process_response=self._process_response,
            create_connection=SimConnection,
            compression="deflate" if self.config.compression else None,
            ping_interval=None,  # Upbit never pings; it only answers the client's pings
            close_timeout=self.config.close_timeout,
            write_limit=WRITE_LIMIT,
            max_size=self.config.max_request_bytes,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        for clock in (self._market_clock(), self._candle_clock(), self._up_clock()):
            task = asyncio.create_task(clock)
            self._tasks.add(task)
        logger.info("simulator serving %s (seed %d)", self.url, self.seed)

    async def aclose(self) -> None:
        """Stop the clocks, close every connection (1001) and wait for the handlers."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._unstall()  # held input would keep the closing handshake waiting
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- where ---------------------------------------------------------------------------------

    @property
    def _host_for_url(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"ws://{self._host_for_url}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self._host_for_url}:{self.port}"

    @property
    def market(self) -> Market:
        if self._market is None:
            raise RuntimeError("the simulator is not started")
        return self._market

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise RuntimeError("the simulator is not started")
        return self._hub

    @property
    def codes(self) -> list[str]:
        """Every code of the universe, busiest first."""
        return list(self.listings)

    # -- operator controls ---------------------------------------------------------------------

    def drop(self) -> int:
        """Cut every connection abruptly (no close frame: clients see 1006). Returns how many."""
        dropped = 0
        for peer in list(self.peers.values()):
            if not peer.ws.transport.is_closing():
                peer.abort()
                dropped += 1
        self.totals["operator_drops"] += dropped
        return dropped

    @property
    def stalled(self) -> bool:
        return self._stall_handle is not None

    def stall(self, seconds: float) -> None:
        """Freeze every connection for ``seconds``: nothing sent or read (pings unanswered)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self._stall_handle is not None:
            if until <= self._stall_handle.when():
                return
            self._stall_handle.cancel()
        self._stall_handle = loop.call_at(until, self._unstall)
        self._unstalled.clear()
        self.totals["stalls"] += 1
        for peer in self.peers.values():
            peer.ws.hold()

    def _unstall(self) -> None:
        self._stall_handle = None
        self.stall_ended = asyncio.get_running_loop().time()
        for peer in list(self.peers.values()):
            peer.ws.release()
            peer.wake.set()
        self._unstalled.set()

    async def wait_unstalled(self) -> None:
        await self._unstalled.wait()

    def mute(self, codes: Iterable[str], seconds: float) -> list[str]:
        """Silence ``codes`` (every type, snapshots too) for ``seconds``; returns the codes."""
        until = asyncio.get_running_loop().time() + seconds
        muted = []
        for code in codes:
            self.hub.muted[code] = max(self.hub.muted.get(code, 0.0), until)
            muted.append(code)
        return muted

    @property
    def sends(self) -> list[tuple[int, int]]:
        """(time_ns, frame_key) of every frame sent so far (``record_sends`` must be on)."""
        return self.send_log.entries() if self.send_log is not None else []

    def take_sends(self) -> list[tuple[int, int]]:
        """Like :attr:`sends`, and empties the log."""
        return self.send_log.entries(clear=True) if self.send_log is not None else []

    def state(self) -> dict[str, Any]:
        """Connections, subscriptions and counters (what ``GET /_sim/state`` answers)."""
        now = asyncio.get_running_loop().time()
        market = self._market
        return {
            "url": self.url,
            "seed": self.seed,
            "rate": self.config.rate,
            "codes": len(self.listings),
            "market": {
                "started": self._market_go.is_set(),
                "events": market.events if market else 0,
                "trades": market.trades if market else 0,
            },
            "stalled_for": (
                max(0.0, self._stall_handle.when() - now) if self._stall_handle else 0.0
            ),
            "muted": {
                code: round(until - now, 3)
                for code, until in (self._hub.muted.items() if self._hub else ())
                if until > now
            },
            "connections": [peer.describe() for peer in self.peers.values()],
            "totals": {"connections_open": len(self.peers), **{k: self.totals[k] for k in TOTALS}},
        }

    # -- connections ---------------------------------------------------------------------------

    def subscribed(self, peer: Peer, snapshots: tuple[Stream, ...]) -> None:
        """A data request replaced ``peer``'s set: index its streams, queue its snapshots."""
        hub = self.hub
        hub.attach(peer, peer.session.streams)
        now = asyncio.get_running_loop().time()
        for frame in hub.snapshots(peer.format, snapshots, now):
            peer.push(frame)
        if snapshots or peer.session.streams:
            self._market_go.set()

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, SimConnection)
        self._next_id += 1
        peer = Peer(self, ws, self._next_id)
        peer.opened_ms = time.time_ns() // 1_000_000
        self.peers[peer.id] = peer
        self.totals["connections_opened"] += 1
        if self.stalled:
            ws.hold()
        try:
            await peer.run()
        finally:
            self.hub.detach(peer)
            del self.peers[peer.id]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        ip = str(connection.remote_address[0]) if connection.remote_address else "?"
        if path != WS_PATH:
            return http.handle(self, request.path, ip)
        if "Upgrade" not in request.headers:
            return None  # websockets answers 426 Upgrade Required
        budget = self._connect_budget(ip)
        now = asyncio.get_running_loop().time()
        if not budget.allows(now):
            self.totals["rate_limited_connects"] += 1
            return http.too_many_requests()
        budget.record(now)
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        if response.status_code == 101 and connection.remote_address:
            budget = self._connect_budget(str(connection.remote_address[0]))
            left = budget.per_second - budget.sent_within(asyncio.get_running_loop().time(), 1.0)
            # Seen on Upbit's upgrade responses (P-KR): the quota left this second.
            response.headers["Remaining-Req"] = f"group=websocket; min=300; sec={max(0, left)}"
            response.headers["Limit-By-Ip"] = "Yes"

    def _connect_budget(self, ip: str) -> RateBudget:
        budget = self._connect_budgets.get(ip)
        if budget is None:
            rate = self.config.connect_rate
            budget = self._connect_budgets[ip] = RateBudget(rate, rate * 60)
        return budget

    # -- clocks --------------------------------------------------------------------------------

    def _wake(self) -> None:
        for sink in self.hub.take_woken():
            if isinstance(sink, Peer):
                sink.wake.set()

    async def _market_clock(self) -> None:
        await self._market_go.wait()
        loop = asyncio.get_running_loop()
        tick, rate = self.config.tick, self.config.rate
        cap = max(1, math.ceil(rate * tick * 10))
        carry = 0.0
        last = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            want = rate * (now - last) + carry
            last = now
            n = int(want)
            carry = want - n
            if n > cap:
                self.totals["events_skipped"] += n - cap
                n = cap
            events = self.market.step(n, time.time_ns() // 1_000_000)
            if self.stalled:
                for _ in events:  # the market moves on; nobody hears it
                    pass
            else:
                self.hub.publish(events, now)
                self._wake()

    @staticmethod
    async def _until_wall_boundary(period: float, after: float) -> float:
        """Sleep to the next multiple of ``period`` in wall time (plus ``after``), never early.

        Returns that multiple (wall seconds).
        """
        boundary = (math.floor(time.time() / period) + 1) * period
        while True:
            delay = boundary + after - time.time()
            if delay <= 0:
                return boundary
            await asyncio.sleep(delay)

    async def _candle_clock(self) -> None:
        await self._market_go.wait()
        loop = asyncio.get_running_loop()
        while True:
            # Distinct wall seconds: never two pushes of one (unit, code) within a second.
            boundary = await self._until_wall_boundary(1.0, 0.002)
            dirty = self.market.candle_updates(int(boundary * 1000))
            if dirty and not self.stalled:
                self.hub.publish_candles(dirty, loop.time())
                self._wake()

    async def _up_clock(self) -> None:
        while True:
            await self._until_wall_boundary(self.config.up_interval, 0.0)
            if self.stalled:
                continue
            for peer in self.peers.values():
                if peer.session.pinged and not peer.closing:
                    peer.push(UP_FRAME)
                    peer.wake.set()


__all__ = ["WS_PATH", "Simulator"]
