"""Wire spelling of simulator frames: field order, DEFAULT/SIMPLE names, list wrapping, numbers.

Simulator layer, pure. Each data type has two msgspec Struct classes built from the field
maps in :mod:`broker.upbit.fields` (one source of truth for names): the DEFAULT class encodes
full names, the SIMPLE class renames them. Structs take the values positionally in Upbit's
field order (the order of the documented and captured frames), which is what
``simulator.market`` produces. Encoding a Struct is several times cheaper than a dict, and one
module-level Encoder is reused.

The error frame and the UP frame belong to the protocol core (:mod:`broker.upbit.session`,
shared with the gateway) and are re-exported here.

``*_LIST`` formats wrap each object in its own array: how many objects Upbit batches into one
list frame is UNCONFIRMED, and consumers must accept any count, one included.

``exponent_numbers`` spells floats the way Java's ``Double.toString`` does (Upbit's servers
are Java): ``1.16539E8`` for >= 1e7, ``7.9276E-4`` below 1e-3. Off by default.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from broker.upbit import fields
from broker.upbit.session import UP_FRAME, error_frame
from broker.upbit.types import Format
from simulator.market import Unit

TICKER_FIELDS: tuple[str, ...] = (
    "type", "code", "opening_price", "high_price", "low_price", "trade_price",
    "prev_closing_price", "acc_trade_price", "change", "change_price", "signed_change_price",
    "change_rate", "signed_change_rate", "ask_bid", "trade_volume", "acc_trade_volume",
    "trade_date", "trade_time", "trade_timestamp", "acc_ask_volume", "acc_bid_volume",
    "highest_52_week_price", "highest_52_week_date", "lowest_52_week_price",
    "lowest_52_week_date", "market_state", "is_trading_suspended", "delisting_date",
    "market_warning", "timestamp", "acc_trade_price_24h", "acc_trade_volume_24h", "stream_type",
)  # fmt: skip
TRADE_FIELDS: tuple[str, ...] = (
    "type", "code", "timestamp", "trade_date", "trade_time", "trade_timestamp", "trade_price",
    "trade_volume", "ask_bid", "prev_closing_price", "change", "change_price", "sequential_id",
    "best_ask_price", "best_ask_size", "best_bid_price", "best_bid_size", "stream_type",
)  # fmt: skip
ORDERBOOK_FIELDS: tuple[str, ...] = (
    "type", "code", "timestamp", "total_ask_size", "total_bid_size", "orderbook_units",
    "stream_type", "level",
)  # fmt: skip
UNIT_FIELDS: tuple[str, ...] = ("ask_price", "bid_price", "ask_size", "bid_size")
CANDLE_FIELDS: tuple[str, ...] = (
    "type", "code", "candle_date_time_utc", "candle_date_time_kst", "opening_price",
    "high_price", "low_price", "trade_price", "candle_acc_trade_volume",
    "candle_acc_trade_price", "timestamp", "stream_type",
)  # fmt: skip

#: DEFAULT keys of each data type's frames, for tests and consumers' checks.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "ticker": TICKER_FIELDS,
    "trade": TRADE_FIELDS,
    "orderbook": ORDERBOOK_FIELDS,
    "candle": CANDLE_FIELDS,
}

_encoder = msgspec.json.Encoder()


def _pair(name: str, names: tuple[str, ...], simple: dict[str, str]) -> tuple[type, type]:
    missing = [n for n in names if n not in simple]
    if missing:  # a field order that disagrees with broker.upbit.fields is a bug here
        raise RuntimeError(f"{name}: no SIMPLE name for {missing}")
    spec = [(n, Any) for n in names]
    default = msgspec.defstruct(f"{name}Default", spec, gc=False)
    abbreviated = msgspec.defstruct(f"{name}Simple", spec, rename=simple, gc=False)
    return default, abbreviated


_TICKER = _pair("Ticker", TICKER_FIELDS, fields.TICKER)
_TRADE = _pair("Trade", TRADE_FIELDS, fields.TRADE)
_ORDERBOOK = _pair("Orderbook", ORDERBOOK_FIELDS, fields.ORDERBOOK)
_UNIT = _pair("OrderbookUnit", UNIT_FIELDS, fields.ORDERBOOK_UNIT)
_CANDLE = _pair("Candle", CANDLE_FIELDS, fields.CANDLE)
_CLASSES = {"ticker": _TICKER, "trade": _TRADE}


def java_double(x: float) -> str:
    """``Double.toString`` spelling: plain for 1e-3 <= |x| < 1e7, else ``d.dddE±n``."""
    if x == 0.0 or 1e-3 <= abs(x) < 1e7:
        return repr(x)
    sign, digits, exponent = Decimal(repr(x)).as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    power = len(digits) + exponent - 1
    return f"{'-' if sign else ''}{text[0]}.{text[1:] or '0'}E{power}"


def _java(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(msgspec.Raw(java_double(v).encode()) if type(v) is float else v for v in values)


class Encoder:
    """Encodes frame values for one format setting of numbers (DEFAULT/SIMPLE per call)."""

    __slots__ = ("exponent_numbers",)

    def __init__(self, exponent_numbers: bool = False) -> None:
        self.exponent_numbers = exponent_numbers

    def _wrap(self, obj: msgspec.Struct, fmt: Format) -> bytes:
        data = _encoder.encode(obj)
        return b"[" + data + b"]" if fmt.is_list else data

    def flat(self, type_: str, values: tuple[Any, ...], fmt: Format) -> bytes:
        """A ticker or trade frame from its values."""
        cls = _CLASSES[type_][fmt.is_simple]
        if self.exponent_numbers:
            values = _java(values)
        return self._wrap(cls(*values), fmt)

    def candle(self, values: tuple[Any, ...], fmt: Format) -> bytes:
        cls = _CANDLE[fmt.is_simple]
        if self.exponent_numbers:
            values = _java(values)
        return self._wrap(cls(*values), fmt)

    def orderbook(
        self,
        code: str,
        timestamp: int,
        book: tuple[list[Unit], float, float],
        level: float,
        stream_type: str,
        fmt: Format,
    ) -> bytes:
        units, total_ask, total_bid = book
        simple = fmt.is_simple
        unit_cls = _UNIT[simple]
        # Upbit echoes the level as a number; an integral one prints without a fraction.
        echo: Any = int(level) if level == int(level) else level
        head: tuple[Any, ...] = (total_ask, total_bid)
        if self.exponent_numbers:
            rows = [unit_cls(*_java(u)) for u in units]
            head = _java(head)
        else:
            rows = [unit_cls(*u) for u in units]
        obj = _ORDERBOOK[simple](
            "orderbook", code, timestamp, head[0], head[1], rows, stream_type, echo
        )
        return self._wrap(obj, fmt)


def encode_json(obj: Any) -> bytes:
    """Plain JSON with the shared encoder (operator and REST answers, LIST replies)."""
    return _encoder.encode(obj)


__all__ = [
    "CANDLE_FIELDS",
    "DEFAULT_KEYS",
    "ORDERBOOK_FIELDS",
    "TICKER_FIELDS",
    "TRADE_FIELDS",
    "UNIT_FIELDS",
    "UP_FRAME",
    "Encoder",
    "encode_json",
    "error_frame",
    "java_double",
]
