"""The hot-path router: a table of frames, an oracle for the rules, fuzzing that it never raises."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.upbit.messages import Candle, Orderbook, Ticker, Trade, decode_message
from broker.upbit.router import (
    MAX_FRAME_BYTES,
    FrameKind,
    Route,
    _classify,
    route_frame,
    route_list_frame,
    split_list_frame,
)
from tests.test_upbit_messages import DEFAULT_FRAMES, encoded_messages, simple

DATA, STATUS, ERROR, LIST_REPLY, MALFORMED = (
    FrameKind.DATA,
    FrameKind.STATUS,
    FrameKind.ERROR,
    FrameKind.LIST_REPLY,
    FrameKind.MALFORMED,
)
NOT_DATA = {kind: Route(kind, "", "", "", 0.0) for kind in FrameKind}


def data(type_: str, code: str, stream_type: str = "", level: float = 0.0) -> Route:
    return Route(DATA, type_, code, stream_type, level)


TABLE: list[tuple[str, bytes, Route]] = [
    # DEFAULT and SIMPLE data, as Upbit sends them
    ("ticker", DEFAULT_FRAMES["ticker"], data("ticker", "KRW-BTC", "REALTIME")),
    ("ticker simple", simple(DEFAULT_FRAMES["ticker"]), data("ticker", "KRW-BTC", "REALTIME")),
    ("trade", DEFAULT_FRAMES["trade"], data("trade", "KRW-BTC", "SNAPSHOT")),
    ("trade simple", simple(DEFAULT_FRAMES["trade"]), data("trade", "KRW-BTC", "SNAPSHOT")),
    ("orderbook", DEFAULT_FRAMES["orderbook"], data("orderbook", "KRW-BTC", "SNAPSHOT", 10000.0)),
    (
        "orderbook simple",
        simple(DEFAULT_FRAMES["orderbook"]),
        data("orderbook", "KRW-BTC", "SNAPSHOT", 10000.0),
    ),
    ("candle", DEFAULT_FRAMES["candle.15m"], data("candle.15m", "KRW-BTC", "SNAPSHOT")),
    (
        "candle simple",
        simple(DEFAULT_FRAMES["candle.15m"]),
        data("candle.15m", "KRW-BTC", "SNAPSHOT"),
    ),
    # key order, whitespace, escapes, number spellings
    ("code first", b'{"code":"KRW-BTC","type":"trade"}', data("trade", "KRW-BTC")),
    (
        "type last",
        b'{"code":"KRW-BTC","x":[1,{"type":"no"}],"type":"trade"}',
        data("trade", "KRW-BTC"),
    ),
    (
        "cd first",
        b'{"cd":"KRW-BTC","st":"REALTIME","ty":"trade"}',
        data("trade", "KRW-BTC", "REALTIME"),
    ),
    ("spaces", b' {\n "ty" : "trade" ,\t"cd" : "KRW-BTC" } \n', data("trade", "KRW-BTC")),
    ("escaped key", b'{"typ\\u0065":"ticker","code":"KRW-BTC"}', data("ticker", "KRW-BTC")),
    ("escaped value", b'{"type":"ticker","code":"KRW-\\u0042TC"}', data("ticker", "KRW-BTC")),
    ("escaped simple", b'{"\\u0074y":"ticker","cd":"KRW-BTC"}', data("ticker", "KRW-BTC")),
    ("quote in value", b'{"type":"ticker","code":"K\\"RW"}', data("ticker", 'K"RW')),
    (
        "lv exponent",
        b'{"ty":"orderbook","cd":"KRW-BTC","lv":1.0E4}',
        data("orderbook", "KRW-BTC", "", 1e4),
    ),
    (
        "level fraction",
        b'{"type":"orderbook","code":"KRW-BTC","level":0.1}',
        data("orderbook", "KRW-BTC", "", 0.1),
    ),
    ("level int", b'{"type":"orderbook","code":"KRW-BTC","level":0}', data("orderbook", "KRW-BTC")),
    (
        "duplicate key: last wins",
        b'{"type":"ticker","code":"A-B","type":"trade"}',
        data("trade", "A-B"),
    ),
    # other spelling's keys are not read (only the type key's presence is)
    (
        "default ignores st",
        b'{"type":"trade","code":"KRW-BTC","st":5,"lv":"x"}',
        data("trade", "KRW-BTC"),
    ),
    (
        "simple ignores level",
        b'{"ty":"trade","cd":"KRW-BTC","level":"x"}',
        data("trade", "KRW-BTC"),
    ),
    # unknown and private types are data; the broker decides
    ("unknown type", b'{"type":"candle.1d","code":"KRW-BTC"}', data("candle.1d", "KRW-BTC")),
    ("myOrder", b'{"type":"myOrder","code":"KRW-BTC"}', data("myOrder", "KRW-BTC")),
    (
        "myAsset has no code",
        b'{"type":"myAsset","stream_type":"REALTIME"}',
        data("myAsset", "", "REALTIME"),
    ),
    ("myAsset simple", b'{"ty":"myAsset","st":"REALTIME"}', data("myAsset", "", "REALTIME")),
    # control frames
    ("status", b'{"status":"UP"}', NOT_DATA[STATUS]),
    ("error", b'{"error":{"name":"NO_TICKET","message":"m"}}', NOT_DATA[ERROR]),
    ("error message first", b'{"error":{"message":"m","name":"NO_TICKET"}}', NOT_DATA[ERROR]),
    ("error any value", b'{"error":"boom"}', NOT_DATA[ERROR]),
    (
        "list reply",
        b'{"method":"LIST_SUBSCRIPTIONS","result":[],"ticket":"t"}',
        NOT_DATA[LIST_REPLY],
    ),
    (
        "list reply simple",
        b'{"mthd":"LIST_SUBSCRIPTIONS","rslt":[],"tckt":1}',
        NOT_DATA[LIST_REPLY],
    ),
    # malformed: not JSON, truncated, wrong shape, gigantic, wrong value types
    ("empty", b"", NOT_DATA[MALFORMED]),
    ("text PING", b"PING", NOT_DATA[MALFORMED]),
    ("truncated", DEFAULT_FRAMES["ticker"][:-1], NOT_DATA[MALFORMED]),
    ("truncated simple", simple(DEFAULT_FRAMES["orderbook"])[:100], NOT_DATA[MALFORMED]),
    ("trailing garbage", b'{"status":"UP"} {}', NOT_DATA[MALFORMED]),
    ("bom", b'\xef\xbb\xbf{"status":"UP"}', NOT_DATA[MALFORMED]),
    ("array", b'[{"type":"trade","code":"KRW-BTC"}]', NOT_DATA[MALFORMED]),
    ("number", b"42", NOT_DATA[MALFORMED]),
    ("string", b'"trade"', NOT_DATA[MALFORMED]),
    ("null", b"null", NOT_DATA[MALFORMED]),
    ("empty object", b"{}", NOT_DATA[MALFORMED]),
    ("gigantic", b'{"status":"UP","pad":"' + b"x" * MAX_FRAME_BYTES + b'"}', NOT_DATA[MALFORMED]),
    ("deep nesting", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, NOT_DATA[MALFORMED]),
    ("bad utf-8 in type", b'{"type":"t\xff","code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("type not a string", b'{"type":5,"code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("code not a string", b'{"type":"trade","code":["KRW-BTC"]}', NOT_DATA[MALFORMED]),
    ("code null", b'{"type":"trade","code":null}', NOT_DATA[MALFORMED]),
    (
        "stream_type not a string",
        b'{"type":"trade","code":"KRW-BTC","stream_type":1}',
        NOT_DATA[MALFORMED],
    ),
    ("level a string", b'{"type":"orderbook","code":"KRW-BTC","level":"0"}', NOT_DATA[MALFORMED]),
    ("level a bool", b'{"type":"orderbook","code":"KRW-BTC","level":true}', NOT_DATA[MALFORMED]),
    ("lv a string", b'{"ty":"orderbook","cd":"KRW-BTC","lv":"0"}', NOT_DATA[MALFORMED]),
    ("status not a string", b'{"status":1}', NOT_DATA[MALFORMED]),
    ("error null", b'{"error":null}', NOT_DATA[MALFORMED]),
    ("method not a string", b'{"method":["LIST_SUBSCRIPTIONS"]}', NOT_DATA[MALFORMED]),
    ("empty type", b'{"type":"","code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("empty code", b'{"type":"trade","code":""}', NOT_DATA[MALFORMED]),
    ("no code", b'{"type":"trade","stream_type":"REALTIME"}', NOT_DATA[MALFORMED]),
    ("both spellings", b'{"type":"trade","ty":"trade","code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("both, ty null", b'{"ty":null,"type":"trade","code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("mixed spelling", b'{"type":"trade","cd":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("mixed spelling simple", b'{"ty":"trade","code":"KRW-BTC"}', NOT_DATA[MALFORMED]),
    ("legacy 2018", b'{"market":"KRW-BTC","trade_price":1.0}', NOT_DATA[MALFORMED]),
    ("legacy 2018 simple", b'{"mk":"KRW-BTC","st":"SNAPSHOT"}', NOT_DATA[MALFORMED]),
]


@pytest.mark.parametrize(("frame", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_route_table(frame: bytes, expected: Route) -> None:
    route = route_frame(frame)
    assert route == expected
    assert route.kind is expected.kind  # the broker compares kinds with "is"
    assert _classify(frame)[0] == expected
    # every input type the I/O layers may hand over routes the same
    assert route_frame(bytearray(frame)) == expected
    assert route_frame(memoryview(frame)) == expected
    try:
        text = frame.decode()
    except UnicodeDecodeError:
        return
    assert route_frame(text) == expected


@pytest.mark.parametrize("frame", [None, 42, 4.2, object(), [b"{}"]])
def test_route_frame_never_raises_even_on_non_buffers(frame: Any) -> None:
    assert route_frame(frame) == NOT_DATA[MALFORMED]


def test_route_frame_rejects_a_lone_surrogate_in_a_str_frame() -> None:
    assert route_frame('{"type":"\ud800","code":"KRW-BTC"}') == NOT_DATA[MALFORMED]


def test_spelling_is_reported() -> None:
    assert _classify(DEFAULT_FRAMES["trade"])[1] is False
    assert _classify(simple(DEFAULT_FRAMES["trade"]))[1] is True
    assert _classify(b'{"mthd":"LIST_SUBSCRIPTIONS"}') == (NOT_DATA[LIST_REPLY], True)
    assert _classify(b'{"method":"LIST_SUBSCRIPTIONS"}') == (NOT_DATA[LIST_REPLY], False)


def test_list_frames() -> None:
    trade, simple_trade = DEFAULT_FRAMES["trade"], simple(DEFAULT_FRAMES["trade"])
    frame = b"[" + trade + b"," + simple_trade + b',{"status":"UP"},5]'
    assert split_list_frame(frame)[:2] == [trade, simple_trade]
    assert route_list_frame(frame) == [
        data("trade", "KRW-BTC", "SNAPSHOT"),
        data("trade", "KRW-BTC", "SNAPSHOT"),
        NOT_DATA[STATUS],
        NOT_DATA[MALFORMED],
    ]
    assert route_list_frame(b"[]") == []
    assert route_list_frame(trade) == [NOT_DATA[MALFORMED]]
    assert route_list_frame(b"[" * 100_000) == [NOT_DATA[MALFORMED]]
    with pytest.raises(msgspec.DecodeError):
        split_list_frame(trade)


# -- the rules, written out as a plain-Python oracle over decoded JSON -------------------------


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_number(v: object) -> bool:
    """A JSON number a float holds (msgspec refuses a larger one for a float field)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _finite_or_marker(text: str) -> object:
    # Out-of-range floats become a string: valid JSON, but no number to a float field.
    value = float(text)
    return value if math.isfinite(value) else "out of range"


