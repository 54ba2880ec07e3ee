"""The gateway's REST rules without sockets (pure): paths, parameters, the REST shapes it
builds from the broker's cached WebSocket frames, the cache's trust and the REST lease's
bookkeeping (the per-client limit it emulates is the simulator's:
``tests/test_upbit_ratelimit.py``).

The shapes are judged against the simulator's own REST answers for the very same market
state: the WebSocket frame the simulator would send (DEFAULT, SIMPLE, Java number spelling),
turned into REST by the gateway, must encode to the same bytes as the simulator's answer:
field names, order, types and values.
"""

from __future__ import annotations

import msgspec
import pytest

from broker.upbit.errors import FrameError
from broker.upbit.types import Format
from gateway.rest import (
    BAD_PARAM,
    NOT_FOUND,
    PRIVATE_REFUSED,
    TOO_MANY,
    UNLIMITED_SEC,
    BadParam,
    Kind,
    PollBook,
    cache_doubt,
    codes_param,
    count_param,
    details_param,
    encode_json,
    kst_parts,
    level_param,
    market_codes,
    remaining_req,
    rest_orderbook,
    rest_ticker,
    route,
)
from simulator import rest as sim_rest
from simulator.encode import Encoder
from simulator.encode import encode_json as sim_encode_json
from simulator.market import Market, orderbook_units, ticker_values
from simulator.universe import build_universe

NOW_MS = 1_700_000_000_000


def test_the_rules_are_pure() -> None:
    """``gateway.rest`` loads no I/O layer and nothing of the broker but its protocol core."""
    from tests.support.imports import IO_AND_OUTER_LAYERS, modules_loaded_by

    loaded = modules_loaded_by("import gateway.rest")
    outer = sorted(m for m in loaded if m.split(".")[0] in IO_AND_OUTER_LAYERS)
    assert outer == []
    assert {m for m in loaded if m.startswith("broker.")} <= {
        m for m in loaded if m.startswith("broker.upbit")
    }


# -- paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind", "group"),
    [
        ("/v1/ticker?markets=KRW-BTC", Kind.TICKER, "ticker"),
        ("/v1/ticker/?markets=KRW-BTC", Kind.TICKER, "ticker"),
        ("/v1/ticker/all?quote_currencies=KRW", Kind.TICKER_ALL, "ticker"),
        ("/v1/orderbook?markets=KRW-BTC", Kind.ORDERBOOK, "orderbook"),
        ("/v1/orderbook?markets=KRW-BTC&level=0&count=5", Kind.ORDERBOOK, "orderbook"),
        ("/v1/orderbook?markets=KRW-BTC&level=10000", Kind.FORWARD, "orderbook"),
        ("/v1/orderbook?markets=KRW-BTC&level=x", Kind.FORWARD, "orderbook"),
        ("/v1/orderbook/instruments?markets=KRW-BTC", Kind.FORWARD, "orderbook"),
        ("/v1/orderbook/supported_levels?markets=KRW-BTC", Kind.FORWARD, "orderbook"),
        ("/v1/market/all", Kind.MARKET_ALL, "market"),
        ("/v1/market/all?is_details=true", Kind.MARKET_ALL, "market"),
        ("/v1/trades/ticks?market=KRW-BTC&count=5", Kind.FORWARD, "trade"),
        ("/v1/candles/minutes/1?market=KRW-BTC", Kind.FORWARD, "candle"),
        ("/v1/candles/days?market=KRW-BTC&count=2", Kind.FORWARD, "candle"),
        ("/v1/candles/seconds?market=KRW-BTC", Kind.FORWARD, "candle"),
    ],
)
def test_quotation_paths(target: str, kind: Kind, group: str) -> None:
    r = route("GET", target, authorization=False)
    assert (r.kind, r.group) == (kind, group)


def test_forwarded_target_keeps_the_query_as_sent() -> None:
    r = route("GET", "/v1/trades/ticks/?market=KRW-BTC&count=5&cursor=1", authorization=False)
    assert r.target == "/v1/trades/ticks?market=KRW-BTC&count=5&cursor=1"
    r = route(
        "GET",
        "/v1/candles/minutes/1?market=KRW-BTC&to=2025-01-02T03%3A04%3A05Z",
        authorization=False,
    )
    assert r.target == "/v1/candles/minutes/1?market=KRW-BTC&to=2025-01-02T03%3A04%3A05Z"


