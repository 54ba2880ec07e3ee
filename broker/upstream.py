"""The one upstream connection: connect, receive, route, send what the controller says
(I/O adapter over :mod:`broker.upstream_connection`).

Receiving never awaits per frame: the connection hands over the messages of each socket read
inside its read callback, and each data frame is routed there (msgspec, only
type/code/stream_type/level) and handed to :meth:`Publisher.enqueue`.
Everything about *what* to send lives in :class:`broker.core.control.SubscriptionController`.

What happens to the connection is reported, in order, on :attr:`Upstream.events` (the service
feeds it to the leader core): :class:`Connected`, :class:`Lost` with a typed
:class:`~broker.core.leader.Loss`, and :class:`Confirmed` resubscribe requests.

Faults handled here: connect failures and closes (exponential backoff with jitter, capped,
reset after a healthy connection), silent stalls (no frame at all, ``{"status":"UP"}``
included, for ``stall_timeout``), missing pongs (websockets' ping timeout), Upbit error frames
(typed, logged, retried with backoff), and make-before-break when the set must shrink to empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from broker.clock import now_ms
from broker.core.admission import Refusal
from broker.core.control import SubscriptionController, Verdict
from broker.core.gaps import Loss
from broker.core.stats import UpstreamStats
from broker.errors import FrameError, UpbitErrorFrame, UpstreamError
from broker.keys import Keys
from broker.publisher import Publisher, Target
from broker.settings import BrokerSettings
from broker.upbit.messages import ErrorFrame, ListSubscriptionsReply, decode_message
from broker.upbit.router import FrameKind, route_frame
from broker.upbit.types import StreamKey, StreamType, SubscriptionSet
from broker.upstream_connection import UpstreamConnection, open_connection

logger = logging.getLogger(__name__)

#: the ``stream_type`` of a SNAPSHOT frame (the router's spelling, DEFAULT and SIMPLE alike)
SNAPSHOT = StreamType.SNAPSHOT.value

#: how long a new connection waits for its gap/connected events to reach Redis before
#: subscribing anyway (Redis calls are bounded by 5 s each; a dead Redis must not stop data)
ANNOUNCE_TIMEOUT = 6.0
#: the close code of a message larger than the peer accepts (RFC 6455)
CLOSE_TOO_BIG = 1009


class StallError(UpstreamError):
    """No frame at all arrived for ``stall_timeout`` seconds."""


class _Switch(Exception):
    """Make-before-break: carry on with this new connection."""

    def __init__(self, ws: UpstreamConnection) -> None:
        super().__init__("switching to a fresh connection")
        self.ws = ws


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection opened at ``at_ms``; ``fresh``: the make-before-break switch opened
    because the set shrank to nothing (not a reconnect: nothing was lost). Whoever handles it
    sets ``announced`` once the connection's ``gap`` and ``connected`` events are out: nothing
    is subscribed before, so consumers hear of a gap before the fresh SNAPSHOTs that close it
    (an application that resets its state on a gap keeps them)."""

    fresh: bool
    at_ms: int
    announced: asyncio.Event


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection ended at ``at_ms``, for ``loss``; ``last_frame_ms``: the wall clock of
    the last frame published by then (0: none), read when it ended, not when this is handled."""

    loss: Loss
    at_ms: int
    last_frame_ms: int
    #: Upbit ended it refusing the last subscribe request (close 1009, an error frame)
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True)
class Verified:
    """LIST_SUBSCRIPTIONS settled the last subscribe request (``controller.take_verdict``)."""

    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Confirmed:
    """LIST_SUBSCRIPTIONS confirmed the full set these resubscribe requests asked for."""

    request_ids: tuple[str, ...]


UpstreamEvent = Connected | Lost | Verified | Confirmed


def parse_list_reply(frame: bytes) -> SubscriptionSet:
    """A LIST_SUBSCRIPTIONS answer (DEFAULT or SIMPLE keys) as the set it lists."""
    reply = decode_message(frame)
    if not isinstance(reply, ListSubscriptionsReply):
        raise FrameError("not a LIST_SUBSCRIPTIONS reply")
    return SubscriptionSet.from_subscriptions(reply.subscriptions())


def parse_error_frame(frame: bytes) -> UpbitErrorFrame:
    try:
        error = decode_message(frame)
    except FrameError:
        return UpbitErrorFrame("?", frame[:200].decode(errors="replace"))
    if isinstance(error, ErrorFrame):
        return error.to_exception()
    return UpbitErrorFrame("?", frame[:200].decode(errors="replace"))


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter in [0.5, 1] of the step: never a thundering herd."""
    step = min(cap, initial * 2.0 ** min(attempt, 30))
    return step * rng.uniform(0.5, 1.0)


