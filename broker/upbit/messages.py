"""Typed models of every frame Upbit sends, and their decoders (pure: stdlib and msgspec).

One Python class per message whatever its wire spelling: each model is declared once with
DEFAULT field names, and a private twin renamed to the SIMPLE names of ``broker.upbit.fields``
is generated from it. A SIMPLE frame decodes into the twin (msgspec does the renaming in C) and
is converted to the model, so ``decode_message`` of a SIMPLE frame equals that of the DEFAULT
frame with the same values. (A msgspec ``rename`` cannot be overridden in a subclass, and one
class cannot accept two names for a field, hence the twins.)

Dispatch reuses the router's rules (``broker.upbit.router``): the frame is routed first, then
decoded with the one reused Decoder of its type and spelling. So every frame ``route_frame``
calls MALFORMED is refused here, and every other frame decodes to the model of its kind (or is
refused when its payload is wrong, e.g. a missing price), never to another kind.

Numbers: prices and sizes are ``float`` and accept any JSON number spelling (``1.16539E8``,
``0.00077720``, ``137002000``). Integers (timestamps, ``sequential_id``) decode exactly from
integer literals, even above 2**53; an integral value spelled as a float (``1.7E16``) is read
through ``Decimal``, never through ``float``. Unknown keys are ignored; legacy and deprecated
keys are optional. Private frames (``myOrder``, ``myAsset``) are read leniently: every field
but the type may be missing, and numbers may be spelled as strings.

Legacy frames of the 2018 docs (``market``/``mk`` instead of ``code``/``cd``, no ``type``)
raise :class:`LegacyFrameError`: Upbit no longer sends them, the router drops them as
MALFORMED, and guessing their type from their other keys would be a second, untested protocol.

(Over 500 lines on purpose: one model per Upbit message, both spellings, and their decoders
belong together; each is short, and splitting them would split the one dispatch table.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from types import GenericAlias
from typing import Any, NamedTuple, TypeAlias, cast

import msgspec

from broker.upbit import fields
from broker.upbit.errors import FrameError, UpbitErrorFrame
from broker.upbit.router import MAX_FRAME_BYTES, FrameKind, _classify
from broker.upbit.types import CANDLE_SECONDS, PUBLIC_TYPES, DataType, Format, Subscription


class LegacyFrameError(FrameError):
    """A 2018-era frame (``market``/``mk``, no ``type``) that current Upbit no longer sends."""


# -- public data -------------------------------------------------------------------------------


class Ticker(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``ticker``: the pair's day so far, pushed on every trade."""

    type: str
    code: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    prev_closing_price: float
    change: str
    change_price: float
    signed_change_price: float
    change_rate: float
    signed_change_rate: float
    trade_volume: float
    acc_trade_volume: float
    acc_trade_volume_24h: float
    acc_trade_price: float
    acc_trade_price_24h: float
    trade_date: str
    trade_time: str
    trade_timestamp: int
    ask_bid: str
    acc_ask_volume: float
    acc_bid_volume: float
    highest_52_week_price: float
    highest_52_week_date: str
    lowest_52_week_price: float
    lowest_52_week_date: str
    market_state: str
    timestamp: int
    stream_type: str
    # Deprecated by Upbit, or null when there is nothing to say.
    is_trading_suspended: bool | None = None
    delisting_date: str | None = None
    market_warning: str | None = None
    # Legacy keys of older live frames (null in a 2021 SIMPLE capture).
    trade_status: str | None = None
    market_state_for_ios: str | None = None