@pytest.mark.parametrize(
    "target",
    [
        "/v1/accounts",
        "/v1/accounts/",
        "/v1/Accounts",
        "/v1/%61ccounts",
        "/v1/orders?state=wait",
        "/v1/orders/chance?market=KRW-BTC",
        "/v1/orders/open",
        "/v1/orders/closed",
        "/v1/orders/uuids",
        "/v1/order?uuid=x",
        "/v1/withdraws",
        "/v1/withdraws/coin",
        "/v1/withdraw?uuid=x",
        "/v1/deposits",
        "/v1/deposits/coin_addresses",
        "/v1/deposit?uuid=x",
        "/v1/api_keys",
        "/v1/status/wallet",
        "/v1/travel_rule/vasps",
    ],
)
def test_private_paths_are_refused(target: str) -> None:
    assert route("GET", target, authorization=False).kind is Kind.PRIVATE
    # whatever the method: a bot placing an order learns why it cannot
    assert route("POST", target, authorization=False).kind is Kind.PRIVATE
    assert route("DELETE", target, authorization=True).kind is Kind.PRIVATE


def test_any_request_with_a_key_is_refused() -> None:
    for target in ("/v1/ticker?markets=KRW-BTC", "/v1/trades/ticks?market=KRW-BTC"):
        assert route("GET", target, authorization=True).kind is Kind.PRIVATE


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("POST", "/v1/ticker?markets=KRW-BTC", Kind.METHOD),
        ("HEAD", "/v1/market/all", Kind.METHOD),
        ("GET", "/v1/nope", Kind.NOT_FOUND),
        ("GET", "/v1", Kind.NOT_FOUND),
        ("GET", "/v1/", Kind.NOT_FOUND),
        ("GET", "/v1/ticker/../accounts", Kind.NOT_FOUND),
        ("GET", "/v1/ticker/..%2Faccounts", Kind.NOT_FOUND),
        ("GET", "/v1/ticker/./all", Kind.NOT_FOUND),
        ("GET", "/v1/ticker%20all", Kind.NOT_FOUND),
        ("GET", "/v1/ticker%00", Kind.NOT_FOUND),
        ("GET", "/V1/ticker", Kind.NOT_FOUND),
        ("GET", "/", Kind.NOT_FOUND),
        ("GET", "/health", Kind.NOT_FOUND),
    ],
)
def test_other_requests(method: str, target: str, kind: Kind) -> None:
    assert route(method, target, authorization=False).kind is kind


def test_an_upgrade_outside_v1_is_not_ours() -> None:
    assert route("GET", "/websocket/v1", authorization=False, upgrade=True).kind is Kind.NOT_MINE
    assert route("GET", "/v1/ticker", authorization=False, upgrade=True).kind is Kind.TICKER


# -- parameters ------------------------------------------------------------------------------------


def test_parameters() -> None:
    assert codes_param({"markets": ["KRW-BTC, KRW-ETH", "KRW-XRP"]}, "markets") == [
        "KRW-BTC",
        "KRW-ETH",
        "KRW-XRP",
    ]
    for bad in ({}, {"markets": [""]}, {"markets": [" , "]}):
        with pytest.raises(BadParam):
            codes_param(bad, "markets")
    assert count_param({}) == 30
    assert count_param({"count": ["1"]}) == 1
    for bad in ("0", "31", "-1", "x", "１"):
        with pytest.raises(BadParam):
            count_param({"count": [bad]})
    assert level_param({}) == 0.0
    assert level_param({"level": ["10000"]}) == 10000.0
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(BadParam):
            level_param({"level": [bad]})
    assert details_param({}) is False
    assert details_param({"is_details": ["TRUE"]}) is True
    assert details_param({"is_details": ["yes"]}) is None
    # the older spelling (Upbit's v1 docs, pyupbit's get_tickers(is_details=True))
    assert details_param({"isDetails": ["true"]}) is True
    assert details_param({"isDetails": ["false"]}) is False
    assert details_param({"isDetails": ["1"]}) is None


def test_error_bodies_are_upbits_shape() -> None:
    for body in (NOT_FOUND, BAD_PARAM, TOO_MANY, PRIVATE_REFUSED):
        error = msgspec.json.decode(body)["error"]
        assert set(error) == {"name", "message"}
    assert sim_encode_json(sim_rest.NOT_FOUND) == NOT_FOUND
    assert sim_encode_json(sim_rest.BAD_PARAM) == BAD_PARAM
    assert sim_encode_json(sim_rest.TOO_MANY) == TOO_MANY


def test_remaining_req_reads_as_upbits() -> None:
    from broker.rest import parse_remaining_req

    assert remaining_req("ticker", 7) == sim_rest.remaining_req("ticker", 7)
    assert parse_remaining_req(remaining_req("ticker", UNLIMITED_SEC)) == ("ticker", 9)


# -- shapes against the simulator ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> tuple[dict, Market]:
    listings = build_universe(0, 5)
    market = Market(listings, seed=5, trade_share=0.5, now_ms=NOW_MS)
    for tick in range(300):
        for _ in market.step(20, NOW_MS + tick * 100):
            pass
    return {x.code: x for x in listings}, market


