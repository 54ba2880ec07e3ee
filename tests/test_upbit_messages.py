"""Frame models: exact numbers, zero padding, SIMPLE == DEFAULT, typed refusals."""

from __future__ import annotations

import time
import types
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import FrameError, UpbitErrorFrame
from broker.upbit import fields
from broker.upbit.messages import (
    MY_ASSET_FIELDS,
    MY_ORDER_FIELDS,
    AssetBalance,
    BookLevels,
    Candle,
    ErrorFrame,
    LegacyFrameError,
    ListedSubscription,
    ListSubscriptionsReply,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    PriceLevel,
    StatusUp,
    Ticker,
    Trade,
    decode_frames,
    decode_message,
    message_class,
)
from broker.upbit.types import DataType, Format, SubscriptionSet

TICKER = (
    b'{"type":"ticker","code":"KRW-BTC","opening_price":31883000,"high_price":32310000,'
    b'"low_price":31855000,"trade_price":32287000,"prev_closing_price":31883000.00000000,'
    b'"acc_trade_price":78039261076.51241000,"change":"RISE","change_price":404000.00000000,'
    b'"signed_change_price":404000.00000000,"change_rate":0.0126713295,'
    b'"signed_change_rate":0.0126713295,"ask_bid":"ASK","trade_volume":0.03103806,'
    b'"acc_trade_volume":2429.58834336,"trade_date":"20230221","trade_time":"074102",'
    b'"trade_timestamp":1676965262139,"acc_ask_volume":1146.25573608,'
    b'"acc_bid_volume":1283.33260728,"highest_52_week_price":57678000.00000000,'
    b'"highest_52_week_date":"2022-03-28","lowest_52_week_price":20700000.00000000,'
    b'"lowest_52_week_date":"2022-12-30","market_state":"ACTIVE","is_trading_suspended":false,'
    b'"delisting_date":null,"market_warning":"NONE","timestamp":1676965262177,'
    b'"acc_trade_price_24h":228827082483.70729000,"acc_trade_volume_24h":7158.80283560,'
    b'"stream_type":"REALTIME"}'
)


def trade_frame(sequential_id: str = "17303368620470000", **extra: str) -> bytes:
    """A DEFAULT trade frame with ``sequential_id`` spelled as given (raw JSON text)."""
    body = (
        '{"type":"trade","code":"KRW-BTC","timestamp":1730336862082,"trade_date":"2024-10-31",'
        '"trade_time":"01:07:42","trade_timestamp":1730336862047,'
        '"trade_price":100473000.00000000,"trade_volume":0.00014208,"ask_bid":"BID",'
        '"prev_closing_price":100571000.00000000,"change":"FALL","change_price":98000.00000000,'
        f'"sequential_id":{sequential_id},"best_ask_price":100473000,"best_ask_size":0.43139478,'
        '"best_bid_price":100465000,"best_bid_size":0.01990656,"stream_type":"SNAPSHOT"'
    )
    for key, raw in extra.items():
        body += f',"{key}":{raw}'
    return (body + "}").encode()


def simple(frame: bytes) -> bytes:
    """The SIMPLE spelling of a DEFAULT frame."""
    obj = msgspec.json.decode(frame)
    return msgspec.json.encode(fields.to_simple(obj["type"], obj))


# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("17303368620470000", 17303368620470000),
        ("17303368620470001", 17303368620470001),  # odd above 2**53: no float holds it
        ("9007199254740993", 2**53 + 1),
        ("18446744073709551617", 2**64 + 1),
        ("123456789012345678901234567890", 123456789012345678901234567890),
        # An integral value spelled as a float is read exactly, through Decimal.
        ("1.7303368620470001E16", 17303368620470001),
        ("17303368620470001.000", 17303368620470001),
        ("1.7303368620470001e+16", 17303368620470001),
    ],
)
def test_sequential_id_is_exact(spelling: str, expected: int) -> None:
    trade = decode_message(trade_frame(spelling))
    assert isinstance(trade, Trade)
    assert type(trade.sequential_id) is int
    assert trade.sequential_id == expected
    simple_trade = decode_message(
        simple(trade_frame()).replace(b'"sid":17303368620470000', b'"sid":' + spelling.encode())
    )
    assert isinstance(simple_trade, Trade)
    assert simple_trade.sequential_id == expected


