"""Upbit's REST trades and candles, and the WebSocket frames the live stream carries for them
(pure: stdlib and msgspec).

After an upstream gap the broker fetches what it missed over Upbit's quotation REST API
(``broker.backfill``) and appends it to the history as the frames the live stream would have
carried, so a consumer reading the history cannot tell a back-filled trade from a live one but
by the entry's ``origin`` field. This module is both directions of that: ``parse_*`` reads a
REST answer into typed objects, ``build_*`` spells one as a frame of the broker's upstream
format (DEFAULT or SIMPLE, with the SIMPLE names of ``broker.upbit.fields``), ``stream_type``
``REALTIME``, in the field order Upbit's frames use.

REST vs WebSocket (PROTOCOL.md sections 4.2, 4.4 and 8):

- ``GET /v1/trades/ticks``: ``market`` (not ``code``), ``trade_date_utc``/``trade_time_utc``
  (the frame's ``trade_date``/``trade_time``, same spelling), one ``timestamp`` (the trade's:
  the frame's ``trade_timestamp``, and its ``timestamp`` too, as the message time is unknown),
  a signed ``change_price`` (``trade_price - prev_closing_price``) where the frame has the
  absolute value and ``change`` (RISE/EVEN/FALL); no ``best_*`` fields (the frame leaves them
  out, as frames before 2024-11-27 did). ``sequential_id`` is read as an exact integer.
- ``GET /v1/candles/...``: the frame's fields with ``market`` for ``code`` (plus ``unit`` and,
  for days, more fields, ignored); ``type`` is the stream's (``candle.1m``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from broker.upbit import fields
from broker.upbit.errors import FrameError
from broker.upbit.messages import _exact_numbers
from broker.upbit.types import Format, StreamType

#: the ``stream_type`` of every built frame: a back-filled trade is a realtime event that was
#: missed, never the state at a subscription
BACKFILL_STREAM_TYPE = StreamType.REALTIME.value
#: the spelling of ``candle_date_time_utc`` (and of the candle endpoints' ``to``, with a Z)
CANDLE_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class RestTrade(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One trade of ``GET /v1/trades/ticks`` (only the fields a frame needs)."""

    market: str
    trade_date_utc: str
    trade_time_utc: str
    timestamp: int
    trade_price: float
    trade_volume: float
    prev_closing_price: float
    change_price: float
    ask_bid: str
    sequential_id: int


