"""A bounded in-process queue that never blocks its producer (asyncio, no I/O).

The pub/sub reader must keep reading whatever the application does, or Redis drops the
connection at its output-buffer limit and every stream of this client loses data. So when the
application falls behind, this queue discards the OLDEST data messages (the ones most likely to
be stale anyway), counts them, and puts one :class:`~consumers.items.Gap` (reason
``fell-behind``) at the head, so the application learns what it missed before anything newer.
Notices (gaps, lease notices) are never discarded.

Two more kinds of data message:

* **Held** (a durable stream's, ``StreamMessage.offset`` set): never discarded either. Redis
  keeps the backlog in the stream's history, so its reader (``consumers.history_reader``)
  waits for room here (:meth:`DropOldestQueue.wait_room`) instead of reading on: the queue
  holds at most ``maxsize`` of them, give or take one read.
* **Latest only** (``put(..., latest=True)``, a state stream subscribed ``latest_only``): a
  newer message of the same channel replaces the one still queued, in its place, so a slow
  reader gets fresh state instead of a backlog; replaced messages are counted, not announced.
"""

from __future__ import annotations

import asyncio
from collections import deque

from consumers.items import FELL_BEHIND, Gap, Item, StreamMessage, frame_time_ms


class QueueClosed(Exception):
    """The queue was closed (its client is closing)."""


class DropOldestQueue:
    """Bounded FIFO of :data:`~consumers.items.Item`; ``put`` never waits.

    Args:
        maxsize: data messages held before the oldest are discarded (gaps do not count).
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        #: data messages discarded so far
        self.dropped = 0
        #: overflow episodes (each produced one gap)
        self.overflows = 0
        #: latest-only messages replaced by a newer one of their channel before being taken
        self.conflated = 0
        #: held (durable) messages in the queue
        self.held = 0
        self._items: deque[Item] = deque()
        # droppable data messages in _items (held ones are counted in `held`)
        self._data_count = 0
        # latest-only channels with a message queued: channel -> (the message queued, in its
        # place in the queue; the newest one, handed out instead when that place comes up)
        self._latest: dict[str, tuple[StreamMessage, StreamMessage]] = {}
        self._room_waiter: asyncio.Future[None] | None = None
        self._room_low = 0  # wake the room waiter once `held` is down to this
        # notices that must come out before anything in _items: any gap or lease notice that
        # was older than the data discarded behind it (the overflow gap comes right after)
        self._head: deque[Item] = deque()
        self._overflow: _Overflow | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items) + len(self._head) + (self._overflow is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: Item, latest: bool = False) -> bool:
        """Append ``item``; return False when doing so discarded an older message.

        With ``latest`` (a :class:`StreamMessage` of a latest-only stream), a message of the
        same channel still queued is replaced by ``item`` in its place.
        """
        if self._closed:
            return True
        if latest and isinstance(item, StreamMessage):
            queued = self._latest.get(item.channel)
            if queued is not None:
                self._latest[item.channel] = (queued[0], item)
                self.conflated += 1
                self._wake()
                return True
            self._latest[item.channel] = (item, item)
        self._items.append(item)
        if isinstance(item, StreamMessage):
            if item.offset is not None:
                self.held += 1
                self._wake()
                return True
            self._data_count += 1
        discarded = False
        while self._data_count > self.maxsize:
            old = self._items.popleft()
            if not isinstance(old, StreamMessage) or old.offset is not None:
                # a notice or a held message is never discarded; moving them ahead keeps
                # their order among themselves (a held stream is never a droppable one)
                self._head.append(old)
                continue
            self._data_count -= 1
            self.dropped += 1
            discarded = True
            if self._latest:
                queued = self._latest.get(old.channel)
                if queued is not None and queued[0] is old:
                    del self._latest[old.channel]
            if self._overflow is None:
                self.overflows += 1
                self._overflow = _Overflow(old)
            self._overflow.add(old)
        self._wake()
        return not discarded

    def get_nowait(self) -> Item | None:
        """The next item, or ``None`` when empty. Raises :class:`QueueClosed` once closed."""
        if self._closed:
            raise QueueClosed
        if self._head:
            item = self._head.popleft()
        elif self._overflow is not None:
            gap = self._overflow.gap()
            self._overflow = None
            return gap
        elif self._items:
            item = self._items.popleft()
            if isinstance(item, StreamMessage) and item.offset is None:
                self._data_count -= 1
        else:
            return None
        if isinstance(item, StreamMessage):
            if item.offset is not None:
                self.held -= 1
                waiter = self._room_waiter
                if waiter is not None and self.held <= self._room_low and not waiter.done():
                    waiter.set_result(None)
            if self._latest:
                queued = self._latest.get(item.channel)
                if queued is not None and queued[0] is item:
                    del self._latest[item.channel]
                    return queued[1]
        return item

    def room(self) -> int:
        """How many more held messages fit before :meth:`wait_room` would wait."""
        return self.maxsize - self.held

    async def wait_room(self, need: int = 1) -> bool:
        """Wait until ``need`` more held messages fit (``need`` is capped at half the queue,
        so a reader that waited reads a batch, not one message at a time). True when it
        waited.

        Raises:
            QueueClosed: the queue was closed.
        """
        need = max(1, min(need, self.maxsize // 2))
        waited = False
        while self.maxsize - self.held < need:
            if self._closed:
                raise QueueClosed
            waited = True
            self._room_low = self.maxsize - need
            self._room_waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._room_waiter is waiter:
                    self._room_waiter = None
        if self._closed:
            raise QueueClosed
        return waited

    async def get(self) -> Item:
        """Wait for the next item. Raises :class:`QueueClosed` once the queue is closed."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    def close(self) -> None:
        """Wake every waiter with :class:`QueueClosed`; later puts are ignored."""
        self._closed = True
        self._items.clear()
        self._head.clear()
        self._latest.clear()
        self._overflow = None
        self._data_count = 0
        self.held = 0
        self._wake()
        if self._room_waiter is not None and not self._room_waiter.done():
            self._room_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Overflow:
    """One overflow episode, summarised as a single gap."""

    __slots__ = ("channels", "count", "since_ms", "until_ms")

    def __init__(self, first: StreamMessage) -> None:
        # one pub/sub connection delivers in publication order, so everything discarded was
        # published after the first discarded message was stamped (or, lacking a stamp,
        # received)
        stamp = frame_time_ms(first.raw)
        since_ms = first.received_ms if stamp is None else min(stamp, first.received_ms)
        self.since_ms = since_ms
        self.until_ms = since_ms
        self.count = 0
        self.channels: set[str] = set()

    def add(self, message: StreamMessage) -> None:
        self.count += 1
        self.until_ms = max(self.until_ms, message.received_ms)
        self.channels.add(message.channel)

    def gap(self) -> Gap:
        return Gap(
            reason=FELL_BEHIND,
            source="local",
            since_ms=self.since_ms,
            until_ms=self.until_ms,
            detail=f"in-process queue full: {self.count} oldest messages discarded",
            dropped=self.count,
            channels=tuple(sorted(self.channels)),
        )
