"""The simulated market: per-code state, the event generator and frame values (simulator layer).

Pure: no asyncio and no clock reads; the caller passes the time in. A :class:`Market` turns
"n events at time t" into state changes (trades and book changes) and tells the caller which
codes changed; :func:`trade_values` and friends read a code's state as the field values of a
frame, in Upbit's field order (DEFAULT names; ``simulator.encode`` spells them).

Repeatability: two independent generators, both derived from the seed, pick the codes of
events and draw their contents. Neither is consulted for anything that depends on time or on
who is subscribed, so the same seed yields the same sequence of events however they are
batched into ticks (only timestamps differ).

Records: each trade goes to its code's :class:`~simulator.tradelog.TradeLog` as it is made,
and each candle of the thirteen units (:mod:`simulator.candles`) that a new period closes is
kept in a bounded history, so the REST API answers from what the market did, not from what
anyone received. A candle's amount is an exact integer (size units x price ticks), turned
into a price once, when read: the WebSocket push and the REST answer of one candle, and a
sum over the logged trades, are the same double.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import accumulate
from time import gmtime, strftime
from typing import Any

from broker.upbit.types import CANDLE_SECONDS
from simulator.book import MAX_LEVELS, Book
from simulator.candles import DAY_MS, PERIOD_STARTS, UNIT_MS
from simulator.tradelog import LoggedTrade, TradeLog
from simulator.universe import Listing

SIZE_DIV = 100_000_000  # sizes are integer units of 1e-8
KST_OFFSET_S = 9 * 3600
CANDLE_TYPES: tuple[str, ...] = tuple(t.value for t in CANDLE_SECONDS)
# Candle list slots: start_ms, open, high, low, close (ticks), volume (units), amount (units x
# ticks, exact), last_ms (the latest trade's time), prev (ticks: prev_closing_price at the
# first trade, which a day candle reports).
_START, _OPEN, _HIGH, _LOW, _CLOSE, _VOL, _AMT, _LAST, _PREV = range(9)
_SECOND_MS = 1000
TRADE_LOG_SIZE = 20_000
CANDLE_HISTORY = 1_000


@lru_cache(maxsize=4096)
def _utc_parts(second: int) -> tuple[str, str, str, str]:
    """yyyyMMdd, HHmmss (ticker) and yyyy-MM-dd, HH:mm:ss (trade) of a UTC second."""
    t = gmtime(second)
    return (
        strftime("%Y%m%d", t),
        strftime("%H%M%S", t),
        strftime("%Y-%m-%d", t),
        strftime("%H:%M:%S", t),
    )


@lru_cache(maxsize=4096)
def candle_times(start_s: int) -> tuple[str, str]:
    """``candle_date_time_utc`` and ``candle_date_time_kst`` (KST = UTC+9) of a candle start."""
    fmt = "%Y-%m-%dT%H:%M:%S"
    return strftime(fmt, gmtime(start_s)), strftime(fmt, gmtime(start_s + KST_OFFSET_S))


def kst_parts(ms: int) -> tuple[str, str]:
    """yyyyMMdd and HHmmss in KST (the REST ticker's ``trade_date_kst``/``trade_time_kst``)."""
    d, t, _, _ = _utc_parts(ms // 1000 + KST_OFFSET_S)
    return d, t


def _merge(candle: list[Any], p: list[Any]) -> None:
    """Add a later second of trades ``p`` to ``candle`` of the same period."""
    if p[_HIGH] > candle[_HIGH]:
        candle[_HIGH] = p[_HIGH]
    if p[_LOW] < candle[_LOW]:
        candle[_LOW] = p[_LOW]
    candle[_CLOSE] = p[_CLOSE]
    candle[_VOL] += p[_VOL]
    candle[_AMT] += p[_AMT]
    candle[_LAST] = p[_LAST]


class CodeState:
    """Everything Upbit would know about one code: book, last trade, day stats, candles."""

    __slots__ = (
        "acc_amt", "acc_amt_24h", "acc_ask", "acc_bid", "acc_vol", "acc_vol_24h", "book",
        "book_ms", "candle_pushed_ms", "candles", "code", "day", "div", "h52_date", "h52_px",
        "high_px", "history", "l52_date", "l52_px", "listing", "log", "low_px", "mul", "open_px",
        "pending", "prev_close_px", "seq_id", "trade_best", "trade_buy", "trade_ms", "trade_px",
        "trade_vol",
    )  # fmt: skip

    def __init__(
        self,
        listing: Listing,
        rng: random.Random,
        now_ms: int,
        seq_id: int,
        *,
        log_size: int = TRADE_LOG_SIZE,
        history: int = CANDLE_HISTORY,
    ) -> None:
        self.listing = listing
        self.code = listing.code
        self.mul = listing.tick_mul
        self.div = listing.tick_div
        mid = round(listing.price * listing.tick_div / listing.tick_mul)
        lot = max(1, min(10**13, int(2e6 / listing.krw_value * SIZE_DIV)))
        thin = listing.weight < 0.06 and rng.random() < 0.35
        max_asks = max_bids = MAX_LEVELS
        if thin:  # quiet pairs may show only a few levels on one side
            if rng.random() < 0.5:
                max_asks = 2 + int(rng.random() * 18)
            else:
                max_bids = 2 + int(rng.random() * 18)
        self.book = Book(rng, mid, lot, max_asks, max_bids)
        self.book_ms = now_ms
        self.day = now_ms // DAY_MS
        self.prev_close_px = max(1, round(mid * rng.uniform(0.97, 1.03)))
        self.open_px = self.prev_close_px
        self.high_px = max(mid, self.open_px)
        self.low_px = min(mid, self.open_px)
        self.acc_vol = int(lot * rng.uniform(500, 5000))
        self.acc_amt = self.acc_vol / SIZE_DIV * listing.price
        self.acc_ask = self.acc_vol // 2
        self.acc_bid = self.acc_vol - self.acc_ask
        self.acc_vol_24h = int(self.acc_vol * rng.uniform(1.5, 3.0))
        self.acc_amt_24h = self.acc_vol_24h / SIZE_DIV * listing.price
        self.h52_px = round(mid * rng.uniform(1.2, 2.0))
        self.l52_px = max(1, round(mid * rng.uniform(0.4, 0.8)))
        self.h52_date = _utc_parts(now_ms // 1000 - 120 * 86400)[2]
        self.l52_date = _utc_parts(now_ms // 1000 - 290 * 86400)[2]
        # One trade before the start, so a trade or candle snapshot always has something.
        self.trade_px = self.book.best_bid
        self.trade_vol = 1 + int(rng.random() * lot)
        self.trade_buy = False
        self.trade_ms = now_ms
        self.seq_id = seq_id
        self.trade_best = (self.book.best_ask, self.book.ask_sz[0], self.book.best_bid,
                           self.book.bid_sz[0])  # fmt: skip
        # That trade is on record like any other: its snapshot frame names its sequential_id.
        self.log = TradeLog(log_size)
        self.log.append(seq_id, now_ms, self.trade_px, self.trade_vol, False, self.prev_close_px)
        px, vol = self.trade_px, self.trade_vol
        # The open candle of each unit (index as simulator.candles), and the closed ones.
        self.candles: list[list[Any]] = [
            [start(now_ms), px, px, px, px, vol, vol * px, now_ms, self.prev_close_px]
            for start in PERIOD_STARTS
        ]
        self.history: list[deque[list[Any]]] = [deque(maxlen=history) for _ in PERIOD_STARTS]
        # Trades of the current second, folded into the candles when the second changes or a
        # candle is read: one update per trade instead of thirteen.
        self.pending: list[Any] | None = None
        self.candle_pushed_ms = now_ms  # the last trade a REALTIME candle push included

    def price(self, ticks: int) -> float:
        return ticks * self.mul / self.div

    def trade(self, rng: random.Random, now_ms: int, seq_id: int) -> None:
        """One taker trade at ``now_ms``: the book, day stats, and all nine candles move."""
        buy = rng.random() < 0.5
        px, vol = self.book.take(buy, rng)
        if now_ms // DAY_MS != self.day:  # 00:00 UTC: a new trading day
            self.day = now_ms // DAY_MS
            self.prev_close_px = self.trade_px
            self.open_px = self.high_px = self.low_px = px
            self.acc_vol_24h, self.acc_amt_24h = self.acc_vol, self.acc_amt
            self.acc_vol = self.acc_ask = self.acc_bid = 0
            self.acc_amt = 0.0
        self.trade_px, self.trade_vol, self.trade_buy = px, vol, buy
        self.trade_ms = self.book_ms = now_ms
        self.seq_id = seq_id
        book = self.book
        self.trade_best = (book.ask_px[0], book.ask_sz[0], book.bid_px[0], book.bid_sz[0])
        if px > self.high_px:
            self.high_px = px
            if px > self.h52_px:
                self.h52_px, self.h52_date = px, _utc_parts(now_ms // 1000)[2]
        elif px < self.low_px:
            self.low_px = px
            if px < self.l52_px:
                self.l52_px, self.l52_date = px, _utc_parts(now_ms // 1000)[2]
        amount = vol / SIZE_DIV * (px * self.mul / self.div)
        self.acc_vol += vol
        self.acc_vol_24h += vol
        self.acc_amt += amount
        self.acc_amt_24h += amount
        if buy:
            self.acc_bid += vol
        else:
            self.acc_ask += vol
        self.log.append(seq_id, now_ms, px, vol, buy, self.prev_close_px)
        p = self.pending
        second = now_ms - now_ms % _SECOND_MS
        if p is None or p[_START] != second:
            if p is not None:
                self.fold_candles()
            self.pending = [second, px, px, px, px, vol, vol * px, now_ms, self.prev_close_px]
        else:
            if px > p[_HIGH]:
                p[_HIGH] = px
            elif px < p[_LOW]:
                p[_LOW] = px
            p[_CLOSE] = px
            p[_VOL] += vol
            p[_AMT] += vol * px
            p[_LAST] = now_ms

    def fold_candles(self) -> None:
        """Fold the pending second of trades into the candles (call before reading them)."""
        p = self.pending
        if p is None:
            return
        self.pending = None
        second, _, high, low, close, vol, amount, last, _ = p  # the slots, in order
        candles, history = self.candles, self.history
        # Inlined (no call per unit): this runs once per code and second with trades.
        for i, unit in enumerate(UNIT_MS):
            start = second - second % unit if unit else PERIOD_STARTS[i](second)
            candle = candles[i]
            if candle[_START] != start:
                history[i].append(candle)  # closed: kept for the REST API, never changed again
                candles[i] = [start, *p[1:]]
                continue
            if high > candle[_HIGH]:
                candle[_HIGH] = high
            if low < candle[_LOW]:
                candle[_LOW] = low
            candle[_CLOSE] = close
            candle[_VOL] += vol
            candle[_AMT] += amount
            candle[_LAST] = last

    def candle_list(self, index: int) -> Iterator[list[Any]]:
        """Candles of unit ``index`` (see :mod:`simulator.candles`), newest first: the open
        one with this second's trades folded into a copy (the state is left as it is, so a
        REST read never changes what the next WebSocket push holds), then the closed ones."""
        current = self.candles[index]
        p = self.pending
        if p is not None:
            start = PERIOD_STARTS[index](p[_START])
            if start != current[_START]:
                yield [start, *p[1:]]
                yield list(current)
            else:
                merged = list(current)
                _merge(merged, p)
                yield merged
        else:
            yield list(current)
        for candle in reversed(self.history[index]):
            yield list(candle)

    def quote(self, rng: random.Random, now_ms: int) -> int:
        """One book change; returns the first orderbook unit index it touched."""
        self.book_ms = now_ms
        r = rng.random()
        if r < 0.6:
            return self.book.resize(rng)
        if r < 0.85:
            return self.book.improve(rng)
        return self.book.retreat(rng)


#: One market event: the code's state, whether it was a trade, the first book unit it changed.
Event = tuple[CodeState, bool, int]


class Market:
    """All codes, and the generator of market events."""

    def __init__(
        self,
        listings: Sequence[Listing],
        *,
        seed: int,
        trade_share: float,
        now_ms: int,
        trade_log_size: int = TRADE_LOG_SIZE,
        candle_history: int = CANDLE_HISTORY,
    ) -> None:
        init = random.Random(f"{seed}:init")
        self._pick = random.Random(f"{seed}:pick")
        self._rng = random.Random(f"{seed}:events")
        self.trade_share = trade_share
        self.seq_id = now_ms * 10_000
        self.states: dict[str, CodeState] = {}
        for listing in listings:
            self.seq_id += 1
            self.states[listing.code] = CodeState(
                listing, init, now_ms, self.seq_id, log_size=trade_log_size, history=candle_history
            )
        self._order = list(self.states.values())
        self._cum = list(accumulate(s.listing.weight for s in self._order))
        self.events = 0
        self.trades = 0
        self.candle_dirty: set[CodeState] = set()

    def step(self, n: int, now_ms: int) -> Iterator[Event]:
        """Apply ``n`` events at ``now_ms``, one per iteration: (state, is_trade, first changed
        book unit). Read the state before advancing: the next event may change it again."""
        if n <= 0:
            return
        rng = self._rng
        share = self.trade_share
        dirty = self.candle_dirty
        self.events += n
        for st in self._pick.choices(self._order, cum_weights=self._cum, k=n):
            if rng.random() < share:
                # sequential_id = trade_timestamp * 10000 + n, strictly increasing across codes.
                self.seq_id = max(now_ms * 10_000, self.seq_id + 1)
                st.trade(rng, now_ms, self.seq_id)
                self.trades += 1
                dirty.add(st)
                yield st, True, 0
            else:
                yield st, False, st.quote(rng, now_ms)

    def candle_updates(self, boundary_ms: int) -> list[CodeState]:
        """Codes whose candles gained trades before ``boundary_ms`` since the last call.

        Their candles then hold exactly the trades before the boundary (unless a snapshot
        folded more), so a push at a second boundary shows each 1-s candle complete; trades of
        the second just begun wait for the next call.
        """
        out: list[CodeState] = []
        keep: set[CodeState] = set()
        for st in self.candle_dirty:
            p = st.pending
            if p is not None:
                if p[_START] < boundary_ms:
                    st.fold_candles()
                else:
                    keep.add(st)
            last = st.candles[0][_LAST]  # the 1-s candle holds the latest folded trade
            if last > st.candle_pushed_ms:
                st.candle_pushed_ms = last
                out.append(st)
        self.candle_dirty = keep
        return out

    def thin_codes(self) -> list[str]:
        """Codes whose book has fewer than 30 levels on a side (zero-padded in frames)."""
        return [
            s.code
            for s in self._order
            if s.book.max_asks < MAX_LEVELS or s.book.max_bids < MAX_LEVELS
        ]


# -- frame values, DEFAULT field order (see simulator.encode) ----------------------------------


def _change(st: CodeState, px: int) -> tuple[str, float]:
    diff = px - st.prev_close_px
    return ("RISE" if diff > 0 else "FALL" if diff < 0 else "EVEN"), st.price(abs(diff))


def trade_values(st: CodeState, stream_type: str) -> tuple[Any, ...]:
    _, _, date, time_ = _utc_parts(st.trade_ms // 1000)
    change, change_price = _change(st, st.trade_px)
    bap, bas, bbp, bbs = st.trade_best
    return (
        "trade", st.code, st.trade_ms, date, time_, st.trade_ms, st.price(st.trade_px),
        st.trade_vol / SIZE_DIV, "BID" if st.trade_buy else "ASK", st.price(st.prev_close_px),
        change, change_price, st.seq_id, st.price(bap), bas / SIZE_DIV, st.price(bbp),
        bbs / SIZE_DIV, stream_type,
    )  # fmt: skip


def rest_trade(st: CodeState, t: LoggedTrade) -> dict[str, Any]:
    """A logged trade in the shape of ``GET /v1/trades/ticks``, fields in Upbit's order.

    ``timestamp`` is the trade's time (the WebSocket frame's ``trade_timestamp``);
    ``change_price`` is signed here (trade_price - prev_closing_price: recorded answers show
    ``-224000.0``), where the WebSocket frame gives it unsigned beside ``change``.
    """
    _, _, date, time_ = _utc_parts(t.timestamp // 1000)
    return {
        "market": st.code,
        "trade_date_utc": date,
        "trade_time_utc": time_,
        "timestamp": t.timestamp,
        "trade_price": st.price(t.price),
        "trade_volume": t.volume / SIZE_DIV,
        "prev_closing_price": st.price(t.prev_close),
        "change_price": st.price(t.price - t.prev_close),
        "ask_bid": "BID" if t.buy else "ASK",
        "sequential_id": t.sequential_id,
    }


def ticker_values(st: CodeState, stream_type: str) -> tuple[Any, ...]:
    date, time_, _, _ = _utc_parts(st.trade_ms // 1000)
    change, change_price = _change(st, st.trade_px)
    prev = st.price(st.prev_close_px)
    rate = round(change_price / prev, 10) if prev else 0.0
    sign = -1.0 if change == "FALL" else 1.0
    return (
        "ticker", st.code, st.price(st.open_px), st.price(st.high_px), st.price(st.low_px),
        st.price(st.trade_px), prev, st.acc_amt, change, change_price, sign * change_price,
        rate, sign * rate, "BID" if st.trade_buy else "ASK", st.trade_vol / SIZE_DIV,
        st.acc_vol / SIZE_DIV, date, time_, st.trade_ms, st.acc_ask / SIZE_DIV,
        st.acc_bid / SIZE_DIV, st.price(st.h52_px), st.h52_date, st.price(st.l52_px),
        st.l52_date, "ACTIVE", False, None, "CAUTION" if st.listing.warning else "NONE",
        st.trade_ms, st.acc_amt_24h,
        st.acc_vol_24h / SIZE_DIV, stream_type,
    )  # fmt: skip


Unit = tuple[float, float, float, float]


def orderbook_units(st: CodeState, depth: int, level_ticks: int) -> tuple[list[Unit], float, float]:
    """``depth`` units (ask_price, bid_price, ask_size, bid_size), zero-padded, and totals.

    ``level_ticks`` > 1 groups prices in buckets of that many ticks.
    """
    book = st.book
    if level_ticks > 1:
        ask_px, ask_sz, bid_px, bid_sz = book.grouped(level_ticks)
    else:
        ask_px, ask_sz, bid_px, bid_sz = book.ask_px, book.ask_sz, book.bid_px, book.bid_sz
    mul, div = st.mul, st.div
    na, nb = min(depth, len(ask_px)), min(depth, len(bid_px))
    units: list[Unit] = []
    for i in range(depth):
        a = i < na
        b = i < nb
        units.append((
            ask_px[i] * mul / div if a else 0.0,
            bid_px[i] * mul / div if b else 0.0,
            ask_sz[i] / SIZE_DIV if a else 0.0,
            bid_sz[i] / SIZE_DIV if b else 0.0,
        ))  # fmt: skip
    return units, sum(ask_sz[:na]) / SIZE_DIV, sum(bid_sz[:nb]) / SIZE_DIV


def candle_amount(st: CodeState, units_ticks: int) -> float:
    """An exact sum of size units x price ticks as a price (the correctly rounded double)."""
    return units_ticks * st.mul / (st.div * SIZE_DIV)


def candle_values(st: CodeState, index: int, stream_type: str) -> tuple[Any, ...]:
    """A candle as last folded (``fold_candles`` first for a snapshot of the latest state)."""
    c = st.candles[index]
    utc, kst = candle_times(c[_START] // 1000)
    return (
        CANDLE_TYPES[index], st.code, utc, kst, st.price(c[_OPEN]), st.price(c[_HIGH]),
        st.price(c[_LOW]), st.price(c[_CLOSE]), c[_VOL] / SIZE_DIV, candle_amount(st, c[_AMT]),
        c[_LAST], stream_type,
    )  # fmt: skip


def rest_candle(st: CodeState, c: list[Any]) -> dict[str, Any]:
    """One candle of :meth:`CodeState.candle_list` in the REST API's common fields, in
    Upbit's order; the caller adds ``unit``, ``prev_closing_price``... per endpoint."""
    utc, kst = candle_times(c[_START] // 1000)
    return {
        "market": st.code,
        "candle_date_time_utc": utc,
        "candle_date_time_kst": kst,
        "opening_price": st.price(c[_OPEN]),
        "high_price": st.price(c[_HIGH]),
        "low_price": st.price(c[_LOW]),
        "trade_price": st.price(c[_CLOSE]),
        "timestamp": c[_LAST],
        "candle_acc_trade_price": candle_amount(st, c[_AMT]),
        "candle_acc_trade_volume": c[_VOL] / SIZE_DIV,
    }


def candle_start(c: list[Any]) -> int:
    """A candle's start (ms)."""
    return int(c[_START])


def day_change(st: CodeState, c: list[Any]) -> dict[str, Any]:
    """A day candle's ``prev_closing_price`` (the one in force that day), and its signed
    ``change_price`` and ``change_rate`` against it (recorded answers: ``-685000.0``,
    ``-0.0072164514``)."""
    prev = c[_PREV]
    return {
        "prev_closing_price": st.price(prev),
        "change_price": st.price(c[_CLOSE] - prev),
        "change_rate": round((c[_CLOSE] - prev) / prev, 10) if prev else 0.0,
    }


__all__ = [
    "CANDLE_HISTORY",
    "CANDLE_TYPES",
    "DAY_MS",
    "SIZE_DIV",
    "TRADE_LOG_SIZE",
    "CodeState",
    "Event",
    "Market",
    "candle_amount",
    "candle_start",
    "candle_times",
    "candle_values",
    "day_change",
    "kst_parts",
    "orderbook_units",
    "rest_candle",
    "rest_trade",
    "ticker_values",
    "trade_values",
]
