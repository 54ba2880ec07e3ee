"""The trade log: every trade one code made, oldest evicted first (simulator layer, pure).

The market appends each trade here the moment it makes it, whoever is subscribed, connected,
stalled or muted, so ``GET /v1/trades/ticks`` can serve a client the trades its socket never
delivered, and ``/_sim/trades`` can show tests the whole record to count what a client missed.

Values are kept as the market holds them (integer ticks and size units, see
:mod:`simulator.market`) in one flat array of 64-bit rows used as a ring: 48 bytes a trade,
instead of ~250 for a tuple of Python ints. ``sequential_id`` increases strictly within a code (the
market draws it from one strictly increasing counter), so a cursor is a binary search.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple


class LoggedTrade(NamedTuple):
    """One trade as the market made it: ticks and size units, not yet prices."""

    sequential_id: int
    timestamp: int  # ms; the frame's trade_timestamp and timestamp
    price: int  # ticks
    volume: int  # size units (1e-8)
    buy: bool  # ask_bid == "BID": the buyer took liquidity
    prev_close: int  # ticks: prev_closing_price when the trade happened


_FIELDS = 6  # sequential_id, timestamp, price, volume, buy, prev_close: one row


class TradeLog:
    """The last ``capacity`` trades of one code, oldest first."""

    __slots__ = ("_head", "_rows", "capacity", "evicted", "last_evicted_ms")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a trade log holds at least one trade")
        self.capacity = capacity
        # One flat array of rows: an append is one call on the market's hot path.
        self._rows = array("q")
        self._head = 0  # row of the oldest trade once the ring is full
        self.evicted = 0
        self.last_evicted_ms: int | None = None  # candles starting later lost nothing

    def append(self, seq: int, ms: int, price: int, volume: int, buy: bool, prev: int) -> None:
        """Record one trade (``seq`` above every one before it)."""
        rows = self._rows
        if len(rows) < self.capacity * _FIELDS:
            rows.extend((seq, ms, price, volume, buy, prev))
            return
        k = self._head * _FIELDS
        self.last_evicted_ms = rows[k + 1]
        self.evicted += 1
        rows[k] = seq
        rows[k + 1] = ms
        rows[k + 2] = price
        rows[k + 3] = volume
        rows[k + 4] = buy
        rows[k + 5] = prev
        self._head = (self._head + 1) % self.capacity

    def __len__(self) -> int:
        return len(self._rows) // _FIELDS

    def _at(self, i: int) -> int:
        """The offset of the ``i``-th oldest row."""
        return (self._head + i) % self.capacity * _FIELDS

    def trade(self, i: int) -> LoggedTrade:
        """The ``i``-th oldest trade kept (0 is the oldest)."""
        k = self._at(i)
        seq, ms, price, volume, buy, prev = self._rows[k : k + _FIELDS]
        return LoggedTrade(seq, ms, price, volume, bool(buy), prev)

    @property
    def newest(self) -> LoggedTrade | None:
        return self.trade(len(self) - 1) if self._rows else None

    def count_below(self, seq: int) -> int:
        """How many kept trades have a ``sequential_id`` below ``seq`` (the cursor's cut)."""
        lo, hi = 0, len(self)
        rows, at = self._rows, self._at
        while lo < hi:
            mid = (lo + hi) // 2
            if rows[at(mid)] < seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def newest_first(
        self,
        count: int,
        *,
        below_seq: int | None = None,
        from_ms: int | None = None,
        below_ms: int | None = None,
    ) -> list[LoggedTrade]:
        """Up to ``count`` trades, newest first: ``sequential_id < below_seq`` and
        ``from_ms <= timestamp < below_ms`` (each bound optional)."""
        i = len(self) if below_seq is None else self.count_below(below_seq)
        out: list[LoggedTrade] = []
        rows, at = self._rows, self._at
        # Times are scanned, not bisected: the wall clock may step back (the ids never do).
        while i > 0 and len(out) < count:
            i -= 1
            t = rows[at(i) + 1]
            if from_ms is not None and t < from_ms:
                break
            if below_ms is None or t < below_ms:
                out.append(self.trade(i))
        return out

    def entries(self) -> list[LoggedTrade]:
        """Every kept trade, oldest first."""
        return [self.trade(i) for i in range(len(self))]

    def sequential_ids(self) -> list[int]:
        """Every kept ``sequential_id``, oldest first."""
        k = self._head * _FIELDS
        rows = self._rows
        return [*rows[k::_FIELDS], *rows[:k:_FIELDS]]


__all__ = ["LoggedTrade", "TradeLog"]