class Upstream:
    """Keeps one connection to Upbit (or the simulator) open for as long as it runs."""

    def __init__(
        self,
        settings: BrokerSettings,
        controller: SubscriptionController,
        publisher: Publisher,
        keys: Keys,
        *,
        stats: UpstreamStats | None = None,
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.publisher = publisher
        self.keys = keys
        #: set by whoever changed the controller's state: the send loop looks at it again
        self.changed = asyncio.Event()
        #: what happened to the connection, in order (read by the service)
        self.events: asyncio.Queue[UpstreamEvent] = asyncio.Queue()
        self.stats = UpstreamStats() if stats is None else stats
        self.connected = False
        self._table: dict[tuple[str, str, float], Target] = {}
        self._targets: dict[StreamKey, Target] = {}
        self._routable: frozenset[StreamKey] = frozenset()
        self._rng = random.Random()
        self._healthy_since: float | None = None

    # -- routing table --------------------------------------------------------------------------

    def _refresh_routes(self) -> None:
        routable = self.controller.routable
        if routable == self._routable:
            return
        self._routable = routable
        table: dict[tuple[str, str, float], Target] = {}
        for key in routable:
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = self.publisher.target(self.keys, key)
            table[(key.type, key.code, key.level)] = target
        self._table = table  # swap whole: the receive loop never sees a half-built table

    # -- connection loop ------------------------------------------------------------------------

    async def _connect(self) -> UpstreamConnection:
        s = self.settings
        # No Origin header (open_connection sends none): Upbit puts clients that send one on a
        # far stricter limit. No compression either.
        return await open_connection(
            s.upstream_url,
            user_agent="upbit-broker",
            max_size=16 * 2**20,
            open_timeout=10,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_interval,
            close_timeout=2,
        )

    async def run(self) -> None:
        """Connect and serve until cancelled; reconnect with backoff on every failure."""
        attempt = 0
        next_ws: UpstreamConnection | None = None
        while True:
            ws = next_ws
            next_ws = None
            fresh = ws is not None  # the planned switch: not a reconnect
            if ws is None:
                try:
                    ws = await self._connect()
                except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                    self.stats.connect_failures += 1
                    self.stats.last_error = f"connect failed: {exc}"
                    delay = backoff_delay(
                        attempt, self.settings.backoff_initial, self.settings.backoff_max, self._rng
                    )
                    attempt += 1
                    logger.warning(
                        "upstream connect failed (%s); retry in %.2fs",
                        exc,
                        delay,
                        extra={"event": "connect_failed", "attempt": attempt, "delay_s": delay},
                    )
                    await asyncio.sleep(delay)
                    continue
            self.stats.connects += 1
            reason = "closed"
            loss = Loss.CLOSED
            refusal: Refusal | None = None
            try:
                await self._serve(ws, fresh=fresh)
            except _Switch as switch:
                next_ws = switch.ws
                reason = "fresh connection"
                loss = Loss.FRESH_SWITCH
                self.stats.fresh_connection_switches += 1
            except StallError as exc:
                self.stats.stalls += 1
                reason = str(exc)
                loss = Loss.STALL
            except UpbitErrorFrame as exc:
                reason = str(exc)
                loss = Loss.ERROR_FRAME
                if exc.is_rate_limit:
                    attempt = max(attempt, 2)  # be gentler after a refusal
                elif exc.refuses_the_request and self.controller.request_unverified:
                    # Our request was refused: sending it again would be refused again.
                    refusal = Refusal(False, self.controller.last_request_bytes, reason)
                    attempt = max(attempt, 2)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                reason = f"connection closed ({code})"
                if code == CLOSE_TOO_BIG and self.controller.request_unverified:
                    refusal = Refusal(True, self.controller.last_request_bound, reason)
                    attempt = max(attempt, 2)
            except OSError as exc:
                reason = f"connection error: {exc}"
            finally:
                self.connected = False
                self.controller.connection_closed(time.monotonic())
                self._refresh_routes()
                if next_ws is None:
                    ws.abort()  # it failed: no close handshake to wait for
                else:
                    await _close_quietly(ws)
            healthy = self._healthy_since
            self._healthy_since = None
            self.events.put_nowait(Lost(loss, now_ms(), self.publisher.last_publish_ms, refusal))
            if next_ws is not None:
                continue  # a planned switch is not a gap: nothing was wanted
            self.stats.last_error = reason
            self.stats.reconnects += 1
            if (
                healthy is not None
                and time.monotonic() - healthy >= self.settings.backoff_reset_after
            ):
                attempt = 0
            delay = backoff_delay(
                attempt, self.settings.backoff_initial, self.settings.backoff_max, self._rng
            )
            attempt += 1
            logger.warning(
                "upstream lost (%s); reconnecting in %.2fs (attempt %d)",
                reason,
                delay,
                attempt,
                extra={
                    "event": "reconnect",
                    "reason": reason,
                    "delay_s": delay,
                    "attempt": attempt,
                },
            )
            await asyncio.sleep(delay)

    async def _serve(self, ws: UpstreamConnection, *, fresh: bool = False) -> None:
        self.controller.connection_opened(time.monotonic())
        self.connected = True
        announced = asyncio.Event()
        self.events.put_nowait(Connected(fresh, now_ms(), announced))
        # Bounded: a Redis that does not answer must not keep the connection from serving.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                await announced.wait()
        receiver = asyncio.create_task(self._receive(ws), name="upstream-receive")
        sender = asyncio.create_task(self._send_loop(ws), name="upstream-send")
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended the connection
            raise UpstreamError("upstream tasks ended")  # pragma: no cover - both loop forever
        finally:
            for task in (receiver, sender):
                task.cancel()
            for task in (receiver, sender):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _send_loop(self, ws: UpstreamConnection) -> None:
        controller = self.controller
        stall = self.settings.stall_timeout
        last_count = self.stats.frames_in
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            for message in controller.data_to_send(now):
                if isinstance(message, bytes):
                    await ws.send(message.decode())  # Upbit clients send text frames
                    if b'"type"' in message:
                        logger.info(
                            "subscribed upstream: %d streams (request #%d)",
                            len(controller.upstream),
                            controller.stats.subscribe_requests,
                            extra={
                                "event": "resubscribe",
                                "streams": len(controller.upstream),
                                "request": controller.stats.subscribe_requests,
                            },
                        )
                else:
                    await ws.send(message)
            self._refresh_routes()
            verdict = controller.take_verdict()  # (verification off: a request went unrefused)
            if verdict is not None:
                self.events.put_nowait(Verified(verdict))
            confirmed = controller.confirmations()
            if confirmed:
                self.events.put_nowait(Confirmed(tuple(confirmed)))
            if controller.wants_fresh_connection:
                logger.info("subscription set shrank to nothing: opening a fresh connection")
                raise _Switch(await self._connect())
            # Stall: any frame counts ({"status":"UP"} every 10 s keeps a quiet set alive).
            if self.stats.frames_in != last_count:
                last_count = self.stats.frames_in
                last_progress = now
                if self._healthy_since is None and controller.upstream:
                    self._healthy_since = now
            elif now - last_progress > stall:
                raise StallError(f"no frame for {stall:.0f}s")
            wakeup = controller.next_wakeup(now)
            timeout = min(1.0, max(0.0, wakeup - now)) if wakeup is not None else 1.0
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.changed.wait()

    async def _receive(self, ws: UpstreamConnection) -> None:
        """Route what ``ws`` reads (in its read callback) until it ends; raises why it did."""
        ws.start(self._route)
        await ws.wait_closed()

    def _route(self, frames: list[bytes]) -> None:
        """The messages of one socket read (binary from Upbit, text from some servers: bytes
        either way), in order; the data frames go to the publisher as one burst. Raises
        :class:`UpbitErrorFrame` on an error frame: the connection ends there (the frames
        before it are published)."""
        stats = self.stats
        burst: list[tuple[Target, bytes]] = []
        add = burst.append
        route = route_frame
        data = FrameKind.DATA
        targets = self._table.get  # (swapped only between reads: by the send loop)
        try:
            for frame in frames:
                stats.frames_in += 1
                r = route(frame)
                if r.kind is data:
                    target = targets((r.type, r.code, r.level))
                    if target is None:
                        stats.dropped_unleased += 1
                    else:
                        if target.snapshot_twin is not None and r.stream_type == SNAPSHOT:
                            target = target.snapshot_twin  # a repeated trade: not in history
                        add((target, frame))
                else:
                    self._other(r.kind, frame)
        finally:
            self.publisher.enqueue_burst(burst)

    def _other(self, kind: FrameKind, frame: bytes) -> None:
        """A frame that is no data: Upbit's status, a LIST_SUBSCRIPTIONS answer, an error
        frame (raised), or one we cannot route."""
        stats = self.stats
        if kind is FrameKind.STATUS:
            stats.status_frames += 1
        elif kind is FrameKind.LIST_REPLY:
            self._list_reply(frame)
        elif kind is FrameKind.ERROR:
            stats.error_frames += 1
            error = parse_error_frame(frame)
            logger.error("upbit error frame: %s: %s", error.name, error.message)
            raise error  # Upbit closes the socket after an error frame anyway
        else:
            stats.malformed += 1
            if stats.malformed <= 10 or stats.malformed % 1000 == 0:
                logger.warning("dropped malformed frame #%d: %r", stats.malformed, frame[:120])

    def _list_reply(self, frame: bytes) -> None:
        try:
            listed = parse_list_reply(frame)
        except FrameError:
            self.stats.malformed += 1
            return
        if not self.controller.list_reply(listed, time.monotonic()):
            logger.info("LIST_SUBSCRIPTIONS does not match (yet): %d streams", len(listed))
        verdict = self.controller.take_verdict()
        if verdict is not None:
            self.events.put_nowait(Verified(verdict))
        self.changed.set()


async def _close_quietly(ws: UpstreamConnection) -> None:
    with contextlib.suppress(Exception):
        await ws.close()  # (bounded by its close_timeout)
