"""Request messages: build the exact bytes we send, parse what a client sent (pure).

``build_*`` is what the broker uses; ``parse_request`` is what the simulator uses, so both sides
share one reading of the format. A request is one JSON array
``[{ticket}, {type...}, ..., {format}]``; objects are identified by their keys, in any order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from broker.upbit.errors import RequestError
from broker.upbit.types import PRIVATE_TYPES, PUBLIC_TYPES, Format, Subscription, SubscriptionSet

LIST_SUBSCRIPTIONS = "LIST_SUBSCRIPTIONS"

# Upbit's error names with the texts captured from the Korean endpoint where there are any.
WRONG_FORMAT = ("WRONG_FORMAT", "Format 이 맞지 않습니다.")
NO_TICKET = ("NO_TICKET", "티켓이 존재하지 않거나, 유효하지 않습니다.")
NO_TYPE = ("NO_TYPE", "type field not exists.")
NO_CODES = ("NO_CODES", "codes field not exists.")
TOO_MANY_REQUESTS = ("Too Many Requests", "요청 수 제한을 초과했습니다.")


def invalid_type(type_: str) -> tuple[str, str]:
    return ("INVALID_PARAM", f"{type_} 은 지원하지 않는 타입입니다.")


_encoder = msgspec.json.Encoder()
# A JSON number as text; Python's float() would also take "nan", "inf", " 1", "1_0".
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _is_level(level: object) -> bool:
    """A usable orderbook level: a finite number >= 0 (a huge int overflows float)."""
    if isinstance(level, bool) or not isinstance(level, int | float):
        return False
    try:
        return math.isfinite(level) and level >= 0
    except OverflowError:
        return False


def _type_object(sub: Subscription) -> dict[str, Any]:
    if sub.type not in PUBLIC_TYPES:
        raise RequestError(*invalid_type(sub.type))
    if not sub.codes:
        raise RequestError(*NO_CODES)
    # Sorted and without duplicates: the same set always gives the same bytes.
    obj: dict[str, Any] = {"type": sub.type, "codes": sorted(set(sub.codes))}
    if sub.level is not None:
        if not _is_level(sub.level):
            raise RequestError(*WRONG_FORMAT)
        obj["level"] = int(sub.level) if sub.level == int(sub.level) else sub.level
    if sub.is_only_snapshot:
        obj["is_only_snapshot"] = True
    if sub.is_only_realtime:
        obj["is_only_realtime"] = True
    return obj


def build_subscribe_request(
    subscriptions: Sequence[Subscription], *, ticket: str, fmt: Format = Format.DEFAULT
) -> bytes:
    """The full request for ``subscriptions``: ticket, one object per entry, format last.

    Deterministic (codes sorted, objects in the given order). Raises :class:`RequestError` for
    what Upbit refuses: no data-type object, empty codes, an unknown type.
    """
    if not ticket:
        raise RequestError(*NO_TICKET)
    if not subscriptions:
        raise RequestError(*NO_TYPE)
    body: list[dict[str, Any]] = [{"ticket": ticket}]
    body.extend(_type_object(s) for s in subscriptions)
    body.append({"format": fmt.value})
    return _encoder.encode(body)


#: the request's frame: ``[{"ticket":...}, ..., {"format":"SIMPLE_LIST"}]`` with a ticket of up
#: to 128 + 30 characters (the broker id, a counter, 8 hex digits)
BASE_BYTES = 256
#: one (type, level) group: up to three objects (flowing, new, snapshot-only), each at most
#: ``{"type":"candle.240m","codes":[],"level":<up to 24 chars>,"is_only_realtime":true},``
GROUP_BYTES = 3 * 100


def code_bytes(code: str) -> int:
    """A code's share of a request: ``"KRW-BTC.15",`` (quotes, a depth suffix, the comma)."""
    return len(code.encode()) + 6


def request_size_bound(streams: SubscriptionSet) -> int:
    """An upper bound on the bytes of :func:`build_subscribe_request` for ``streams`` (any
    split into flowing, new and snapshot-only objects): cheap, and never below the real size,
    so a cap checked against it holds for the request sent."""
    size = BASE_BYTES
    groups: set[tuple[str, float]] = set()
    for key in streams.depths:
        size += code_bytes(key.code)
        groups.add((key.type, key.level))
    return size + GROUP_BYTES * len(groups)