ENCODINGS = [
    pytest.param(Format.DEFAULT, False, id="default"),
    pytest.param(Format.SIMPLE, False, id="simple"),
    pytest.param(Format.DEFAULT, True, id="default-java-numbers"),
    pytest.param(Format.SIMPLE, True, id="simple-java-numbers"),
]


@pytest.mark.parametrize(("fmt", "java"), ENCODINGS)
def test_rest_ticker_from_a_frame_is_the_simulators_rest_ticker(
    world: tuple[dict, Market], fmt: Format, java: bool
) -> None:
    listings, market = world
    codes = ["KRW-BTC", "KRW-XRP", "BTC-ETH", "KRW-SHIB", "USDT-BTC"]
    frames = [
        Encoder(java).flat("ticker", ticker_values(market.states[c], "REALTIME"), fmt)
        for c in codes
    ]
    ours = encode_json([rest_ticker(f) for f in frames])
    status, theirs = sim_rest.answer("/v1/ticker", {"markets": [",".join(codes)]}, listings, market)
    assert status == 200
    assert ours == sim_encode_json(theirs)


@pytest.mark.parametrize(("fmt", "java"), ENCODINGS)
@pytest.mark.parametrize("count", [30, 15, 5, 1])
def test_rest_orderbook_from_a_frame_is_the_simulators_rest_orderbook(
    world: tuple[dict, Market], fmt: Format, java: bool, count: int
) -> None:
    listings, market = world
    codes = ["KRW-BTC", "KRW-ETH", "BTC-XRP", *market.thin_codes()[:2]]
    frames = []
    for code in codes:
        st = market.states[code]
        book = orderbook_units(st, 30, 0)
        frames.append(Encoder(java).orderbook(code, st.book_ms, book, 0.0, "REALTIME", fmt))
    built = [rest_orderbook(f, count) for f in frames]
    status, theirs = sim_rest.answer(
        "/v1/orderbook", {"markets": [",".join(codes)], "count": [str(count)]}, listings, market
    )
    assert status == 200
    assert encode_json(built) == sim_encode_json(theirs)


def test_rest_shapes_name_the_market_and_drop_the_frame_fields(world: tuple[dict, Market]) -> None:
    _, market = world
    st = market.states["KRW-BTC"]
    ticker = rest_ticker(Encoder().flat("ticker", ticker_values(st, "SNAPSHOT"), Format.SIMPLE))
    assert ticker["market"] == "KRW-BTC"
    assert {"code", "type", "stream_type", "cd", "ty"}.isdisjoint(ticker)
    assert (ticker["trade_date_kst"], ticker["trade_time_kst"]) == kst_parts(
        ticker["trade_timestamp"]
    )
    frame = Encoder().orderbook(
        "KRW-BTC", 1, orderbook_units(st, 30, 0), 0.0, "REALTIME", Format.DEFAULT
    )
    book = rest_orderbook(frame)
    assert book is not None
    assert list(book) == [
        "market",
        "timestamp",
        "total_ask_size",
        "total_bid_size",
        "orderbook_units",
        "level",
    ]


def test_a_shallow_frame_cannot_answer_a_deeper_count(world: tuple[dict, Market]) -> None:
    _, market = world
    st = market.states["KRW-BTC"]
    frame = Encoder().orderbook(
        "KRW-BTC", 1, orderbook_units(st, 5, 0), 0.0, "REALTIME", Format.DEFAULT
    )
    assert rest_orderbook(frame, 30) is None
    assert rest_orderbook(frame, 5) is not None


def test_frames_of_another_type_are_refused(world: tuple[dict, Market]) -> None:
    _, market = world
    ticker = Encoder().flat(
        "ticker", ticker_values(market.states["KRW-BTC"], "SNAPSHOT"), Format.DEFAULT
    )
    with pytest.raises(FrameError):
        rest_orderbook(ticker)
    with pytest.raises(FrameError):
        rest_ticker(b'{"status":"UP"}')


def test_kst_is_utc_plus_nine() -> None:
    # 2023-11-14 22:13:20 UTC = 2023-11-15 07:13:20 KST
    assert kst_parts(1_700_000_000_000) == ("20231115", "071320")


def test_market_codes_keep_upbits_order(world: tuple[dict, Market]) -> None:
    listings, market = world
    _, body = sim_rest.answer("/v1/market/all", {}, listings, market)
    assert market_codes(sim_encode_json(body)) == tuple(listings)
    for bad in (b"", b"{}", b"[]", b'[{"name": 1}]'):
        with pytest.raises(ValueError):
            market_codes(bad)


# -- can the cache be believed? --------------------------------------------------------------------

NOW = 1_800_000_000_000


