"""The simulated market and frame spelling, without sockets: invariants and repeatability."""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest

from broker.upbit import fields
from broker.upbit.codes import is_valid_code
from broker.upbit.types import Format
from simulator.book import Book
from simulator.encode import DEFAULT_KEYS, Encoder, java_double
from simulator.hub import Hub
from simulator.market import Market, candle_values, orderbook_units, trade_values
from simulator.session import Stream
from simulator.universe import build_universe

NOW_MS = 1_790_134_742_106
LEGACY_TICKER_KEYS = {"trade_status", "market_state_for_ios"}


def market(seed: int = 7, markets: int = 0) -> Market:
    return Market(build_universe(markets, seed), seed=seed, trade_share=0.5, now_ms=NOW_MS)


def test_universe_has_real_krw_btc_usdt_codes_and_synthetic_ones() -> None:
    listings = build_universe(5, seed=1)
    codes = [x.code for x in listings]
    assert codes[0] == "KRW-BTC"
    assert {"KRW-ETH", "KRW-XRP", "BTC-ETH", "USDT-BTC", "KRW-SIM0005"} <= set(codes)
    assert 40 <= len(codes) - 5 <= 50
    assert all(is_valid_code(c) for c in codes)
    assert len(set(codes)) == len(codes)
    weights = [x.weight for x in listings]
    assert weights == sorted(weights, reverse=True)  # busiest first
    assert sum(weights[:5]) > sum(weights[20:])  # a few codes carry most traffic


def test_book_invariants_hold_over_many_events() -> None:
    rng = random.Random(3)
    book = Book(rng, mid=100_000, lot=1_000_000, max_asks=30, max_bids=12)
    for i in range(20_000):
        r = rng.random()
        if r < 0.4:
            book.take(rng.random() < 0.5, rng)
        elif r < 0.7:
            book.resize(rng)
        elif r < 0.9:
            book.improve(rng)
        else:
            book.retreat(rng)
        assert book.ask_px == sorted(book.ask_px), i
        assert book.bid_px == sorted(book.bid_px, reverse=True), i
        assert book.ask_px[0] > book.bid_px[0], i
        assert 1 <= len(book.ask_px) <= 30 and 1 <= len(book.bid_px) <= 12
        assert min(book.ask_sz) > 0 and min(book.bid_sz) > 0


def test_grouped_book_sums_sizes_per_bucket() -> None:
    rng = random.Random(1)
    book = Book(rng, mid=100_000, lot=1_000, max_asks=30, max_bids=30)
    ask_px, ask_sz, bid_px, bid_sz = book.grouped(10)
    assert sum(ask_sz) == sum(book.ask_sz) and sum(bid_sz) == sum(book.bid_sz)
    assert all(p % 10 == 0 for p in ask_px + bid_px)
    assert ask_px[0] >= book.ask_px[0] and bid_px[0] <= book.bid_px[0]


def test_same_seed_same_events_however_batched() -> None:
    a, b = market(11), market(11)
    frames_a = [trade_values(st, "REALTIME")[6:12] for st, t, _ in a.step(3000, NOW_MS) if t]
    frames_b = []
    for n in (1, 7, 500, 2492):
        frames_b += [trade_values(st, "REALTIME")[6:12] for st, t, _ in b.step(n, NOW_MS) if t]
    assert frames_a == frames_b
    assert frames_a != [
        trade_values(st, "REALTIME")[6:12] for st, t, _ in market(12).step(3000, NOW_MS) if t
    ]


def test_sequential_ids_exceed_2_pow_53_and_increase() -> None:
    m = market()
    # Read each event's state before advancing, as the hub does.
    ids = [st.seq_id for st, is_trade, _ in m.step(5000, NOW_MS) if is_trade]
    ids += [st.seq_id for st, is_trade, _ in m.step(5000, NOW_MS + 1) if is_trade]
    assert len(ids) > 4000
    assert all(i > 2**53 for i in ids)
    assert all(b > a for a, b in itertools.pairwise(ids))
    assert ids[0] // 10_000 == NOW_MS  # trade_timestamp * 10000 + n


