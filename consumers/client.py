"""``BrokerClient``: lease what you want, receive it from Redis, learn about every gap (I/O).

A consumer never talks to Upbit. It writes a lease (``broker.leases``) naming the streams it
wants, keeps it alive with heartbeats, and SUBSCRIBEs to the streams' channels; the broker's
leader serves the union of all leases over one upstream connection and publishes every frame.

Delivery and back-pressure:

* One reader task owns the pub/sub connection (``consumers.subscriber``) and never waits on the
  application: it only appends to bounded queues, so Redis never has to buffer for us.
* ``messages()`` reads one queue; callbacks run from a second queue in a dispatcher task. When
  the application falls behind, each queue discards its OLDEST data messages and puts a
  ``fell-behind`` :class:`~consumers.items.Gap` in front (drop-oldest, never block: the latest
  price is worth more than a stale one, and blocking would only move the loss into Redis).
* A callback that blocks the event loop stalls the reader too; then Redis drops the
  connection at its output-buffer limit, the reader notices, reconnects, and reports a
  ``fell-behind`` gap. Either way the application is told, and the broker never waits.

Durable streams (``durable=True``, for the client or one subscription) take another road: the
broker's history of each stream, read with XREAD from the last offset delivered
(``consumers.history_reader``). Their messages are never discarded: that reader waits for room
in the queues instead, Redis keeps the backlog, and a reconnect or a pause resumes where it
left off; a consumer pushed off the retained window gets a ``trimmed`` gap. Events still come
over pub/sub. ``latest_only`` streams keep one message per stream in each queue, the newest.

(Over 500 lines on purpose: this is the library's one public class, and most of its length is
the documented API — subscribe, messages, callbacks, snapshots, lease notices — with its
argument checks; the pub/sub reader, the queue, the commands and the items are modules of their
own.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.clock import now_ms
from broker.contract import (
    Event,
    LeaseEvent,
    UnknownEvent,
    decode_event,
)
from broker.core.history import history_cap, parse_history_caps
from broker.errors import (
    ConfigError,
    InvalidCodeError,
    InvalidDepthSuffixError,
    LeaseError,
    describe,
)
from broker.event_gate import EventGate as _EventGate
from broker.event_gate import Verdict
from broker.keys import DEFAULT_NAMESPACE, keys_for, stream_name, validate_name
from broker.leases import Lease, LeaseStore
from broker.redis_client import redis_client
from broker.redis_url import is_cluster_url, names_replica
from broker.settings import (
    CLIENT_BOUNDS,
    REDIS_URL_SCHEMES,
    REDIS_URL_SCHEMES_TEXT,
    Bound,
    check_number,
    redact_url,
)
from broker.upbit.codes import normalize_depth, parse_code, validate_code
from broker.upbit.types import DataType, StreamKey, SubscriptionSet, union
from consumers import commands
from consumers.errors import ClientClosedError, RedisUnavailableError
from consumers.history_reader import DEFAULT_READ_COUNT, Cursor, HistoryReader
from consumers.history_window import (
    Lost,
    StreamInfo,
    beyond_stream,
    check_start,
    entry_frame,
    offset_text,
    resolve_start,
)
from consumers.items import (
    CONSUMER_DISCONNECTED,
    FELL_BEHIND,
    LEASE_LAPSED,
    TRIMMED,
    Gap,
    Item,
    LeaseNotice,
    StreamMessage,
    event_item,
)
from consumers.queue import DropOldestQueue, QueueClosed
from consumers.sharded_subscriber import ShardedSubscriber
from consumers.subscriber import Break, Subscriber

if TYPE_CHECKING:
    from broker.upbit.messages import Message

logger = logging.getLogger(__name__)

#: A data callback gets each :class:`StreamMessage`; it may be a plain or an ``async`` function.
Callback = Callable[[StreamMessage], Awaitable[None] | None]
#: A gap callback gets each :class:`Gap`.
GapCallback = Callable[[Gap], Awaitable[None] | None]
#: A lease callback gets each :class:`LeaseNotice` about this client's own lease.
LeaseCallback = Callable[[LeaseNotice], Awaitable[None] | None]


def default_client_id() -> str:
    """``{host}-{pid}-{random}``: unique per process start, valid for ``validate_name``."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_")[:60] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (plain ints, read them any time)."""

    #: data messages received from Redis
    messages: int = 0
    #: gaps delivered to the application (broker gap events and local ones)
    gaps: int = 0
    #: pub/sub connections lost (each is followed by a reconnect and a gap)
    reconnects: int = 0
    #: times this client could not keep up (Redis dropped it, or a queue overflowed)
    fell_behind: int = 0
    #: data messages discarded by the in-process queues
    dropped: int = 0
    #: exceptions raised by application callbacks (logged, then ignored)
    callback_errors: int = 0
    #: lease writes that failed (Redis unreachable); retried by the next heartbeat
    lease_failures: int = 0
    #: the broker's notices about this client's lease (invalid, partial, expired, ok again)
    lease_notices: int = 0
    #: renewals that found the lease gone past its deadline (each reported as a
    #: ``lease-lapsed`` gap)
    lease_lapses: int = 0
    #: events on ``{ns}:events`` dropped as not the leader's: naming a broker the status does
    #: not name as leader, naming none, or going back in epoch (design.md "Who may publish
    #: events")
    events_rejected: int = 0
    #: the broker's follow-ups of its gaps (``Gap.state`` set), not counted in ``gaps``
    gap_follow_ups: int = 0
    #: history (durable) connections lost; each resumes from the offsets delivered
    history_reconnects: int = 0
    #: latest-only messages replaced in a queue by a newer one of their stream
    conflated: int = 0


#: How long an event naming a broker the status does not (yet) name waits for the status to
#: name it (a new leader writes its status as it starts), re-reading it every _VERIFY_POLL s.
_VERIFY_GRACE = 3.0
_VERIFY_POLL = 0.1
#: Unverified events held at most; more are rejected at once (a flood of forged ones).
_VERIFY_MAX_PENDING = 256

_ACCEPT, _REJECT, _CHECK = Verdict.ACCEPT, Verdict.REJECT, Verdict.CHECK

#: ``read_count``: XREAD COUNT per stream (durable streams); at most the broker's smallest cap
_READ_COUNT_BOUND = Bound(1, 10_000, "entries", True, "XREAD COUNT per durable stream")
#: Every trade is an event, not a state: conflating trades would drop some silently.
_NOT_CONFLATED = frozenset({DataType.TRADE.value})


@dataclass(slots=True)
class _Route:
    """Where the messages of one channel go."""

    channel: str
    type: str
    stream: str
    code: str
    level: float
    callbacks: list[Callback] = field(default_factory=list)
    to_queue: bool = False
    #: read from the stream's history (``{ns}:hist:...``), not SUBSCRIBEd
    durable: bool = False
    #: the queues keep only its newest message
    latest_only: bool = False


class BrokerClient:
    """A consumer of the broker: ``async with BrokerClient(redis_url=...) as client: ...``.

    Args:
        redis_url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``),
            or a master found through Sentinel:
            ``redis+sentinel://[user:password@]h1:26379,h2:26379/mymaster/0``
            (``rediss+sentinel://`` with TLS; ``broker.redis_url``). After a failover the
            lease is re-asserted and the channels resubscribed on the new master, with a gap.
            A Redis Cluster: ``redis+cluster://[user:password@]h1:p1,h2:p2``; its frames are
            SSUBSCRIBEd on the master of each channel's slot
            (``consumers.sharded_subscriber``); durable streams are read from the master of
            the history's slot (one hash tag for all of them: ``broker.keys``).
        subscribe_url: where to SUBSCRIBE, when not ``redis_url``: a replica of that master
            (``redis://replica:6379/0``), or one the sentinels know
            (``redis+sentinel://h1:26379/mymaster/0?role=replica``), so fan-out grows by
            adding replicas (design.md "Fan-out from replicas"). The lease, the commands, the
            status and durable streams stay on ``redis_url``. A replica that does not hear
            the master (its link down, resyncing, another master's) is left for the master,
            with a ``consumer-disconnected`` gap.
        client_id: the lease's name; default ``{host}-{pid}-{random}``, unique per start.
        namespace: key prefix shared with the broker.
        lease_ttl: seconds the lease outlives this process if it dies; heartbeats every TTL/3.
        on_gap: called with each :class:`Gap` (plain or ``async`` function).
        on_lease: called with each :class:`LeaseNotice`: the broker could not serve this
            client's lease (or part of it), or it expired, or it is served again.
        queue_size: data messages each in-process queue holds before discarding the oldest
            (for durable streams: before their reader waits).
        connect_timeout: seconds for connecting to Redis (and for each Redis command).
        ping_interval: the pub/sub connection is PINGed after this long without traffic.
        durable: read streams from the broker's history (``{ns}:hist:{stream}:{code}``) with
            XREAD instead of pub/sub, so a reconnect, a pause or a slow phase loses nothing
            still retained (``subscribe(durable=...)`` decides per subscription).
        read_count: entries per durable stream and read (XREAD COUNT). It must not exceed
            the smallest history cap of the durable streams (the rule that finds a consumer
            pushed off the window relies on it, ``consumers.history_window``): the client
            lowers it to the caps the broker writes in its status (field ``history``); with no
            such status it is taken as it is.

    Raises:
        ConfigError: a bad URL, namespace or client id, or a number out of its range
            (``broker.settings.CLIENT_BOUNDS``: lease_ttl, queue_size, connect_timeout,
            ping_interval; read_count from 1 to 10000); ``durable`` on a Redis Cluster, or a
            cluster URL beside one that names no cluster.
    """

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        client_id: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        lease_ttl: float = 10.0,
        *,
        on_gap: GapCallback | None = None,
        on_lease: LeaseCallback | None = None,
        queue_size: int = 10_000,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        durable: bool = False,
        read_count: int = DEFAULT_READ_COUNT,
        subscribe_url: str | None = None,
    ) -> None:
        for what, url in (("redis url", redis_url), ("subscribe url", subscribe_url)):
            if what == "subscribe url" and url is None:
                continue
            if not isinstance(url, str) or not url.startswith(REDIS_URL_SCHEMES):
                raise ConfigError(
                    f"{what} must start with {REDIS_URL_SCHEMES_TEXT}, got {redact_url(str(url))!r}"
                )
        if names_replica(redis_url):
            raise ConfigError(
                f"redis url {redact_url(redis_url)}: role=replica is for subscribe_url only "
                "(the lease is written to the master)"
            )
        #: a Redis Cluster: frames come by sharded pub/sub (consumers.sharded_subscriber)
        self.cluster = is_cluster_url(redis_url)
        if subscribe_url is not None and is_cluster_url(subscribe_url) != self.cluster:
            # the broker SPUBLISHes on a cluster and PUBLISHes elsewhere: the other one hears
            # nothing it sends
            raise ConfigError(
                f"redis url {redact_url(redis_url)} and subscribe url "
                f"{redact_url(subscribe_url)}: both must name the cluster, or neither"
            )
        # every numeric option finite and in range (broker.settings.CLIENT_BOUNDS)
        lease_ttl = check_number("lease_ttl", lease_ttl, CLIENT_BOUNDS["lease_ttl"])
        queue_size = check_number("queue_size", queue_size, CLIENT_BOUNDS["queue_size"])
        connect_timeout = check_number(
            "connect_timeout", connect_timeout, CLIENT_BOUNDS["connect_timeout"]
        )
        ping_interval = check_number("ping_interval", ping_interval, CLIENT_BOUNDS["ping_interval"])
        read_count = check_number("read_count", read_count, _READ_COUNT_BOUND)
        self.durable = bool(durable)
        self._read_count = read_count
        self.redis_url = redis_url
        #: where the pub/sub subscription goes (``redis_url`` unless ``subscribe_url`` given)
        self.subscribe_url = subscribe_url or redis_url
        self.client_id = validate_name(client_id or default_client_id(), "client id")
        self.keys = keys_for(namespace, redis_url)
        self.namespace = self.keys.namespace
        self.lease_ttl = float(lease_ttl)
        self.stats = ClientStats()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._on_gap = on_gap
        self._on_lease = on_lease
        #: the broker's latest notice about this client's lease (None: nothing to say so far)
        self.lease_notice: LeaseNotice | None = None
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._subs = SubscriptionSet()
        self._lease: Lease | None = None
        self._routes: dict[str, _Route] = {}
        self._queue = DropOldestQueue(queue_size)
        self._cb_queue = DropOldestQueue(queue_size)
        self._queue_used = False
        self._lock = asyncio.Lock()
        self._renew_now = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis: Redis | None = None
        self._store: LeaseStore | None = None
        self._subscriber: Subscriber | ShardedSubscriber | None = None
        self._history: HistoryReader | None = None
        self._started = False
        self._closed = False
        self._lease_failing = False
        self._gate = _EventGate()
        #: events waiting for the status to name their broker: (event, monotonic arrival)
        self._unverified: deque[tuple[Event, float]] = deque()
        self._verify_wake = asyncio.Event()
        self._rejection_logged = False
        #: the broker's history caps as its status says (``history``); None: not known
        self._history_spec: str | None = None
        self._caps: dict[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Redis and start the reader, heartbeat and dispatcher tasks.

        Raises:
            RedisUnavailableError: Redis did not answer PING within ``connect_timeout``.
        """
        if self._started:
            return
        if self._closed:
            raise ClientClosedError("this BrokerClient was closed; create a new one")
        self._started = True
        try:
            redis = self._command_client()
        except ConfigError:  # e.g. a port that is not a number
            self._closed = True
            raise
        self._redis = redis
        try:
            async with asyncio.timeout(self._connect_timeout * 3):
                await redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._abort_start()
            raise RedisUnavailableError(
                f"cannot reach redis at {redact_url(self.redis_url)}: {describe(exc)}"
            ) from exc
        self._store = LeaseStore(redis, self.namespace)
        await self._read_leader()  # events of the leader are then judged at once
        elsewhere = self.subscribe_url != self.redis_url
        if self.cluster:
            events = self.keys.events.encode()
            try:
                self._subscriber = ShardedSubscriber(
                    self.subscribe_url,
                    name=f"{self.client_id}:sub"[:128],
                    on_message=self._on_message,
                    # the data channels are SPUBLISHed, the events channel PUBLISHed
                    sharded=lambda channel: channel != events,
                    on_break=self._on_break,
                    on_restored=self._on_restored,
                    connect_timeout=self._connect_timeout,
                    ping_interval=self._ping_interval,
                )
            except ConfigError:
                await self._abort_start()
                raise
        else:
            self._subscriber = Subscriber(
                self.subscribe_url,
                name=f"{self.client_id}:sub"[:128],
                on_message=self._on_message,
                on_break=self._on_break,
                on_restored=self._on_restored,
                connect_timeout=self._connect_timeout,
                ping_interval=self._ping_interval,
                # subscribing elsewhere: prove the node hears the master, else fall back on it
                fallback_url=self.redis_url if elsewhere else None,
                master_replid=self._master_replid if elsewhere else None,
            )
        await self._subscriber.subscribe([self.keys.events.encode()])
        # connects once a durable stream is subscribed
        self._history = HistoryReader(
            self.redis_url,
            name=f"{self.client_id}:hist"[:128],
            on_entries=self._on_entries,
            on_trimmed=self._on_trimmed,
            on_restart=self._on_history_restart,
            on_break=self._on_history_break,
            on_failure=self._on_history_failure,
            room=self._room,
            wait_room=self._wait_room,
            read_count=self._read_count,
            connect_timeout=self._connect_timeout,
            # on a cluster every history stream shares one slot: any of them names it
            cluster_key=self.keys.history("trade", "KRW-BTC") if self.cluster else None,
        )
        self._spawn(self._subscriber.run(), "reader")
        if self._history is not None:
            self._spawn(self._history.run(), "history")
        self._spawn(self._heartbeat(), "heartbeat")
        self._spawn(self._dispatch(), "dispatcher")
        self._spawn(self._verify_events(), "events")
        try:
            await self._subscriber.wait_connected(self._connect_timeout * 3)
        except TimeoutError:
            await self.close()
            raise RedisUnavailableError(
                f"cannot subscribe at {redact_url(self.subscribe_url)} within "
                f"{self._connect_timeout * 3:g}s"
            ) from None
        logger.debug("client %s started", self.client_id)

    async def close(self) -> None:
        """Release the lease at once, stop every task and close the connections.

        Safe to call twice. If Redis is unreachable the lease simply expires after its TTL.
        """
        if self._closed:
            return
        self._closed = True
        heartbeat = [t for t in self._tasks if t.get_name().endswith(":heartbeat")]
        await _cancel(heartbeat)
        if self._store is not None and self._lease is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._store.release(self.client_id)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning(
                    "could not release lease %s (%s); it expires in %gs",
                    self.client_id,
                    describe(exc),
                    self.lease_ttl,
                )
            self._lease = None
        await _cancel(list(self._tasks))
        self._queue.close()
        self._cb_queue.close()
        if self._subscriber is not None:
            await self._subscriber.aclose()
        if self._history is not None:
            await self._history.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        logger.debug("client %s closed", self.client_id)

    def _command_client(self) -> Redis:
        """The client for leases and commands (``RedisUrlError`` for a malformed URL)."""
        return redis_client(
            self.redis_url,
            name=f"{self.client_id}:cmd",
            connect_timeout=self._connect_timeout,
            retries=2,
        )

    async def _master_replid(self) -> str | None:
        """The ``master_replid`` of the master the lease goes to (``INFO replication``; None
        when it says none). Errors propagate: the subscriber takes them as "unknown"."""
        assert self._redis is not None
        info: dict[str, Any] = await self._redis.info("replication")
        replid = info.get("master_replid")
        return str(replid) if replid else None

    async def _abort_start(self) -> None:
        self._closed = True
        if self._redis is not None:
            await self._redis.aclose()

    # -- subscriptions --------------------------------------------------------------------

    @property
    def subscriptions(self) -> SubscriptionSet:
        """What this client's lease asks for now."""
        return self._subs

    @property
    def lease(self) -> Lease | None:
        """The lease as last written (``None`` while nothing is subscribed)."""
        return self._lease

    async def subscribe(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        callback: Callback | None = None,
        *,
        level: float = 0.0,
        durable: bool | None = None,
        start: str = "$",
        latest_only: bool = False,
    ) -> None:
        """Add streams to the lease and start delivering them.

        Returns once Redis confirmed the channel subscriptions (durable streams: once their
        start offsets are fixed) and the lease is written, so the first frame the broker
        publishes for them is received. Without ``callback`` the messages go to
        :meth:`messages`.

        Args:
            data_type: ``ticker``, ``trade``, ``orderbook``, ``candle.1s`` ... ``candle.240m``.
            codes: market codes (``KRW-BTC``); orderbook codes may carry a depth (``KRW-BTC.15``).
            callback: called with each :class:`StreamMessage` of these streams.
            level: orderbook grouping level (orderbook only).
            durable: read these streams from the broker's history (default: the client's
                ``durable``); their messages carry ``offset``.
            start: where a durable stream starts: ``$`` (default) with what is appended from
                now on; ``0`` with the oldest entry retained; an entry id (``item.offset`` of
                the last message handled) after that entry; a bare ``ms`` from that time on.
                An offset above the stream's newest entry (the stream was deleted or Redis
                restarted since) starts at its newest entry, with a warning. A stream already
                subscribed keeps reading where it is.
            latest_only: keep only the newest message of each of these streams in the queues
                (state streams: ticker, orderbook, candles; not trade). A slow reader gets
                fresh state, not a backlog; the messages it skips are no loss to announce.

        Raises:
            ValueError: an unknown data type, no codes, a level for a non-orderbook type, a
                bad ``start`` (or one without ``durable``), ``latest_only`` for trade, a
                stream already subscribed with other ``durable`` / ``latest_only`` settings,
                or ``durable`` for a type the broker keeps no history of (its status says so),
                or on a Redis Cluster (a ``ConfigError``).
            InvalidCodeError: a code not of Upbit's shape (nothing was written).
            LeaseError: the lease could not be written (the subscription is rolled back).
            RedisUnavailableError: Redis did not confirm the SUBSCRIBE in time, or did not
                answer where a durable stream starts (rolled back).
        """
        wanted = _parse_streams(data_type, codes, level)
        durable = self.durable if durable is None else bool(durable)
        start = check_start(start)
        if start != "$" and not durable:
            raise ValueError(f"start={start!r} needs a durable subscription (durable=True)")
        latest_only = bool(latest_only)
        if latest_only and _data_type(data_type) in _NOT_CONFLATED:
            raise ValueError(
                f"latest_only does not apply to {data_type}: every trade counts, "
                "conflating them would drop trades"
            )
        self._check_running()
        assert self._store is not None and self._subscriber is not None
        if durable:
            await self._read_leader()  # the broker's caps as they are now
            self._check_history(_data_type(data_type))
        async with self._lock:
            for key in wanted:
                route = self._routes.get(self.keys.channel(key.type, key.code, key.level))
                if route is not None and (route.durable, route.latest_only) != (
                    durable,
                    latest_only,
                ):
                    raise ValueError(
                        f"{route.stream} {route.code} is subscribed with durable="
                        f"{route.durable}, latest_only={route.latest_only}; unsubscribe it "
                        "first to change that"
                    )
            new_set = union(self._subs, SubscriptionSet(wanted))
            added: list[_Route] = []
            for key in sorted(wanted):
                channel = self.keys.channel(key.type, key.code, key.level)
                route = self._routes.get(channel)
                if route is None:
                    route = _Route(
                        channel=channel,
                        type=key.type,
                        stream=stream_name(key.type, key.level),
                        code=key.code,
                        level=key.level,
                        durable=durable,
                        latest_only=latest_only,
                    )
                    self._routes[channel] = route
                    added.append(route)
                if callback is None:
                    route.to_queue = True
                    self._queue_used = True
                elif callback not in route.callbacks:
                    route.callbacks.append(callback)
            try:
                # channels (and history offsets) before the lease: the broker starts
                # streaming once the lease is in
                try:
                    await self._subscriber.subscribe(
                        r.channel.encode() for r in added if not r.durable
                    )
                except TimeoutError as exc:
                    raise RedisUnavailableError(str(exc)) from None
                await self._start_history([r for r in added if r.durable], start)
                self._lease = await self._write_lease(new_set)
            except BaseException:
                for route in added:
                    del self._routes[route.channel]
                    if route.durable and self._history is not None:
                        self._history.remove(self._history_key(route))
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self._subscriber.unsubscribe(
                        r.channel.encode() for r in added if not r.durable
                    )
                raise
            self._subs = new_set

    async def unsubscribe(
        self, data_type: str, codes: Iterable[str] | str, *, level: float = 0.0
    ) -> None:
        """Remove streams from the lease and stop delivering them (depth suffixes ignored).

        Returns once the lease is written (released when nothing is left). Messages of these
        streams still queued are not delivered after this returns.

        Raises:
            ValueError / InvalidCodeError: as :meth:`subscribe`.
            LeaseError: the lease could not be written (nothing changed).
        """
        removing = set(_parse_streams(data_type, codes, level))
        self._check_running()
        assert self._store is not None and self._subscriber is not None
        async with self._lock:
            remaining = SubscriptionSet(
                {k: d for k, d in self._subs.depths.items() if k not in removing}
            )
            if remaining != self._subs:
                if remaining:
                    self._lease = await self._write_lease(remaining)
                else:
                    await self._release_lease()
                self._subs = remaining
            channels = [self.keys.channel(k.type, k.code, k.level) for k in removing]
            gone = [r for c in channels if (r := self._routes.pop(c, None)) is not None]
            for route in gone:
                if route.durable and self._history is not None:
                    self._history.remove(self._history_key(route))
            await self._subscriber.unsubscribe(r.channel.encode() for r in gone if not r.durable)

    def _history_key(self, route: _Route) -> str:
        return self.keys.history(route.type, route.code, route.level)

    async def _start_history(self, routes: list[_Route], start: str) -> None:
        """Fix where each new durable stream starts (``XINFO STREAM``: ``$`` is the newest
        entry now, not when the reader first reads) and hand it to the history reader."""
        if not routes:
            return
        assert self._redis is not None and self._history is not None
        try:
            async with (
                asyncio.timeout(self._connect_timeout * 2),
                self._redis.pipeline(transaction=False) as pipe,
            ):
                for route in routes:
                    pipe.execute_command("XINFO", "STREAM", self._history_key(route))
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailableError(
                f"cannot read where the durable streams start: {describe(exc)}"
            ) from exc
        cursors = []
        for route, reply in zip(routes, replies, strict=True):
            if isinstance(reply, Exception) and "no such key" not in str(reply).lower():
                raise RedisUnavailableError(
                    f"cannot read the history of {route.stream} {route.code}: {reply}"
                )
            info = None if isinstance(reply, Exception) else StreamInfo.parse(reply)
            last, n = resolve_start(start, info)
            if beyond_stream(start, info):
                logger.warning(
                    "history %s: start %s is above its newest entry (%s): the stream was "
                    "deleted or Redis restarted since; reading from its newest entry on",
                    self._history_key(route),
                    start,
                    "none" if info is None else offset_text(info.last_generated),
                )
            cursors.append(
                Cursor(
                    key=self._history_key(route),
                    channel=route.channel,
                    last=last,
                    n=n,
                    latest_only=route.latest_only,
                    # an entry id: while it is retained nothing after it was trimmed
                    anchored=info is not None
                    and info.first is not None
                    and (last == info.last_generated or ("-" in start and start != "0-0")),
                    cap=self._cap(route.type),
                )
            )
        for cursor in cursors:
            self._history.add(cursor)

    async def _write_lease(self, subs: SubscriptionSet) -> Lease:
        assert self._store is not None
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                lease = await self._store.write(
                    self.client_id,
                    subs,
                    ttl_ms=max(1, int(self.lease_ttl * 1000)),
                    host=self.host,
                    pid=self.pid,
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.lease_failures += 1
            raise LeaseError(f"could not write lease {self.client_id}: {describe(exc)}") from exc
        previous = self._lease
        # lease.lua keeps created_ms of a lease that is there: created == renewed means this
        # write created it anew. Past the old deadline, the broker stopped serving it meanwhile.
        if (
            previous is not None
            and lease.created_ms == lease.renewed_ms
            and lease.renewed_ms >= previous.deadline_ms
        ):
            self._lease_lapsed(previous, lease)
        return lease

    def _lease_lapsed(self, previous: Lease, lease: Lease) -> None:
        """A renewal found the lease gone past its deadline (this process was paused longer
        than its TTL): the streams it held may have stopped from the old deadline until now."""
        self.stats.lease_lapses += 1
        keys = previous.subscriptions.depths
        channels = tuple(sorted(self.keys.channel(k.type, k.code, k.level) for k in keys))
        late = lease.renewed_ms - previous.renewed_ms
        logger.warning(
            "lease %s lapsed: not renewed for %d ms (TTL %d ms); re-created, %d streams "
            "may have missed %d ms",
            self.client_id,
            late,
            previous.ttl_ms,
            len(channels),
            lease.renewed_ms - previous.deadline_ms,
        )
        self._emit_gap(
            Gap(
                reason=LEASE_LAPSED,
                source="local",
                since_ms=previous.deadline_ms,
                until_ms=lease.renewed_ms,
                detail=(
                    f"the lease was not renewed for {late} ms (TTL {previous.ttl_ms} ms, "
                    "this process was paused?): it lapsed and was re-created"
                ),
                channels=channels,
            )
        )

    async def _release_lease(self) -> None:
        assert self._store is not None
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                await self._store.release(self.client_id)
        except (RedisError, OSError, TimeoutError) as exc:
            raise LeaseError(f"could not release lease {self.client_id}: {describe(exc)}") from exc
        self._lease = None

    # -- delivery -------------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[Item]:
        """Every :class:`StreamMessage` of streams subscribed without a callback, every
        :class:`Gap` and every :class:`LeaseNotice`, in arrival order; ends when the client
        closes. Dispatch on ``item.kind``: ``data``, ``gap`` or ``lease``."""
        self._queue_used = True
        while True:
            # what is queued already is taken without a coroutine or a wait per item
            try:
                item = self._take()
            except QueueClosed:
                return
            if item is None:
                item = await self._next(None)
                if item is None:
                    return
            yield item

    async def next_message(self, timeout: float | None = None) -> Item | None:
        """The next item of :meth:`messages`, or ``None`` after ``timeout`` s (or on close)."""
        self._queue_used = True
        return await self._next(timeout)

    def _take(self) -> Item | None:
        """The next queued item for the application, ``None`` when none is queued.

        Raises:
            QueueClosed: the client closed.
        """
        queue = self._queue
        while (item := queue.get_nowait()) is not None:
            if self._wanted(item):
                return item
        return None

    def _wanted(self, item: Item) -> bool:
        if not isinstance(item, StreamMessage):
            return True  # a gap or a lease notice
        route = self._routes.get(item.channel)
        return route is not None and route.to_queue  # not unsubscribed since it was queued

    async def _next(self, timeout: float | None) -> Item | None:
        # A burst arrives in one socket chunk and is queued at once: what is queued is taken
        # without a timeout context; only an empty queue is waited on.
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while True:
                item = self._take()
                if item is not None:
                    return item
                if deadline is None:  # messages(): no timeout context per wake-up
                    item = await self._queue.get()
                else:
                    async with asyncio.timeout_at(deadline):
                        item = await self._queue.get()
                if self._wanted(item):
                    return item
        except (QueueClosed, TimeoutError):
            return None

    def _on_message(self, channel: bytes, data: bytes, received_ms: int) -> None:
        # the reader (on the raw road: the protocol's data_received): only enqueue, never wait
        name = channel.decode()
        route = self._routes.get(name)
        if route is None:
            if name == self.keys.events:
                self._on_event(data)
            return
        self.stats.messages += 1
        item = StreamMessage(
            channel=name,
            type=route.type,
            stream=route.stream,
            code=route.code,
            level=route.level,
            raw=data,
            received_ms=received_ms,
        )
        if route.callbacks:
            self._put(self._cb_queue, item, "callback", route.latest_only)
        if route.to_queue:
            self._put(self._queue, item, "messages()", route.latest_only)

    def _on_entries(self, cursor: Cursor, entries: Any, received_ms: int) -> None:
        # the history reader, with one stream's entries of one read, oldest first: only
        # enqueue (held messages are never discarded; the reader waited for room before)
        route = self._routes.get(cursor.channel)
        if route is None:
            return
        self.stats.messages += len(entries)
        to_cb = bool(route.callbacks)
        to_queue = route.to_queue
        latest = route.latest_only
        # a held message is never discarded, so no overflow to account for: put it directly
        put_cb, put_queue = self._cb_queue.put, self._queue.put
        for entry_id, fields in entries:
            raw, backfilled = entry_frame(fields)
            item = StreamMessage(
                channel=route.channel,
                type=route.type,
                stream=route.stream,
                code=route.code,
                level=route.level,
                raw=raw,
                received_ms=received_ms,
                offset=entry_id.decode(),
                backfilled=backfilled,
            )
            if latest:
                if to_cb:
                    self._put(self._cb_queue, item, "callback", latest)
                if to_queue:
                    self._put(self._queue, item, "messages()", latest)
                continue
            if to_cb:
                put_cb(item)
            if to_queue:
                put_queue(item)

    def _on_trimmed(self, cursor: Cursor, lost: Lost) -> None:
        to = None if lost.to is None else offset_text(lost.to)
        if lost.inside:
            # it reads the new stream already (it kept up): the loss lies before, when the
            # old one went, and after the last check that found it whole
            since_ms, from_offset = cursor.verified_ms, None
            detail = (
                f"{cursor.key}: the stream was deleted and recreated (DEL, FLUSHALL, eviction) "
                "since it was last checked; entries of the old one this consumer had not read "
                f"may be lost (count unknown); the new one, from {to}, is read on"
            )
        elif lost.recreated:
            since_ms, from_offset = cursor.since_ms, offset_text(cursor.last)
            detail = (
                f"{cursor.key}: the stream was deleted{' and recreated' if to else ''} (DEL, "
                f"FLUSHALL, eviction, a restart): entries after {from_offset} this consumer "
                "had not read are lost (count unknown); "
                + (f"the new one is read from {to}" if to else "what it holds next is read")
            )
        else:
            count = "entries" if lost.count is None else f"{lost.count} entries"
            since_ms, from_offset = cursor.since_ms, offset_text(cursor.last)
            detail = (
                f"{cursor.key}: the {count} after {from_offset} and before {to} were trimmed "
                "before this consumer read them (it fell off the retained window)"
            )
        until_ms = now_ms() if lost.to is None or lost.recreated else lost.to[0]
        self._emit_gap(
            Gap(
                reason=TRIMMED,
                source="local",
                since_ms=since_ms,
                until_ms=max(since_ms, until_ms),
                detail=detail,
                dropped=lost.count or 0,
                channels=(cursor.channel,),
                from_offset=from_offset,
                to_offset=to,
            )
        )

    def _on_history_failure(self, error: str) -> None:
        # the reader retries from the offsets delivered: nothing is skipped, but the durable
        # streams stall until it reads again, and the application must hear of it
        assert self._history is not None
        channels = tuple(sorted(c.channel for c in self._history.cursors.values()))
        now = now_ms()
        self._emit_gap(
            Gap(
                reason=CONSUMER_DISCONNECTED,
                source="local",
                since_ms=now,
                until_ms=now,
                detail=(
                    f"the history reader failed ({error}); it retries, reading on from the "
                    "offsets delivered"
                ),
                channels=channels,
            )
        )

    def _on_history_restart(self, since_ms: int, until_ms: int) -> None:
        assert self._history is not None
        channels = tuple(sorted(c.channel for c in self._history.cursors.values()))
        self._emit_gap(
            Gap(
                reason=CONSUMER_DISCONNECTED,
                source="local",
                since_ms=since_ms,
                until_ms=until_ms,
                detail="redis restarted: history this consumer had not read yet went with it",
                channels=channels,
            )
        )

    def _durable_queues(self) -> list[DropOldestQueue]:
        queues = []
        if self._queue_used:
            queues.append(self._queue)
        if any(r.callbacks for r in self._routes.values() if r.durable):
            queues.append(self._cb_queue)
        return queues

    def _room(self) -> int:
        return min((q.room() for q in self._durable_queues()), default=self._queue.maxsize)

    async def _wait_room(self, need: int) -> bool:
        waited = False
        for queue in self._durable_queues():
            waited = await queue.wait_room(need) or waited
        return waited

    def _put(self, queue: DropOldestQueue, item: Item, which: str, latest: bool = False) -> None:
        before = queue.overflows
        if latest:
            conflated = queue.conflated
            kept = queue.put(item, latest=True)
            self.stats.conflated += queue.conflated - conflated
        else:
            kept = queue.put(item)
        if not kept:
            self.stats.dropped += 1
            if queue.overflows != before:
                self.stats.fell_behind += 1
                self.stats.gaps += 1
                logger.warning(
                    "client %s fell behind: %s queue full (%d), discarding oldest messages",
                    self.client_id,
                    which,
                    queue.maxsize,
                )

    def _on_event(self, data: bytes) -> None:
        # the reader task: judge the event by what is known; an unknown broker waits for the
        # events task to re-read the status (events are rare: this never slows data)
        try:
            event = decode_event(data)
        except ValueError as exc:
            logger.debug("ignored event: %s", exc)
            return
        if isinstance(event, UnknownEvent):
            return
        if isinstance(event, LeaseEvent) and event.client_id != self.client_id:
            return  # every client hears every lease event: not ours, nothing to judge
        if self._unverified:  # keep the order behind the events still being checked
            self._hold(event)
            return
        verdict, why = self._gate.judge(event)
        if verdict == _ACCEPT:
            self._deliver_event(event)
        elif verdict == _REJECT:
            self._reject_event(event, why)
        else:
            self._hold(event)

    def _hold(self, event: Event) -> None:
        if len(self._unverified) >= _VERIFY_MAX_PENDING:
            self._reject_event(event, "too many events wait for the status to name a leader")
            return
        self._unverified.append((event, time.monotonic()))
        self._verify_wake.set()

    def _reject_event(self, event: Event, why: str) -> None:
        self.stats.events_rejected += 1
        # one WARNING per client, then DEBUG: a forger must not flood the logs
        level = logging.DEBUG if self._rejection_logged else logging.WARNING
        self._rejection_logged = True
        logger.log(
            level,
            "client %s: ignored a %s event on %s, not the leader's: %s (%d ignored so far; "
            "stats.events_rejected)",
            self.client_id,
            type(event).__struct_config__.tag,
            self.keys.events,
            why,
            self.stats.events_rejected,
        )

    def _deliver_event(self, event: Event) -> None:
        item = event_item(event)
        if isinstance(item, LeaseNotice):
            self._emit_lease_notice(item)
        elif isinstance(item, Gap) and item.is_follow_up:
            logger.info(
                "broker gap (%s, epoch %s) followed up: %s, %s",
                item.reason,
                item.epoch,
                item.state,
                item.backfill,
            )
            self._emit_gap(item)
        elif isinstance(item, Gap):
            logger.info(
                "broker gap (%s, epoch %s): %d ms",
                item.reason,
                item.epoch,
                item.until_ms - item.since_ms,
            )
            self._emit_gap(item)

    async def _verify_events(self) -> None:
        """Re-read the status while events naming an unknown broker wait; accept each once
        the status names its broker as leader, reject it after ``_VERIFY_GRACE`` s."""
        while True:
            await self._verify_wake.wait()
            self._verify_wake.clear()
            while self._unverified:
                await self._read_leader()
                now = time.monotonic()
                while self._unverified:
                    event, arrived = self._unverified[0]
                    named = bool(event.broker) and event.broker == self._gate.leader
                    if not named and now - arrived < _VERIFY_GRACE:
                        break  # the status may not name a new leader yet: read it again
                    self._unverified.popleft()
                    verdict, why = self._gate.settle(event)
                    if verdict == _ACCEPT:
                        self._deliver_event(event)
                    else:
                        self._reject_event(event, why)
                if self._unverified:
                    await asyncio.sleep(_VERIFY_POLL)

    async def _read_leader(self) -> None:
        """``leader``, ``leader_token``, ``epoch`` and ``history`` (the caps) of
        ``{ns}:status``: one pipeline of HGET (the commands the least-privilege consumer ACL
        allows), bounded by ``connect_timeout``."""
        assert self._redis is not None
        try:
            async with (
                asyncio.timeout(self._connect_timeout),
                self._redis.pipeline(transaction=False) as pipe,
            ):
                for name in ("leader", "leader_token", "epoch", "history"):
                    pipe.hget(self.keys.status, name)
                raw = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("could not read the leader from the status: %s", describe(exc))
            return
        leader, token, epoch, history = (_text(v) for v in raw)
        self._history_caps_read(history)
        try:
            epoch_n = int(epoch) if epoch else None
        except ValueError:
            epoch_n = None
        if leader != self._gate.leader:
            logger.debug("client %s: the status names leader %s", self.client_id, leader)
        self._gate.status_read(leader, token, epoch_n)

    def _history_caps_read(self, spec: str | None) -> None:
        """The status's ``history`` (None: not there, a broker that does not say): the caps
        bound each durable stream's XREAD COUNT (``HistoryReader.count_limit``)."""
        if spec == self._history_spec:
            return
        self._history_spec = spec
        try:
            self._caps = None if spec is None else parse_history_caps(spec)
        except ConfigError as exc:
            logger.warning("the broker status's history caps are unreadable: %s", exc)
            self._caps = None
        if self._history is None:
            return
        for route in self._routes.values():
            cursor = self._history.cursors.get(self._history_key(route))
            if route.durable and cursor is not None:
                cursor.cap = self._cap(route.type)
                if self._caps is not None and cursor.cap is None and not route.latest_only:
                    logger.warning(
                        "history %s: the broker keeps no history of %s any more (history=%r)",
                        cursor.key,
                        route.type,
                        spec,
                    )

    def _cap(self, type_: str) -> int | None:
        """The broker's history cap of ``type_`` (None: not known, or none kept)."""
        return None if self._caps is None else history_cap(self._caps, type_) or None

    def _check_history(self, type_: str) -> None:
        """Refuse a durable subscription the broker's status says it keeps no history of."""
        if self._caps is not None and not history_cap(self._caps, type_):
            raise ValueError(
                f"the broker keeps no history of {type_} (its status says history="
                f"{self._history_spec!r}): subscribe it with durable=False, or give the "
                "broker a cap for it (UPBIT_BROKER_HISTORY, run --history)"
            )

    def _emit_lease_notice(self, notice: LeaseNotice) -> None:
        self.stats.lease_notices += 1
        self.lease_notice = notice
        heard = self._queue_used or self._on_lease is not None
        # a warning when the application hears it no other way (callbacks only, no on_lease)
        level = logging.INFO if heard or notice.state == "ok" else logging.WARNING
        logger.log(level, "lease %s: %s: %s", self.client_id, notice.state, notice.why)
        if notice.state == "expired" and self._subs:
            self._renew_now.set()  # still alive and still wanting: put the lease back now
        if self._queue_used:
            self._queue.put(notice)
        if self._on_lease is not None:
            self._cb_queue.put(notice)

    def _emit_gap(self, gap: Gap) -> None:
        if gap.is_follow_up:
            self.stats.gap_follow_ups += 1
        else:
            self.stats.gaps += 1
        if self._queue_used:
            self._queue.put(gap)
        if self._on_gap is not None:
            self._cb_queue.put(gap)

    def _on_break(self, error: str) -> None:
        self.stats.reconnects += 1

    def _on_history_break(self, error: str) -> None:
        self.stats.history_reconnects += 1

    async def _on_restored(self, incident: Break) -> None:
        self._gate.reconnected()
        if incident.replica:
            # incident.error says why (the replica's link, resync or master)
            detail = "the node subscribed on did not hear the master, subscribed again on "
            detail += self._subscriber_where()
        elif incident.reason == FELL_BEHIND:
            self.stats.fell_behind += 1
            detail = "redis dropped this subscriber (output buffer limit: it fell behind)"
        elif incident.server_changed:
            detail = "the pub/sub connection to redis was lost; another server answers now (a "
            detail += "failover or a restart)"
        else:
            detail = "the pub/sub connection to redis was lost"
        # durable streams lost nothing (their reader resumes from its offsets): with any of
        # them, the gap names what pub/sub carried, the other streams and the events (a gap
        # or lease event of the broker may have been missed)
        channels: tuple[str, ...] = ()
        if any(r.durable for r in self._routes.values()):
            channels = (
                *sorted(r.channel for r in self._routes.values() if not r.durable),
                self.keys.events,
            )
            if incident.server_changed:  # the new master may lack the old one's last entries
                detail += "; durable streams resume at their offsets (the broker's redis gap "
                detail += "names what the new server may lack)"
            else:
                detail += "; durable streams are not affected"
        self._emit_gap(
            Gap(
                reason=incident.reason,
                source="local",
                since_ms=incident.since_ms,
                until_ms=incident.until_ms,
                detail=f"{detail}: {incident.error}",
                channels=channels,
            )
        )
        # Redis may have restarted empty, or failed over to a replica that lacks the lease's
        # last write (replication is asynchronous): put it back now, not at the next heartbeat
        self._renew_now.set()

    def _subscriber_where(self) -> str:
        return self._subscriber.where if self._subscriber is not None else "?"

    async def _dispatch(self) -> None:
        while True:
            try:
                item = await self._cb_queue.get()
            except QueueClosed:
                return
            callbacks: list[Any]
            if isinstance(item, Gap):
                callbacks = [self._on_gap] if self._on_gap is not None else []
            elif isinstance(item, LeaseNotice):
                callbacks = [self._on_lease] if self._on_lease is not None else []
            else:
                route = self._routes.get(item.channel)
                callbacks = list(route.callbacks) if route is not None else []
            for callback in callbacks:
                try:
                    result = callback(item)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.stats.callback_errors += 1
                    # first ten, then every thousandth: a broken callback must not flood logs
                    n = self.stats.callback_errors
                    if n <= 10 or n % 1000 == 0:
                        logger.exception("callback %r failed (%d so far)", callback, n)

    # -- heartbeat ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.lease_ttl / 3
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._renew_now.wait()
            self._renew_now.clear()
            async with self._lock:
                if not self._subs:
                    continue
                try:
                    self._lease = await self._write_lease(self._subs)
                except LeaseError as exc:
                    if not self._lease_failing:
                        logger.warning("lease heartbeat failed: %s; retrying", exc)
                    self._lease_failing = True
                    continue
                if self._lease_failing:
                    logger.info("lease %s re-asserted", self.client_id)
                self._lease_failing = False

    # -- snapshots ------------------------------------------------------------------------

    async def snapshot_frames(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        *,
        level: float = 0.0,
        timeout: float = 3.0,
    ) -> dict[str, bytes]:
        """The latest frame of each code as raw bytes, from the broker (cache or upstream).

        Raises:
            ValueError / InvalidCodeError: before anything is sent.
            NoBrokerError: no broker answered within ``timeout``.
            PartialSnapshotError: some codes had no data (it carries the frames that did).
        """
        type_ = _data_type(data_type)
        code_list = [codes] if isinstance(codes, str) else list(codes)
        plain = [_plain_code(type_, c)[0] for c in code_list]
        self._check_running()
        assert self._redis is not None
        return await commands.snapshot_frames(
            self._redis, self.keys, type_, plain, level=level, timeout=timeout
        )

    async def snapshot(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        *,
        level: float = 0.0,
        timeout: float = 3.0,
    ) -> dict[str, Message]:
        """The latest message of each code, typed: ``{code: Ticker(...)}``.

        Raises:
            SnapshotError: naming the codes with no data; or no broker answered in time
                (``NoBrokerError`` is not a ``SnapshotError``: it says no broker is there).
        """
        from broker.upbit.messages import decode_message

        frames = await self.snapshot_frames(data_type, codes, level=level, timeout=timeout)
        return {code: decode_message(raw) for code, raw in frames.items()}

    async def broker_status(self) -> tuple[dict[bytes, bytes], int]:
        """The leader's status hash (empty: no broker ever ran in this namespace) and the Redis
        server clock in ms, to judge its ``updated_ms`` by (design.md "Status").

        Raises:
            RedisUnavailableError: Redis did not answer within ``connect_timeout``.
        """
        self._check_running()
        assert self._redis is not None
        try:
            return await commands.read_status(self._redis, self.keys, timeout=self._connect_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailableError(f"cannot read the broker status: {describe(exc)}") from exc

    # -- helpers --------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._closed:
            raise ClientClosedError("this BrokerClient is closed")
        if not self._started:
            raise ClientClosedError("start the BrokerClient first (async with BrokerClient(...))")

    def _spawn(self, coro: Awaitable[None], what: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.client_id}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "client %s: task %s died",
                self.client_id,
                task.get_name(),
                exc_info=task.exception(),
            )


def _data_type(data_type: str) -> str:
    try:
        return DataType(data_type).value
    except ValueError:
        known = ", ".join(t.value for t in DataType)
        raise ValueError(f"unknown data type {data_type!r} (expected one of: {known})") from None


def _plain_code(type_: str, raw: str) -> tuple[str, int | None]:
    """A code and its orderbook depth (None: no suffix), validated by ``parse_code``."""
    if not isinstance(raw, str):
        validate_code(raw)  # raises, naming it
    try:
        return parse_code(raw, depth_suffix=type_ == DataType.ORDERBOOK)
    except InvalidDepthSuffixError as exc:
        raise InvalidDepthSuffixError(f"{exc} (e.g. 'KRW-BTC.15')") from None
    except InvalidCodeError as exc:
        raise InvalidCodeError(f"{exc} (expected e.g. 'KRW-BTC')") from None


def validate_streams(
    data_type: str, codes: Iterable[str] | str, level: float = 0.0
) -> SubscriptionSet:
    """What ``subscribe(data_type, codes, level=level)`` would lease, without any I/O.

    Raises:
        ValueError: an unknown data type, no codes, or a level for a non-orderbook type.
        InvalidCodeError: a code not of Upbit's shape.
    """
    return SubscriptionSet(_parse_streams(data_type, codes, level))


def _parse_streams(
    data_type: str, codes: Iterable[str] | str, level: float
) -> dict[StreamKey, int]:
    """Validate a subscribe/unsubscribe call into ``{stream: depth}``; nothing is written yet."""
    type_ = _data_type(data_type)
    if isinstance(codes, str):
        codes = [codes]
    code_list = list(codes)
    if not code_list:
        raise ValueError("no codes given")
    try:
        level = float(level or 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"orderbook level must be a number, got {level!r}") from None
    if level and type_ != DataType.ORDERBOOK:
        raise ValueError(f"level applies to orderbook only, not {type_}")
    if not math.isfinite(level) or level < 0:
        raise ValueError(f"orderbook level must be a finite number >= 0, got {level!r}")
    out: dict[StreamKey, int] = {}
    for raw in code_list:
        code, depth = _plain_code(type_, raw)
        key = StreamKey(type_, code, level)
        out[key] = max(out.get(key, 0), normalize_depth(depth))
    return out


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        # wait() does not raise the tasks' CancelledError, so a cancellation of the caller
        # itself still propagates
        await asyncio.wait(tasks)
