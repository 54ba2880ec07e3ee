"""The gateway service: Upbit's WebSocket (and REST) on the outside, leases on the inside (I/O).

Lifecycle in phases (uvicorn-style, as the simulator's): :meth:`Gateway.start` reaches Redis,
opens the one pub/sub connection, reads who leads, and listens; :meth:`Gateway.aclose` stops
listening, closes every client (1001, going away) and releases their leases in one round, then
stops its tasks. ``async with Gateway(settings) as gw: ... gw.url ...`` in tests;
``upbit-broker gateway`` runs :meth:`Gateway.serve` until SIGTERM or Ctrl-C.

One websockets server answers both sides on one port. ``/websocket/v1`` (and
``/websocket/v1/``) upgrade to a client connection (:mod:`gateway.connection`); any other path
is plain HTTP, handed to ``gateway.http.process_request(gateway, connection, request)`` (the
REST side: Upbit's quotation paths) when that module exists, else answered 404 in Upbit's
error shape. What it may use of this object: :attr:`Gateway.settings`, :attr:`Gateway.redis`
(a ``redis.asyncio`` client), :attr:`Gateway.keys`, :attr:`Gateway.leases` (the namespace's
:class:`~broker.leases.LeaseStore`).

Process-wide clocks, one task each: the lease batch writer (:mod:`gateway.leases`), the UP
clock (``{"status":"UP"}`` every ``up_interval`` seconds, aligned to the wall clock as Upbit's,
to clients that sent a text ``PING``), and the idle watch (a client that neither sent nor
received anything for ``idle_timeout`` seconds is dropped without a close frame, as Upbit
drops it: the client sees 1006; protocol pings from the client count as traffic and are
answered by websockets, so any client that keeps Upbit's connection alive keeps this one).

Gaps (``{ns}:events``): a gap the leader announces means frames of every stream may be
missing. ``on_gap = "snapshot"`` (the default) makes each stream's next frame, for each
client, a SNAPSHOT again: after a reconnect that is the new upstream connection's own SNAPSHOT,
so tickers and orderbooks are whole again without the client doing anything, and without a
thousand clients reconnecting at once; the trades lost stay lost either way (a reconnect to
Upbit would not bring them back either). A stream asked ``is_only_realtime`` (pyupbit's and
cryptofeed's way) gets no SNAPSHOT then either, as Upbit never sends it one: it goes on with
REALTIME frames. ``on_gap = "close"`` closes every client with 1012
instead, for bots whose library should notice and resynchronise itself. The gateway's own
pub/sub connection breaking counts the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import importlib
import logging
import math
import os
import ssl
import time
from collections import Counter
from types import ModuleType, TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import msgspec
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from broker.contract import ContractError, GapEvent, LeaderEvent, LeaseEvent, decode_event
from broker.errors import describe
from broker.event_gate import EventGate, Verdict
from broker.keys import keys_for
from broker.leases import LeaseStore
from broker.redis_client import redis_client
from broker.settings import redact_url
from broker.upbit.codes import is_valid_code
from broker.upbit.ratelimit import RateBudget
from broker.upbit.session import UP_FRAME, AnyLevelMarket
from consumers.subscriber import Break
from gateway.config import GatewaySettings
from gateway.connection import GAP_CLOSE, WRITE_LIMIT, Client, GatewayConnection
from gateway.frames import binary_frame
from gateway.hub import Hub
from gateway.leases import LeaseBatcher
from gateway.snapshots import SnapshotFetcher

logger = logging.getLogger(__name__)

#: the WebSocket paths (Upbit's, with and without the trailing slash some clients add)
WS_PATHS = frozenset({"/websocket/v1", "/websocket/v1/"})
#: how long starting may wait for Redis
START_TIMEOUT = 10.0
#: Upbit's connect limit, per client IP (only with ``emulate_limits``)
CONNECT_RATE = 5
#: how often idle clients are looked for
IDLE_CHECK = 1.0

_UP = binary_frame(UP_FRAME)
_encoder = msgspec.json.Encoder()


def json_response(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON answer in Upbit's style (``{"error": {"name": ..., "message": ...}}`` bodies)."""
    data = _encoder.encode(body)
    return Response(
        status,
        http.HTTPStatus(status).phrase,
        Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Content-Length", str(len(data))),
                ("Content-Type", "application/json; charset=utf-8"),
                *headers,
            ]
        ),
        data,
    )


