"""One Redis pub/sub connection for the whole gateway process, fanned out to its clients (I/O).

Every channel any client of this process streams is SUBSCRIBEd once, on one connection
(:class:`consumers.subscriber.Subscriber`: raw RESP parsed where the bytes arrive, reconnects
that report what they lost); the channel's clients are counted here, so 1,000 clients on
``KRW-BTC`` cost Redis one subscriber, and the last one to leave UNSUBSCRIBEs it. The events
channel ``{ns}:events`` rides on the same connection, so a gap event and the frames around it
arrive in the order Redis sent them.

The hot path is per burst, not per message: messages are collected as the subscriber parses
them, and one callback per socket chunk fans the whole burst out. For each frame, the clients
of its channel are grouped by :class:`~gateway.frames.Variant` (format, orderbook depth); each
variant is converted and framed once and the same bytes are appended to every client of the
group; then each client touched writes its whole burst with one ``transport.write``. No
``await`` anywhere on that path.

A client's first frame of a stream is a SNAPSHOT (Upbit's rule): the channel's newest frame
re-marked, when this process already has one; otherwise the member *awaits*: the next frame on
the channel, or the broker's answer to a snapshot command (:attr:`Hub.fetch`, one per channel
at a time however many clients wait, asked only if the frame has not come within
:data:`SNAPSHOT_GRACE`), whichever comes first, is its SNAPSHOT. Frames the
channel carries marked SNAPSHOT (a new stream's first frame, another consumer's snapshot
fetched upstream, a reconnect's) go only to awaiting members: Upbit sends one SNAPSHOT per
stream and request, and a trade's SNAPSHOT repeats a trade already sent.

After a gap (:meth:`Hub.await_all`) a trade channel remembers the last trade its members got:
the new upstream connection's SNAPSHOT (or the broker's cached frame) is that very trade when
none happened meanwhile, and a client whose connection never broke must not get a trade twice
(Upbit repeats one only in the SNAPSHOT of a new request); its members then take the next
trade as their SNAPSHOT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from broker.errors import describe
from broker.keys import Keys
from broker.redis_url import is_cluster_url
from broker.upbit.types import DataType, StreamKey
from consumers.sharded_subscriber import ShardedSubscriber
from consumers.subscriber import Break, Subscriber
from gateway.frames import Variant, binary_frame, convert, is_snapshot, trade_id

logger = logging.getLogger(__name__)

#: a broker snapshot command names at most this many codes
SNAPSHOT_CODES = 100
#: how long an awaiting member waits for its stream's own frame before the broker is asked:
#: a new stream's first frame is its SNAPSHOT (Upbit sends it 0.2-0.4 s after the request),
#: so the command is only the fallback of quiet streams, and costs the leader nothing else
SNAPSHOT_GRACE = 0.5

#: ``fetch(type, level, codes)``: the broker's latest frame of each code it has
Fetch = Callable[[str, float, list[str]], Awaitable[dict[str, bytes]]]


class Sink(Protocol):
    """A client connection as the hub sees it."""

    #: framed bytes queued in this burst (written by :meth:`flush`)
    burst: list[bytes]
    #: already in this burst's list of clients to flush
    touched: bool

    def flush(self) -> None: ...


class Member:
    """One client on one channel."""

    __slots__ = ("awaiting", "realtime_only", "sink", "variant")

    def __init__(self, sink: Sink, variant: Variant) -> None:
        self.sink = sink
        self.variant = variant
        #: its next frame of this channel is its SNAPSHOT
        self.awaiting = False
        #: it asked ``is_only_realtime``: Upbit never sends it a SNAPSHOT of this stream
        self.realtime_only = False


class Channel:
    """One Redis channel (one stream) and the clients of this process on it."""

    __slots__ = (
        "_snaps",
        "_snaps_of",
        "fetching",
        "groups",
        "key",
        "last",
        "members",
        "name",
        "ready",
        "repeat",
        "subscribing",
    )

    def __init__(self, name: bytes, key: StreamKey) -> None:
        self.name = name
        self.key = key
        self.members: dict[Sink, Member] = {}
        self.groups: list[tuple[Variant, list[Member]]] | None = None
        #: the newest frame received (None: none since it was subscribed, or since a gap)
        self.last: bytes | None = None
        self.subscribing = False
        self.ready = asyncio.Event()  # SUBSCRIBE answered (or failed)
        self.fetching = False
        #: after a gap, on a trade channel: the id of the last trade its members got (a frame
        #: repeating it is sent to nobody); None once another frame came
        self.repeat: bytes | None = None
        self._snaps: dict[Variant, bytes] = {}
        self._snaps_of: bytes | None = None

    def snapshot(self, variant: Variant) -> bytes:
        """:attr:`last` as a framed SNAPSHOT of ``variant``, converted once per frame and
        variant however many clients start the stream (a mass reconnect, a gap)."""
        last = self.last
        assert last is not None
        if self._snaps_of is not last:
            self._snaps = {}
            self._snaps_of = last
        framed = self._snaps.get(variant)
        if framed is None:
            framed = self._snaps[variant] = binary_frame(convert(last, variant, snapshot=True))
        return framed

    def repeats(self, frame: bytes) -> bool:
        """True when ``frame`` is the trade the members got last before a gap (then dropped);
        the first other frame ends the watch."""
        if trade_id(frame) == self.repeat:
            return True
        self.repeat = None
        return False

    def regroup(self) -> list[tuple[Variant, list[Member]]]:
        groups: dict[Variant, list[Member]] = {}
        for member in self.members.values():
            groups.setdefault(member.variant, []).append(member)
        self.groups = list(groups.items())
        return self.groups


class Hub:
    """The gateway's channels and its one pub/sub connection.

    Args:
        redis_url, keys: where, and the namespace's names.
        name: ``CLIENT SETNAME`` of the pub/sub connection.
        fetch: the broker's snapshot command (see :data:`Fetch`).
        on_event: called with each message of ``{ns}:events``, in order with the frames.
        on_restored: called once a lost pub/sub connection is back: frames were lost.
    """

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        *,
        name: str,
        fetch: Fetch,
        on_event: Callable[[bytes], None],
        on_restored: Callable[[Break], None],
        connect_timeout: float = 5.0,
    ) -> None:
        self.keys = keys
        self.fetch = fetch
        self._on_event = on_event
        self._on_restored = on_restored
        self._events = keys.events.encode()
        self._subscriber: Subscriber | ShardedSubscriber
        if is_cluster_url(redis_url):
            events = self._events
            # a cluster: the data channels are SPUBLISHed (SSUBSCRIBE per master), the events
            # channel PUBLISHed
            self._subscriber = ShardedSubscriber(
                redis_url,
                name=name,
                on_message=self._on_message,
                sharded=lambda channel: channel != events,
                on_restored=self._restored,
                connect_timeout=connect_timeout,
            )
        else:
            self._subscriber = Subscriber(
                redis_url,
                name=name,
                on_message=self._on_message,
                on_restored=self._restored,
                connect_timeout=connect_timeout,
            )
        self.channels: dict[bytes, Channel] = {}
        self._pending: list[tuple[bytes, bytes]] = []
        self._scheduled = False
        self._unsubscribe: set[bytes] = set()
        self._unsubscribe_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._run: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.variants = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Connect and subscribe the events channel. Raises ``TimeoutError``."""
        self._loop = asyncio.get_running_loop()
        await self._subscriber.subscribe([self._events])
        self._run = asyncio.create_task(self._subscriber.run(), name="gateway-pubsub")
        await self._subscriber.wait_connected(timeout)

    async def aclose(self) -> None:
        tasks = [*self._tasks, *([self._run] if self._run else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._run = None
        await self._subscriber.aclose()

    @property
    def live(self) -> bool:
        return self._subscriber.live

    def subscribed_channels(self) -> frozenset[bytes]:
        """What the pub/sub connection wants (the events channel included)."""
        return self._subscriber.channels

    # -- membership -----------------------------------------------------------------------------

    def attach(
        self,
        sink: Sink,
        key: StreamKey,
        variant: Variant,
        *,
        snapshot: bool,
        realtime_only: bool | None = None,
    ) -> Channel:
        """Put ``sink`` on ``key``'s channel (or change its variant); with ``snapshot`` its
        SNAPSHOT is queued now (from the channel's newest frame) or awaited. ``realtime_only``
        (the request's ``is_only_realtime``): no SNAPSHOT of it, not even after a gap; None
        keeps what the member had (a format switch). The caller awaits
        :meth:`ensure_subscribed` for the channels it attached, and flushes ``sink``."""
        name = self.keys.channel(key.type, key.code, key.level).encode()
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(name, key)
            self._unsubscribe.discard(name)
        member = channel.members.get(sink)
        if member is None:
            member = channel.members[sink] = Member(sink, variant)
            channel.groups = None
        elif member.variant != variant:
            member.variant = variant
            channel.groups = None
        if realtime_only is not None:
            member.realtime_only = realtime_only
            if realtime_only:
                member.awaiting = False  # a SNAPSHOT armed by an earlier request or a gap
        if snapshot:
            if channel.last is not None:
                member.awaiting = False
                sink.burst.append(channel.snapshot(variant))
            else:
                member.awaiting = True
        return channel

    def detach(self, sink: Sink, name: bytes) -> None:
        """Take ``sink`` off a channel; the last one out UNSUBSCRIBEs it."""
        channel = self.channels.get(name)
        if channel is None or channel.members.pop(sink, None) is None:
            return
        channel.groups = None
        if not channel.members:
            del self.channels[name]
            self._unsubscribe.add(name)
            if not self._unsubscribe_scheduled:
                self._unsubscribe_scheduled = True
                self._schedule(self._flush_unsubscribe)

    def snapshot_now(self, sink: Sink, key: StreamKey, variant: Variant) -> bool:
        """Queue a snapshot of a channel this process streams (for a snapshot-only request);
        False when it has no frame of it."""
        name = self.keys.channel(key.type, key.code, key.level).encode()
        channel = self.channels.get(name)
        if channel is None or channel.last is None:
            return False
        sink.burst.append(channel.snapshot(variant))
        return True

    async def ensure_subscribed(self, channels: Iterable[Channel], timeout: float = 5.0) -> None:
        """Return once Redis confirmed the SUBSCRIBE of each channel (sent now for those not
        yet subscribing). A channel Redis does not confirm in time is logged, not raised: its
        SUBSCRIBE stays wanted and a reconnect sends it again."""
        wanted = list(channels)
        start = [c for c in wanted if not c.subscribing]
        for channel in start:
            channel.subscribing = True
        if start:
            try:
                await self._subscriber.subscribe([c.name for c in start])
            except TimeoutError as exc:
                logger.warning("subscribe of %d channel(s) not confirmed: %s", len(start), exc)
            finally:
                for channel in start:
                    channel.ready.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for channel in wanted:
                    await channel.ready.wait()

    def request_snapshots(self, channels: Iterable[Channel], grace: float = SNAPSHOT_GRACE) -> None:
        """Ask the broker for the latest frame of every channel whose members still await
        theirs after ``grace`` seconds (one command per stream and 100 codes, one at a time
        per channel)."""
        groups: dict[tuple[str, float], list[Channel]] = {}
        for channel in channels:
            if channel.fetching or not any(m.awaiting for m in channel.members.values()):
                continue
            channel.fetching = True
            groups.setdefault((channel.key.type, channel.key.level), []).append(channel)
        for (type_, level), group in groups.items():
            for i in range(0, len(group), SNAPSHOT_CODES):
                chunk = group[i : i + SNAPSHOT_CODES]
                self._spawn(self._fetch(type_, level, chunk, grace))

    def await_all(self) -> None:
        """Every member's next frame becomes its SNAPSHOT and nothing held is trusted (after a
        gap): what this process had may be older than what was lost.

        Except a ``realtime_only`` member's: it asked never to get a SNAPSHOT, and Upbit never
        sends it one (pyupbit and cryptofeed ask so). It goes on with the next REALTIME frame,
        which for a ticker or an orderbook is the whole state anyway; a trade's SNAPSHOT would
        only repeat a trade, possibly one it already has.
        """
        for channel in self.channels.values():
            if channel.key.type == DataType.TRADE and channel.last is not None:
                channel.repeat = trade_id(channel.last)
            channel.last = None
            for member in channel.members.values():
                member.awaiting = not member.realtime_only

    # -- the hot path ---------------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes, received_ms: int) -> None:
        self._pending.append((channel, data))
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Fan out every message received since the last call (one socket chunk, usually)."""
        pending, self._pending = self._pending, []
        self._scheduled = False
        channels = self.channels
        events = self._events
        touched: list[Sink] = []
        variants = 0
        sent = 0
        for name, data in pending:
            channel = channels.get(name)
            if channel is None:
                if name == events:
                    self._event(data)
                continue  # unsubscribed meanwhile
            channel.last = data
            if channel.repeat is not None and channel.repeats(data):
                continue  # a trade its members already have (after a gap)
            snapshot = is_snapshot(data)
            groups = channel.groups or channel.regroup()
            for variant, members in groups:
                framed: bytes | None = None
                for member in members:
                    sink = member.sink
                    if member.awaiting:
                        member.awaiting = False
                        sink.burst.append(channel.snapshot(variant))
                    elif snapshot:
                        continue  # one SNAPSHOT per stream and request: it had its own
                    else:
                        if framed is None:
                            framed = binary_frame(convert(data, variant))
                            variants += 1
                        sink.burst.append(framed)
                    sent += 1
                    if not sink.touched:
                        sink.touched = True
                        touched.append(sink)
        self.frames_in += len(pending)
        self.frames_out += sent
        self.variants += variants
        for sink in touched:
            sink.touched = False
            sink.flush()

    def _event(self, data: bytes) -> None:
        try:
            self._on_event(data)
        except Exception:  # a bug there must not stop the frames
            logger.exception("event handler failed")

    # -- internals ------------------------------------------------------------------------------

    async def _fetch(self, type_: str, level: float, channels: list[Channel], grace: float) -> None:
        waiting: list[Channel] = []
        try:
            if grace > 0:
                await asyncio.sleep(grace)
            waiting = [
                c
                for c in channels
                if self.channels.get(c.name) is c and any(m.awaiting for m in c.members.values())
            ]
            if not waiting:
                return
            frames = await self.fetch(type_, level, [c.key.code for c in waiting])
        finally:
            for channel in channels:
                channel.fetching = False
        touched: list[Sink] = []
        for channel in waiting:
            frame = frames.get(channel.key.code)
            if frame is None or self.channels.get(channel.name) is not channel:
                continue
            if channel.repeat is not None and channel.repeats(frame):
                continue  # the broker's newest is a trade they have: the next one is theirs
            snaps: dict[Variant, bytes] = {}
            for member in channel.members.values():
                if not member.awaiting:
                    continue  # the channel's own frame came first
                member.awaiting = False
                variant = member.variant
                framed = snaps.get(variant)
                if framed is None:
                    framed = snaps[variant] = binary_frame(convert(frame, variant, snapshot=True))
                member.sink.burst.append(framed)
                if not member.sink.touched:
                    member.sink.touched = True
                    touched.append(member.sink)
        for sink in touched:
            sink.touched = False
            sink.flush()

    async def _restored(self, incident: Break) -> None:
        logger.warning(
            "pubsub connection was lost (%s, %s): %d ms of frames may be missing",
            incident.reason,
            incident.error,
            incident.until_ms - incident.since_ms,
        )
        self._on_restored(incident)

    def _flush_unsubscribe(self) -> None:
        self._unsubscribe_scheduled = False
        if self._unsubscribe:
            self._spawn(self._send_unsubscribe())

    async def _send_unsubscribe(self) -> None:
        # Chosen when the task runs, not when it was scheduled: a client may have taken a
        # channel again in between, and the subscriber forgets a channel at this very call.
        names = [n for n in self._unsubscribe if n not in self.channels]
        self._unsubscribe.clear()
        if not names:
            return
        try:
            await self._subscriber.unsubscribe(names)
        except Exception as exc:  # logged: a reconnect drops them anyway
            logger.warning("unsubscribe failed: %s", describe(exc))

    def _schedule(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        self._loop.call_soon(callback)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("gateway task failed", exc_info=task.exception())


__all__ = ["Channel", "Fetch", "Hub", "Member", "Sink"]