def test_candles_fold_trades_and_pushes_hold_complete_seconds() -> None:
    m = market()
    st = m.states["KRW-BTC"]
    base = NOW_MS - NOW_MS % 1000  # a second 42 s into its minute: three seconds fit
    prices: dict[int, list[float]] = {}
    for second in range(3):
        for s, is_trade, _ in m.step(600, base + second * 1000 + 500):
            if is_trade and s is st:
                prices.setdefault(second, []).append(st.price(st.trade_px))
    assert all(prices.get(i) for i in range(3))
    # A push at the start of second 2 holds seconds 0 and 1, and nothing of second 2.
    assert st in m.candle_updates(base + 2000)
    one_s = candle_values(st, 0, "REALTIME")
    assert one_s[:3] == ("candle.1s", "KRW-BTC", _iso(base + 1000))
    assert one_s[7] == prices[1][-1]
    one_m = candle_values(st, 1, "REALTIME")
    seen = prices[0] + prices[1]
    assert one_m[2] == _iso(NOW_MS - NOW_MS % 60_000)
    assert one_m[5] >= max(seen) and one_m[6] <= min(seen) and one_m[7] == seen[-1]
    assert st not in m.candle_updates(base + 2000)  # no trade before that boundary is new
    assert st in m.candle_updates(base + 3000)  # second 2's trades are
    assert candle_values(st, 0, "REALTIME")[7] == prices[2][-1]
    utc, kst = candle_values(st, 8, "SNAPSHOT")[2:4]  # candle.240m
    assert (int(utc[11:13]) + 9) % 24 == int(kst[11:13])  # KST = UTC+9


def _iso(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))


def test_thin_books_are_zero_padded_to_the_depth() -> None:
    m = market(markets=50)
    thin = m.thin_codes()
    assert thin
    st = m.states[thin[0]]
    units, total_ask, total_bid = orderbook_units(st, 30, 0)
    assert len(units) == 30
    assert units[-1][0] == 0.0 or units[-1][1] == 0.0
    assert total_ask == pytest.approx(sum(u[2] for u in units))
    assert total_bid == pytest.approx(sum(u[3] for u in units))


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.16539e8, "1.16539E8"), (7.9276e-4, "7.9276E-4"), (5e-4, "5.0E-4"), (0.0206, "0.0206"),
     (3000.0, "3000.0"), (0.0, "0.0"), (-1.5e9, "-1.5E9"), (1e7, "1.0E7")],
)  # fmt: skip
def test_java_double_spelling(value: float, text: str) -> None:
    assert java_double(value) == text
    assert float(text) == value


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("exponent", [False, True])
def test_every_type_encodes_with_documented_keys(fmt: Format, exponent: bool) -> None:
    m = market()
    m.step(500, NOW_MS)
    hub = Hub(m, Encoder(exponent_numbers=exponent))
    types = ["ticker", "trade", "orderbook", "candle.1s", "candle.240m"]
    frames = hub.snapshots(fmt, [Stream(t, "KRW-BTC") for t in types], 0.0)
    for type_, frame in zip(types, frames, strict=True):
        body = msgspec.json.decode(frame)
        if fmt.is_list:
            assert isinstance(body, list) and len(body) == 1
            body = body[0]
        names = fields.fields_for(type_)
        expected = set(DEFAULT_KEYS["candle" if type_.startswith("candle") else type_])
        assert expected == set(names) - LEGACY_TICKER_KEYS
        if fmt.is_simple:
            expected = {names[k] for k in expected}
        assert set(body) == expected
        assert body["ty" if fmt.is_simple else "type"] == type_
        if type_ == "orderbook":
            unit_keys = set(
                fields.ORDERBOOK_UNIT.values() if fmt.is_simple else fields.ORDERBOOK_UNIT
            )
            units = body["obu" if fmt.is_simple else "orderbook_units"]
            assert len(units) == 30 and all(set(u) == unit_keys for u in units)
    if exponent:
        assert b"E8" in frames[0]  # KRW-BTC's prices are ~1.4E8