@pytest.mark.parametrize(
    "spelling", ["1.5", "1.7303368620470001E-3", '"17303368620470000"', "null"]
)
def test_sequential_id_that_is_no_integer_is_refused(spelling: str) -> None:
    with pytest.raises(FrameError, match="sequential_id"):
        decode_message(trade_frame(spelling))


def test_huge_exponent_is_refused_quickly() -> None:
    # A hostile exponent must not become a billion-digit int on the way.
    start = time.perf_counter()
    with pytest.raises(FrameError):
        decode_message(trade_frame("1E999999999"))
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.16539E8", 116539000.0),
        ("1.16539e8", 116539000.0),
        ("116539000.00000000", 116539000.0),
        ("116539000", 116539000.0),
        ("7.9276E-4", 0.00079276),
        ("5.0E-4", 0.0005),
        ("0.00077720", 0.0007772),
        ("0", 0.0),
    ],
)
def test_prices_accept_every_number_spelling(raw: str, expected: float) -> None:
    frame = trade_frame().replace(
        b'"trade_price":100473000.00000000', f'"trade_price":{raw}'.encode()
    )
    trade = decode_message(frame)
    assert isinstance(trade, Trade)
    assert type(trade.trade_price) is float
    assert trade.trade_price == expected


def test_int_fields_spelled_as_floats_are_read_exactly() -> None:
    frame = trade_frame().replace(b'"timestamp":1730336862082', b'"timestamp":1.730336862082E12')
    trade = decode_message(frame)
    assert isinstance(trade, Trade)
    assert trade.timestamp == 1730336862082
    with pytest.raises(FrameError, match="timestamp"):
        decode_message(trade_frame().replace(b'"timestamp":1730336862082', b'"timestamp":1.5'))
    # the second chance is no more tolerant of the other fields: no float out of range
    out_of_range = frame.replace(b'"trade_volume":0.00014208', b'"trade_volume":1E999')
    with pytest.raises(FrameError, match="bad trade frame"):
        decode_message(out_of_range)


def test_wire_orderbook_spelling() -> None:
    frame = (
        b'{"ty":"orderbook","cd":"KRW-BTC","tms":1790134773006,"tas":0.48514983,'
        b'"tbs":2.2403413,"obu":[{"ap":116606000,"bp":116534000,"as":0.06288509,'
        b'"bs":7.9276E-4},{"ap":1.16609E8,"bp":116521000,"as":5.0E-4,"bs":0.01624318}],'
        b'"st":"SNAPSHOT","lv":0}'
    )
    assert decode_message(frame) == Orderbook(
        type="orderbook",
        code="KRW-BTC",
        timestamp=1790134773006,
        total_ask_size=0.48514983,
        total_bid_size=2.2403413,
        orderbook_units=(
            OrderbookUnit(116606000.0, 116534000.0, 0.06288509, 0.00079276),
            OrderbookUnit(116609000.0, 116521000.0, 0.0005, 0.01624318),
        ),
        stream_type="SNAPSHOT",
        level=0.0,
    )


# -- orderbook zero padding --------------------------------------------------------------------


def _book(*units: tuple[float, float, float, float]) -> Orderbook:
    return Orderbook(
        type="orderbook",
        code="BTC-XRP",
        timestamp=1,
        total_ask_size=0.0,
        total_bid_size=0.0,
        orderbook_units=tuple(OrderbookUnit(*u) for u in units),
        stream_type="REALTIME",
    )


