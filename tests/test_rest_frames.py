"""REST trades and candles as the frames the live stream carries (broker/upbit/rest_frames.py):
against the shared examples, in both spellings, with Upbit's REST shapes (PROTOCOL.md 8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.upbit import fields
from broker.upbit.errors import FrameError
from broker.upbit.messages import Candle, Trade, decode_message
from broker.upbit.rest_frames import (
    RestCandle,
    RestTrade,
    build_candle_frame,
    build_trade_frame,
    candle_start_ms,
    format_candle_to,
    parse_rest_candles,
    parse_rest_trades,
)
from broker.upbit.types import Format

#: the in-repository copies of ../shared/upbit/examples (tests/test_upbit_examples.py)
EXAMPLES = Path(__file__).resolve().parent / "data" / "upbit_examples"

#: what a back-filled frame cannot know: the message time (it carries the trade's), the
#: stream type (REALTIME), the top of the book at the trade (REST has none)
NOT_SHARED = {"timestamp", "stream_type", "best_ask_price", "best_ask_size", "best_bid_price",
              "best_bid_size"}  # fmt: skip


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text())


def rest_of_ws_trade(ws: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/trades/ticks`` object of the same trade, by the REST docs' shape: ``market``,
    UTC date and time, the trade's ``timestamp``, a signed ``change_price``."""
    sign = {"RISE": 1, "EVEN": 0, "FALL": -1}[ws["change"]]
    return {
        "market": ws["code"],
        "trade_date_utc": ws["trade_date"],
        "trade_time_utc": ws["trade_time"],
        "timestamp": ws["trade_timestamp"],
        "trade_price": ws["trade_price"],
        "trade_volume": ws["trade_volume"],
        "prev_closing_price": ws["prev_closing_price"],
        "change_price": sign * ws["change_price"],
        "ask_bid": ws["ask_bid"],
        "sequential_id": ws["sequential_id"],
    }


def rest_trades(*objects: dict[str, Any]) -> list[RestTrade]:
    return parse_rest_trades(json.dumps(list(objects)).encode())


@pytest.mark.parametrize("name", ["trade.default.json", "trade.default.live-2026-09.json"])
@pytest.mark.parametrize("fmt", [Format.DEFAULT, Format.SIMPLE])
def test_a_rest_trade_and_the_ws_trade_agree_on_every_shared_field(name: str, fmt: Format) -> None:
    raw = (EXAMPLES / name).read_bytes()
    ws = decode_message(raw)
    assert isinstance(ws, Trade)
    (trade,) = rest_trades(rest_of_ws_trade(json.loads(raw)))
    frame = build_trade_frame(trade, fmt)
    built = decode_message(frame, fmt)
    assert isinstance(built, Trade)
    mine, theirs = msgspec.structs.asdict(built), msgspec.structs.asdict(ws)
    shared = set(theirs) - NOT_SHARED
    assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}
    assert built.stream_type == "REALTIME"
    assert built.timestamp == built.trade_timestamp == ws.trade_timestamp
    assert built.best_ask_price is None  # left out, as frames before 2024-11-27 did
    assert built.sequential_id == json.loads(raw)["sequential_id"]  # exact, above 2**53


def test_the_frame_keeps_upbits_field_order_and_names() -> None:
    ws = example("trade.default.json")
    (trade,) = rest_trades(rest_of_ws_trade(ws))
    default = json.loads(build_trade_frame(trade))
    assert list(default) == [k for k in ws if k not in NOT_SHARED - {"timestamp", "stream_type"}]
    simple = json.loads(build_trade_frame(trade, Format.SIMPLE))
    assert list(simple) == [fields.TRADE[k] for k in default]
    # the 2020 SIMPLE capture's keys, less what it lacks (best_*) and we do not
    assert set(simple) == set(example("trade.simple.json"))


