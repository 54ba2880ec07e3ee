"""The broker's frames as one client asked for them (gateway layer, pure: no I/O).

The broker publishes Upbit's bytes unchanged, one object per frame, in DEFAULT field names (or
SIMPLE, with ``--upstream-format SIMPLE``), and one channel per stream carries the deepest
orderbook depth any lease asks for. A gateway client may want another spelling, the ``*_LIST``
wrapping, fewer orderbook units, or (for its first frame of a stream) the frame re-marked
``stream_type: SNAPSHOT``. :func:`convert` makes that :class:`Variant` of a frame; the hub calls
it once per (frame, variant) and sends the same bytes to every client of that variant.

What is kept exactly: every value's spelling (numbers such as ``1.16539E8`` or
``0.00077720``, ``sequential_id`` above 2**53), the key order, keys the field maps do not know.
Values are carried as ``msgspec.Raw``; only the orderbook totals of a trimmed book are
recomputed (Upbit's ``total_ask_size`` is the sum over the units it returns), exactly, from the
sizes' decimal text. A frame this module cannot read is passed on as published (wrapped for a
``*_LIST`` client): never an exception on the hot path.

:func:`binary_frame` puts an RFC 6455 header in front of a payload (an unmasked, unfragmented
binary frame, as Upbit sends them), so a burst for one client is one ``transport.write``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

import msgspec

from broker.upbit import fields
from broker.upbit.types import DataType, Format

SNAPSHOT_MARK = b'"SNAPSHOT"'
_SNAPSHOT_RAW = msgspec.Raw(SNAPSHOT_MARK)
_SIMPLE_PREFIX = b'{"ty":'
_ORDERBOOK = DataType.ORDERBOOK.value


class Variant(NamedTuple):
    """What one client receives of a stream's frames.

    ``depth``: orderbook units kept (0: every unit the frame carries; other types always 0).
    """

    simple: bool
    listed: bool
    depth: int = 0


def variant_of(fmt: Format, type_: str = "", depth: int = 0) -> Variant:
    """The variant of a client with format ``fmt`` on a stream of ``type_`` at ``depth``.

    A depth of 30 or more keeps every unit (no channel carries more than Upbit's 30)."""
    keep = depth if type_ == _ORDERBOOK and 0 < depth < 30 else 0
    return Variant(fmt.is_simple, fmt.is_list, keep)


# -- field maps, both ways -----------------------------------------------------------------------

_TYPES = ("ticker", "trade", "orderbook", "candle.1s")
_TO_SIMPLE: dict[str, dict[str, str]] = {t: fields.fields_for(t) for t in _TYPES}
_TO_DEFAULT: dict[str, dict[str, str]] = {
    t: {simple: default for default, simple in names.items()} for t, names in _TO_SIMPLE.items()
}
_UNIT_TO_SIMPLE = fields.ORDERBOOK_UNIT
_UNIT_TO_DEFAULT = {simple: default for default, simple in _UNIT_TO_SIMPLE.items()}


def _names(type_: str, to_simple: bool) -> dict[str, str] | None:
    key = "candle.1s" if type_.startswith("candle.") else type_
    table = _TO_SIMPLE if to_simple else _TO_DEFAULT
    return table.get(key)


_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str_decoder = msgspec.json.Decoder(str)
_encoder = msgspec.json.Encoder()
_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError, TypeError)


def is_simple(frame: bytes) -> bool:
    """True for a frame in SIMPLE names (Upbit puts the type key first: ``{"ty":``)."""
    return frame.startswith(_SIMPLE_PREFIX)


def is_snapshot(frame: bytes) -> bool:
    """True for a frame marked ``stream_type: SNAPSHOT`` (in either spelling).

    ``"SNAPSHOT"`` as a whole JSON string only occurs as that value: codes are ``QUOTE-BASE``,
    the other string values are dates, times and fixed words."""
    return SNAPSHOT_MARK in frame


def trade_id(frame: bytes) -> bytes | None:
    """The ``sequential_id`` (SIMPLE: ``sid``) of a trade frame, as its text; None for any other
    frame, or one this module cannot read. Never raises (read only after a gap, not per frame).
    """
    try:
        obj = _object_decoder.decode(frame)
    except _ERRORS:
        return None
    raw = obj.get("sequential_id") or obj.get("sid")
    return bytes(raw) if raw is not None else None


