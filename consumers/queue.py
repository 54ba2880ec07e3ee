"""A bounded in-process queue that never blocks its producer (asyncio, no I/O).

The pub/sub reader must keep reading whatever the application does, or Redis drops the
connection at its output-buffer limit and every stream of this client loses data. So when the
application falls behind, this queue discards the OLDEST data messages (the ones most likely to
be stale anyway), counts them, and puts one :class:`~consumers.items.Gap` (reason
``fell-behind``) at the head, so the application learns what it missed before anything newer.
Notices (gaps, lease notices) are never discarded.
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
        self._items: deque[Item] = deque()
        self._data_count = 0
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

    def put(self, item: Item) -> bool:
        """Append ``item``; return False when doing so discarded an older message."""
        if self._closed:
            return True
        self._items.append(item)
        if isinstance(item, StreamMessage):
            self._data_count += 1
        discarded = False
        while self._data_count > self.maxsize:
            old = self._items.popleft()
            if not isinstance(old, StreamMessage):
                self._head.append(old)  # a notice is never discarded
                continue
            self._data_count -= 1
            self.dropped += 1
            discarded = True
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
            return self._head.popleft()
        if self._overflow is not None:
            gap = self._overflow.gap()
            self._overflow = None
            return gap
        if self._items:
            item = self._items.popleft()
            if isinstance(item, StreamMessage):
                self._data_count -= 1
            return item
        return None

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
        self._overflow = None
        self._data_count = 0
        self._wake()

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
