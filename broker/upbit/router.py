"""Hot-path routing: pull type, code, stream type (and orderbook level) out of a frame (pure).

The broker republishes frames unchanged, so it only needs to know where a frame goes. A msgspec
Struct that declares just these keys lets the C decoder skip every other value without building
Python objects for it (see ``benchmarks/bench_router.py`` for the cost against a full decode).
Both DEFAULT (``type``/``code``) and SIMPLE (``ty``/``cd``) spellings are read.
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


class _Head(msgspec.Struct):
    type: str | None = None
    ty: str | None = None
    code: str | None = None
    cd: str | None = None
    stream_type: str | None = None
    st: str | None = None
    level: float | None = None
    lv: float | None = None
    status: str | None = None
    error: msgspec.Raw | None = None
    method: str | None = None
    mthd: str | None = None


_decoder = msgspec.json.Decoder(_Head)

MALFORMED = Route(FrameKind.MALFORMED, "", "", "", 0.0)
STATUS = Route(FrameKind.STATUS, "", "", "", 0.0)
ERROR = Route(FrameKind.ERROR, "", "", "", 0.0)
LIST_REPLY = Route(FrameKind.LIST_REPLY, "", "", "", 0.0)


def route_frame(frame: bytes | str) -> Route:
    """Classify one frame (an object, not a ``*_LIST`` array) without decoding its payload.

    Never raises: anything that is not a well-formed Upbit object is ``FrameKind.MALFORMED``.
    """
    try:
        head = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return MALFORMED
    type_ = head.type or head.ty
    code = head.code or head.cd
    if type_ is not None and code is not None:
        lv = head.level if head.level is not None else head.lv
        return Route(
            FrameKind.DATA, type_, code, head.stream_type or head.st or "", lv or 0.0
        )
    if head.status is not None:
        return STATUS
    if head.error is not None:
        return ERROR
    if (head.method or head.mthd) is not None:
        return LIST_REPLY
    return MALFORMED


_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def split_list_frame(frame: bytes | str) -> list[bytes]:
    """Split a ``JSON_LIST``/``SIMPLE_LIST`` frame into the raw bytes of its objects.

    Raises ``msgspec.DecodeError`` when the frame is not a JSON array.
    """
    return [bytes(raw) for raw in _list_decoder.decode(frame)]


__all__ = ["FrameKind", "Route", "route_frame", "split_list_frame"]