@pytest.mark.parametrize(
    ("units", "asks", "bids"),
    [
        ((), (), ()),
        (((2.0, 1.0, 0.5, 0.25),), ((2.0, 0.5),), ((1.0, 0.25),)),
        # thin ask side: padded with zero slots while bids go on
        (
            ((2.0, 1.0, 0.5, 0.25), (0.0, 0.9, 0.0, 1.0), (0.0, 0.8, 0.0, 2.0)),
            ((2.0, 0.5),),
            ((1.0, 0.25), (0.9, 1.0), (0.8, 2.0)),
        ),
        # thin bid side
        (((2.0, 1.0, 0.5, 0.25), (3.0, 0.0, 1.5, 0.0)), ((2.0, 0.5), (3.0, 1.5)), ((1.0, 0.25),)),
        # an empty book is all padding
        (((0.0, 0.0, 0.0, 0.0),) * 30, (), ()),
        # a price without size is no level either
        (((2.0, 1.0, 0.0, 0.25),), (), ((1.0, 0.25),)),
    ],
)
def test_levels_drop_zero_slots(
    units: tuple[tuple[float, float, float, float], ...],
    asks: tuple[tuple[float, float], ...],
    bids: tuple[tuple[float, float], ...],
) -> None:
    levels = _book(*units).levels()
    assert levels == BookLevels(
        asks=tuple(PriceLevel(*a) for a in asks), bids=tuple(PriceLevel(*b) for b in bids)
    )


def test_zero_padded_wire_frame() -> None:
    frame = simple(
        msgspec.json.encode(
            {
                "type": "orderbook",
                "code": "BTC-XRP",
                "timestamp": 1,
                "total_ask_size": 1.0,
                "total_bid_size": 3.0,
                "orderbook_units": [
                    {"ask_price": 4.1e-6, "bid_price": 4.0e-6, "ask_size": 1.0, "bid_size": 1.0},
                    {"ask_price": 0.0, "bid_price": 3.9e-6, "ask_size": 0.0, "bid_size": 2.0},
                ],
                "stream_type": "REALTIME",
                "level": 0,
            }
        )
    )
    book = decode_message(frame)
    assert isinstance(book, Orderbook)
    assert len(book.orderbook_units) == 2
    assert book.levels().asks == (PriceLevel(4.1e-6, 1.0),)
    assert book.levels().bids == (PriceLevel(4.0e-6, 1.0), PriceLevel(3.9e-6, 2.0))


# -- SIMPLE and DEFAULT give one model ---------------------------------------------------------

DEFAULT_FRAMES = {
    "ticker": TICKER,
    "trade": trade_frame(),
    "orderbook": (
        b'{"type":"orderbook","code":"KRW-BTC","timestamp":1790134742106,'
        b'"total_ask_size":2.51469375,"total_bid_size":1.63815297,"orderbook_units":['
        b'{"ask_price":1.16539E8,"bid_price":1.16538E8,"ask_size":0.02054761,"bid_size":0.08120946},'
        b'{"ask_price":1.16542E8,"bid_price":1.16537E8,"ask_size":0.00077720,"bid_size":0.01129382}],'
        b'"stream_type":"SNAPSHOT","level":10000}'
    ),
    "candle.15m": (
        b'{"type":"candle.15m","code":"KRW-BTC","candle_date_time_utc":"2026-08-26T08:00:00",'
        b'"candle_date_time_kst":"2026-08-26T17:00:00","opening_price":109753000.0,'
        b'"high_price":109756000.0,"low_price":109667000.0,"trade_price":109756000.0,'
        b'"candle_acc_trade_volume":3.63363563,"candle_acc_trade_price":398651814.32878,'
        b'"timestamp":1787731717049,"stream_type":"SNAPSHOT"}'
    ),
}


@pytest.mark.parametrize("name", sorted(DEFAULT_FRAMES))
def test_simple_and_default_decode_to_the_same_model(name: str) -> None:
    frame = DEFAULT_FRAMES[name]
    from_default = decode_message(frame)
    from_simple = decode_message(simple(frame))
    assert type(from_simple) is type(from_default)
    assert from_simple == from_default
    assert decode_message(frame, Format.DEFAULT) == from_default
    assert decode_message(simple(frame), "SIMPLE") == from_default
    assert decode_frames(b"[" + frame + b"," + frame + b"]", Format.JSON_LIST) == [from_default] * 2
    assert decode_frames(b"[" + simple(frame) + b"]", Format.SIMPLE_LIST) == [from_default]


