"""Plain HTTP on the gateway's port: Upbit's quotation REST API (gateway layer, I/O adapter).

The gateway's websockets server hands every request that is not for the WebSocket path to
:func:`process_request` and sends the ``Response`` it returns (None: websockets goes on with
the handshake). What a path means and the shapes of the answers are :mod:`gateway.rest`
(pure); forwarding within the one upstream rate limiter is :mod:`gateway.forward`.

Answered from the broker's last-value cache (``{ns}:last:ticker``, ``{ns}:last:orderbook``):
``/v1/ticker``, ``/v1/ticker/all``, ``/v1/orderbook`` (level 0). Every code polled is held in
the gateway's one REST lease (client id ``{gateway_id}.rest``) until it goes
``rest_lease_seconds`` without a poll, so its stream keeps flowing and the cache stays
current while anyone polls it. A code the lease did not hold yet is fetched once through the
broker's snapshot command (cache or upstream, bounded by ``rest_wait``; concurrent polls of it
share that one fetch); from then on the cache answers it alone, in one Redis round trip that
also reads the broker's status: with no running, connected leader, a cache Redis stopped
writing, or our lease refused, the cache is not believed. What the cache cannot answer (no
broker, a timeout, a code with no frame yet, a book shallower than ``count``) is forwarded to
Upbit instead, so the client always gets an answer Upbit would give.

Remaining-Req on the answers served here: ``group=<g>; min=600; sec=9`` (the gateway imposes
no limit of its own by default); with ``emulate_limits``, Upbit's 10 a second per client IP and
group, and a 429 past it. Forwarded answers carry Upbit's own header.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from broker.clock import server_time_ms
from broker.coordination import queue_time
from broker.errors import BrokerError, FrameError
from broker.keys import Keys
from broker.leases import LeaseStore
from broker.upbit.codes import is_valid_code
from broker.upbit.ratelimit import ClientLimiter
from broker.upbit.types import SubscriptionSet
from consumers.commands import snapshot_frames
from consumers.errors import PartialSnapshotError
from gateway import rest
from gateway.config import GatewaySettings
from gateway.forward import JSON, UPSTREAM_TIMEOUT, Answer, AnswerCache, Forwarder, local_answer
from gateway.rest import Kind, PollBook, RestStats, Route, StreamCode

logger = logging.getLogger(__name__)

#: one Redis round trip (lease write, cache read) at most: the client has no socket timeout
REDIS_TIMEOUT = 5.0
#: codes per snapshot command (the broker takes 1 to 100)
SNAPSHOT_BATCH = 100

Build = Callable[[bytes], dict[str, Any] | None]


def request_budget(settings: GatewaySettings) -> float:
    """The longest one REST request may take here: a first-frame wait, then a forward that
    waits for the shared budget and for Upbit. websockets bounds ``process_request`` by the
    server's ``open_timeout`` (default 10 s): serve with a larger one, or slow answers are cut
    without a reply; past this budget the client gets a 504 instead."""
    return settings.rest_wait + settings.rest_forward_wait + UPSTREAM_TIMEOUT + 2.0


class RestGateway:
    """The REST side of one gateway process: its lease, its limiter, its market list.

    Args:
        settings: the gateway's settings.
        redis: its Redis client (either ``decode_responses`` setting works).
        keys: the namespace's key names.
        leases: the lease store of that namespace.
        forwarder: the upstream forwarder (default: one for ``settings.upstream_rest_url``).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        redis: Redis,
        keys: Keys,
        leases: LeaseStore,
        *,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.leases = leases
        self.client_id = f"{settings.gateway_id}.rest"
        self.forwarder = forwarder or Forwarder(
            settings.upstream_rest_url,
            per_second=settings.rest_per_second,
            wait=settings.rest_forward_wait,
        )
        self.book = PollBook(settings.rest_lease_seconds)
        self.markets = AnswerCache(settings.rest_market_cache)
        #: Upbit's limit per client (emulated on demand: Upbit applies it upstream anyway)
        self.rates = (
            ClientLimiter(prune_at=rest.CLIENT_BUDGETS) if settings.emulate_limits else None
        )
        self.stats = RestStats()
        self.budget = request_budget(settings)
        self._host = socket.gethostname()
        self._lease_lock = asyncio.Lock()
        self._inflight: dict[StreamCode, asyncio.Future[bytes | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._codes: tuple[bytes, tuple[str, ...], frozenset[str]] | None = None

    # -- the entry point ---------------------------------------------------------------------

    async def process(self, request: Request, peer: str) -> Response | None:
        """The answer to one plain HTTP request from client IP ``peer``."""
        headers = request.headers
        r = rest.route(
            getattr(request, "method", "GET"),  # websockets < 14 parsed GET only
            request.path,
            authorization="Authorization" in headers,
            upgrade=headers.get("Upgrade", "").lower() == "websocket",
        )
        if r.kind is Kind.NOT_MINE:
            return None
        self.stats.requests += 1
        try:
            async with asyncio.timeout(self.budget):
                answer = await self._answer(r, peer)
        except TimeoutError:
            logger.warning("rest: %s took longer than %.0fs", r.path, self.budget)
            answer = local_answer(504, rest.error_body(504, "No answer in time."), r.group)
        extra: tuple[tuple[str, str], ...] = ()
        if r.kind is Kind.METHOD:
            extra = (("Allow", "GET"),)
        return _response(answer, extra)

    async def _answer(self, r: Route, peer: str) -> Answer:
        match r.kind:
            case Kind.PRIVATE:
                self.stats.refused_private += 1
                return local_answer(403, rest.PRIVATE_REFUSED, None)
            case Kind.METHOD:
                return local_answer(405, rest.METHOD_NOT_ALLOWED, None)
            case Kind.NOT_FOUND | Kind.NOT_MINE:
                self.stats.not_found += 1
                return local_answer(404, rest.NOT_FOUND, None)
            case Kind.FORWARD:
                return await self._forward(r)
        # Served here: Upbit's per-client limit applies only when emulated.
        sec = rest.UNLIMITED_SEC
        if self.rates is not None:
            left = self.rates.take(peer, r.group, time.monotonic())
            if left is None:
                self.stats.limited += 1
                return local_answer(429, rest.TOO_MANY, r.group, 0)
            sec = left
        try:
            match r.kind:
                case Kind.MARKET_ALL:
                    return await self._market_all(r, sec)
                case Kind.TICKER:
                    codes = rest.codes_param(r.params or {}, "markets")
                    return await self._from_cache(r, sec, "ticker", codes, _ticker)
                case Kind.TICKER_ALL:
                    return await self._tickers_by_quote(r, sec)
                case Kind.ORDERBOOK:
                    codes = rest.codes_param(r.params or {}, "markets")
                    count = rest.count_param(r.params or {})
                    build: Build = lambda raw: rest.rest_orderbook(raw, count)  # noqa: E731
                    return await self._from_cache(r, sec, "orderbook", codes, build)
        except rest.BadParam:
            self.stats.bad_requests += 1
            return local_answer(400, rest.BAD_PARAM, r.group, sec)
        raise AssertionError(f"unrouted {r.kind}")  # pragma: no cover

    # -- upstream ----------------------------------------------------------------------------

    async def _forward(self, r: Route) -> Answer:
        self.stats.forwarded += 1
        answer = await self.forwarder.get(r.target, r.group)
        if answer.upstream and answer.status in (429, 418):
            self.stats.upstream_refusals += 1
        elif not answer.upstream and answer.status == 429:
            self.stats.limited += 1
        return answer

    async def _market_list(self, details: bool) -> Answer:
        flag = "true" if details else "false"
        target = f"/v1/market/all?is_details={flag}"
        route = Route(Kind.FORWARD, "/v1/market/all", f"is_details={flag}", None, "market")
        return await self.markets.get(target, lambda: self._forward(route))

    async def _market_all(self, r: Route, sec: int) -> Answer:
        details = rest.details_param(r.params or {})
        if details is None:
            return await self._forward(r)  # Upbit says what is wrong with it
        answer = await self._market_list(details)
        if answer.status != 200:
            return answer
        # Upbit's list, kept for minutes: the Remaining-Req of now, not of when it was read.
        return local_answer(200, answer.body, "market", sec)

    async def _known_codes(self) -> tuple[tuple[str, ...], frozenset[str]] | None:
        """Upbit's codes (in its order, and as a set), or None when the list is unavailable."""
        answer = await self._market_list(False)
        if answer.status != 200:
            return None
        memo = self._codes
        if memo is None or memo[0] is not answer.body:
            try:
                ordered = rest.market_codes(answer.body)
            except ValueError:
                return None
            memo = self._codes = (answer.body, ordered, frozenset(ordered))
        return memo[1], memo[2]

    # -- answers from the cache --------------------------------------------------------------

    async def _tickers_by_quote(self, r: Route, sec: int) -> Answer:
        quotes = set(rest.codes_param(r.params or {}, "quote_currencies"))
        known = await self._known_codes()
        if known is None:
            return await self._fallback(r)
        codes = [c for c in known[0] if rest.quote_of(c) in quotes]
        if not codes:
            return await self._fallback(r)  # an unknown quote: Upbit's answer, whatever it is
        return await self._from_cache(r, sec, "ticker", codes, _ticker, checked=True)

    async def _from_cache(
        self,
        r: Route,
        sec: int,
        stream: str,
        codes: list[str],
        build: Build,
        *,
        checked: bool = False,
    ) -> Answer:
        if not checked:
            if not all(is_valid_code(c) for c in codes):
                self.stats.not_found += 1
                return local_answer(404, rest.NOT_FOUND, r.group, sec)
            known = await self._known_codes()
            if known is not None and not all(c in known[1] for c in codes):
                self.stats.not_found += 1
                return local_answer(404, rest.NOT_FOUND, r.group, sec)
        items = await self._items(stream, codes, build)
        if items is None:
            return await self._fallback(r)
        return local_answer(200, rest.encode_json([items[c] for c in codes]), r.group, sec)

    async def _fallback(self, r: Route) -> Answer:
        self.stats.fallbacks += 1
        return await self._forward(r)

    async def _items(
        self, stream: str, codes: Sequence[str], build: Build
    ) -> dict[str, dict[str, Any]] | None:
        """The REST object of each code, from the cache or a first fetch; None when the cache
        cannot answer them all (then the request is forwarded)."""
        unique = list(dict.fromkeys(codes))
        book = self.book
        if not book.poll(stream, unique, time.monotonic()):
            logger.debug("rest lease full: %s %d codes forwarded", stream, len(unique))
            return None
        items: dict[str, dict[str, Any]] = {}
        pending = unique
        try:
            await self._sync_lease()
            for _ in range(3):
                trusted = [c for c in pending if book.trusted(stream, c)]
                values, doubt = await self._read_cache(stream, trusted)
                if doubt is not None:
                    logger.debug("rest: cache not believed (%s), forwarding", doubt)
                    return None
                for code, raw in zip(trusted, values, strict=True):
                    item = _build(build, raw)
                    if item is None:
                        book.distrust(stream, code)
                    else:
                        items[code] = item
                pending = [c for c in unique if c not in items]
                # A fetch that ended while we read confirmed its codes: read them, do not
                # fetch them again (nothing awaits between this check and the fetch below).
                if not any(book.trusted(stream, c) for c in pending):
                    break
        except (RedisError, OSError, TimeoutError, BrokerError) as exc:
            logger.warning("rest: redis unavailable, forwarding (%s)", exc)
            return None
        if not pending:
            self.stats.from_cache += 1
            return items
        frames = await self._first_frames(stream, pending)
        for code in pending:
            item = _build(build, frames.get(code))
            if item is None:
                return None
            items[code] = item
        self.stats.first_frames += 1
        return items

    async def _read_cache(
        self, stream: str, codes: list[str]
    ) -> tuple[list[bytes | str | None], str | None]:
        """The cache's values of ``codes`` and why the cache may be stale (None: fresh), in
        one round trip."""
        async with asyncio.timeout(REDIS_TIMEOUT):
            pipe = self.redis.pipeline(transaction=False)
            if codes:
                pipe.hmget(self.keys.last_values(stream), codes)
            pipe.hmget(self.keys.status, list(rest.STATUS_FIELDS))
            queue_time(pipe, self.keys)
            results = await pipe.execute()
        values: list[bytes | str | None] = list(results[0]) if codes else []
        status, now = results[-2], results[-1]
        return values, rest.cache_doubt(status, server_time_ms(now), self.client_id)

    async def _sync_lease(self) -> None:
        """Write (or renew, shrink, release) the REST lease when it is due."""
        book = self.book
        if not book.due(time.monotonic()):
            return
        async with self._lease_lock:
            now = time.monotonic()
            if not book.due(now):
                return  # written while we waited for the lock
            held = book.held_now()
            async with asyncio.timeout(REDIS_TIMEOUT):
                if held:
                    await self.leases.write(
                        self.client_id,
                        SubscriptionSet.of(book.subs(held)),
                        ttl_ms=int(book.ttl * 1000),
                        host=self._host,
                        pid=os.getpid(),
                    )
                else:
                    await self.leases.release(self.client_id)
            book.written(held, now)

    async def _first_frames(self, stream: str, codes: list[str]) -> dict[str, bytes]:
        """The first frame of each code through the broker's snapshot command; one fetch per
        code however many polls wait for it. Codes with no frame in time are left out."""
        loop = asyncio.get_running_loop()
        waits: dict[str, asyncio.Future[bytes | None]] = {}
        fetch: list[str] = []
        for code in codes:
            future = self._inflight.get((stream, code))
            if future is None:
                future = self._inflight[(stream, code)] = loop.create_future()
                fetch.append(code)
            waits[code] = future
        if fetch:
            # A task of its own: a client that hangs up must not cancel the others' fetch.
            task = asyncio.create_task(self._fetch_first(stream, fetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(waits.values(), timeout=self.settings.rest_wait + REDIS_TIMEOUT)
        out: dict[str, bytes] = {}
        for code, future in waits.items():
            if future.done() and not future.cancelled():
                raw = future.result()
                if raw is not None:
                    out[code] = raw
        return out

    async def _fetch_first(self, stream: str, codes: list[str]) -> None:
        frames: dict[str, bytes] = {}
        try:
            batches = [codes[i : i + SNAPSHOT_BATCH] for i in range(0, len(codes), SNAPSHOT_BATCH)]
            for part in await asyncio.gather(*(self._snapshot(stream, b) for b in batches)):
                frames.update(part)
        finally:
            # A fresh frame arrived while the lease held the code (written before the fetch):
            # the cache answers it from now on. Confirmed before the waiters wake, so a poll
            # that missed this fetch reads the cache instead of fetching again.
            for code in frames:
                self.book.confirm(stream, code)
            for code in codes:
                future = self._inflight.pop((stream, code), None)
                if future is not None and not future.done():
                    future.set_result(frames.get(code))

    async def _snapshot(self, stream: str, codes: list[str]) -> dict[str, bytes]:
        self.stats.snapshot_commands += 1
        try:
            return await snapshot_frames(
                self.redis, self.keys, stream, codes, timeout=self.settings.rest_wait
            )
        except PartialSnapshotError as exc:
            return exc.frames
        except (BrokerError, RedisError, OSError, TimeoutError) as exc:
            logger.warning("rest: no first frames of %s (%s)", stream, exc)
            return {}

    # -- shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel the fetches in flight, release the REST lease, stop the forwarder."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(2.0):
                await self.leases.release(self.client_id)
        except (RedisError, OSError, TimeoutError, BrokerError) as exc:
            # It expires by itself within its TTL.
            logger.warning("rest lease not released (%s)", exc)
        await self.forwarder.aclose()


def _ticker(raw: bytes) -> dict[str, Any] | None:
    return rest.rest_ticker(raw)


def _build(build: Build, raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        return build(raw.encode() if isinstance(raw, str) else raw)
    except FrameError:
        return None


def _response(answer: Answer, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    try:
        reason = http.HTTPStatus(answer.status).phrase
    except ValueError:
        reason = ""
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(answer.body))),
            *answer.headers,
            *extra,
        ]
    )
    if "Content-Type" not in headers:
        headers["Content-Type"] = JSON
    return Response(answer.status, reason, headers, answer.body)


# -- the contract with the gateway's server ------------------------------------------------------

_gateways: weakref.WeakKeyDictionary[Any, RestGateway] = weakref.WeakKeyDictionary()


def rest_gateway(gw: Any) -> RestGateway:
    """The :class:`RestGateway` of the gateway object ``gw`` (attributes ``settings``,
    ``redis``, ``keys``, ``leases``), made on first use: ``gw.rest`` when it holds one, else
    one kept per ``gw`` (which must then accept weak references)."""
    own = getattr(gw, "rest", None)
    if isinstance(own, RestGateway):
        return own
    found = _gateways.get(gw)
    if found is None:
        found = _gateways[gw] = RestGateway(gw.settings, gw.redis, gw.keys, gw.leases)
    return found


async def process_request(gw: Any, connection: Any, request: Request) -> Response | None:
    """websockets' ``process_request`` for every path but the WebSocket one: the answer to a
    plain HTTP request (None: not ours, let websockets go on with the handshake)."""
    address = getattr(connection, "remote_address", None)
    peer = str(address[0]) if address else "?"
    return await rest_gateway(gw).process(request, peer)


async def aclose(gw: Any) -> None:
    """Release what :func:`process_request` holds for ``gw`` (call once at shutdown)."""
    own = getattr(gw, "rest", None)
    found = own if isinstance(own, RestGateway) else _gateways.pop(gw, None)
    if found is not None:
        await found.aclose()


__all__ = ["RestGateway", "aclose", "process_request", "request_budget", "rest_gateway"]