def _status(**fields: object) -> list[bytes | None]:
    base: dict[str, object] = {
        "updated_ms": NOW - 100,
        "status_interval_ms": 200,
        "connected": 1,
        "cache_stale_since_ms": 0,
        "refused": "{}",
    }
    base.update(fields)
    names = ("updated_ms", "status_interval_ms", "connected", "cache_stale_since_ms", "refused")
    return [None if base[n] is None else str(base[n]).encode() for n in names]


@pytest.mark.parametrize(
    ("status", "doubt"),
    [
        (_status(), None),
        (_status(refused='{"other.rest": "union full"}'), None),
        (_status(status_interval_ms=None), None),
        ([None] * 5, "no broker status"),
        (_status(updated_ms=NOW - 700), "stale"),
        (_status(status_interval_ms=None, updated_ms=NOW - 3_100), "stale"),
        (_status(connected=0), "not connected"),
        (_status(cache_stale_since_ms=NOW - 5), "cache is stale"),
        (_status(refused='{"gw.rest": "union full"}'), "refused"),
    ],
)
def test_cache_doubt(status: list[bytes | None], doubt: str | None) -> None:
    found = cache_doubt(status, NOW, "gw.rest")
    if doubt is None:
        assert found is None
    else:
        assert found is not None and doubt in found


# -- the REST lease --------------------------------------------------------------------------------


def test_poll_book_writes_when_the_set_grows_and_renews_while_polled() -> None:
    book = PollBook(60.0)
    assert not book.due(0.0)  # nothing held, nothing written
    assert book.poll("ticker", ["KRW-BTC", "KRW-ETH"], 0.0)
    assert book.due(0.0) and not book.trusted("ticker", "KRW-BTC")
    held = book.held_now()
    book.written(held, 0.0)
    assert PollBook.subs(held) == {"ticker": ["KRW-BTC", "KRW-ETH"]}
    assert not book.due(1.0)
    book.confirm("ticker", "KRW-BTC")
    assert book.trusted("ticker", "KRW-BTC") and not book.trusted("ticker", "KRW-ETH")
    book.poll("ticker", ["KRW-BTC"], 10.0)
    assert not book.due(10.0)
    assert book.due(20.0)  # renew every idle_after / 3
    book.written(book.held_now(), 20.0)
    # the TTL outlasts a renewal period: a code polled right after a renewal is still held
    # idle_after seconds later
    assert book.ttl == pytest.approx(80.0)


def test_poll_book_shrinks_when_codes_go_idle_and_releases_when_empty() -> None:
    book = PollBook(60.0)
    book.poll("ticker", ["KRW-BTC"], 0.0)
    book.poll("orderbook", ["KRW-ETH"], 0.0)
    book.written(book.held_now(), 0.0)
    book.confirm("orderbook", "KRW-ETH")
    book.poll("ticker", ["KRW-BTC"], 50.0)
    book.expire(70.0)
    assert book.held_now() == {("ticker", "KRW-BTC")}
    assert book.due(70.0) and not book.trusted("orderbook", "KRW-ETH")
    book.written(book.held_now(), 70.0)
    book.expire(200.0)
    assert book.held_now() == frozenset() and book.due(200.0)  # release
    book.written(frozenset(), 200.0)
    assert not book.due(300.0)


def test_poll_book_codes_polled_during_a_write_make_it_due_again() -> None:
    book = PollBook(60.0)
    book.poll("ticker", ["KRW-BTC"], 0.0)
    held = book.held_now()
    book.poll("ticker", ["KRW-ETH"], 0.0)  # while the write is under way
    book.written(held, 0.0)
    assert book.due(0.0)
    book.confirm("ticker", "KRW-ETH")  # not in the written lease: not trusted
    assert not book.trusted("ticker", "KRW-ETH")


def test_poll_book_distrust_rewrites_and_refetches() -> None:
    book = PollBook(60.0)
    book.poll("ticker", ["KRW-BTC"], 0.0)
    book.written(book.held_now(), 0.0)
    book.confirm("ticker", "KRW-BTC")
    book.distrust("ticker", "KRW-BTC")
    assert not book.trusted("ticker", "KRW-BTC") and book.due(1.0)


def test_poll_book_has_a_cap() -> None:
    book = PollBook(60.0, max_streams=3)
    assert book.poll("ticker", ["KRW-BTC", "KRW-ETH"], 0.0)
    assert not book.poll("orderbook", ["KRW-BTC", "KRW-ETH"], 0.0)
    assert book.held_now() == {("ticker", "KRW-BTC"), ("ticker", "KRW-ETH")}
    assert book.poll("ticker", ["KRW-BTC", "KRW-ETH", "KRW-XRP"], 1.0)
    with pytest.raises(ValueError):
        PollBook(0.0)
