"""The gateway's pure parts, without sockets: frame conversion (every format and depth against
the simulator's own encoding of the same values) and the protocol core's session as the gateway
drives it (no limits, every well-formed code). Its gap gate is ``broker.event_gate``
(``tests/test_event_gate.py``)."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest

from broker.upbit.codes import is_valid_code
from broker.upbit.session import AnyLevelMarket, Listed, Pinged, Refused, Session, Subscribed
from broker.upbit.types import Format, StreamKey, SubscriptionSet
from gateway.frames import Variant, binary_frame, convert, is_snapshot, trade_id, variant_of
from simulator.encode import Encoder
from simulator.market import Market, candle_values, orderbook_units, ticker_values, trade_values
from simulator.universe import build_universe

FORMATS = list(Format)


@pytest.fixture(scope="module")
def market() -> Market:
    listings = list(build_universe(0, seed=3))
    now = time.time_ns() // 1_000_000
    m = Market(listings, seed=3, trade_share=0.5, now_ms=now, trade_log_size=100, candle_history=10)
    for _ in m.step(400, now):
        pass
    return m


def _frames(market: Market, enc: Encoder, fmt: Format, stream_type: str) -> dict[str, bytes]:
    st = market.states["KRW-BTC"]
    st.fold_candles()
    return {
        "ticker": enc.flat("ticker", ticker_values(st, stream_type), fmt),
        "trade": enc.flat("trade", trade_values(st, stream_type), fmt),
        "candle": enc.candle(candle_values(st, 1, stream_type), fmt),
        "orderbook": enc.orderbook(
            "KRW-BTC", st.book_ms, orderbook_units(st, 30, 0), 0.0, stream_type, fmt
        ),
    }


@pytest.mark.parametrize("exponent", [False, True])
@pytest.mark.parametrize("published", [Format.DEFAULT, Format.SIMPLE])
@pytest.mark.parametrize("wanted", FORMATS)
@pytest.mark.parametrize("snapshot", [False, True])
def test_every_format_is_byte_for_byte_what_the_simulator_encodes(
    market: Market, exponent: bool, published: Format, wanted: Format, snapshot: bool
) -> None:
    """A broker frame (DEFAULT or SIMPLE) converted for a client equals the simulator's own
    frame of the same values in the client's format: names, order, list wrapping, number
    spelling (Java's exponent form too), the SNAPSHOT mark."""
    enc = Encoder(exponent_numbers=exponent)
    source = _frames(market, enc, published, "REALTIME")
    expected = _frames(market, enc, wanted, "SNAPSHOT" if snapshot else "REALTIME")
    for type_, frame in source.items():
        variant = variant_of(wanted, type_)
        assert convert(frame, variant, snapshot=snapshot) == expected[type_], type_


@pytest.mark.parametrize("depth", [1, 5, 15, 30])
@pytest.mark.parametrize("published", [Format.DEFAULT, Format.SIMPLE])
@pytest.mark.parametrize("wanted", FORMATS)
def test_orderbook_depth_per_client_with_its_own_totals(
    market: Market, depth: int, published: Format, wanted: Format
) -> None:
    """A 30-unit frame trimmed for a ``.N`` client is the frame Upbit (the simulator) sends
    at depth N: N units, totals summed over them (exactly, as decimals)."""
    enc = Encoder()
    for code in ("KRW-BTC", "KRW-XRP", "BTC-ETH", "KRW-SHIB"):
        st = market.states[code]
        full = enc.orderbook(
            code, st.book_ms, orderbook_units(st, 30, 0), 0.0, "REALTIME", published
        )
        want = enc.orderbook(
            code, st.book_ms, orderbook_units(st, depth, 0), 0.0, "REALTIME", wanted
        )
        assert convert(full, variant_of(wanted, "orderbook", depth)) == want, code


def test_a_shallower_frame_is_never_padded(market: Market) -> None:
    st = market.states["KRW-ETH"]
    five = Encoder().orderbook(
        "KRW-ETH", st.book_ms, orderbook_units(st, 5, 0), 0.0, "REALTIME", Format.DEFAULT
    )
    assert convert(five, variant_of(Format.DEFAULT, "orderbook", 15)) == five


def test_variants() -> None:
    assert variant_of(Format.SIMPLE_LIST, "orderbook", 5) == Variant(True, True, 5)
    assert variant_of(Format.DEFAULT, "orderbook", 30) == Variant(False, False, 0)
    assert variant_of(Format.JSON_LIST, "ticker", 5) == Variant(False, True, 0)


def test_what_cannot_be_read_is_passed_on_as_published() -> None:
    for frame in (b"not json", b'{"type":"ticker"', b'{"ty":1}', b"[1,2]"):
        assert convert(frame, Variant(False, False, 0), snapshot=True) == frame
        assert convert(frame, Variant(True, True, 5)) == b"[" + frame + b"]"


def test_unknown_keys_and_huge_integers_survive() -> None:
    frame = (
        b'{"type":"trade","code":"KRW-BTC","sequential_id":17303368620470000123,'
        b'"new_field":[1,{"a":2}],"stream_type":"REALTIME"}'
    )
    out = msgspec.json.decode(convert(frame, variant_of(Format.SIMPLE), snapshot=True))
    assert out == {
        "ty": "trade",
        "cd": "KRW-BTC",
        "sid": 17303368620470000123,
        "new_field": [1, {"a": 2}],
        "st": "SNAPSHOT",
    }


def test_snapshot_mark_and_framing() -> None:
    assert is_snapshot(b'{"ty":"ticker","st":"SNAPSHOT"}')
    assert not is_snapshot(b'{"type":"ticker","code":"KRW-SNAPSHOT","stream_type":"REALTIME"}')
    for size in (0, 125, 126, 65535, 65536):
        payload = b"x" * size
        framed = binary_frame(payload)
        assert framed[0] == 0x82 and framed.endswith(payload)
        header = len(framed) - size
        assert header == (2 if size < 126 else 4 if size < 65536 else 10)


def test_trade_id_in_either_spelling(market: Market) -> None:
    """What a gap's repeated trade is recognised by: its sequential_id, as text (it exceeds
    2**53), in DEFAULT and SIMPLE frames; nothing for other frames or unreadable bytes."""
    for published in (Format.DEFAULT, Format.SIMPLE):
        frames = _frames(market, Encoder(), published, "SNAPSHOT")
        assert trade_id(frames["trade"]) == str(market.states["KRW-BTC"].seq_id).encode()
        for other in ("ticker", "candle", "orderbook"):
            assert trade_id(frames[other]) is None
    assert trade_id(b'{"type":"trade","sequential_id":17303368620470000123}') == (
        b"17303368620470000123"
    )
    for frame in (b"not json", b"[1]", b'{"type":"trade"'):
        assert trade_id(frame) is None


# -- the protocol core's session, as the gateway drives it ------------------------------------


def gateway_session(limits: tuple[int, int] | None = None) -> Session:
    return Session(AnyLevelMarket(None, is_valid_code), limits)


def req(*objects: dict[str, Any], fmt: str | None = None) -> str:
    body: list[dict[str, Any]] = [{"ticket": "t"}, *objects]
    if fmt:
        body.append({"format": fmt})
    return json.dumps(body)


def test_the_gateway_takes_every_well_formed_code_and_level() -> None:
    s = gateway_session()
    out = s.receive(
        req(
            {"type": "ticker", "codes": ["KRW-ANY", "krw-btc", "KRW-BTC.5"]},
            {"type": "orderbook", "codes": ["KRW-BTC.5", "BTC-ETH"], "level": 7},
            {"type": "trade", "codes": ["KRW-ETH"], "isOnlyRealtime": True},
        ),
        0.0,
    )
    assert isinstance(out, Subscribed)
    assert s.realtime_set() == SubscriptionSet(
        {
            StreamKey("ticker", "KRW-ANY"): 30,
            StreamKey("orderbook", "KRW-BTC", 7.0): 5,
            StreamKey("orderbook", "BTC-ETH", 7.0): 30,
            StreamKey("trade", "KRW-ETH"): 30,
        }
    )
    assert [(x.type, x.code) for x in out.snapshots] == [
        ("ticker", "KRW-ANY"),
        ("orderbook", "KRW-BTC"),
        ("orderbook", "BTC-ETH"),
    ]


def test_without_limits_nothing_is_refused_for_its_rate() -> None:
    s = gateway_session()
    for i in range(500):
        assert not isinstance(s.receive("PING", i * 0.001), Refused)
    limited = gateway_session((5, 100))
    outcomes = [limited.receive("PING", i * 0.001) for i in range(6)]
    assert outcomes[0] == Pinged(first=True)
    assert isinstance(outcomes[5], Refused) and outcomes[5].rate_limited
    listed = s.receive('[{"ticket":"l"},{"method":"LIST_SUBSCRIPTIONS"}]', 1.0)
    assert isinstance(listed, Listed)


# -- layers ---------------------------------------------------------------------------------------


def test_the_gateways_pure_modules_do_no_io_and_nothing_imports_the_simulator() -> None:
    """``gateway/frames.py`` is pure (the hot path's conversion is testable without sockets);
    no gateway module depends on the simulator or the tests."""
    from pathlib import Path

    from tests.support.imports import imported_names

    root = Path(__file__).resolve().parents[1] / "gateway"
    io = ("asyncio", "redis", "websockets", "hiredis", "consumers", "gateway.hub")
    for name in ("frames.py",):
        found = [n for n in imported_names(root / name) if n.split(".")[0] in io or n in io]
        assert found == [], name
    for path in sorted(root.glob("*.py")):
        outer = [
            n
            for n in imported_names(path)
            if n.split(".")[0] in ("simulator", "tests", "cli") or n.startswith("broker.testing")
        ]
        assert outer == [], path.name