def test_orderbook_units_of_simple_frames_are_orderbook_units() -> None:
    book = decode_message(simple(DEFAULT_FRAMES["orderbook"]))
    assert isinstance(book, Orderbook)
    assert {type(u) for u in book.orderbook_units} == {OrderbookUnit}
    assert book.level == 10000.0


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (Ticker, fields.TICKER),
        (Trade, fields.TRADE),
        (Orderbook, fields.ORDERBOOK),
        (OrderbookUnit, fields.ORDERBOOK_UNIT),
        (Candle, fields.CANDLE),
        (MyOrder, MY_ORDER_FIELDS),
        (MyAsset, MY_ASSET_FIELDS),
    ],
)
def test_every_field_has_a_simple_name(cls: type[msgspec.Struct], names: dict[str, str]) -> None:
    assert set(cls.__struct_fields__) <= set(names)
    assert len(set(names.values())) == len(names), "two fields share a SIMPLE name"


def test_fmt_hint_refuses_the_other_spelling() -> None:
    with pytest.raises(FrameError, match="spelled SIMPLE, expected DEFAULT"):
        decode_message(simple(TICKER), Format.DEFAULT)
    with pytest.raises(FrameError, match="spelled DEFAULT, expected SIMPLE_LIST"):
        decode_message(TICKER, Format.SIMPLE_LIST)
    # control frames are spelled the same in every format
    assert decode_message(b'{"status":"UP"}', Format.SIMPLE) == StatusUp("UP")


# -- optional, legacy and unknown keys ---------------------------------------------------------


def test_legacy_and_deprecated_ticker_keys_are_optional() -> None:
    obj = msgspec.json.decode(TICKER)
    for key in ("is_trading_suspended", "delisting_date", "market_warning"):
        del obj[key]
    ticker = decode_message(msgspec.json.encode(obj))
    assert isinstance(ticker, Ticker)
    assert (ticker.delisting_date, ticker.trade_status, ticker.market_state_for_ios) == (None,) * 3
    obj.update(trade_status="ACTIVE", market_state_for_ios=None, delisting_date="2026-10-01")
    ticker = decode_message(msgspec.json.encode(obj))
    assert isinstance(ticker, Ticker)
    assert (ticker.trade_status, ticker.delisting_date) == ("ACTIVE", "2026-10-01")


def test_unknown_keys_are_ignored() -> None:
    frame = trade_frame(new_field='{"nested":[1,2,{"x":null}]}', another='"x"')
    assert decode_message(frame) == decode_message(trade_frame())


def test_trades_before_best_bid_ask_decode() -> None:
    obj = msgspec.json.decode(trade_frame())
    for key in ("best_ask_price", "best_ask_size", "best_bid_price", "best_bid_size"):
        del obj[key]
    trade = decode_message(msgspec.json.encode(obj))
    assert isinstance(trade, Trade)
    assert trade.best_ask_price is None


def test_orderbook_without_level_is_level_zero() -> None:
    obj = msgspec.json.decode(DEFAULT_FRAMES["orderbook"])
    del obj["level"]
    book = decode_message(msgspec.json.encode(obj))
    assert isinstance(book, Orderbook)
    assert book.level == 0.0


# -- control frames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b'{"error":{"name":"NO_TICKET","message":"m"}}',
        b'{"error":{"message":"m","name":"NO_TICKET"}}',
        b'{ "error" : { "message" : "m" , "name" : "NO_TICKET" , "extra" : 1 } }',
    ],
)
def test_error_frames_in_any_key_order(frame: bytes) -> None:
    assert decode_message(frame) == ErrorFrame(name="NO_TICKET", message="m")


def test_error_frame_becomes_a_typed_exception() -> None:
    error = decode_message(b'{"error":{"name":"Too Many Requests","message":"slow down"}}')
    assert isinstance(error, ErrorFrame)
    assert error.is_rate_limit
    exc = error.to_exception()
    assert isinstance(exc, UpbitErrorFrame)
    assert (exc.name, exc.message, exc.is_rate_limit) == ("Too Many Requests", "slow down", True)
    assert decode_message(b'{"error":{"name":404,"message":"Code not found"}}') == ErrorFrame(
        "404", "Code not found"
    )