def build_list_subscriptions_request(*, ticket: str, fmt: Format | None = None) -> bytes:
    """``[{"ticket":...},{"method":"LIST_SUBSCRIPTIONS"}]``, with a format object if given.

    Note: a format object here switches the format of the streams already running.
    """
    if not ticket:
        raise RequestError(*NO_TICKET)
    body: list[dict[str, Any]] = [{"ticket": ticket}, {"method": LIST_SUBSCRIPTIONS}]
    if fmt is not None:
        body.append({"format": fmt.value})
    return _encoder.encode(body)


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A request as a server reads it. ``method`` is set for LIST_SUBSCRIPTIONS."""

    ticket: str
    subscriptions: tuple[Subscription, ...]
    format: Format | None
    method: str | None = None


def _flag(obj: dict[str, Any], snake: str, camel: str) -> bool:
    value = obj.get(snake, obj.get(camel, False))
    if not isinstance(value, bool):
        raise RequestError(*WRONG_FORMAT)
    return value


def parse_request(data: bytes | str) -> ParsedRequest:
    """Read a client's request the way Upbit does; raise :class:`RequestError` with its name.

    Accepts both ``is_only_*`` and camelCase ``isOnly*`` flags, objects in any order, and a
    missing format object (served as DEFAULT). Codes are kept as sent: unknown or lower-case
    codes are not errors (Upbit ignores them silently), so filtering them is the caller's job.
    """
    try:
        body = msgspec.json.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError, TypeError):
        # Not JSON, bad UTF-8 (ValueError), nesting deeper than the stack (RecursionError).
        raise RequestError(*WRONG_FORMAT) from None
    if not isinstance(body, list) or not body or not all(isinstance(o, dict) for o in body):
        raise RequestError(*WRONG_FORMAT)

    ticket: str | None = None
    fmt: Format | None = None
    method: str | None = None
    subs: list[Subscription] = []
    for obj in body:
        if "ticket" in obj:
            if not isinstance(obj["ticket"], str) or not obj["ticket"]:
                raise RequestError(*NO_TICKET)
            ticket = obj["ticket"]
        elif "format" in obj:
            try:
                fmt = Format(obj["format"])
            except ValueError:
                raise RequestError(*WRONG_FORMAT) from None
        elif "method" in obj:
            method = obj["method"]
            if method != LIST_SUBSCRIPTIONS:
                raise RequestError(*WRONG_FORMAT)
        elif "type" in obj:
            subs.append(_parse_type_object(obj))
        elif "codes" in obj:
            raise RequestError(*NO_TYPE)
        else:
            raise RequestError(*WRONG_FORMAT)
    if ticket is None:
        raise RequestError(*NO_TICKET)
    if method is None and not subs:
        raise RequestError(*NO_TYPE)
    return ParsedRequest(ticket=ticket, subscriptions=tuple(subs), format=fmt, method=method)


def _parse_type_object(obj: dict[str, Any]) -> Subscription:
    type_ = obj["type"]
    if not isinstance(type_, str):
        raise RequestError(*WRONG_FORMAT)
    if type_ not in PUBLIC_TYPES:
        if type_ in PRIVATE_TYPES:
            # Private types live on /websocket/v1/private.
            raise RequestError("INVALID_AUTH", "인증 정보가 올바르지 않습니다.")
        raise RequestError(*invalid_type(type_))
    codes = obj.get("codes")
    if codes is None:
        raise RequestError(*NO_CODES)
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise RequestError(*WRONG_FORMAT)
    if not codes:
        raise RequestError(*NO_CODES)
    level = obj.get("level")
    if level is not None:
        # A number, or a numeric string (the guide's table types it String).
        if isinstance(level, str) and _NUMBER_RE.fullmatch(level):
            level = float(level)
        if not _is_level(level):
            raise RequestError(*WRONG_FORMAT)
        level = float(level)
    return Subscription(
        type=type_,
        codes=tuple(codes),
        level=level,
        is_only_snapshot=_flag(obj, "is_only_snapshot", "isOnlySnapshot"),
        is_only_realtime=_flag(obj, "is_only_realtime", "isOnlyRealtime"),
    )


def build_error_frame(name: str, message: str) -> bytes:
    """An error frame in Upbit's shape: ``{"error":{"name":...,"message":...}}``."""
    return _encoder.encode({"error": {"name": name, "message": message}})


__all__ = [
    "BASE_BYTES",
    "GROUP_BYTES",
    "LIST_SUBSCRIPTIONS",
    "ParsedRequest",
    "build_error_frame",
    "build_list_subscriptions_request",
    "build_subscribe_request",
    "code_bytes",
    "parse_request",
    "request_size_bound",
]