NOT_FOUND_BODY = {"error": {"name": 404, "message": "Code not found"}}


def _http_module() -> ModuleType | None:
    """``gateway.http`` (the REST side) when it exists."""
    try:
        return importlib.import_module("gateway.http")
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.http":
            raise  # the module exists and something it imports does not: a real error
        return None


class Gateway:
    """An Upbit-compatible server whose every client connection is a lease on the broker."""

    def __init__(self, settings: GatewaySettings | None = None, **overrides: Any) -> None:
        base = settings or GatewaySettings()
        self.settings = base.with_(**overrides) if overrides else base
        s = self.settings
        self.keys = keys_for(s.namespace, s.redis_url)
        # commands are bounded by their callers (broker.redis_client says why)
        self.redis = redis_client(s.redis_url, name=f"upbit-gateway-{s.gateway_id}")
        self.leases = LeaseStore(self.redis, s.namespace)
        self.lease_batcher = LeaseBatcher(self.leases, ttl=s.lease_ttl, pid=os.getpid())
        self.fetcher = SnapshotFetcher(self.redis, self.keys)
        #: Upbit ignores unknown codes silently; the gateway cannot know Upbit's list, so it
        #: takes every well-formed code (the broker refuses the unknown ones in the lease)
        self.market = AnyLevelMarket(None, is_valid_code)
        self.hub = Hub(
            s.redis_url,
            self.keys,
            name=f"upbit-gateway-pubsub-{s.gateway_id}",
            fetch=self.fetcher,
            on_event=self._on_event,
            on_restored=self._on_restored,
        )
        #: which gap events to believe: the leader's only (design.md "Who may publish events")
        self.gate = EventGate()
        self.clients: dict[str, Client] = {}
        self.stats: Counter[str] = Counter()
        self.port = s.port
        self._next = 0
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._http = _http_module()
        self._connect_budgets: dict[str, RateBudget] = {}
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach Redis, open the pub/sub connection, listen (``port=0``: a free port).

        Raises:
            RedisError, OSError, TimeoutError: Redis cannot be reached; OSError: cannot listen.
        """
        s = self.settings
        self._started = True
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"cannot reach redis at {redact_url(s.redis_url)}: {describe(exc, with_type=False)}"
            ) from exc
        await self.hub.start(START_TIMEOUT)
        await self._read_leader()
        self._spawn(self.lease_batcher.run(), "gateway-leases")
        self._spawn(self._up_clock(), "gateway-up")
        if s.idle_timeout:
            self._spawn(self._idle_watch(), "gateway-idle")
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            process_request=self._process_request,
            process_response=self._process_response,
            create_connection=GatewayConnection,
            # no permessage-deflate: compressing is per client and per frame, while a frame
            # is converted once for every client of a variant (Upbit never forces it either)
            compression=None,
            ping_interval=None,  # Upbit never pings; it answers the client's pings
            close_timeout=5,
            write_limit=WRITE_LIMIT,
            max_size=2**20,
            ssl=self._ssl_context(),
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info(
            "gateway %s serving %s (redis %s, namespace %s)",
            s.gateway_id,
            self.url,
            redact_url(s.redis_url),
            s.namespace,
        )

    async def aclose(self) -> None:
        """Stop listening, close every client (1001), release the leases, stop the tasks."""
        if not self._started:
            return
        self._started = False
        if self._server is not None:
            self._server.close()  # closes every connection with 1001 (going away)
            try:
                async with asyncio.timeout(10):
                    await self._server.wait_closed()
            except TimeoutError:
                # a client that stopped reading never lets its close frame out: cut it
                for client in list(self.clients.values()):
                    client.ws.transport.abort()
            self._server = None
        for client in list(self.clients.values()):
            client.leave()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        try:
            released = await self.lease_batcher.release_all()
            logger.info(
                "gateway %s stopped: %d lease(s) released", self.settings.gateway_id, released
            )
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("leases not released (%s): they expire by TTL", describe(exc))
        closer = getattr(self._http, "aclose", None)
        if closer is not None:  # the REST side's own resources (its lease, its HTTP client)
            try:
                await closer(self)
            except Exception as exc:
                logger.warning("rest side did not close cleanly: %s", describe(exc))
        await self.hub.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then close."""
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.aclose()

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.tls else "ws"
        return f"{scheme}://{self._host()}:{self.port}/websocket/v1"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{self._host()}:{self.port}"

    def _host(self) -> str:
        host = self.settings.host
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    def state(self) -> dict[str, Any]:
        """Clients, channels and counters."""
        return {
            "gateway_id": self.settings.gateway_id,
            "clients": [c.describe() for c in self.clients.values()],
            "channels": sorted(n.decode() for n in self.hub.channels),
            "pubsub_live": self.hub.live,
            "leases": len(self.lease_batcher),
            "totals": {
                **dict(self.stats),
                "frames_in": self.hub.frames_in,
                "frames_out": self.hub.frames_out,
                "variants": self.hub.variants,
                "lease_writes": self.lease_batcher.writes,
                "lease_releases": self.lease_batcher.releases,
                "snapshot_requests": self.fetcher.requests,
            },
        }

    # -- connections ----------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, GatewayConnection)
        self._next += 1
        client = Client(self, ws, self._next)
        self.clients[client.id] = client
        self.stats["connections_opened"] += 1
        try:
            await client.run()
        finally:
            self.clients.pop(client.id, None)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path not in WS_PATHS:
            if self._http is not None:
                response: Response | None = await self._http.process_request(
                    self, connection, request
                )
                return response
            return json_response(404, NOT_FOUND_BODY)
        if "Upgrade" not in request.headers:
            return None  # websockets answers 426 Upgrade Required
        if len(self.clients) >= self.settings.max_clients:
            self.stats["refused_connections"] += 1
            body = {"error": {"name": 503, "message": "Too many connections to this gateway."}}
            return json_response(503, body)
        if self.settings.emulate_limits:
            budget = self._connect_budget(connection)
            now = asyncio.get_running_loop().time()
            if not budget.allows(now):
                self.stats["rate_limited_connects"] += 1
                body = {
                    "error": {
                        "name": "Too Many Requests",
                        "message": "Too many connection requests.",
                    }
                }
                return json_response(429, body)
            budget.record(now)
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        if response.status_code == 101 and self.settings.emulate_limits:
            budget = self._connect_budget(connection)
            left = budget.per_second - budget.sent_within(asyncio.get_running_loop().time(), 1.0)
            # Seen on Upbit's upgrade responses (P-KR): the quota left this second.
            response.headers["Remaining-Req"] = f"group=websocket; min=300; sec={max(0, left)}"
            response.headers["Limit-By-Ip"] = "Yes"

    def _connect_budget(self, connection: ServerConnection) -> RateBudget:
        remote = connection.remote_address
        ip = str(remote[0]) if remote else "?"
        budget = self._connect_budgets.get(ip)
        if budget is None:
            if len(self._connect_budgets) > 10_000:
                self._connect_budgets.clear()  # bounded: a budget is only a second's memory
            budget = self._connect_budgets[ip] = RateBudget(CONNECT_RATE, CONNECT_RATE * 60)
        return budget

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # as Upbit: TLS 1.2+
        context.load_cert_chain(s.tls_cert, s.tls_key)
        return context

    # -- events and gaps ------------------------------------------------------------------------

    def _on_event(self, data: bytes) -> None:
        """A message of ``{ns}:events``, in order with the frames (the hub's burst)."""
        try:
            event = decode_event(data)
        except ContractError:
            return
        if isinstance(event, LeaderEvent):
            self._spawn(self._read_leader(), "gateway-leader")
        elif isinstance(event, LeaseEvent):
            if event.client_id in self.clients:
                logger.info("lease of client %s is %s: %s", event.client_id, event.state, event.why)
        elif isinstance(event, GapEvent) and not isinstance(event.state, str):
            # (a gap's follow-up, with its back-fill's ``state``, reports no new loss)
            verdict, _ = self.gate.judge(event)
            if verdict is Verdict.ACCEPT:
                self._gap(event)
            elif verdict is Verdict.CHECK:
                self._spawn(self._check_gap(event), "gateway-gap")

    async def _check_gap(self, event: GapEvent) -> None:
        await self._read_leader()
        verdict, why = self.gate.settle(event)
        if verdict is Verdict.ACCEPT:
            self._gap(event)
        else:
            logger.warning("ignored a gap event from %r, not the leader's: %s", event.broker, why)

    def _gap(self, event: GapEvent) -> None:
        self.stats["gaps"] += 1
        logger.info(
            "broker gap (%s, epoch %s): %s",
            event.reason,
            event.epoch,
            "closing clients" if self.settings.on_gap == "close" else "re-sending snapshots",
        )
        self._lost(f"broker gap ({event.reason})", ask_broker=False)

    def _on_restored(self, incident: Break) -> None:
        self.gate.reconnected()
        self._spawn(self._read_leader(), "gateway-leader")
        # upstream did not break: the broker's cache is current, so it may answer snapshots
        self._lost(f"gateway lost its redis subscription ({incident.reason})", ask_broker=True)

    def _lost(self, why: str, *, ask_broker: bool) -> None:
        """Frames of every stream may be missing: apply ``on_gap`` to every client."""
        if self.settings.on_gap == "close":
            for client in list(self.clients.values()):
                if client.streams:
                    client.cut(GAP_CLOSE, why)
            return
        # The gap event precedes the new upstream connection's SNAPSHOT frames: each stream's
        # next frame is fresh, what this process held before is not (hence no broker fetch)
        self.hub.await_all()
        if ask_broker:
            self.hub.request_snapshots(list(self.hub.channels.values()))

    async def _read_leader(self) -> None:
        try:
            async with asyncio.timeout(5):
                leader = await self.redis.hget(self.keys.status, "leader")
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("status not read: %s", describe(exc))
            return
        text = leader.decode("utf-8", "replace") if isinstance(leader, bytes) else leader
        self.gate.status_read(text)

    # -- clocks ---------------------------------------------------------------------------------

    async def _up_clock(self) -> None:
        period = self.settings.up_interval
        while True:
            # aligned to the wall clock, as Upbit's 10-s ticks are
            boundary = (math.floor(time.time() / period) + 1) * period
            await asyncio.sleep(max(0.0, boundary - time.time()))
            for client in list(self.clients.values()):
                if client.session.pinged and not client.closing:
                    client.send(_UP)

    async def _idle_watch(self) -> None:
        timeout = self.settings.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(IDLE_CHECK, timeout / 2))
            now = loop.time()
            for client in list(self.clients.values()):
                if max(client.ws.last_rx, client.last_tx) + timeout <= now and not client.closing:
                    logger.info("client %s: idle for %.1f s, dropping it", client.id, timeout)
                    self.stats["idle_drops"] += 1
                    client.abort()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("gateway task %s failed", task.get_name(), exc_info=task.exception())


__all__ = ["NOT_FOUND_BODY", "WS_PATHS", "Gateway", "json_response"]
