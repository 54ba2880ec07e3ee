"""The back-fill planners and the gap desk (broker/core/backfill.py), and how the leader core
queues jobs and follow-ups: tables on plain values, no Redis, no sockets, no event loop.

A tape of trades stands for Upbit's trade log; the history is what a broker holding that tape
would have (live entries before and after a gap, perhaps back-filled ones); a fake REST answers
pages of the tape the way Upbit does (newest first, ``cursor`` exclusive, one UTC day at a
time when asked to)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import pytest

from broker.contract import GapEvent
from broker.core.backfill import (
    ANCHOR_MARGIN_MS,
    DAY_MS,
    MAX_DAYS_AGO,
    MAX_DEFER_MS,
    MAX_MERGED_SPAN_MS,
    SETTLE_MS,
    BackfillDesk,
    CandleFill,
    CandleHistory,
    Mark,
    Outcome,
    StreamResult,
    TradeFill,
    TradeHistory,
    TradeRequest,
    Window,
)
from broker.core.gaps import Loss
from broker.core.leader import LeaderCore
from broker.core.stats import Counters
from broker.upbit.rest_frames import RestCandle, RestTrade, format_candle_to
from broker.upbit.types import StreamKey
from tests.test_leader_core import (
    T0_MS,
    connect,
    events,
    leading,
    lease,
    list_leases,
    settings,
)

T0 = 1_700_000_000_000  # ms, a whole day boundary is T0 - T0 % DAY_MS
TRADE = StreamKey("trade", "KRW-BTC")
CANDLE = StreamKey("candle.1m", "KRW-BTC")


def trade(ts: int, sid: int) -> RestTrade:
    return RestTrade(
        market="KRW-BTC",
        trade_date_utc="2023-11-14",
        trade_time_utc="22:13:20",
        timestamp=ts,
        trade_price=1.0,
        trade_volume=1.0,
        prev_closing_price=1.0,
        change_price=0.0,
        ask_bid="BID",
        sequential_id=sid,
    )


def tape(start: int, count: int, step: int = 100) -> list[RestTrade]:
    """``count`` trades from ``start``, every ``step`` ms, ids ``ts * 10 + 1``."""
    return [trade(start + i * step, (start + i * step) * 10 + 1) for i in range(count)]


class FakeTicks:
    """``/v1/trades/ticks`` over ``trades``: newest first, older than ``cursor``; with
    ``by_day``, one UTC day at a time (the latest trade's, or ``days_ago`` before it)."""

    def __init__(self, trades: Sequence[RestTrade], *, by_day: bool = False) -> None:
        self.trades = sorted(trades, key=lambda t: (t.timestamp, t.sequential_id), reverse=True)
        self.by_day = by_day
        self.requests: list[TradeRequest] = []

    def page(self, request: TradeRequest, count: int) -> list[RestTrade]:
        self.requests.append(request)
        out = self.trades
        if self.by_day and out:
            day = out[0].timestamp - out[0].timestamp % DAY_MS - request.days_ago * DAY_MS
            out = [t for t in out if day <= t.timestamp < day + DAY_MS]
        if request.cursor is not None:
            out = [t for t in out if t.sequential_id < request.cursor]
        return out[:count]


def history_of(entries: Iterable[tuple[RestTrade, bool]], since_ms: int) -> TradeHistory:
    """A TradeHistory fed ``(trade, live)`` entries given oldest first (as XADDed)."""
    history = TradeHistory(since_ms)
    for t, live in reversed(list(entries)):
        if history.entry(Mark(t.timestamp, t.sequential_id), live=live):
            break
    return history


def run(plan: TradeFill, ticks: FakeTicks, page_size: int) -> list[RestTrade]:
    while not plan.done:
        plan.page(ticks.page(plan.request(), page_size))
    return plan.missing()


def sids(trades: Iterable[RestTrade]) -> list[int]:
    return [t.sequential_id for t in trades]


# -- trades ------------------------------------------------------------------------------------


def test_the_missed_trades_are_found_and_only_those() -> None:
    everything = tape(T0, 100)  # one trade every 100 ms for 10 s
    since, until = T0 + 4_000, T0 + 6_000  # nothing published from 4 s to 6 s (and a bit)
    before = [t for t in everything if t.timestamp <= since]
    after = [t for t in everything if t.timestamp >= until + 500]  # the stream resumed late
    live = [(t, True) for t in before + after[:20]]  # 20 live entries since
    history = history_of(live, since)
    assert history.anchor == Mark(T0 + 3_000, (T0 + 3_000) * 10 + 1)  # 1 s margin
    assert history.newest == Mark(after[19].timestamp, after[19].sequential_id)
    plan = TradeFill(Window(since, until), history, page_size=7)
    assert plan.request() == TradeRequest(after[19].sequential_id, 0)  # starts below the cutoff
    missing = run(plan, FakeTicks(everything), 7)
    expected = [t for t in everything if since < t.timestamp < until + 500]
    assert sids(missing) == sids(expected)
    assert plan.outcome is Outcome.COMPLETE


def test_without_live_entries_after_the_gap_the_gaps_end_is_the_cutoff() -> None:
    everything = tape(T0, 100)
    since, until = T0 + 4_000, T0 + 6_000
    history = history_of([(t, True) for t in everything if t.timestamp <= since], since)
    assert history.newest == Mark(T0 + 4_000, (T0 + 4_000) * 10 + 1)  # within the margin
    plan = TradeFill(Window(since, until), history, page_size=500)
    assert plan.request() == TradeRequest(None, 0)
    missing = run(plan, FakeTicks(everything), 500)
    assert sids(missing) == sids(t for t in everything if since < t.timestamp <= until)


def test_known_entries_back_filled_ones_included_are_not_appended_again() -> None:
    everything = tape(T0, 60)
    since, until = T0 + 3_000, T0 + 4_000
    before = [(t, True) for t in everything if t.timestamp <= since]
    resumed = [(t, True) for t in everything if t.timestamp >= until]
    # an earlier job already appended half the gap, after the live entries
    earlier = [(t, False) for t in everything if since < t.timestamp <= since + 500]
    history = history_of(before + resumed + earlier, since)
    # back-filled entries (old trades, appended last) never pass for the anchor or the newest
    assert history.newest == Mark(everything[-1].timestamp, everything[-1].sequential_id)
    assert history.anchor is not None and history.anchor.timestamp == since - ANCHOR_MARGIN_MS
    missing = run(TradeFill(Window(since, until), history), FakeTicks(everything), 500)
    assert sids(missing) == sids(t for t in everything if since + 500 < t.timestamp < until)


def test_trades_are_appended_by_time_then_id_whatever_the_order_of_ids() -> None:
    since, until = T0 + 2_000, T0 + 3_000
    anchor = trade(T0, 500)
    # ids do not follow time (Upbit promises uniqueness, not order)
    gap = [trade(T0 + 2_100, 90), trade(T0 + 2_100, 40), trade(T0 + 2_500, 10)]
    after = trade(T0 + 3_500, 999)
    history = history_of([(anchor, True), (after, True)], since)
    plan = TradeFill(Window(since, until), history)
    # the server's order (newest first by its own rule), not sorted by id
    plan.page([after, gap[2], gap[0], gap[1], anchor])
    assert plan.done and plan.outcome is Outcome.COMPLETE
    assert sids(plan.missing()) == [40, 90, 10]


def test_a_trade_newer_than_the_newest_live_entry_is_left_to_the_live_stream() -> None:
    since, until = T0 + 2_000, T0 + 3_000
    anchor, newest = trade(T0, 1), trade(T0 + 3_200, 5)
    history = history_of([(anchor, True), (newest, True)], since)
    plan = TradeFill(Window(since, until), history)
    # in flight: traded after the newest live entry, not in the history yet
    plan.page([trade(T0 + 3_300, 6), newest, trade(T0 + 2_500, 3), trade(T0 + 2_500, 4), anchor])
    assert sids(plan.missing()) == [3, 4]


def test_without_an_anchor_paging_stops_before_the_gaps_start() -> None:
    everything = tape(T0, 100)
    since, until = T0 + 8_000, T0 + 9_000
    history = history_of([], since)  # an empty (or capped) history
    assert history.anchor is None and history.newest is None
    ticks = FakeTicks(everything)
    missing = run(TradeFill(Window(since, until), history, page_size=10), ticks, 10)
    floor = since - ANCHOR_MARGIN_MS
    assert sids(missing) == sids(t for t in everything if floor <= t.timestamp <= until)
    # 9.9 s .. 9.0, 8.9 .. 8.0, 7.9 .. 7.0 (7.0 is the floor), 6.9 ..: older, stops there
    assert len(ticks.requests) == 4


def test_the_page_limit_makes_it_incomplete() -> None:
    everything = tape(T0, 100)
    since, until = T0 + 1_000, T0 + 9_000
    history = history_of([(everything[0], True)], since)
    plan = TradeFill(Window(since, until), history, page_size=10, max_pages=3)
    missing = run(plan, FakeTicks(everything), 10)
    assert plan.outcome is Outcome.INCOMPLETE and plan.pages == 3
    assert len(missing) == 21  # 9.0 s, then 8.9 .. 7.0: what the pages found is appended


def test_a_cursor_that_does_not_move_stops_the_paging() -> None:
    history = history_of([(trade(T0, 1), True)], T0 + 5_000)
    plan = TradeFill(Window(T0 + 5_000, T0 + 6_000), history, page_size=3)
    page = [trade(T0 + 5_900, 9), trade(T0 + 5_800, 8), trade(T0 + 5_700, 7)]
    plan.page(page)
    assert not plan.done and plan.request() == TradeRequest(7, 0)
    plan.page(page)  # a server that ignores the cursor
    assert plan.done and plan.outcome is Outcome.INCOMPLETE
    assert sids(plan.missing()) == [7, 8, 9]


def test_a_gap_across_midnight_asks_for_the_day_before() -> None:
    midnight = T0 - T0 % DAY_MS + DAY_MS
    everything = tape(midnight - 3_000, 60)  # 3 s before midnight to 3 s after
    since, until = midnight - 1_500, midnight + 1_000
    live = [(t, True) for t in everything if t.timestamp <= since or t.timestamp >= until + 200]
    history = history_of(live, since)
    ticks = FakeTicks(everything, by_day=True)
    plan = TradeFill(Window(since, until), history, page_size=500)
    missing = run(plan, ticks, 500)
    assert [r.days_ago for r in ticks.requests] == [0, 1]
    assert ticks.requests[1].cursor is None
    assert sids(missing) == sids(t for t in everything if since < t.timestamp < until + 200)
    assert plan.outcome is Outcome.COMPLETE


def test_a_server_that_ignores_days_ago_leaves_the_stream_incomplete() -> None:
    midnight = T0 - T0 % DAY_MS + DAY_MS
    since, until = midnight - 5_000, midnight + 1_000
    history = history_of([(trade(midnight - 9_000, 1), True)], since)
    plan = TradeFill(Window(since, until), history, page_size=5)
    short = [trade(midnight + 500, 3), trade(midnight + 100, 2)]  # today's, then the day's end
    plan.page(short)
    assert plan.request() == TradeRequest(None, 1)
    plan.page(short)  # the same trades again: yesterday's cannot be had from this server
    assert plan.done and plan.outcome is Outcome.INCOMPLETE
    assert sids(plan.missing()) == [2, 3]


def test_a_gap_across_midnight_whose_first_page_is_empty_asks_for_the_day_before() -> None:
    """Gap 23:59:50 .. 00:00:10; the first live trade after it (the cutoff) is the day's
    first, so nothing of that day lies below it: the 23:59:55 trade is the day before's."""
    midnight = T0 - T0 % DAY_MS + DAY_MS
    since, until = midnight - 10_000, midnight + 10_000
    anchor, lost = trade(midnight - 12_000, 11), trade(midnight - 5_000, 12)
    first_today = trade(midnight + 11_000, 13)
    history = history_of([(anchor, True), (first_today, True)], since)
    ticks = FakeTicks([anchor, lost, first_today], by_day=True)
    plan = TradeFill(Window(since, until), history)
    missing = run(plan, ticks, 500)
    assert ticks.requests == [TradeRequest(13, 0), TradeRequest(None, 1)]
    assert sids(missing) == [12]
    assert plan.outcome is Outcome.COMPLETE


def test_a_date_that_turned_after_the_cutoff_is_paged_the_day_before() -> None:
    """The gap and the cutoff are before midnight, the job runs after it: Upbit's latest date
    is the new day, whose trades are all newer than the cutoff (an empty first page)."""
    midnight = T0 - T0 % DAY_MS + DAY_MS
    everything = tape(midnight - 20_000, 400)  # up to 20 s past midnight
    since, until = midnight - 15_000, midnight - 10_000
    live = [(t, True) for t in everything if t.timestamp <= since or until + 500 <= t.timestamp]
    history = history_of([e for e in live if e[0].timestamp < midnight - 5_000], since)
    ticks = FakeTicks(everything, by_day=True)
    plan = TradeFill(Window(since, until), history)
    missing = run(plan, ticks, 500)
    assert [r.days_ago for r in ticks.requests] == [0, 1]
    assert sids(missing) == sids(t for t in everything if since < t.timestamp < until + 500)
    assert plan.outcome is Outcome.COMPLETE


def test_a_day_without_trades_is_passed_over_while_the_gap_starts_before_it() -> None:
    day = T0 - T0 % DAY_MS
    # no trades on the day before: the gap began two days back (a long outage)
    anchor, lost = trade(day - DAY_MS - 60_000, 1), trade(day - DAY_MS - 30_000, 2)
    today = trade(day + 60_000, 3)
    history = history_of([(anchor, True), (today, True)], day - DAY_MS - 40_000)
    ticks = FakeTicks([anchor, lost, today], by_day=True)
    plan = TradeFill(Window(day - DAY_MS - 40_000, day + 30_000), history)
    missing = run(plan, ticks, 500)
    assert [r.days_ago for r in ticks.requests] == [0, 1, 2]
    assert sids(missing) == [2] and plan.outcome is Outcome.COMPLETE


def test_a_gap_older_than_the_days_upbit_keeps_is_incomplete() -> None:
    day = T0 - T0 % DAY_MS
    today = trade(day + 60_000, 3)
    since = day - (MAX_DAYS_AGO + 1) * DAY_MS
    history = history_of([(today, True)], since)
    plan = TradeFill(Window(since, day + 30_000), history, max_pages=50)
    run(plan, FakeTicks([today], by_day=True), 500)
    assert plan.request().days_ago == MAX_DAYS_AGO and plan.outcome is Outcome.INCOMPLETE


def test_an_aborted_fill_keeps_what_it_found() -> None:
    history = history_of([(trade(T0, 1), True)], T0 + 5_000)
    plan = TradeFill(Window(T0 + 5_000, T0 + 6_000), history, page_size=2)
    plan.abort()
    assert plan.outcome is Outcome.FAILED and plan.missing() == []
    plan = TradeFill(Window(T0 + 5_000, T0 + 6_000), history, page_size=2)
    plan.page([trade(T0 + 5_900, 9), trade(T0 + 5_800, 8)])
    plan.abort()
    assert plan.outcome is Outcome.INCOMPLETE and sids(plan.missing()) == [8, 9]


# -- candles -----------------------------------------------------------------------------------

MINUTE = 60_000


def candle(start: int, last: int) -> RestCandle:
    at = format_candle_to(start).removesuffix("Z")
    return RestCandle(
        market="KRW-BTC",
        candle_date_time_utc=at,
        candle_date_time_kst=at,
        opening_price=1.0,
        high_price=1.0,
        low_price=1.0,
        trade_price=1.0,
        timestamp=last,
        candle_acc_trade_price=1.0,
        candle_acc_trade_volume=1.0,
    )


class FakeCandles:
    def __init__(self, candles: Sequence[RestCandle]) -> None:
        self.candles = sorted(candles, key=lambda c: c.candle_date_time_utc, reverse=True)
        self.requests: list[int] = []

    def page(self, to_ms: int, count: int) -> list[RestCandle]:
        self.requests.append(to_ms)
        to = format_candle_to(to_ms).removesuffix("Z")
        return [c for c in self.candles if c.candle_date_time_utc < to][:count]


def test_complete_candles_the_history_lacks_are_found() -> None:
    base = T0 - T0 % MINUTE
    # one candle a minute for 10 minutes; each finished at start + 59 s
    upbit = [candle(base + i * MINUTE, base + i * MINUTE + 59_000) for i in range(10)]
    since = base + 3 * MINUTE + 30_000  # half-way into the 4th candle
    until = base + 6 * MINUTE + 10_000  # the 7th candle is open at the reconnect
    history = CandleHistory(MINUTE, since)
    entries = [  # newest first: live after the gap, then the half candle before it
        (base + 7 * MINUTE, base + 7 * MINUTE + 5_000, True),
        (base + 6 * MINUTE, base + 6 * MINUTE + 59_000, True),
        (base + 5 * MINUTE, base + 5 * MINUTE + 59_000, False),  # back-filled before: complete
        (base + 3 * MINUTE, base + 3 * MINUTE + 20_000, True),  # seen half-way
        (base + 2 * MINUTE, base + 2 * MINUTE + 59_000, True),  # ended before the window
        (base + 1 * MINUTE, base + 1 * MINUTE + 59_000, True),  # not read
    ]
    for start, last, live in entries:
        if history.entry(start, last, live=live):
            break
    assert history.newest_start == base + 7 * MINUTE and history.done
    assert base + MINUTE not in history.known
    plan = CandleFill(Window(since, until), history, page_size=2)
    assert plan.request() == base + 7 * MINUTE  # the newest live candle is the live stream's
    fake = FakeCandles(upbit)
    while not plan.done:
        plan.page(fake.page(plan.request(), 2))
    starts = [c.candle_date_time_utc for c in plan.missing()]
    assert starts == [format_candle_to(base + i * MINUTE).removesuffix("Z") for i in (3, 4)]
    assert plan.outcome is Outcome.COMPLETE
    assert fake.requests == [base + 7 * MINUTE, base + 5 * MINUTE, base + 3 * MINUTE]


def test_without_live_candles_the_gaps_end_bounds_the_candles() -> None:
    base = T0 - T0 % MINUTE
    upbit = [candle(base + i * MINUTE, base + i * MINUTE + 59_000) for i in range(10)]
    since, until = base + 2 * MINUTE + 10_000, base + 4 * MINUTE + 30_000
    history = CandleHistory(MINUTE, since)
    plan = CandleFill(Window(since, until), history)
    plan.page(FakeCandles(upbit).page(plan.request(), 200))
    # 2 (open at the gap's start) and 3; 4 was open at the reconnect: the live stream's
    assert [c.timestamp for c in plan.missing()] == [base + i * MINUTE + 59_000 for i in (2, 3)]
    assert plan.outcome is Outcome.COMPLETE


def test_a_candle_fill_stops_at_its_page_limit_or_a_page_that_does_not_move() -> None:
    base = T0 - T0 % MINUTE
    upbit = FakeCandles([candle(base + i * MINUTE, base + i * MINUTE + 1) for i in range(50)])
    window = Window(base + 5 * MINUTE, base + 45 * MINUTE)
    history = CandleHistory(MINUTE, window.since_ms)
    plan = CandleFill(window, history, page_size=10, max_pages=2)
    while not plan.done:
        plan.page(upbit.page(plan.request(), 10))
    assert plan.outcome is Outcome.INCOMPLETE and plan.pages == 2
    assert len(plan.missing()) == 20  # minutes 25 .. 44, still appended
    plan = CandleFill(window, history, page_size=3)
    page = upbit.page(plan.request(), 3)
    plan.page(page)
    plan.page(page)  # a server that ignores ``to``
    assert plan.outcome is Outcome.INCOMPLETE and len(plan.missing()) == 3


# -- the desk ----------------------------------------------------------------------------------


def gap(since: int, until: int, reason: str = "reconnect", epoch: int = 2) -> GapEvent:
    return GapEvent(epoch=epoch, since_ms=since, until_ms=until, reason=reason, broker="b1")


CAPS = {"trade": 100, "candle": 10, "ticker": 5}
TICKER = StreamKey("ticker", "KRW-BTC")
BOOK = StreamKey("orderbook", "KRW-ETH", 1000.0)
ETH = StreamKey("trade", "KRW-ETH")


def test_a_job_is_due_once_the_new_connection_flows() -> None:
    desk = BackfillDesk(CAPS)
    desk.gap(gap(T0, T0 + 1_000), [TRADE, TICKER])
    assert desk.next_due_ms() == T0 + 1_000 + SETTLE_MS
    assert desk.take(T0 + 1_000 + SETTLE_MS - 1) is None
    job = desk.take(T0 + 1_000 + SETTLE_MS)
    assert job is not None and desk.pending == 0 and desk.next_due_ms() is None
    assert [(f.key, f.window, f.cap) for f in job.streams] == [(TRADE, Window(T0, T0 + 1_000), 100)]


def test_gaps_queued_before_the_job_merge_per_stream() -> None:
    desk = BackfillDesk(CAPS)
    desk.gap(gap(T0, T0 + 1_000), [TRADE, CANDLE])
    desk.gap(gap(T0 + 1_500, T0 + 2_000, epoch=3), [TRADE, ETH])
    job = desk.take(T0 + 2_000 + SETTLE_MS)
    assert job is not None and len(job.gaps) == 2
    windows = {f.key: f.window for f in job.streams}
    assert windows == {
        CANDLE: Window(T0, T0 + 1_000),
        ETH: Window(T0 + 1_500, T0 + 2_000),
        TRADE: Window(T0, T0 + 2_000),
    }


def test_a_flapping_connection_postpones_a_job_only_so_long() -> None:
    desk = BackfillDesk(CAPS)
    for i in range(30):
        desk.gap(gap(T0 + i * 1_000, T0 + i * 1_000 + 500), [TRADE])
    assert desk.next_due_ms() == T0 + 500 + MAX_DEFER_MS


def test_a_wall_clock_set_back_does_not_hold_a_job() -> None:
    desk = BackfillDesk(CAPS)
    desk.gap(gap(T0, T0 + 1_000), [TRADE])
    assert desk.take(T0 + 1_000 - MAX_DEFER_MS) is None  # just announced: not due yet
    assert desk.take(T0 + 1_000 - MAX_DEFER_MS - 1) is not None  # an hour back, say


def test_streams_without_history_or_with_the_backfill_off_are_not_fetched() -> None:
    desk = BackfillDesk({"ticker": 5})  # no trade history
    desk.gap(gap(T0, T0 + 1_000), [TRADE, TICKER])
    job = desk.take(T0 + 10_000)
    assert job is not None and job.streams == ()
    (event,) = desk.follow_ups(job, [])
    assert (event.state, event.restored, event.backfill) == (
        "lost",
        ["ticker"],
        {"streams": 0, "appended": 0, "failed": 0},
    )
    off = BackfillDesk(CAPS, enabled=False)
    assert not off.gap(gap(T0, T0 + 1_000), [TRADE, TICKER])  # nothing queued, no follow-up
    assert off.pending == 0 and off.next_due_ms() is None and off.waiting_since_ms() == 0
    assert off.take(T0 + 10_000) is None


def test_gaps_far_apart_are_not_merged() -> None:
    """Gaps queued while a long job ran: the later gap gets its own job, not one window
    reaching back to the first gap's start."""
    desk = BackfillDesk(CAPS)
    first = gap(T0, T0 + 1_000)
    later = gap(T0 + 1_000 + MAX_MERGED_SPAN_MS, T0 + 2_000 + MAX_MERGED_SPAN_MS, epoch=3)
    close = gap(later.since_ms + 500, later.since_ms + 900, epoch=4)  # type: ignore[operator]
    desk.gap(first, [TRADE])
    desk.gap(later, [TRADE, ETH])
    desk.gap(close, [TRADE])
    assert desk.pending == 3 and desk.waiting_since_ms() == T0
    now = T0 + 10_000 + MAX_MERGED_SPAN_MS  # all of them due
    job = desk.take(now)
    assert job is not None and [f.gap for f in job.gaps] == [first]
    assert [(f.key, f.window) for f in job.streams] == [(TRADE, Window(T0, T0 + 1_000))]
    assert desk.pending == 2 and desk.next_due_ms() == later.until_ms + SETTLE_MS  # type: ignore[operator]
    job = desk.take(now)
    assert job is not None and [f.gap for f in job.gaps] == [later, close]
    windows = {f.key: f.window for f in job.streams}
    assert windows == {
        ETH: Window(later.since_ms, later.until_ms),  # type: ignore[arg-type]
        TRADE: Window(later.since_ms, later.until_ms),  # type: ignore[arg-type]
    }
    assert desk.take(now) is None and desk.pending == 0


def test_a_long_gap_merges_with_one_it_overlaps() -> None:
    desk = BackfillDesk(CAPS)
    desk.gap(gap(T0 - 10 * MAX_MERGED_SPAN_MS, T0), [TRADE])  # a takeover after a long pause
    desk.gap(gap(T0 - 1_000, T0 + 500, epoch=3), [TRADE])
    job = desk.take(T0 + 10_000)
    assert job is not None and len(job.gaps) == 2
    assert [f.window for f in job.streams] == [Window(T0 - 10 * MAX_MERGED_SPAN_MS, T0 + 500)]


@pytest.mark.parametrize(
    ("outcomes", "state", "counts"),
    [
        ({TRADE: (Outcome.COMPLETE, 5), CANDLE: (Outcome.COMPLETE, 1)}, "filled", (2, 6, 0)),
        ({TRADE: (Outcome.COMPLETE, 5), CANDLE: (Outcome.FAILED, 0)}, "partial", (2, 5, 1)),
        ({TRADE: (Outcome.INCOMPLETE, 3), CANDLE: (Outcome.FAILED, 0)}, "partial", (2, 3, 2)),
        ({TRADE: (Outcome.FAILED, 0), CANDLE: (Outcome.FAILED, 0)}, "lost", (2, 0, 2)),
        # the page limit with nothing missing found: fetched, just not to the end
        ({TRADE: (Outcome.INCOMPLETE, 0), CANDLE: (Outcome.FAILED, 0)}, "partial", (2, 0, 2)),
        ({TRADE: (Outcome.COMPLETE, 0), CANDLE: (Outcome.COMPLETE, 0)}, "filled", (2, 0, 0)),
    ],
)
def test_the_follow_up_says_how_the_gap_was_filled(
    outcomes: dict[StreamKey, tuple[Outcome, int]], state: str, counts: tuple[int, int, int]
) -> None:
    desk = BackfillDesk(CAPS)
    announced = gap(T0, T0 + 1_000, reason="stall", epoch=7)
    desk.gap(announced, [TRADE, CANDLE, TICKER, BOOK])
    job = desk.take(T0 + 10_000)
    assert job is not None
    results = [StreamResult(k, outcome, n) for k, (outcome, n) in outcomes.items()]
    (event,) = desk.follow_ups(job, results)
    # the announcement repeated, with what the back-fill did
    assert (
        msgspec.structs.replace(
            event, state=msgspec.UNSET, restored=msgspec.UNSET, backfill=msgspec.UNSET
        )
        == announced
    )
    assert event.state == state
    assert event.restored == ["orderbook", "ticker"]
    assert event.backfill == dict(zip(("streams", "appended", "failed"), counts, strict=True))


def test_a_redis_gap_restores_nothing_by_snapshot() -> None:
    desk = BackfillDesk(CAPS)
    desk.gap(gap(T0, T0 + 1_000, reason="redis"), [TICKER, TRADE])
    job = desk.take(T0 + 10_000)
    assert job is not None
    (event,) = desk.follow_ups(job, [StreamResult(TRADE, Outcome.COMPLETE, 2)])
    assert event.restored == [] and event.state == "filled"


def test_merged_gaps_each_get_their_own_follow_up() -> None:
    desk = BackfillDesk(CAPS)
    first, second = gap(T0, T0 + 1_000, epoch=2), gap(T0 + 2_000, T0 + 2_500, epoch=3)
    desk.gap(first, [TRADE])
    desk.gap(second, [TRADE, TICKER])
    job = desk.take(T0 + 10_000)
    assert job is not None
    events_ = desk.follow_ups(job, [StreamResult(TRADE, Outcome.COMPLETE, 4)])
    assert [(e.epoch, e.since_ms, e.state, e.restored) for e in events_] == [
        (2, T0, "filled", []),
        (3, T0 + 2_000, "filled", ["ticker"]),
    ]


# -- the leader core ---------------------------------------------------------------------------


def decoded(core: Any) -> list[dict[str, Any]]:
    return events(core)


def reconnect(core: Any, at: float) -> None:
    core.upstream_lost(Loss.CLOSED, T0_MS + int(at * 1000) - 500, T0_MS + int(at * 1000) - 600)
    connect(core, at, epoch=core.epoch + 1)


def test_each_announced_gap_queues_a_job_and_gets_its_follow_up() -> None:
    core = leading()
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC"], "ticker": ["KRW-ETH"]}))
    connect(core, 0.0)
    decoded(core)
    reconnect(core, 5.0)
    gap_event, _connected = decoded(core)
    assert core.take_backfill_queued() and not core.take_backfill_queued()
    due = core.next_backfill_ms()
    assert due == gap_event["until_ms"] + SETTLE_MS
    assert core.take_backfill(due - 1) is None
    job = core.take_backfill(due)
    assert job is not None and [f.key for f in job.streams] == [TRADE]
    assert core.next_backfill_ms() is None
    core.backfill_done(job, [StreamResult(TRADE, Outcome.COMPLETE, 12)])
    (follow_up,) = decoded(core)
    assert follow_up == {
        **gap_event,
        "state": "filled",
        "restored": ["ticker"],
        "backfill": {"streams": 1, "appended": 12, "failed": 0},
    }
    stats = core.counters.backfill
    assert (stats.gaps, stats.jobs, stats.filled) == (1, 1, 1)


def test_the_status_names_the_earliest_gap_not_back_filled_until_its_job_is_done() -> None:
    core = leading()
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC"]}))
    connect(core, 0.0)
    decoded(core)
    assert core.backfill_since_ms() == 0
    reconnect(core, 5.0)
    gap_event, _connected = decoded(core)
    assert core.backfill_since_ms() == gap_event["since_ms"]  # waiting
    due = core.next_backfill_ms()
    assert due is not None
    job = core.take_backfill(due)
    assert job is not None
    assert core.backfill_since_ms() == gap_event["since_ms"]  # running
    assert core.status(6.0, due).backfill_since_ms == gap_event["since_ms"]
    core.backfill_done(job, [StreamResult(TRADE, Outcome.COMPLETE, 1)])
    assert core.backfill_since_ms() == 0


@pytest.mark.parametrize("another_process", [True, False], ids=["takeover", "own-lapse"])
def test_a_gap_its_leader_never_back_filled_is_covered_by_the_next_phases_gap(
    another_process: bool,
) -> None:
    """The leader died (or lapsed) with a back-fill pending since T0 - 60 s; its last frame
    was T0 - 1 s. The next phase's gap starts at the pending one, so its back-fill covers it
    (the pending gap's own follow-up never comes)."""
    counters = Counters()
    core = LeaderCore(settings(), counters)
    token = "someone-else" if another_process else core.token
    core.took_lead(T0_MS, token, T0_MS - 1_000, T0_MS - 60_000)
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC"]}))
    connect(core, 0.0)
    gaps = [e for e in decoded(core) if e["event"] == "gap"]
    assert [(g["reason"], g["since_ms"]) for g in gaps] == [
        ("takeover" if another_process else "reconnect", T0_MS - 60_000)
    ]
    due = core.next_backfill_ms()
    assert due is not None
    job = core.take_backfill(due)
    assert job is not None and job.streams[0].window.since_ms == T0_MS - 60_000


@pytest.mark.parametrize(
    "overrides", [{"backfill": False}, {"rest_url": "off"}], ids=["backfill-off", "rest-off"]
)
def test_with_the_backfill_off_a_gap_gets_no_follow_up(overrides: dict[str, Any]) -> None:
    core = leading(**overrides)
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC"], "orderbook": ["KRW-ETH"]}))
    connect(core, 0.0)
    decoded(core)
    reconnect(core, 5.0)
    gap_event, connected = decoded(core)
    assert (gap_event["event"], connected["event"]) == ("gap", "connected")
    assert not core.take_backfill_queued() and core.next_backfill_ms() is None
    assert core.take_backfill(gap_event["until_ms"] + 60_000) is None
    assert decoded(core) == []  # no follow-up: it could only ever say "lost"
    assert core.backfill_since_ms() == 0  # a successor's gap need not reach back for it
    stats = core.counters.backfill
    assert (stats.gaps, stats.jobs, stats.lost) == (0, 0, 0)


def test_a_redis_gap_queues_a_job_too() -> None:
    core = leading()
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC"]}))
    connect(core, 0.0)
    decoded(core)
    core.publish_lost(T0_MS + 1_000, T0_MS + 1_250, 3)
    (announced,) = decoded(core)
    assert announced["reason"] == "redis"
    job = core.take_backfill(T0_MS + 1_250 + SETTLE_MS)
    assert job is not None and job.gaps[0].restored == ()


def test_a_gap_with_only_state_streams_is_filled_by_the_snapshots() -> None:
    core = leading()
    list_leases(core, 0.0, lease("a", {"ticker": ["KRW-BTC"]}))
    connect(core, 0.0)
    decoded(core)
    reconnect(core, 5.0)
    decoded(core)
    assert core.take_backfill(T0_MS + 10_000) is None
    (follow_up,) = decoded(core)
    assert (follow_up["state"], follow_up["restored"]) == ("filled", ["ticker"])


def test_counters_start_at_zero() -> None:
    stats = Counters().backfill
    assert stats.gaps == stats.jobs == stats.appended == stats.requests == 0