# The oracle reads JSON without msgspec's float range check, as the router does when skipping.
_oracle_decoder = msgspec.json.Decoder(float_hook=_finite_or_marker)


def _data_rule(obj: dict[str, Any], keys: tuple[str, str, str, str], other: str) -> Route | None:
    t, c, s, lv = (obj.get(k) for k in keys)
    valid = all(v is None or _is_str(v) for v in (t, c, s)) and (lv is None or _is_number(lv))
    codeless = c is None and t == "myAsset"
    if not valid or other in obj or not t or not (c or codeless):
        return None
    return data(t, c or "", s or "", float(lv) if lv else 0.0)


def oracle(obj: object) -> Route:
    """What route_frame must answer for a frame that decodes to ``obj`` (module docstring)."""
    if not isinstance(obj, dict):
        return NOT_DATA[MALFORMED]
    route = _data_rule(obj, ("type", "code", "stream_type", "level"), "ty")
    if route is None:
        route = _data_rule(obj, ("ty", "cd", "st", "lv"), "type")
    if route is not None:
        return route
    if not all(obj.get(k) is None or _is_str(obj.get(k)) for k in ("status", "method", "mthd")):
        return NOT_DATA[MALFORMED]
    if obj.get("status") is not None:
        return NOT_DATA[STATUS]
    if obj.get("error") is not None:
        return NOT_DATA[ERROR]
    if obj.get("method") is not None or obj.get("mthd") is not None:
        return NOT_DATA[LIST_REPLY]
    return NOT_DATA[MALFORMED]