def test_list_subscriptions_reply_in_both_spellings() -> None:
    expected = ListSubscriptionsReply(
        method="LIST_SUBSCRIPTIONS",
        result=(
            ListedSubscription("ticker", ("KRW-BTC", "KRW-ETH")),
            ListedSubscription("orderbook", ("KRW-BTC.15",), 10000.0),
            ListedSubscription("myAsset"),
        ),
        ticket="12345",
    )
    default = (
        b'{"method":"LIST_SUBSCRIPTIONS","result":[{"type":"ticker","codes":["KRW-BTC","KRW-ETH"]},'
        b'{"type":"orderbook","codes":["KRW-BTC.15"],"level":10000},{"type":"myAsset"}],'
        b'"ticket":"12345"}'
    )
    simple_reply = (
        b'{"mthd":"LIST_SUBSCRIPTIONS","rslt":[{"ty":"ticker","cds":["KRW-BTC","KRW-ETH"]},'
        b'{"ty":"orderbook","cds":["KRW-BTC.15"],"lv":1.0E4},{"ty":"myAsset"}],"tckt":12345}'
    )
    assert decode_message(default) == expected
    assert decode_message(simple_reply) == expected
    assert decode_message(simple_reply, Format.SIMPLE) == expected
    with pytest.raises(FrameError, match="spelled SIMPLE"):
        decode_message(simple_reply, Format.DEFAULT)
    listed = SubscriptionSet.from_subscriptions(expected.subscriptions())
    assert listed == SubscriptionSet.of(
        {"ticker": ["KRW-BTC", "KRW-ETH"], "orderbook@10000": ["KRW-BTC.15"]}
    )
    empty = decode_message(b'{"method":"LIST_SUBSCRIPTIONS","result":null}')
    assert empty == ListSubscriptionsReply("LIST_SUBSCRIPTIONS", (), None)


# -- private frames ----------------------------------------------------------------------------


def test_private_frames_are_decoded_leniently() -> None:
    order = decode_message(
        b'{"ty":"myOrder","cd":"KRW-BTC","uid":"u","p":"0.001453","v":"2","tc":1,"im":true,'
        b'"st":"REALTIME","tms":1710751597500}'
    )
    assert isinstance(order, MyOrder)
    assert (order.code, order.price, order.volume, order.is_maker) == (
        "KRW-BTC",
        0.001453,
        2.0,
        True,
    )
    asset = decode_message(
        b'{"ty":"myAsset","astuid":"a","ast":[{"cu":"KRW","b":1386929.37,"l":"10"}],"st":"REALTIME"}'
    )
    assert asset == MyAsset(
        type="myAsset",
        asset_uuid="a",
        assets=(AssetBalance(currency="KRW", balance=1386929.37, locked=10.0),),
        stream_type="REALTIME",
    )


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error", "match"),
    [
        (b"", FrameError, "not valid JSON"),
        (b"PING", FrameError, "not valid JSON"),
        (TICKER[:-20], FrameError, "not valid JSON"),
        (b"[" + TICKER + b"]", FrameError, "decode_frames"),
        (b"42", FrameError, "expected a JSON object, got int"),
        (b'"ticker"', FrameError, "expected a JSON object, got str"),
        (b"null", FrameError, "got NoneType"),
        (b"{}", FrameError, "not an Upbit frame"),
        (b'{"type":"ticker"}', FrameError, "not an Upbit frame"),
        (b'{"type":5,"code":"KRW-BTC"}', FrameError, "not an Upbit frame"),
        (b'{"type":"ticker","cd":"KRW-BTC"}', FrameError, "not an Upbit frame"),
        (b'{"type":"ticker","ty":"ticker","code":"KRW-BTC"}', FrameError, "both 'type' and 'ty'"),
        (b'{"type":"nope","code":"KRW-BTC"}', FrameError, "unknown data type 'nope'"),
        (b'{"type":"ticker","code":"KRW-BTC","stream_type":"REALTIME"}', FrameError, "bad ticker"),
        (
            TICKER.replace(b'"trade_price":32287000', b'"trade_price":"1"'),
            FrameError,
            "trade_price",
        ),
        (b'{"market":"KRW-BTC","trade_price":1.0}', LegacyFrameError, "legacy"),
        (b'{"mk":"KRW-BTC","st":"SNAPSHOT"}', LegacyFrameError, "legacy"),
        (b'{"error":"boom"}', FrameError, "bad error frame"),
        (b'{"status":"UP"' + b" " * (1 << 20) + b"}", FrameError, "over the"),
        (b'{"a":' * 10000 + b"1" + b"}" * 10000, FrameError, "unreadable frame"),
        (b'{"type":"trade","code":"KRW-BTC","trade_date":"\xff"}', FrameError, "not valid UTF-8"),
    ],
)
def test_refusals_are_frame_errors(frame: bytes, error: type[FrameError], match: str) -> None:
    with pytest.raises(error, match=match):
        decode_message(frame)


