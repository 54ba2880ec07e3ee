"""Who gets which frame: the subscription index and the fan-out of market events (simulator layer).

Pure: no asyncio. The index maps (type, code) to the connections streaming it, each with the
streams it holds for that pair (several orderbook levels may share a code). For every market
event the hub renders each needed variant (format, depth, level) once and pushes the same bytes
to every connection wanting it, which keeps the per-frame cost low enough to offer tens of
thousands of frames a second. Rendering happens only for pairs someone subscribes to.

Connections are :class:`Sink` objects: a current format and a ``push`` that queues bytes. The
hub collects the sinks it pushed to in ``woken``, so the I/O layer wakes each sender once per
burst rather than once per frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from broker.upbit.types import DataType, Format, StreamType
from simulator.encode import Encoder
from simulator.market import (
    CANDLE_TYPES,
    CodeState,
    Event,
    Market,
    candle_values,
    orderbook_units,
    ticker_values,
    trade_values,
)
from simulator.session import Stream

REALTIME = StreamType.REALTIME.value
SNAPSHOT = StreamType.SNAPSHOT.value
_CANDLE_INDEX = {t: i for i, t in enumerate(CANDLE_TYPES)}


class Sink(Protocol):
    """A connection as the hub sees it."""

    @property
    def format(self) -> Format: ...

    def push(self, frame: bytes) -> None: ...


def _level_ticks(st: CodeState, level: float) -> int:
    return round(level * st.div / st.mul) if level else 0


class Hub:
    """Subscription index plus rendering of events, snapshots and candles into frames."""

    def __init__(self, market: Market, encoder: Encoder) -> None:
        self.market = market
        self.encoder = encoder
        self._index: dict[tuple[str, str], dict[Sink, tuple[Stream, ...]]] = {}
        self._streams: dict[Sink, tuple[Stream, ...]] = {}
        self.muted: dict[str, float] = {}  # code -> monotonic time the mute ends
        self.woken: set[Sink] = set()

    # -- index --------------------------------------------------------------------------------

    def attach(self, sink: Sink, streams: Sequence[Stream]) -> None:
        """Make ``streams`` the whole realtime set of ``sink`` (replacing what it had)."""
        self.detach(sink)
        grouped: dict[tuple[str, str], list[Stream]] = {}
        for s in streams:
            grouped.setdefault((s.type, s.code), []).append(s)
        for key, group in grouped.items():
            self._index.setdefault(key, {})[sink] = tuple(group)
        if streams:
            self._streams[sink] = tuple(streams)

    def detach(self, sink: Sink) -> None:
        for s in self._streams.pop(sink, ()):
            peers = self._index.get((s.type, s.code))
            if peers is not None:
                peers.pop(sink, None)
                if not peers:
                    del self._index[(s.type, s.code)]

    def is_muted(self, code: str, now: float) -> bool:
        until = self.muted.get(code)
        if until is None:
            return False
        if until <= now:
            del self.muted[code]
            return False
        return True

    def take_woken(self) -> set[Sink]:
        woken, self.woken = self.woken, set()
        return woken

    # -- realtime -----------------------------------------------------------------------------

    def publish(self, events: Iterable[Event], now: float) -> None:
        """Fan out market events (``Market.step``, consumed one at a time) to the sinks."""
        index = self._index
        muted = self.muted
        for st, is_trade, lo in events:
            code = st.code
            if muted and self.is_muted(code, now):
                continue
            if is_trade:
                peers = index.get(("trade", code))
                if peers:
                    self._flat(peers, "trade", trade_values(st, REALTIME))
                peers = index.get(("ticker", code))
                if peers:
                    self._flat(peers, "ticker", ticker_values(st, REALTIME))
            peers = index.get(("orderbook", code))
            if peers:
                self._orderbook(peers, st, lo, REALTIME)

    def publish_candles(self, states: Iterable[CodeState], now: float) -> None:
        """One push per (unit, code) for codes that traded since the last call."""
        index = self._index
        for st in states:
            if self.muted and self.is_muted(st.code, now):
                continue
            for i, type_ in enumerate(CANDLE_TYPES):
                peers = index.get((type_, st.code))
                if peers:
                    values = candle_values(st, i, REALTIME)
                    cache: dict[Format, bytes] = {}
                    for sink in peers:
                        fmt = sink.format
                        frame = cache.get(fmt)
                        if frame is None:
                            frame = cache[fmt] = self.encoder.candle(values, fmt)
                        sink.push(frame)
                        self.woken.add(sink)

    def _flat(
        self, peers: dict[Sink, tuple[Stream, ...]], type_: str, values: tuple[object, ...]
    ) -> None:
        cache: dict[Format, bytes] = {}
        woken = self.woken
        for sink in peers:
            fmt = sink.format
            frame = cache.get(fmt)
            if frame is None:
                frame = cache[fmt] = self.encoder.flat(type_, values, fmt)
            sink.push(frame)
            woken.add(sink)

    def _orderbook(
        self, peers: dict[Sink, tuple[Stream, ...]], st: CodeState, lo: int, stream_type: str
    ) -> None:
        cache: dict[tuple[Format, int, float], bytes] = {}
        woken = self.woken
        for sink, streams in peers.items():
            fmt = sink.format
            for s in streams:
                if lo >= s.depth and not s.level:
                    continue  # the change is below what this subscriber sees
                key = (fmt, s.depth, s.level)
                frame = cache.get(key)
                if frame is None:
                    book = orderbook_units(st, s.depth, _level_ticks(st, s.level))
                    frame = cache[key] = self.encoder.orderbook(
                        st.code, st.book_ms, book, s.level, stream_type, fmt
                    )
                sink.push(frame)
                woken.add(sink)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshots(self, fmt: Format, streams: Iterable[Stream], now: float) -> list[bytes]:
        """The SNAPSHOT frame of each stream, in order (muted codes give none)."""
        out: list[bytes] = []
        states = self.market.states
        enc = self.encoder
        for s in streams:
            st = states[s.code]
            if self.muted and self.is_muted(s.code, now):
                continue
            if s.type == DataType.TRADE:
                out.append(enc.flat("trade", trade_values(st, SNAPSHOT), fmt))
            elif s.type == DataType.TICKER:
                out.append(enc.flat("ticker", ticker_values(st, SNAPSHOT), fmt))
            elif s.type == DataType.ORDERBOOK:
                # A quiet book's snapshot carries the time of its last change, as on Upbit.
                book = orderbook_units(st, s.depth, _level_ticks(st, s.level))
                out.append(enc.orderbook(st.code, st.book_ms, book, s.level, SNAPSHOT, fmt))
            else:
                st.fold_candles()  # a snapshot shows the latest state, trades of this second too
                values = candle_values(st, _CANDLE_INDEX[s.type], SNAPSHOT)
                out.append(enc.candle(values, fmt))
        return out

    def subscribers(self) -> int:
        """How many (type, code) pairs have at least one realtime subscriber."""
        return len(self._index)


__all__ = ["REALTIME", "SNAPSHOT", "Hub", "Sink"]