def convert(frame: bytes, variant: Variant, *, snapshot: bool = False) -> bytes:
    """``frame`` (one object, as published) as ``variant`` wants it; with ``snapshot`` its
    ``stream_type`` says ``SNAPSHOT``. Never raises."""
    if not snapshot and not variant.depth and is_simple(frame) == variant.simple:
        return b"[" + frame + b"]" if variant.listed else frame  # the common case: no parse
    try:
        body = _rewrite(frame, variant, snapshot)
    except _ERRORS:
        body = frame
    return b"[" + body + b"]" if variant.listed else body


def _rewrite(frame: bytes, variant: Variant, snapshot: bool) -> bytes:
    obj = _object_decoder.decode(frame)
    simple_in = "ty" in obj and "type" not in obj
    type_raw = obj.get("ty" if simple_in else "type")
    type_ = _str_decoder.decode(type_raw) if type_raw is not None else ""
    rename = _names(type_, variant.simple) if simple_in != variant.simple else None
    units_key = "obu" if simple_in else "orderbook_units"
    out: dict[str, Any] = {}
    trimmed: tuple[float, float] | None = None
    for key, value in obj.items():
        item: Any = value
        if key == units_key and type_ == _ORDERBOOK:
            item, trimmed = _units(value, variant.depth, simple_in, rename is not None)
        out[rename.get(key, key) if rename else key] = item
    simple_out = variant.simple if rename is not None else simple_in
    if trimmed is not None:
        ask, bid = ("tas", "tbs") if simple_out else ("total_ask_size", "total_bid_size")
        if ask in out:
            out[ask] = trimmed[0]
        if bid in out:
            out[bid] = trimmed[1]
    if snapshot:
        out["st" if simple_out else "stream_type"] = _SNAPSHOT_RAW
    return _encoder.encode(out)


def _units(
    raw: msgspec.Raw, depth: int, simple_in: bool, rename: bool
) -> tuple[Any, tuple[float, float] | None]:
    """The units to send (trimmed to ``depth``, renamed), and the new totals when trimmed."""
    if not depth and not rename:
        return raw, None
    units = _raw_list_decoder.decode(raw)
    totals: tuple[float, float] | None = None
    if depth and len(units) > depth:
        units = units[:depth]
        sizes = _sizes_decoder[simple_in]
        ask = bid = Decimal(0)
        for unit in units:
            row = sizes.decode(unit)
            ask += _decimal(row.ask)
            bid += _decimal(row.bid)
        totals = (float(ask), float(bid))
    if rename:
        names = _UNIT_TO_DEFAULT if simple_in else _UNIT_TO_SIMPLE
        decode = _object_decoder.decode
        return [{names.get(k, k): v for k, v in decode(u).items()} for u in units], totals
    return msgspec.Raw(b"[" + b",".join(units) + b"]"), totals


class _DefaultSizes(msgspec.Struct):
    ask: msgspec.Raw = msgspec.field(name="ask_size", default=msgspec.Raw(b"0"))
    bid: msgspec.Raw = msgspec.field(name="bid_size", default=msgspec.Raw(b"0"))


class _SimpleSizes(msgspec.Struct):
    ask: msgspec.Raw = msgspec.field(name="as", default=msgspec.Raw(b"0"))
    bid: msgspec.Raw = msgspec.field(name="bs", default=msgspec.Raw(b"0"))


_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
#: by ``simple_in``
_sizes_decoder = (msgspec.json.Decoder(_DefaultSizes), msgspec.json.Decoder(_SimpleSizes))


def _decimal(raw: msgspec.Raw) -> Decimal:
    """A size's exact value from its text: the totals of a trimmed book are the decimal sum,
    as the double nearest to it (``0.1 + 0.2`` gives ``0.3``, as Upbit's arithmetic does)."""
    try:
        return Decimal(bytes(raw).decode())
    except InvalidOperation:
        raise ValueError(f"not a number: {bytes(raw)!r}") from None


def binary_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked, unfragmented RFC 6455 binary frame (server to client)."""
    length = len(payload)
    if length < 126:
        return bytes((0x82, length)) + payload
    if length < 65536:
        return b"\x82\x7e" + length.to_bytes(2, "big") + payload
    return b"\x82\x7f" + length.to_bytes(8, "big") + payload


__all__ = [
    "SNAPSHOT_MARK",
    "Variant",
    "binary_frame",
    "convert",
    "is_simple",
    "is_snapshot",
    "variant_of",
]