KEYS = st.sampled_from(
    [
        "type",
        "ty",
        "code",
        "cd",
        "stream_type",
        "st",
        "level",
        "lv",
        "status",
        "error",
        "method",
        "mthd",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "ticker", "trade", "orderbook", "myAsset", "KRW-BTC", "UP", "SNAPSHOT"]),
    st.text(max_size=8),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=12,
)
HEADS = st.dictionaries(KEYS, JSON, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.one_of(HEADS, JSON))
@example({"ty": None, "type": "trade", "code": "X"})
@example({"type": "myAsset", "code": None})
@example({"type": "orderbook", "code": "X", "level": 10**18})
@example({"type": "orderbook", "code": "X", "level": 10**400})
@example({"ty": "orderbook", "cd": "X", "lv": -(10**400)})
def test_route_frame_follows_the_rules(obj: Any) -> None:
    frame = msgspec.json.encode(obj)
    expected = oracle(obj)
    assert route_frame(frame) == expected
    assert _classify(frame)[0] == expected
    pretty = msgspec.json.format(frame, indent=1)
    assert route_frame(pretty) == expected
    assert route_frame(pretty.decode()) == expected


@settings(max_examples=150, deadline=None)
@given(encoded_messages())
def test_route_frame_agrees_with_a_full_decode(case: tuple[Any, bytes, bool]) -> None:
    message, frame, is_simple = case
    decoded = decode_message(frame)
    assert decoded == message
    assert isinstance(decoded, Ticker | Trade | Orderbook | Candle)
    level = decoded.level if isinstance(decoded, Orderbook) else 0.0
    expected = data(decoded.type, decoded.code, decoded.stream_type, level)
    assert route_frame(frame) == expected
    assert _classify(frame) == (expected, is_simple)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
@example(b'{"ty":')
@example(b'{"ty"')
@example(b"{")
def test_route_frame_never_raises_on_arbitrary_bytes(frame: bytes) -> None:
    route = route_frame(frame)
    assert isinstance(route, Route)
    assert route == _classify(frame)[0]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=100))
def test_route_frame_never_raises_on_arbitrary_text(frame: str) -> None:
    assert isinstance(route_frame(frame), Route)


@settings(max_examples=150, deadline=None)
@given(encoded_messages(), st.data())
def test_route_frame_never_raises_on_damaged_frames(
    case: tuple[Any, bytes, bool], draw: st.DataObject
) -> None:
    _, frame, _ = case
    cut = draw.draw(st.integers(0, len(frame)))
    junk = draw.draw(st.binary(max_size=4))
    for damaged in (frame[:cut], frame[:cut] + junk + frame[cut:], frame[:cut] + frame[cut + 1 :]):
        route = route_frame(damaged)
        assert route == _classify(damaged)[0]
        try:
            obj = _oracle_decoder.decode(damaged)
        except (msgspec.DecodeError, ValueError, RecursionError):
            assert route == NOT_DATA[MALFORMED]
        else:
            assert route == oracle(obj)