class RestCandle(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One candle of ``GET /v1/candles/{seconds,minutes/N}``."""

    market: str
    candle_date_time_utc: str
    candle_date_time_kst: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    timestamp: int
    candle_acc_trade_price: float
    candle_acc_trade_volume: float


_trades_decoder = msgspec.json.Decoder(list[RestTrade])
_candles_decoder = msgspec.json.Decoder(list[RestCandle])
_lax_decoder = msgspec.json.Decoder(Any, float_hook=Decimal)
_encoder = msgspec.json.Encoder()
_BROKEN = (ValueError, RecursionError, TypeError)


def _parse(body: bytes, decoder: msgspec.json.Decoder[Any], what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        # Integers spelled as floats (1.7E16) are read exactly, as the frame decoders do.
        try:
            return msgspec.convert(_exact_numbers(_lax_decoder.decode(body)), decoder.type)
        except (msgspec.DecodeError, msgspec.ValidationError, *_BROKEN):
            raise FrameError(f"not a list of {what}: {exc}") from None
    except (msgspec.DecodeError, *_BROKEN) as exc:
        raise FrameError(f"not a list of {what}: {exc}") from None


def parse_rest_trades(body: bytes) -> list[RestTrade]:
    """The trades of a ``/v1/trades/ticks`` answer, in its order (newest first).

    Raises:
        FrameError: not a JSON list of trades (an error body, garbage, a missing field).
    """
    trades: list[RestTrade] = _parse(body, _trades_decoder, "trades")
    return trades


def parse_rest_candles(body: bytes) -> list[RestCandle]:
    """The candles of a ``/v1/candles/...`` answer, in its order (newest first).

    Raises:
        FrameError: not a JSON list of candles.
    """
    candles: list[RestCandle] = _parse(body, _candles_decoder, "candles")
    return candles


def _change(trade: RestTrade) -> str:
    # From the prices, not from change_price's sign: the REST docs call change_price only the
    # change "from the previous close", and a source that sends it unsigned must not flip it.
    if trade.trade_price > trade.prev_closing_price:
        return "RISE"
    if trade.trade_price < trade.prev_closing_price:
        return "FALL"
    return "EVEN"


def _spelled(type_: str, obj: dict[str, object], fmt: Format) -> bytes:
    if fmt.is_list:
        # The broker republishes frames one by one and refuses the *_LIST formats upstream.
        raise ValueError(f"frames are built one by one: {fmt.value} is not served")
    return _encoder.encode(fields.to_simple(type_, obj) if fmt.is_simple else obj)


def build_trade_frame(trade: RestTrade, fmt: Format = Format.DEFAULT) -> bytes:
    """The ``trade`` frame the live stream would have carried for ``trade`` (REALTIME)."""
    obj: dict[str, object] = {
        "type": "trade",
        "code": trade.market,
        "timestamp": trade.timestamp,
        "trade_date": trade.trade_date_utc,
        "trade_time": trade.trade_time_utc,
        "trade_timestamp": trade.timestamp,
        "trade_price": trade.trade_price,
        "trade_volume": trade.trade_volume,
        "ask_bid": trade.ask_bid,
        "prev_closing_price": trade.prev_closing_price,
        "change": _change(trade),
        "change_price": abs(trade.change_price),
        "sequential_id": trade.sequential_id,
        "stream_type": BACKFILL_STREAM_TYPE,
    }
    return _spelled("trade", obj, fmt)


def build_candle_frame(type_: str, candle: RestCandle, fmt: Format = Format.DEFAULT) -> bytes:
    """The ``type_`` (``candle.1m`` ...) frame the live stream would have carried for ``candle``
    once complete (REALTIME)."""
    if not type_.startswith("candle."):
        raise ValueError(f"not a candle type: {type_!r}")
    obj: dict[str, object] = {
        "type": type_,
        "code": candle.market,
        "candle_date_time_utc": candle.candle_date_time_utc,
        "candle_date_time_kst": candle.candle_date_time_kst,
        "opening_price": candle.opening_price,
        "high_price": candle.high_price,
        "low_price": candle.low_price,
        "trade_price": candle.trade_price,
        "candle_acc_trade_volume": candle.candle_acc_trade_volume,
        "candle_acc_trade_price": candle.candle_acc_trade_price,
        "timestamp": candle.timestamp,
        "stream_type": BACKFILL_STREAM_TYPE,
    }
    return _spelled(type_, obj, fmt)


def candle_start_ms(candle_date_time_utc: str) -> int:
    """``"2026-08-26T08:08:00"`` (UTC) -> its milliseconds since the epoch.

    Raises:
        FrameError: not a date and time of that shape.
    """
    try:
        at = datetime.strptime(candle_date_time_utc, CANDLE_TIME_FORMAT)
    except (ValueError, TypeError):
        raise FrameError(f"bad candle time {candle_date_time_utc!r}") from None
    return int(at.replace(tzinfo=UTC).timestamp()) * 1000


def format_candle_to(ms: int) -> str:
    """The candle endpoints' ``to`` for a time in ms: ``2026-08-26T08:08:00Z`` (UTC, seconds;
    candles that start before it are answered)."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime(CANDLE_TIME_FORMAT) + "Z"


__all__ = [
    "BACKFILL_STREAM_TYPE",
    "CANDLE_TIME_FORMAT",
    "RestCandle",
    "RestTrade",
    "build_candle_frame",
    "build_trade_frame",
    "candle_start_ms",
    "format_candle_to",
    "parse_rest_candles",
    "parse_rest_trades",
]