@pytest.mark.parametrize(
    "frame",
    [b"[1]", b"[", b'[{"status":"UP"}, 5]', b'[{"market":"KRW-BTC"}]', b" " * (1 << 20) + b"[]"],
)
def test_decode_frames_refusals(frame: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frames(frame)


def test_decode_frames_of_single_objects_and_empty_lists() -> None:
    assert decode_frames(b'{"status":"UP"}') == [StatusUp()]
    assert decode_frames(b"  []") == []
    assert decode_frames("[]") == []


def test_str_frames_decode_like_bytes() -> None:
    assert decode_message(TICKER.decode()) == decode_message(TICKER)


def test_message_class_and_candle_units() -> None:
    assert message_class("ticker") is Ticker
    assert message_class("candle.240m") is Candle
    assert message_class("myOrder") is MyOrder
    assert message_class("nope") is None
    for data_type in DataType:
        if data_type.is_candle:
            candle = decode_message(
                DEFAULT_FRAMES["candle.15m"].replace(b"candle.15m", data_type.value.encode())
            )
            assert isinstance(candle, Candle)
            assert candle.type == data_type.value
    candle = decode_message(DEFAULT_FRAMES["candle.15m"])
    assert isinstance(candle, Candle)
    assert candle.unit_seconds == 900


# -- generated messages: any value, either spelling, any key order, round trip ----------------

CODES = st.from_regex(r"[A-Z]{2,6}-[A-Z0-9]{1,16}", fullmatch=True)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=12)


def _strategy(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of a model field's type (everything but type/code/stream_type)."""
    if isinstance(annotation, types.UnionType):
        return st.one_of(*(_strategy(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return st.none()
    if annotation is OrderbookUnit:
        return st.builds(OrderbookUnit, FLOATS, FLOATS, FLOATS, FLOATS)
    if typing.get_origin(annotation) is tuple:
        return st.lists(_strategy(typing.get_args(annotation)[0]), max_size=30).map(tuple)
    return {
        float: FLOATS,
        int: st.integers(-(2**70), 2**70),
        str: TEXT,
        bool: st.booleans(),
    }[annotation]


def _message_strategy(cls: type[msgspec.Struct], types_: list[str]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, st.SearchStrategy[Any]] = {
        name: _strategy(hints[name]) for name in cls.__struct_fields__
    }
    kwargs.update(
        type=st.sampled_from(types_),
        code=CODES,
        stream_type=st.sampled_from(["SNAPSHOT", "REALTIME", ""]),
    )
    return st.builds(cls, **kwargs)


MESSAGES: st.SearchStrategy[Ticker | Trade | Orderbook | Candle] = st.one_of(
    _message_strategy(Ticker, ["ticker"]),
    _message_strategy(Trade, ["trade"]),
    _message_strategy(Orderbook, ["orderbook"]),
    _message_strategy(Candle, [t.value for t in DataType if t.is_candle]),
)


@st.composite
def encoded_messages(draw: st.DrawFn) -> tuple[Any, bytes, bool]:
    """(message, a frame of it in a drawn spelling and key order, whether SIMPLE)."""
    message = draw(MESSAGES)
    obj: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(message))
    is_simple = draw(st.booleans())
    if is_simple:
        obj = fields.to_simple(message.type, obj)
    keys = draw(st.permutations(list(obj)))
    frame = msgspec.json.encode({k: obj[k] for k in keys})
    if draw(st.booleans()):
        frame = msgspec.json.format(frame, indent=draw(st.integers(0, 2)))
    return message, frame, is_simple


@settings(max_examples=150, deadline=None)
@given(encoded_messages())
def test_generated_frames_round_trip(case: tuple[Any, bytes, bool]) -> None:
    message, frame, _ = case
    assert decode_message(frame) == message
    assert decode_frames(b"[" + frame + b"]") == [message]
