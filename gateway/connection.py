"""One client connection of the gateway: Upbit's protocol outside, a lease inside (I/O adapter).

The client's messages go to the protocol core's :class:`~broker.upbit.session.Session` (the
very rules the simulator plays: replace-on-subscribe, tickets, formats, both spellings of the
snapshot flags, LIST_SUBSCRIPTIONS, PING, error frames; Upbit's message budget only with
``emulate_limits``), and its outcome becomes actions here:

* a new set: the client's channels on the hub (:mod:`gateway.hub`: SNAPSHOT first, then
  REALTIME), its lease (``{gateway_id}.{n}``, host = the client's address) changed in the next
  batch of :class:`~gateway.leases.LeaseBatcher`, the channels Redis did not carry for this
  process SUBSCRIBEd *before* the lease names them (the first frame of a new stream is its
  SNAPSHOT, published as soon as the broker reads the lease);
* a refused request: Upbit's error frame after what was queued, then a close (1000) 0.2 s
  later, as Upbit (and the simulator) do;
* a LIST_SUBSCRIPTIONS: the answer, and the new format for the running streams.

Writes never wait: a burst is written with one ``transport.write`` while the socket keeps up;
when it does not (the write buffer passed ``WRITE_LIMIT``), frames queue in a backlog drained
by a task of this connection, and a client more than ``client_queue`` frames behind is closed
with 1008 and its lease released. So a slow client only ever slows itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from broker.upbit.session import (
    UPBIT_MESSAGE_RATE,
    Listed,
    Pinged,
    Refused,
    Session,
    Stream,
    Subscribed,
)
from broker.upbit.types import EMPTY, StreamKey
from gateway.frames import binary_frame, convert, variant_of

if TYPE_CHECKING:
    from gateway.hub import Channel
    from gateway.server import Gateway

logger = logging.getLogger(__name__)

#: High-water mark of a connection's write buffer (also passed to ``serve(write_limit=...)``).
WRITE_LIMIT = 2**16
#: Frames written at once by the backlog's drain.
BATCH = 512
#: Upbit closes 150-800 ms after an error frame; the simulator waits 0.2 s.
ERROR_CLOSE_DELAY = 0.2
#: How long a close we start may take before the TCP connection is cut.
CLOSE_TIMEOUT = 5.0

#: close codes: a client too slow for its streams; a gap with ``on_gap = "close"``
TOO_SLOW = 1008
GAP_CLOSE = 1012


class GatewayConnection(ServerConnection):
    """A websockets server connection that notes when bytes arrive and when it may write."""

    last_rx: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writable.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.writable.set()  # a waiting drain finds the connection closed


class Client:
    """One client connection: its session, its channels, its lease and its writes."""

    def __init__(self, gateway: Gateway, ws: GatewayConnection, number: int) -> None:
        self.gateway = gateway
        self.hub = gateway.hub
        self.ws = ws
        self.number = number
        self.id = f"{gateway.settings.gateway_id}.{number}"
        limits = UPBIT_MESSAGE_RATE if gateway.settings.emulate_limits else None
        self.session = Session(gateway.market, limits)
        remote = ws.remote_address
        self.peer = f"{remote[0]}:{remote[1]}" if remote else "?"
        #: framed frames of the burst being assembled (the hub appends, :meth:`flush` writes)
        self.burst: list[bytes] = []
        self.touched = False
        self.backlog: deque[bytes] = deque()
        self._drainer: asyncio.Task[None] | None = None
        #: the channels this client streams, and the stream each carries for it
        self.streams: dict[bytes, Stream] = {}
        self.generation = 0  # bumped by every data request (stale snapshot answers are dropped)
        self.closing = False  # nothing more is written
        self.left = False  # off every channel, lease released
        self.last_tx = ws.loop.time()
        self.frames_sent = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises ConnectionClosed."""
        # every client shows in `upbit-broker leases` from the start, wanting nothing yet
        self.gateway.lease_batcher.put(self.id, EMPTY, self.peer)
        try:
            refusal = await self._reader()
            if refusal is not None:
                await self._close_after_error(refusal)
        finally:
            self.leave()
            self.closing = True
            for task in [*self._tasks, *([self._drainer] if self._drainer else [])]:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def leave(self) -> None:
        """Off every channel, lease released (idempotent)."""
        if self.left:
            return
        self.left = True
        for name in self.streams:
            self.hub.detach(self, name)
        self.streams = {}
        self.gateway.lease_batcher.drop(self.id)

    def cut(self, code: int, reason: str) -> None:
        """Close with ``code`` now, whatever is queued (a slow client, a gap)."""
        if self.closing:
            return
        logger.info("client %s (%s): closing with %d: %s", self.id, self.peer, code, reason)
        self.closing = True
        self.backlog.clear()
        self.burst = []
        self.leave()
        self._spawn(self._close(code, reason))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (an idle client, as Upbit does)."""
        self.closing = True
        self.leave()
        self.ws.transport.abort()

    # -- reading --------------------------------------------------------------------------------

    async def _reader(self) -> Refused | None:
        loop = self.ws.loop
        session = self.session
        try:
            async for message in self.ws:
                before = session.format
                outcome = session.receive(message, loop.time())
                if isinstance(outcome, Subscribed):
                    await self._subscribed(outcome)
                elif isinstance(outcome, Listed):
                    if session.format is not before:
                        self._regroup()
                    self.burst.append(binary_frame(outcome.frame))
                    self.flush()
                elif isinstance(outcome, Pinged):
                    pass  # the gateway's UP clock reads session.pinged
                else:
                    return outcome
        except ConnectionClosed:
            pass
        return None

    async def _subscribed(self, outcome: Subscribed) -> None:
        """A data request replaced the set: channels, snapshots, lease."""
        self.generation += 1
        fmt = self.session.format
        hub = self.hub
        wanted = {(s.type, s.code, s.level) for s in outcome.snapshots}
        streams: dict[bytes, Stream] = {}
        channels: list[Channel] = []
        realtime: set[tuple[str, str, float]] = set()
        for stream in self.session.streams:
            triple = (stream.type, stream.code, stream.level)
            realtime.add(triple)
            channel = hub.attach(
                self,
                StreamKey(*triple),
                variant_of(fmt, stream.type, stream.depth),
                snapshot=triple in wanted,
                realtime_only=triple not in wanted,  # is_only_realtime
            )
            streams[channel.name] = stream
            channels.append(channel)
        for name in self.streams.keys() - streams.keys():
            hub.detach(self, name)
        self.streams = streams
        only = [
            s
            for s in outcome.snapshots
            if (s.type, s.code, s.level) not in realtime
            and not hub.snapshot_now(
                self, StreamKey(s.type, s.code, s.level), variant_of(fmt, s.type, s.depth)
            )
        ]
        self.flush()
        # SUBSCRIBE before the lease names the streams: their first frames are SNAPSHOTs
        await hub.ensure_subscribed(channels)
        if self.left:
            return
        self.gateway.lease_batcher.put(self.id, self.session.realtime_set(), self.peer)
        hub.request_snapshots(channels)
        if only:
            self._spawn(self._snapshot_only(only, self.generation))

    def _regroup(self) -> None:
        """The format changed (a LIST_SUBSCRIPTIONS with a format object): the running streams
        switch to it, without a new SNAPSHOT."""
        fmt = self.session.format
        for stream in self.streams.values():
            key = StreamKey(stream.type, stream.code, stream.level)
            self.hub.attach(self, key, variant_of(fmt, stream.type, stream.depth), snapshot=False)

    async def _snapshot_only(self, streams: list[Stream], generation: int) -> None:
        """Snapshots of streams nobody here streams, for an ``is_only_snapshot`` request."""
        groups: dict[tuple[str, float], list[Stream]] = {}
        for stream in streams:
            groups.setdefault((stream.type, stream.level), []).append(stream)
        for (type_, level), group in groups.items():
            for i in range(0, len(group), 100):
                chunk = group[i : i + 100]
                frames = await self.gateway.fetcher(type_, level, [s.code for s in chunk])
                if self.generation != generation or self.closing:
                    return  # a newer request replaced what asked for them
                fmt = self.session.format
                for stream in chunk:
                    frame = frames.get(stream.code)
                    if frame is not None:
                        variant = variant_of(fmt, stream.type, stream.depth)
                        self.burst.append(binary_frame(convert(frame, variant, snapshot=True)))
                self.flush()

    # -- writing --------------------------------------------------------------------------------

    def send(self, framed: bytes) -> None:
        """Queue one framed message and write it (a LIST answer, an UP frame)."""
        self.burst.append(framed)
        self.flush()

    def flush(self) -> None:
        """Write the burst: at once while the socket keeps up, else behind the backlog."""
        burst = self.burst
        if not burst:
            return
        self.burst = []
        if self.closing:
            return
        ws = self.ws
        if self.backlog or not ws.writable.is_set():
            self.backlog.extend(burst)
            if len(self.backlog) > self.gateway.settings.client_queue:
                self.gateway.stats["slow_clients"] += 1
                self.cut(TOO_SLOW, "client too slow: queue full")
            elif self._drainer is None:
                self._drainer = asyncio.create_task(self._drain(), name=f"gw-drain-{self.id}")
            return
        if ws.protocol.state is not State.OPEN:
            return  # closing: no more data frames
        ws.transport.write(b"".join(burst) if len(burst) > 1 else burst[0])
        self.frames_sent += len(burst)
        self.last_tx = ws.loop.time()

    async def _drain(self) -> None:
        ws = self.ws
        backlog = self.backlog
        try:
            while backlog and not self.closing:
                await ws.writable.wait()
                if ws.protocol.state is not State.OPEN:
                    backlog.clear()
                    return
                while backlog and ws.writable.is_set():
                    n = min(len(backlog), BATCH)
                    ws.transport.write(b"".join([backlog.popleft() for _ in range(n)]))
                    self.frames_sent += n
                    self.last_tx = ws.loop.time()
        finally:
            self._drainer = None

    async def _close_after_error(self, refusal: Refused) -> None:
        self.gateway.stats["refused_requests"] += 1
        self.leave()
        # What was queued before the bad message still goes out; the error is the last frame.
        self.send(binary_frame(refusal.frame))
        await asyncio.sleep(ERROR_CLOSE_DELAY)
        drainer = self._drainer
        if drainer is not None:  # the error frame is behind a backlog: let it go out first
            await asyncio.wait({drainer}, timeout=CLOSE_TIMEOUT)
        self.closing = True
        await self._close(1000, "")

    async def _close(self, code: int, reason: str) -> None:
        # websockets' close() waits for the write buffer to drain first, which a client that
        # stopped reading never lets happen: bound it, then cut the TCP connection
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def describe(self) -> dict[str, object]:
        """This connection as the gateway's state shows it."""
        return {
            "id": self.id,
            "peer": self.peer,
            "subscriptions": self.session.subscription_set().by_type(),
            "format": self.session.format.value,
            "frames_sent": self.frames_sent,
            "queued": len(self.backlog),
            "requests": self.session.requests,
            "ping": self.session.pinged,
        }


__all__ = ["CLOSE_TIMEOUT", "GAP_CLOSE", "TOO_SLOW", "WRITE_LIMIT", "Client", "GatewayConnection"]
