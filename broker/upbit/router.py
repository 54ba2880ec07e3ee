"""Hot-path routing: pull type, code, stream type (and orderbook level) out of a frame (pure).

The broker republishes frames unchanged, so it only needs to know where a frame goes. A msgspec
Struct that declares just these keys lets the C decoder skip every other value without building
Python objects for it; ``benchmarks/bench_router.py`` measures the cost against a full decode.

Rules (the same whatever the key order, whitespace or string escapes of a frame):

* DATA, DEFAULT spelling: a JSON object with non-empty strings ``type`` and ``code``, no ``ty``.
* DATA, SIMPLE spelling: non-empty strings ``ty`` and ``cd``, no ``type``. A frame carrying both
  ``type`` and ``ty`` is ambiguous and so MALFORMED; spellings are never mixed (``type`` with
  ``cd`` is not data either).
* ``stream_type``/``st`` (a string, ``""`` when absent) and ``level``/``lv`` (a number, ``0.0``
  when absent) are read in the frame's own spelling; a value of the wrong type is MALFORMED.
* Otherwise STATUS (``status`` is a string), ERROR (an ``error`` key), LIST_REPLY (``method`` or
  ``mthd`` is a string), in that order; anything else, including invalid JSON, a non-object, a
  ``*_LIST`` array and a frame over :data:`MAX_FRAME_BYTES`, is MALFORMED.

An unknown type is still DATA (the broker decides what it does with it).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import msgspec


class FrameKind(IntEnum):
    DATA = 0
    STATUS = 1  # {"status":"UP"}
    ERROR = 2  # {"error":{...}}
    LIST_REPLY = 3  # LIST_SUBSCRIPTIONS answer
    MALFORMED = 4


class Route(NamedTuple):
    """Where a frame goes. ``type``/``code`` are ``""`` for frames that are not data."""

    kind: FrameKind
    type: str
    code: str
    stream_type: str
    level: float


#: Frames above this size are MALFORMED without being parsed (a 30-unit orderbook is ~3 KB).
MAX_FRAME_BYTES = 1 << 20


class _DefaultHead(msgspec.Struct):
    type: str | None = None
    code: str | None = None
    stream_type: str | None = None
    level: float | None = None
    # Only its presence matters: a frame with both spellings of the type key is ambiguous.
    ty: msgspec.Raw | None = None


class _SimpleHead(msgspec.Struct):
    ty: str | None = None
    cd: str | None = None
    st: str | None = None
    lv: float | None = None
    type: msgspec.Raw | None = None


class _ControlHead(msgspec.Struct):
    status: str | None = None
    error: msgspec.Raw | None = None
    method: str | None = None
    mthd: str | None = None


_default_decoder = msgspec.json.Decoder(_DefaultHead)
_simple_decoder = msgspec.json.Decoder(_SimpleHead)
_control_decoder = msgspec.json.Decoder(_ControlHead)

# What a hostile or broken frame can make msgspec raise: invalid JSON or a wrong type
# (DecodeError, ValidationError), bad UTF-8 or a lone surrogate in a str frame (ValueError),
# nesting deeper than the C stack allows (RecursionError), a frame that is no buffer (TypeError).
_FRAME_ERRORS = (msgspec.DecodeError, ValueError, RecursionError, TypeError)

MALFORMED = Route(FrameKind.MALFORMED, "", "", "", 0.0)
STATUS = Route(FrameKind.STATUS, "", "", "", 0.0)
ERROR = Route(FrameKind.ERROR, "", "", "", 0.0)
LIST_REPLY = Route(FrameKind.LIST_REPLY, "", "", "", 0.0)

_DATA = FrameKind.DATA
# NamedTuple's generated __new__ is Python code; building the tuple directly halves its cost.
_new_route = tuple.__new__
_SIMPLE_PREFIX = b'{"ty":'
_SIMPLE_PREFIX_STR = '{"ty":'


def route_frame(frame: bytes | str) -> Route:
    """Classify one frame (an object, not a ``*_LIST`` array) without decoding its payload.

    Never raises: anything that is not a well-formed Upbit object is ``FrameKind.MALFORMED``.
    """
    # Fast path for what Upbit sends: a bytes frame whose type key comes first, decoded once
    # with the small head of its spelling. Whatever it does not settle goes to _classify,
    # which applies the full rules (and gives the same answer for what the fast path settles).
    if type(frame) is bytes and len(frame) <= MAX_FRAME_BYTES:
        try:
            if frame.startswith(_SIMPLE_PREFIX):
                s = _simple_decoder.decode(frame)
                if s.type is None and s.ty and s.cd:
                    return _new_route(Route, (_DATA, s.ty, s.cd, s.st or "", s.lv or 0.0))
            else:
                d = _default_decoder.decode(frame)
                if d.ty is None and d.type and d.code:
                    route = (_DATA, d.type, d.code, d.stream_type or "", d.level or 0.0)
                    return _new_route(Route, route)
        except _FRAME_ERRORS:
            pass
    return _classify(frame)[0]


def _classify(frame: bytes | str) -> tuple[Route, bool]:
    """The route of ``frame`` and whether it is spelled SIMPLE (``ty``/``cd``, ``mthd``)."""
    try:
        if len(frame) > MAX_FRAME_BYTES:
            return MALFORMED, False
        # Upbit puts the type key first, so the prefix tells which spelling to try first. The
        # answer does not depend on this guess (the two DATA rules exclude each other), only
        # the cost does: one small decode for every frame Upbit sends.
        prefix = _SIMPLE_PREFIX_STR if type(frame) is str else _SIMPLE_PREFIX
        if frame[:6] == prefix:
            s = _simple_head(frame)
            route = _simple_route(s)
            if route is not None:
                return route, True
            if s is not None and s.ty is None and s.type is None:
                return _control(frame)
            route = _default_route(_default_head(frame))
            return (route, False) if route is not None else _control(frame)
        d = _default_head(frame)
        if d is not None and d.ty is None:
            if d.type and d.code:
                return _new_route(Route, (_DATA, d.type, d.code, d.stream_type or "", d.level or 0.0)), False
            if d.type is None:  # no type key of either spelling: not data at all
                return _control(frame)
        route = _simple_route(_simple_head(frame))
        return (route, True) if route is not None else _control(frame)
    except _FRAME_ERRORS:
        # Invalid JSON, a non-object, an unreadable buffer: no rule can match.
        return MALFORMED, False


def _default_route(d: _DefaultHead | None) -> Route | None:
    if d is None or d.ty is not None or not d.type or not d.code:
        return None
    return Route(_DATA, d.type, d.code, d.stream_type or "", d.level or 0.0)


def _simple_route(s: _SimpleHead | None) -> Route | None:
    if s is None or s.type is not None or not s.ty or not s.cd:
        return None
    return Route(_DATA, s.ty, s.cd, s.st or "", s.lv or 0.0)


def _default_head(frame: bytes | str) -> _DefaultHead | None:
    try:
        return _default_decoder.decode(frame)
    except msgspec.ValidationError:
        return None


def _simple_head(frame: bytes | str) -> _SimpleHead | None:
    try:
        return _simple_decoder.decode(frame)
    except msgspec.ValidationError:
        return None


def _control(frame: bytes | str) -> tuple[Route, bool]:
    try:
        head = _control_decoder.decode(frame)
    except msgspec.ValidationError:
        return MALFORMED, False
    if head.status is not None:
        return STATUS, False
    if head.error is not None:
        return ERROR, False
    if head.method is not None:
        return LIST_REPLY, False
    if head.mthd is not None:
        return LIST_REPLY, True
    return MALFORMED, False


_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def split_list_frame(frame: bytes | str) -> list[bytes]:
    """Split a ``JSON_LIST``/``SIMPLE_LIST`` frame into the raw bytes of its objects.

    Raises ``msgspec.DecodeError`` when the frame is not a JSON array.
    """
    return [bytes(raw) for raw in _list_decoder.decode(frame)]


def route_list_frame(frame: bytes | str) -> list[Route]:
    """Routes of the objects of a ``*_LIST`` frame; one MALFORMED route if it is no array."""
    try:
        if len(frame) > MAX_FRAME_BYTES:
            return [MALFORMED]
        items = _list_decoder.decode(frame)
    except _FRAME_ERRORS:
        return [MALFORMED]
    return [_classify(bytes(raw))[0] for raw in items]


__all__ = [
    "MAX_FRAME_BYTES",
    "FrameKind",
    "Route",
    "route_frame",
    "route_list_frame",
    "split_list_frame",
]
