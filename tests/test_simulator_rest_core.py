"""The simulator's REST logic without sockets: trade log, day-scoped paging, candles built
from the same trades as the log, rate-limit groups, parameter errors (the limiter's arithmetic,
shared with the gateway: ``tests/test_upbit_ratelimit.py``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from simulator.candles import DAY_MS, PERIOD_STARTS, UNIT_NAMES, week_start
from simulator.encode import TICKER_FIELDS
from simulator.market import (
    SIZE_DIV,
    CodeState,
    Market,
    candle_amount,
    candle_values,
    ticker_values,
)
from simulator.rest import (
    BAD_PARAM,
    NOT_FOUND,
    answer,
    group_of,
    remaining_req,
)
from simulator.tradelog import TradeLog
from simulator.universe import CAUTIONS, build_universe

# Three seconds before a UTC midnight: trades on two days.
MIDNIGHT = (1_790_134_742_106 // DAY_MS + 1) * DAY_MS
START = MIDNIGHT - 3_000
TRADE_KEYS = [
    "market", "trade_date_utc", "trade_time_utc", "timestamp", "trade_price", "trade_volume",
    "prev_closing_price", "change_price", "ask_bid", "sequential_id",
]  # fmt: skip
CANDLE_KEYS = [
    "market", "candle_date_time_utc", "candle_date_time_kst", "opening_price", "high_price",
    "low_price", "trade_price", "timestamp", "candle_acc_trade_price", "candle_acc_trade_volume",
]  # fmt: skip
CANDLE_PATHS = [
    "seconds", "minutes/1", "minutes/3", "minutes/5", "minutes/10", "minutes/15", "minutes/30",
    "minutes/60", "minutes/240", "days", "weeks", "months", "years",
]  # fmt: skip


def market(**options: Any) -> Market:
    listings = build_universe(options.pop("markets", 0), 5)
    return Market(listings, seed=5, trade_share=0.5, now_ms=START, **options)


def run(m: Market, times: list[int], events: int = 200) -> None:
    for t in times:
        for _ in m.step(events, t):
            pass


def get(m: Market, path: str, **query: object) -> tuple[int, Any]:
    listings = {st.code: st.listing for st in m.states.values()}
    return answer(path, {k: [str(v)] for k, v in query.items()}, listings, m)


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))


# -- the trade log --------------------------------------------------------------------------------


def test_trade_log_is_a_ring_that_evicts_the_oldest() -> None:
    log = TradeLog(4)
    for i in range(1, 7):
        log.append(seq=i * 10, ms=1000 + i, price=i, volume=i, buy=i % 2 == 0, prev=5)
    assert len(log) == 4 and log.evicted == 2 and log.last_evicted_ms == 1002
    assert log.sequential_ids() == [30, 40, 50, 60]
    assert [t.sequential_id for t in log.entries()] == [30, 40, 50, 60]
    assert log.newest is not None and log.newest.sequential_id == 60 and log.newest.buy
    assert log.count_below(45) == 2 and log.count_below(30) == 0 and log.count_below(99) == 4
    newest = log.newest_first(10, below_seq=60)
    assert [t.sequential_id for t in newest] == [50, 40, 30]
    assert [t.sequential_id for t in log.newest_first(2)] == [60, 50]
    window = log.newest_first(10, from_ms=1004, below_ms=1006)
    assert [t.timestamp for t in window] == [1005, 1004]
    with pytest.raises(ValueError):
        TradeLog(0)


def test_every_trade_is_logged_as_the_websocket_frame_shows_it() -> None:
    m = market()
    seen: list[tuple[Any, ...]] = []
    for st, is_trade, _ in m.step(3000, START):
        if is_trade and st.code == "KRW-BTC":
            seen.append((st.seq_id, st.trade_ms, st.trade_px, st.trade_vol, st.trade_buy))
    log = m.states["KRW-BTC"].log
    logged = [(t.sequential_id, t.timestamp, t.price, t.volume, t.buy) for t in log.entries()]
    assert logged[1:] == seen  # the first is the trade before the start (snapshots show it)
    assert len(seen) > 100


# -- /v1/trades/ticks ---------------------------------------------------------------------------


def test_trades_are_newest_first_in_upbits_shape() -> None:
    m = market()
    run(m, [START + 500])
    st = m.states["KRW-BTC"]
    status, body = get(m, "/v1/trades/ticks", market="KRW-BTC", count=5)
    assert status == 200 and len(body) == 5
    assert all(list(t) == TRADE_KEYS for t in body)
    newest = st.log.entries()[-5:][::-1]
    assert [t["sequential_id"] for t in body] == [t.sequential_id for t in newest]
    first, logged = body[0], newest[0]
    assert first["trade_price"] == st.price(logged.price)
    assert first["trade_volume"] == logged.volume / SIZE_DIV
    assert first["change_price"] == first["trade_price"] - first["prev_closing_price"]
    assert first["ask_bid"] == ("BID" if logged.buy else "ASK")
    assert first["trade_date_utc"] + "T" + first["trade_time_utc"] == iso(logged.timestamp)
    assert get(m, "/v1/trades/ticks", market="KRW-BTC")[1][0] == first  # count defaults to 1


def test_trades_are_served_one_utc_day_at_a_time() -> None:
    m = market()
    run(m, [START + 500, START + 1500, START + 2500, MIDNIGHT + 500, MIDNIGHT + 1500])
    log = m.states["KRW-BTC"].log.entries()
    today = [t.sequential_id for t in log if t.timestamp >= MIDNIGHT][::-1]
    yesterday = [t.sequential_id for t in log if t.timestamp < MIDNIGHT][::-1]
    assert today and yesterday

    def ids(**query: object) -> list[int]:
        status, body = get(m, "/v1/trades/ticks", market="KRW-BTC", count=500, **query)
        assert status == 200
        return [t["sequential_id"] for t in body]

    assert ids() == today
    assert ids(days_ago=1) == yesterday
    assert ids(days_ago=2) == []
    first_second = [t.sequential_id for t in log[::-1] if MIDNIGHT <= t.timestamp < MIDNIGHT + 1000]
    assert first_second and ids(to="000001") == ids(to="00:00:01") == first_second
    assert ids(days_ago=1, to="23:59:59") == [
        t.sequential_id for t in log[::-1] if MIDNIGHT - 3000 <= t.timestamp < MIDNIGHT - 1000
    ]
    # A cursor pages back within the day: no duplicate, nothing skipped, then an empty page.
    for days_ago, expected in ((None, today), (1, yesterday)):
        pages: list[int] = []
        cursor: int | None = None
        while True:
            query: dict[str, object] = {"count": 7}
            if days_ago:
                query["days_ago"] = days_ago
            if cursor is not None:
                query["cursor"] = cursor
            _, body = get(m, "/v1/trades/ticks", market="KRW-BTC", **query)
            page = [t["sequential_id"] for t in body]
            if not page:
                break
            pages += page
            cursor = page[-1]
        assert pages == expected


def test_a_full_log_serves_what_it_kept() -> None:
    m = market(trade_log_size=10)
    run(m, [START + 500, START + 1500])
    log = m.states["KRW-BTC"].log
    assert len(log) == 10 and log.evicted > 0
    body = get(m, "/v1/trades/ticks", market="KRW-BTC", count=500)[1]
    assert [t["sequential_id"] for t in body] == log.sequential_ids()[::-1]


@pytest.mark.parametrize(
    "query",
    [{"count": 0}, {"count": 501}, {"count": "x"}, {"count": -1}, {"days_ago": 0},
     {"days_ago": 8}, {"cursor": "abc"}, {"to": "25:00:00"}, {"to": "1200"}, {"to": "12-00-00"}],
)  # fmt: skip
def test_bad_trade_parameters_are_400(query: dict[str, object]) -> None:
    m = market()
    assert get(m, "/v1/trades/ticks", market="KRW-BTC", **query) == (400, BAD_PARAM)


def test_a_missing_market_is_400_an_unknown_one_404() -> None:
    m = market()
    for path in ("/v1/trades/ticks", "/v1/candles/minutes/1", "/v1/candles/days"):
        assert get(m, path) == (400, BAD_PARAM)
        assert get(m, path, market="KRW-NOPE") == (404, NOT_FOUND)
    assert get(m, "/v1/candles/minutes/2", market="KRW-BTC") == (400, BAD_PARAM)
    assert get(m, "/v1/candles/hours", market="KRW-BTC") == (404, NOT_FOUND)
    assert get(m, "/v1/candles/days", market="KRW-BTC", to="yesterday") == (400, BAD_PARAM)


# -- candles --------------------------------------------------------------------------------------


def aggregate(st: CodeState, index: int) -> list[dict[str, Any]]:
    """The candles of unit ``index`` computed from the logged trades alone, newest first."""
    periods: dict[int, list[int]] = {}
    for t in st.log.entries():
        start = PERIOD_STARTS[index](t.timestamp)
        c = periods.get(start)
        if c is None:
            periods[start] = [t.price, t.price, t.price, t.price, t.volume, t.volume * t.price,
                              t.timestamp, t.prev_close]  # fmt: skip
            continue
        c[1], c[2], c[3] = max(c[1], t.price), min(c[2], t.price), t.price
        c[4] += t.volume
        c[5] += t.volume * t.price
        c[6] = t.timestamp
    return [
        {
            "start": start,
            "opening_price": st.price(c[0]),
            "high_price": st.price(c[1]),
            "low_price": st.price(c[2]),
            "trade_price": st.price(c[3]),
            "candle_acc_trade_volume": c[4] / SIZE_DIV,
            "candle_acc_trade_price": candle_amount(st, c[5]),
            "timestamp": c[6],
            "prev": st.price(c[7]),
        }
        for start, c in sorted(periods.items(), reverse=True)
    ]


def test_rest_candles_of_every_unit_are_the_logged_trades_aggregated() -> None:
    m = market()
    times = [START + 500, START + 1500, START + 2700, MIDNIGHT + 100, MIDNIGHT + 400]
    run(m, times)
    run(m, [MIDNIGHT + 1100], events=3)  # this second stays pending: reads must include it
    st = m.states["KRW-BTC"]
    for index, kind in enumerate(CANDLE_PATHS):
        status, body = get(m, f"/v1/candles/{kind}", market="KRW-BTC", count=200)
        assert status == 200, kind
        expected = aggregate(st, index)
        assert len(body) == len(expected), kind
        for got, want in zip(body, expected, strict=True):
            assert list(got)[:10] == CANDLE_KEYS, kind
            assert got["candle_date_time_utc"] == iso(want["start"]), kind
            for key in CANDLE_KEYS[3:]:
                assert got[key] == want[key], (kind, key)
            if kind.startswith("minutes/"):
                assert got["unit"] == int(kind.partition("/")[2])
            if kind == "days":
                assert got["prev_closing_price"] == want["prev"]
                assert got["change_price"] == got["trade_price"] - want["prev"]
                assert got["change_rate"] == round(got["change_price"] / want["prev"], 10)
            if kind in ("weeks", "months", "years"):
                assert got["first_day_of_period"] == got["candle_date_time_utc"][:10]
    days = get(m, "/v1/candles/days", market="KRW-BTC", count=2)[1]
    assert len(days) == 2  # midnight closed a day candle
    assert days[0]["prev_closing_price"] == days[1]["trade_price"]  # yesterday's close
    assert st.pending is not None  # reading folded nothing into the state


def test_candle_periods_start_on_utc_boundaries() -> None:
    monday = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday
    assert time.gmtime(monday / 1000).tm_wday == 0
    for ms in (monday, monday + 1, monday + 6 * DAY_MS + DAY_MS - 1):
        assert week_start(ms) == monday
    assert week_start(monday - 1) == monday - 7 * DAY_MS
    assert iso(PERIOD_STARTS[11](monday + 40 * DAY_MS)) == "2026-02-01T00:00:00"  # months
    assert iso(PERIOD_STARTS[12](monday + 40 * DAY_MS)) == "2026-01-01T00:00:00"  # years
    assert UNIT_NAMES[:2] == ("1s", "1m") and UNIT_NAMES[9:] == ("days", "weeks", "months", "years")


def test_candles_to_and_count() -> None:
    m = market(candle_history=5000)
    run(m, [START - 400_000 + i * 1000 for i in range(300)], events=30)
    seconds = get(m, "/v1/candles/seconds", market="KRW-BTC", count=200)[1]
    assert len(seconds) == 200  # Upbit's cap
    assert len(get(m, "/v1/candles/seconds", market="KRW-BTC", count=250)[1]) == 200
    starts = [c["candle_date_time_utc"] for c in seconds]
    assert starts == sorted(starts, reverse=True)
    cut = seconds[10]["candle_date_time_utc"]
    for to in (cut, cut + "Z", cut.replace("T", " "), cut + "+00:00"):
        page = get(m, "/v1/candles/seconds", market="KRW-BTC", count=3, to=to)[1]
        assert [c["candle_date_time_utc"] for c in page] == starts[11:14], to  # exclusive
    kst = seconds[10]["candle_date_time_kst"]
    for to in (kst + "+09:00", kst + " 09:00"):  # the second: a "+" not URL-encoded
        page = get(m, "/v1/candles/seconds", market="KRW-BTC", count=1, to=to)[1]
        assert page[0]["candle_date_time_utc"] == starts[11]
    assert get(m, "/v1/candles/seconds", market="KRW-BTC", count=0) == (400, BAD_PARAM)


def test_candle_history_is_bounded() -> None:
    m = market(candle_history=5)
    run(m, [START - 400_000 + i * 1000 for i in range(100)], events=30)
    m.states["KRW-BTC"].fold_candles()  # the last second's trades: into the open candle
    body = get(m, "/v1/candles/seconds", market="KRW-BTC", count=200)[1]
    assert len(body) == 6  # five closed, the open one
    assert len(get(m, "/v1/candles/days", market="KRW-BTC", count=200)[1]) == 1


def test_a_websocket_candle_push_and_the_rest_candle_agree() -> None:
    m = market()
    run(m, [START + 200, START + 1200])
    st = m.states["KRW-BTC"]
    assert st in m.candle_updates(START - START % 1000 + 2000)
    for index, kind in ((0, "seconds"), (1, "minutes/1"), (8, "minutes/240")):
        pushed = dict(
            zip(
                ["type", "code", "candle_date_time_utc", "candle_date_time_kst", "opening_price",
                 "high_price", "low_price", "trade_price", "candle_acc_trade_volume",
                 "candle_acc_trade_price", "timestamp", "stream_type"],
                candle_values(st, index, "REALTIME"),
                strict=True,
            )
        )  # fmt: skip
        (rest,) = get(m, f"/v1/candles/{kind}", market="KRW-BTC")[1]
        for key in CANDLE_KEYS[1:]:
            assert rest[key] == pushed[key], (kind, key)


# -- market list, ticker --------------------------------------------------------------------------


def test_market_details_flag_a_few_codes_and_the_ticker_agrees() -> None:
    m = market(markets=200)
    status, plain = get(m, "/v1/market/all")
    assert status == 200 and all("market_event" not in x for x in plain)
    status, detailed = get(m, "/v1/market/all", is_details="true")
    assert status == 200 and [x["market"] for x in detailed] == [x["market"] for x in plain]
    for x in detailed:
        assert list(x) == ["market", "korean_name", "english_name", "market_event"]
        assert set(x["market_event"]) == {"warning", "caution"}
        assert list(x["market_event"]["caution"]) == list(CAUTIONS)
    warned = [x["market"] for x in detailed if x["market_event"]["warning"]]
    cautioned = [x["market"] for x in detailed if any(x["market_event"]["caution"].values())]
    assert warned and cautioned and "KRW-BTC" not in warned + cautioned
    assert get(m, "/v1/market/all", is_details="maybe") == (400, BAD_PARAM)
    # The WebSocket ticker's legacy market_warning names the same codes.
    for code, expected in ((warned[0], "CAUTION"), ("KRW-BTC", "NONE")):
        values = dict(zip(TICKER_FIELDS, ticker_values(m.states[code], "SNAPSHOT"), strict=True))
        assert values["market_warning"] == expected


def test_tickers_by_quote_currency() -> None:
    m = market()
    status, body = get(m, "/v1/ticker/all", quote_currencies="BTC,USDT")
    assert status == 200 and body
    assert {t["market"].partition("-")[0] for t in body} == {"BTC", "USDT"}
    assert get(m, "/v1/ticker/all") == (400, BAD_PARAM)


# -- rate-limit groups (the limit itself: tests/test_upbit_ratelimit.py) -----------------------


def test_remaining_req_and_groups() -> None:
    assert remaining_req("candle", 7) == "group=candle; min=600; sec=7"
    assert group_of("/v1/market/all") == "market"
    assert group_of("/v1/ticker") == group_of("/v1/ticker/all") == "ticker"
    assert group_of("/v1/orderbook/instruments") == "orderbook"
    assert group_of("/v1/trades/ticks") == "trade"
    assert group_of("/v1/candles/minutes/1") == group_of("/v1/candles/days") == "candle"
    assert group_of("/v1/nope") is None
