"""Hot-path routing: pull type, code, stream type (and orderbook level) out of a frame (pure).

The broker republishes frames unchanged, so it only needs to know where a frame goes. A msgspec
Struct that declares just these keys lets the C decoder skip every other value without building
Python objects for it; ``benchmarks/bench_router.py`` measures the cost against a full decode.

Rules (the same whatever the key order, whitespace or string escapes of a frame):

* DATA, DEFAULT spelling: a JSON object with non-empty strings ``type`` and ``code`` and no
  ``ty`` key. DATA, SIMPLE spelling: non-empty strings ``ty`` and ``cd`` and no ``type`` key.
  A frame with both type keys is ambiguous, and spellings are never mixed (``type`` with ``cd``
  is not data). ``myAsset`` frames, which are account-wide, may lack the code (``""``).
* ``stream_type``/``st`` (a string, ``""`` when absent) and ``level``/``lv`` (a number, ``0.0``
  when absent) are read in the frame's own spelling; a value of the wrong type is MALFORMED.
* Otherwise STATUS (``status`` is a string), ERROR (``error`` is not null), LIST_REPLY
  (``method`` or ``mthd`` is a string), in that order. Anything else, including invalid JSON,
  a non-object, a ``*_LIST`` array and a frame over :data:`MAX_FRAME_BYTES`, is MALFORMED.

An unknown type is still DATA (the broker decides what it does with it).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple, TypeAlias

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


#: What a frame may arrive as: websockets gives bytes (binary) or str (text) messages.
Buffer: TypeAlias = bytes | bytearray | memoryview | str

#: Frames above this size are MALFORMED without being parsed (a 30-unit orderbook is ~3 KB).
MAX_FRAME_BYTES = 1 << 20


_ABSENT = msgspec.Raw()


class _DefaultHead(msgspec.Struct):
    type: str | None = None
    code: str | None = None
    stream_type: str | None = None
    level: float | None = None
    # Only its presence matters: a frame with both spellings of the type key is ambiguous.
    # (An empty Raw marks "absent": msgspec cannot put Raw in a union with None.)
    ty: msgspec.Raw = _ABSENT


class _SimpleHead(msgspec.Struct):
    ty: str | None = None
    cd: str | None = None
    st: str | None = None
    lv: float | None = None
    type: msgspec.Raw = _ABSENT


class _ControlHead(msgspec.Struct):
    status: str | None = None
    error: msgspec.Raw = _ABSENT
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


def route_frame(frame: Buffer) -> Route:
    """Classify one frame (an object, not a ``*_LIST`` array) without decoding its payload.

    Never raises: anything that is not a well-formed Upbit object is ``FrameKind.MALFORMED``.
    """
    # Fast path for what Upbit sends (the type key first): one decode with the small head of
    # the frame's spelling. Whatever it does not settle goes to _classify, which applies the
    # full rules (and gives the same answer for every frame the fast path settles). An absent
    # key decodes to the very _ABSENT default, so "is" tests presence. Upbit's data frames are
    # ASCII, and an ASCII frame needs no UTF-8 check of the strings msgspec skips.
    try:
        # Byte 4 is '"' (34) in '{"ty":' and 'p' in '{"type":'. Other input (str, bytearray,
        # a frame with another first key) goes to _classify.
        if type(frame) is bytes and len(frame) <= MAX_FRAME_BYTES and frame.isascii():
            if frame[4] == 34:
                s = _simple_decoder.decode(frame)
                if s.ty and s.cd and s.type is _ABSENT:
                    return _new_route(Route, (_DATA, s.ty, s.cd, s.st or "", s.lv or 0.0))
            else:
                d = _default_decoder.decode(frame)
                if d.type and d.code and d.ty is _ABSENT:
                    route = (_DATA, d.type, d.code, d.stream_type or "", d.level or 0.0)
                    return _new_route(Route, route)
    except (*_FRAME_ERRORS, IndexError):
        pass
    return _classify(frame)[0]


def _classify(frame: Buffer) -> tuple[Route, bool]:
    """The route of ``frame`` and whether it is spelled SIMPLE (``ty``/``cd``, ``mthd``)."""
    try:
        if len(frame) > MAX_FRAME_BYTES:
            return MALFORMED, False
        if not isinstance(frame, str):
            # msgspec checks the UTF-8 of the strings it decodes, not of those it skips.
            raw = frame if isinstance(frame, bytes) else bytes(frame)
            if not raw.isascii():
                raw.decode()
        # Upbit puts the type key first, so the prefix tells which spelling to try first. The
        # answer does not depend on this guess (the two DATA rules exclude each other), only
        # the cost does: one small decode for every frame Upbit sends.
        prefix = _SIMPLE_PREFIX_STR if type(frame) is str else _SIMPLE_PREFIX
        if frame[:6] == prefix:
            s = _simple_head(frame)
            route = _simple_route(s)
            if route is not None:
                return route, True
            if s is not None and s.ty is None and not s.type:
                return _control(frame)
            route = _default_route(_default_head(frame))
            return (route, False) if route is not None else _control(frame)
        d = _default_head(frame)
        route = _default_route(d)
        if route is not None:
            return route, False
        if d is not None and d.type is None and not d.ty:
            return _control(frame)  # no type key of either spelling: not data at all
        route = _simple_route(_simple_head(frame))
        return (route, True) if route is not None else _control(frame)
    except _FRAME_ERRORS:
        # Invalid JSON, a non-object, an unreadable buffer: no rule can match.
        return MALFORMED, False


def _default_route(d: _DefaultHead | None) -> Route | None:
    if d is None or d.ty or not d.type or not (d.code or _codeless(d.type, d.code)):
        return None
    return _new_route(Route, (_DATA, d.type, d.code or "", d.stream_type or "", d.level or 0.0))


def _simple_route(s: _SimpleHead | None) -> Route | None:
    if s is None or s.type or not s.ty or not (s.cd or _codeless(s.ty, s.cd)):
        return None
    return _new_route(Route, (_DATA, s.ty, s.cd or "", s.st or "", s.lv or 0.0))


def _codeless(type_: str, code: str | None) -> bool:
    # myAsset (private) is account-wide: its frames carry no code at all.
    return code is None and type_ == "myAsset"


def _default_head(frame: Buffer) -> _DefaultHead | None:
    try:
        return _default_decoder.decode(frame)
    except msgspec.ValidationError:
        return None


def _simple_head(frame: Buffer) -> _SimpleHead | None:
    try:
        return _simple_decoder.decode(frame)
    except msgspec.ValidationError:
        return None


def _control(frame: Buffer) -> tuple[Route, bool]:
    try:
        head = _control_decoder.decode(frame)
    except msgspec.ValidationError:
        return MALFORMED, False
    if head.status is not None:
        return STATUS, False
    if head.error and bytes(head.error) != b"null":
        return ERROR, False
    if head.method is not None:
        return LIST_REPLY, False
    if head.mthd is not None:
        return LIST_REPLY, True
    return MALFORMED, False


_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def split_list_frame(frame: Buffer) -> list[bytes]:
    """Split a ``JSON_LIST``/``SIMPLE_LIST`` frame into the raw bytes of its objects.

    Raises ``msgspec.DecodeError`` when the frame is not a JSON array.
    """
    return [bytes(raw) for raw in _list_decoder.decode(frame)]


def route_list_frame(frame: Buffer) -> list[Route]:
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
    "Buffer",
    "FrameKind",
    "Route",
    "route_frame",
    "route_list_frame",
    "split_list_frame",
]