class Trade(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``trade``: one execution. ``sequential_id`` is an exact int (it exceeds 2**53)."""

    type: str
    code: str
    timestamp: int
    trade_date: str
    trade_time: str
    trade_timestamp: int
    trade_price: float
    trade_volume: float
    ask_bid: str
    prev_closing_price: float
    change: str
    change_price: float
    sequential_id: int
    stream_type: str
    # Since 2024-11-27; frames from before that date lack them.
    best_ask_price: float | None = None
    best_ask_size: float | None = None
    best_bid_price: float | None = None
    best_bid_size: float | None = None


class OrderbookUnit(msgspec.Struct, frozen=True, gc=False):
    """The i-th best ask and the i-th best bid; a thin side is padded with zero slots."""

    ask_price: float
    bid_price: float
    ask_size: float
    bid_size: float


class PriceLevel(NamedTuple):
    price: float
    size: float


class BookLevels(NamedTuple):
    """One side per field, best first, without the zero slots Upbit pads thin sides with."""

    asks: tuple[PriceLevel, ...]
    bids: tuple[PriceLevel, ...]


class Orderbook(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``orderbook``: the whole top of the book (never a delta); replace, do not merge."""

    type: str
    code: str
    timestamp: int
    total_ask_size: float
    total_bid_size: float
    orderbook_units: tuple[OrderbookUnit, ...]
    stream_type: str
    # Absent from frames older than the level feature; 0 means no price grouping.
    level: float = 0.0

    def levels(self) -> BookLevels:
        """The book without zero-padded slots (a slot is empty when its price or size is 0)."""
        units = self.orderbook_units
        return BookLevels(
            asks=tuple(
                PriceLevel(u.ask_price, u.ask_size) for u in units if u.ask_price and u.ask_size
            ),
            bids=tuple(
                PriceLevel(u.bid_price, u.bid_size) for u in units if u.bid_price and u.bid_size
            ),
        )


class Candle(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``candle.{unit}`` (one class for every unit; ``type`` names it, e.g. ``candle.1m``)."""

    type: str
    code: str
    candle_date_time_utc: str
    candle_date_time_kst: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    candle_acc_trade_volume: float
    candle_acc_trade_price: float
    timestamp: int
    stream_type: str

    @property
    def unit_seconds(self) -> int:
        """The candle's length in seconds (``candle.1m`` -> 60)."""
        return CANDLE_SECONDS[DataType(self.type)]


# -- private data (decoded tolerantly: every field but the type may be missing) ----------------


class MyOrder(msgspec.Struct, frozen=True, kw_only=True):
    """``myOrder`` (private endpoint): an order of the account changed."""

    type: str
    code: str | None = None
    uuid: str | None = None
    ask_bid: str | None = None
    order_type: str | None = None
    state: str | None = None
    trade_uuid: str | None = None
    price: float | None = None
    avg_price: float | None = None
    volume: float | None = None
    remaining_volume: float | None = None
    executed_volume: float | None = None
    trades_count: int | None = None
    reserved_fee: float | None = None
    remaining_fee: float | None = None
    paid_fee: float | None = None
    locked: float | None = None
    executed_funds: float | None = None
    time_in_force: str | None = None
    trade_fee: float | None = None
    is_maker: bool | None = None
    identifier: str | None = None
    smp_type: str | None = None
    prevented_volume: float | None = None
    prevented_locked: float | None = None
    trade_timestamp: int | None = None
    order_timestamp: int | None = None
    timestamp: int | None = None
    stream_type: str | None = None


class AssetBalance(msgspec.Struct, frozen=True, kw_only=True):
    """One currency of a ``myAsset`` frame (floats: more digits than a float holds are lost)."""

    currency: str
    balance: float | None = None
    locked: float | None = None


class MyAsset(msgspec.Struct, frozen=True, kw_only=True):
    """``myAsset`` (private endpoint): balances of the account changed."""

    type: str
    asset_uuid: str | None = None
    assets: tuple[AssetBalance, ...] = ()
    asset_timestamp: int | None = None
    timestamp: int | None = None
    stream_type: str | None = None


# SIMPLE names of the private types (PROTOCOL.md section 5); fields.py holds the public ones.
MY_ORDER_FIELDS: dict[str, str] = {
    "type": "ty",
    "code": "cd",
    "uuid": "uid",
    "ask_bid": "ab",
    "order_type": "ot",
    "state": "s",
    "trade_uuid": "tuid",
    "price": "p",
    "avg_price": "ap",
    "volume": "v",
    "remaining_volume": "rv",
    "executed_volume": "ev",
    "trades_count": "tc",
    "reserved_fee": "rsf",
    "remaining_fee": "rmf",
    "paid_fee": "pf",
    "locked": "l",
    "executed_funds": "ef",
    "time_in_force": "tif",
    "trade_fee": "tf",
    "is_maker": "im",
    "identifier": "id",
    "smp_type": "smpt",
    "prevented_volume": "pv",
    "prevented_locked": "pl",
    "trade_timestamp": "ttms",
    "order_timestamp": "otms",
    "timestamp": "tms",
    "stream_type": "st",
}
MY_ASSET_FIELDS: dict[str, str] = {
    "type": "ty",
    "asset_uuid": "astuid",
    "assets": "ast",
    "asset_timestamp": "asttms",
    "timestamp": "tms",
    "stream_type": "st",
}
ASSET_BALANCE_FIELDS: dict[str, str] = {"currency": "cu", "balance": "b", "locked": "l"}


# -- control frames ----------------------------------------------------------------------------


class StatusUp(msgspec.Struct, frozen=True):
    """The keep-alive answer ``{"status":"UP"}`` (any status string decodes here)."""

    status: str = "UP"


class ErrorFrame(msgspec.Struct, frozen=True):
    """``{"error":{"name":...,"message":...}}``; Upbit closes the socket after sending one."""

    name: str
    message: str

    @property
    def is_rate_limit(self) -> bool:
        return self.name in ("Too Many Requests", "I'm a teapot")

    def to_exception(self) -> UpbitErrorFrame:
        """The error as ``broker.upbit.errors.UpbitErrorFrame``, ready to raise."""
        return UpbitErrorFrame(self.name, self.message)


class ListedSubscription(msgspec.Struct, frozen=True):
    """One entry of a LIST_SUBSCRIPTIONS answer (private types may carry no codes)."""

    type: str
    codes: tuple[str, ...] = ()
    level: float | None = None


class ListSubscriptionsReply(msgspec.Struct, frozen=True):
    """The answer to LIST_SUBSCRIPTIONS: what the connection is subscribed to right now."""

    method: str
    result: tuple[ListedSubscription, ...]
    ticket: str | None = None

    def subscriptions(self) -> tuple[Subscription, ...]:
        """The public entries as request objects (feed them to ``SubscriptionSet``)."""
        return tuple(
            Subscription(type=e.type, codes=e.codes, level=e.level)
            for e in self.result
            if e.type in PUBLIC_TYPES and e.codes
        )


Message: TypeAlias = (
    Ticker
    | Trade
    | Orderbook
    | Candle
    | MyOrder
    | MyAsset
    | StatusUp
    | ErrorFrame
    | ListSubscriptionsReply
)


# -- SIMPLE twins ------------------------------------------------------------------------------


def _simple_twin(
    cls: type[msgspec.Struct],
    names: Mapping[str, str],
    types: Mapping[str, Any] | None = None,
    **config: Any,
) -> type[msgspec.Struct]:
    """A Struct with ``cls``'s fields (in order, same defaults) renamed to SIMPLE ``names``."""
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        type_ = (types or {}).get(f.name, f.type)
        if f.default is not msgspec.NODEFAULT:
            spec.append((f.name, type_, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            spec.append((f.name, type_, msgspec.field(default_factory=f.default_factory)))
        else:
            spec.append((f.name, type_))
    return msgspec.defstruct(
        f"_Simple{cls.__name__}",
        spec,
        rename={k: v for k, v in names.items() if k in cls.__struct_fields__},
        kw_only=True,
        module=__name__,
        **config,
    )


def _tuple_of(item: Any) -> Any:
    # The twins are runtime classes, which a static ``tuple[...]`` annotation cannot name.
    return GenericAlias(tuple, (item, ...))


def _list_of(item: Any) -> Any:
    return GenericAlias(list, (item,))


_SimpleUnit = _simple_twin(OrderbookUnit, fields.ORDERBOOK_UNIT, gc=False)
_SimpleBalance = _simple_twin(AssetBalance, ASSET_BALANCE_FIELDS)

_SIMPLE_TWINS: dict[type[msgspec.Struct], type[msgspec.Struct]] = {
    Ticker: _simple_twin(Ticker, fields.TICKER, gc=False),
    Trade: _simple_twin(Trade, fields.TRADE, gc=False),
    Orderbook: _simple_twin(
        Orderbook, fields.ORDERBOOK, {"orderbook_units": _tuple_of(_SimpleUnit)}, gc=False
    ),
    Candle: _simple_twin(Candle, fields.CANDLE, gc=False),
    MyOrder: _simple_twin(MyOrder, MY_ORDER_FIELDS),
    MyAsset: _simple_twin(MyAsset, MY_ASSET_FIELDS, {"assets": _tuple_of(_SimpleBalance)}),
}

_CLASS_OF_TYPE: dict[str, type[msgspec.Struct]] = {
    DataType.TICKER.value: Ticker,
    DataType.TRADE.value: Trade,
    DataType.ORDERBOOK.value: Orderbook,
    **{t.value: Candle for t in DataType if t.is_candle},
    "myOrder": MyOrder,
    "myAsset": MyAsset,
}
# Private frames are decoded leniently (numbers spelled as strings too): their documentation
# is thinner than the public types', and the broker never subscribes them itself.
_LENIENT = frozenset({MyOrder, MyAsset})


def message_class(type_: str) -> type[msgspec.Struct] | None:
    """The model class of a data ``type`` (``candle.1m`` -> ``Candle``), or None if unknown."""
    return _CLASS_OF_TYPE.get(type_)


class _Decoders(NamedTuple):
    default: msgspec.json.Decoder[Any]
    simple: msgspec.json.Decoder[Any]


_DECODERS: dict[type[msgspec.Struct], _Decoders] = {
    cls: _Decoders(
        msgspec.json.Decoder(cls, strict=cls not in _LENIENT),
        msgspec.json.Decoder(twin, strict=cls not in _LENIENT),
    )
    for cls, twin in _SIMPLE_TWINS.items()
}


# -- control frame wire shapes -----------------------------------------------------------------


class _ErrorBody(msgspec.Struct):
    # REST error bodies carry a numeric name (404); keep the frame readable either way.
    name: str | int | None = None
    message: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


class _ListEntry(msgspec.Struct):
    type: str
    codes: list[str] | None = None
    level: float | None = None


class _ListReply(msgspec.Struct):
    method: str
    result: list[_ListEntry] | None = None
    # A string in the current docs, a Long in an older page.
    ticket: str | int | None = None


_SimpleListEntry = _simple_twin(_ListEntry, fields.LIST_SUBSCRIPTIONS)
_SimpleListReply = _simple_twin(
    _ListReply, fields.LIST_SUBSCRIPTIONS, {"result": _list_of(_SimpleListEntry) | None}
)

_status_decoder = msgspec.json.Decoder(StatusUp)
_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)
_list_reply_decoders = _Decoders(
    msgspec.json.Decoder(_ListReply), msgspec.json.Decoder(_SimpleListReply)
)
_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder(Any, float_hook=Decimal)

# What a broken frame can make msgspec raise besides DecodeError (see router._FRAME_ERRORS).
_BROKEN = (ValueError, RecursionError, TypeError)


# -- decoding ----------------------------------------------------------------------------------


def decode_message(frame: bytes | str, fmt_hint: Format | str | None = None) -> Message:
    """Decode one frame (an object, not a ``*_LIST`` array) into its typed model.

    DEFAULT vs SIMPLE is read from the keys; ``fmt_hint`` (a :class:`Format`) makes a frame
    of the other spelling an error instead. Raises :class:`broker.upbit.errors.FrameError` (or
    :class:`LegacyFrameError`) with the reason when the frame cannot be decoded.
    """
    route, simple = _classify(frame)
    kind = route.kind
    if kind is FrameKind.DATA:
        _check_spelling(simple, fmt_hint, route.type)
        cls = _CLASS_OF_TYPE.get(route.type)
        if cls is None:
            raise FrameError(f"unknown data type {route.type!r} (code {route.code!r})")
        decoders = _DECODERS[cls]
        decoder = decoders.simple if simple else decoders.default
        try:
            obj = decoder.decode(frame)
        except msgspec.ValidationError as exc:
            obj = _decode_lax(frame, decoder.type, cls not in _LENIENT, route.type, exc)
        except _BROKEN as exc:  # defensive: the router has checked the JSON and its UTF-8
            raise FrameError(f"bad {route.type} frame: {exc!r}") from None
        if simple:
            obj = msgspec.convert(obj, cls, from_attributes=True)
        return cast(Message, obj)
    if kind is FrameKind.STATUS:
        return _status_decoder.decode(frame)
    if kind is FrameKind.ERROR:
        return _decode_error(frame)
    if kind is FrameKind.LIST_REPLY:
        _check_spelling(simple, fmt_hint, "LIST_SUBSCRIPTIONS")
        return _decode_list_reply(frame, simple)
    raise _why_malformed(frame)


def decode_frames(frame: bytes | str, fmt_hint: Format | str | None = None) -> list[Message]:
    """Decode a frame of any format: a ``*_LIST`` array gives one message per element."""
    head = frame[:64].lstrip()
    if head[:1] == (b"[" if isinstance(head, bytes) else "["):
        if len(frame) > MAX_FRAME_BYTES:
            raise FrameError(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES} limit")
        try:
            items = _list_decoder.decode(frame)
        except msgspec.DecodeError as exc:
            raise FrameError(f"bad *_LIST frame: {exc}") from None
        except _BROKEN as exc:
            raise FrameError(f"bad *_LIST frame: {exc!r}") from None
        return [decode_message(bytes(raw), fmt_hint) for raw in items]
    return [decode_message(frame, fmt_hint)]


def _check_spelling(simple: bool, fmt_hint: Format | str | None, what: str) -> None:
    if fmt_hint is None:
        return
    expected = Format(fmt_hint).is_simple
    if expected != simple:
        spelled = "SIMPLE" if simple else "DEFAULT"
        raise FrameError(f"{what} frame is spelled {spelled}, expected {Format(fmt_hint).value}")


def _decode_lax(frame: bytes | str, target: Any, strict: bool, type_: str, exc: Exception) -> Any:
    """Second chance for integers spelled as floats (``1.7E16``): exact, through Decimal."""
    try:
        return msgspec.convert(_exact_numbers(_any_decoder.decode(frame)), target, strict=strict)
    except msgspec.ValidationError as lax_exc:
        # The second error is what is left once integers are read exactly: the real problem.
        raise FrameError(f"bad {type_} frame: {lax_exc}") from None
    except _BROKEN:
        raise FrameError(f"bad {type_} frame: {exc}") from None


class _OutOfRange:
    def __repr__(self) -> str:
        return "<number out of range>"


_OUT_OF_RANGE = _OutOfRange()


def _exact_numbers(value: Any) -> Any:
    """Replace Decimals by an exact int when integral and not huge, else by a float."""
    if isinstance(value, Decimal):
        # adjusted() bounds the digits, so a hostile 1E999999999 never becomes a giant int.
        if value.is_finite() and value.adjusted() < 40 and value == value.to_integral_value():
            return int(value)
        number = float(value)
        # Out of float range: a value no model field accepts, as the strict decoder refuses
        # such a number instead of reading it as an infinity (convert would take a Decimal).
        return number if math.isfinite(number) else _OUT_OF_RANGE
    if isinstance(value, dict):
        return {k: _exact_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact_numbers(v) for v in value]
    return value


def _decode_error(frame: bytes | str) -> ErrorFrame:
    try:
        body = _error_decoder.decode(frame).error
    except msgspec.ValidationError as exc:
        raise FrameError(f"bad error frame: {exc}") from None
    name = "" if body.name is None else str(body.name)
    return ErrorFrame(name=name, message=body.message or "")


def _decode_list_reply(frame: bytes | str, simple: bool) -> ListSubscriptionsReply:
    decoder = _list_reply_decoders.simple if simple else _list_reply_decoders.default
    try:
        wire = decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise FrameError(f"bad LIST_SUBSCRIPTIONS reply: {exc}") from None
    entries = tuple(
        ListedSubscription(type=e.type, codes=tuple(e.codes or ()), level=e.level)
        for e in wire.result or ()
    )
    ticket = None if wire.ticket is None else str(wire.ticket)
    return ListSubscriptionsReply(method=wire.method, result=entries, ticket=ticket)


def _utf8_error(frame: bytes | str) -> UnicodeError | None:
    """Why ``frame`` is not valid UTF-8 (a ``str`` with a lone surrogate included), else None."""
    try:
        if isinstance(frame, str):
            frame.encode()
        else:
            bytes(frame).decode()
    except UnicodeError as exc:
        return exc
    return None


def _why_malformed(frame: bytes | str) -> FrameError:
    """A FrameError that says why the router found no rule for ``frame``."""
    if len(frame) > MAX_FRAME_BYTES:
        return FrameError(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES} limit")
    try:
        obj = _any_decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeError) as exc:
        # Checked here, not read from msgspec's message: its wording changes between releases.
        bad_utf8 = _utf8_error(frame)
        if bad_utf8 is not None:
            return FrameError(f"not valid UTF-8: {bad_utf8}")
        return FrameError(f"not valid JSON: {exc}")
    except _BROKEN as exc:
        return FrameError(f"unreadable frame: {exc!r}")
    if isinstance(obj, list):
        return FrameError("a JSON array (a JSON_LIST/SIMPLE_LIST frame): use decode_frames")
    if not isinstance(obj, dict):
        return FrameError(f"expected a JSON object, got {type(obj).__name__}")
    has_type = "type" in obj or "ty" in obj
    if not has_type and ("market" in obj or "mk" in obj):
        return LegacyFrameError(
            "legacy 2018 frame (market/mk instead of code/cd, no type): not sent by Upbit "
            "any more, not supported"
        )
    if obj.get("type") is not None and obj.get("ty") is not None:
        return FrameError("frame carries both 'type' and 'ty': DEFAULT or SIMPLE?")
    simple = obj.get("type") is None and obj.get("ty") is not None
    keys = ("ty", "cd", "st", "lv") if simple else ("type", "code", "stream_type", "level")
    shown = {k: obj[k] for k in keys if k in obj}
    return FrameError(
        "not an Upbit frame: data needs non-empty strings type and code (or ty and cd) and a "
        f"string or number for the others, got {shown!r} (keys {sorted(obj)[:8]!r})"
    )


__all__ = [
    "ASSET_BALANCE_FIELDS",
    "MY_ASSET_FIELDS",
    "MY_ORDER_FIELDS",
    "AssetBalance",
    "BookLevels",
    "Candle",
    "ErrorFrame",
    "LegacyFrameError",
    "ListSubscriptionsReply",
    "ListedSubscription",
    "Message",
    "MyAsset",
    "MyOrder",
    "Orderbook",
    "OrderbookUnit",
    "PriceLevel",
    "StatusUp",
    "Ticker",
    "Trade",
    "decode_frames",
    "decode_message",
    "message_class",
]