@pytest.mark.parametrize(
    ("price", "prev", "change_price", "change", "absolute"),
    [
        (101.0, 100.0, 1.0, "RISE", 1.0),
        (99.0, 100.0, -1.0, "FALL", 1.0),
        (100.0, 100.0, 0.0, "EVEN", 0.0),
        (99.0, 100.0, 1.0, "FALL", 1.0),  # an unsigned change_price: the prices decide
    ],
)
def test_change_is_read_from_the_prices(
    price: float, prev: float, change_price: float, change: str, absolute: float
) -> None:
    ws = {**example("trade.default.json"), "trade_price": price, "prev_closing_price": prev}
    obj = {**rest_of_ws_trade(ws), "change_price": change_price}
    (trade,) = rest_trades(obj)
    built = decode_message(build_trade_frame(trade))
    assert isinstance(built, Trade)
    assert (built.change, built.change_price) == (change, absolute)


@pytest.mark.parametrize("fmt", [Format.DEFAULT, Format.SIMPLE])
@pytest.mark.parametrize("name", ["candle.1m.default.json", "candle.15m.default.json"])
def test_a_rest_candle_and_the_ws_candle_agree(name: str, fmt: Format) -> None:
    ws = example(name)
    unit = int(ws["type"].removeprefix("candle.").removesuffix("m"))
    rest = {"market": ws["code"], **{k: v for k, v in ws.items() if k not in (
        "type", "code", "stream_type")}, "unit": unit}  # fmt: skip
    (candle,) = parse_rest_candles(json.dumps([rest]).encode())
    built = decode_message(build_candle_frame(ws["type"], candle, fmt), fmt)
    expected = decode_message(json.dumps(ws).encode())
    assert isinstance(built, Candle) and isinstance(expected, Candle)
    assert msgspec.structs.replace(built, stream_type="SNAPSHOT") == expected
    assert built.stream_type == "REALTIME"
    assert list(json.loads(build_candle_frame(ws["type"], candle))) == list(ws)


def test_candle_times() -> None:
    start = candle_start_ms("2026-08-26T08:08:00")
    assert start == 1787731680000
    assert format_candle_to(start) == "2026-08-26T08:08:00Z"
    assert format_candle_to(start + 999) == "2026-08-26T08:08:00Z"  # seconds
    for bad in ("2026-08-26 08:08", "", "yesterday"):
        with pytest.raises(FrameError):
            candle_start_ms(bad)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"error":{"name":404,"message":"Code not found"}}',
        b'[{"market":"KRW-BTC"}]',
        b'[{"market":"KRW-BTC","trade_date_utc":"2024-10-31","trade_time_utc":"01:07:42",'
        b'"timestamp":"soon","trade_price":1,"trade_volume":1,"prev_closing_price":1,'
        b'"change_price":0,"ask_bid":"BID","sequential_id":1}]',
        b"[" * 100_000,
    ],
)
def test_what_is_no_list_of_trades_is_a_frame_error(body: bytes) -> None:
    with pytest.raises(FrameError):
        parse_rest_trades(body)
    with pytest.raises(FrameError):
        parse_rest_candles(body)


def test_an_integer_spelled_as_a_float_is_read_exactly() -> None:
    obj = rest_of_ws_trade(example("trade.default.live-2026-09.json"))
    body = json.dumps([obj]).replace(str(obj["sequential_id"]), "1.7883351803770004E16")
    (trade,) = parse_rest_trades(body.encode())
    assert trade.sequential_id == 17883351803770004
    assert parse_rest_trades(b"[]") == []


def test_list_formats_are_not_built() -> None:
    (trade,) = rest_trades(rest_of_ws_trade(example("trade.default.json")))
    with pytest.raises(ValueError, match="one by one"):
        build_trade_frame(trade, Format.JSON_LIST)
    candle = RestCandle(
        market="KRW-BTC",
        candle_date_time_utc="2026-08-26T08:08:00",
        candle_date_time_kst="2026-08-26T17:08:00",
        opening_price=1.0,
        high_price=1.0,
        low_price=1.0,
        trade_price=1.0,
        timestamp=1,
        candle_acc_trade_price=1.0,
        candle_acc_trade_volume=1.0,
    )
    with pytest.raises(ValueError, match="not a candle type"):
        build_candle_frame("trade", candle)
