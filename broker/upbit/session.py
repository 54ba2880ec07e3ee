"""One connection's protocol state, as Upbit keeps it (protocol core, pure: no I/O, no clock).

The one copy of the per-connection rules of Upbit's public WebSocket: the simulator (a faithful
Upbit) and the gateway (Upbit in front of the broker) both drive this class, so the two can
never disagree about a request. What a connection needs to know of the market is a
:class:`Market`: which codes exist and which orderbook levels a code serves.

Fed one client message at a time by :meth:`Session.receive` with the current time; returns
what the connection must do (an outcome value), never calls back. Rules:

* With a message budget (Upbit's: 5/s and 100/min), every message counts against it: data
  requests, LIST_SUBSCRIPTIONS, text ``PING`` and malformed ones alike. Over budget ->
  ``Too Many Requests`` error frame, then close. ``message_rate=None``: no budget.
* A data request atomically replaces the whole set (overwrite semantics). Its format object,
  or DEFAULT when it has none, becomes the connection's format. A LIST_SUBSCRIPTIONS request
  keeps the set and changes the format only if it carries a format object.
* Codes are kept as requested; unknown and lower-case ones are silently dropped. Streams are
  deduplicated by (type, code, level), an orderbook stream taking the deepest depth asked.
  One SNAPSHOT per stream unless every object naming it is ``is_only_realtime``; REALTIME
  unless every object naming it is ``is_only_snapshot`` (both spellings: snake and camel case).
  Both flags true on one object (UNCONFIRMED on Upbit) deliver nothing for it.
* ``level`` is honoured on codes the market serves it for; any other nonzero level gives
  silence for that code (no snapshot, no stream), but it stays subscribed.
* LIST_SUBSCRIPTIONS answers with one result entry per requested object, in request order,
  codes as requested (depth suffix kept) minus ignored codes; ``is_only_snapshot`` objects are
  left out, since their delivery finished when the snapshot went out. The ticket echoed is the
  LIST request's own (which ticket Upbit echoes is UNCONFIRMED). It uses SIMPLE names when the
  format is SIMPLE or SIMPLE_LIST and, like error and UP frames, is never wrapped in a list.
* A request holding both a ``method`` object and data-type objects is a LIST_SUBSCRIPTIONS:
  the data-type objects are ignored (UNCONFIRMED on Upbit).
* Text ``PING`` starts the ``{"status":"UP"}`` cycle (:data:`UP_FRAME`, every 10 s on Upbit;
  the caller's clock sends it to every connection whose :attr:`Session.pinged` is set).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from broker.upbit import fields
from broker.upbit.codes import split_depth
from broker.upbit.errors import RequestError
from broker.upbit.ratelimit import RateBudget
from broker.upbit.requests import (
    LIST_SUBSCRIPTIONS,
    TOO_MANY_REQUESTS,
    build_error_frame,
    parse_request,
)
from broker.upbit.types import DataType, Format, StreamKey, Subscription, SubscriptionSet

PING_TEXT = "PING"
#: Upbit's keepalive answer to a text PING (sent every 10 s once a PING started the cycle).
UP_FRAME = b'{"status":"UP"}'
#: Upbit's per-connection message limit: (per second, per minute).
UPBIT_MESSAGE_RATE = (5, 100)

_encoder = msgspec.json.Encoder()


def _is_ping(data: str | bytes) -> bool:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return text.strip() == PING_TEXT


class Market(Protocol):
    """What a connection needs to know of the market it serves."""

    def knows(self, code: str) -> bool:
        """True for a code that exists (a plain code: no depth suffix)."""
        ...

    def serves_level(self, code: str, level: float) -> bool:
        """True when orderbook frames of ``code`` grouped by ``level`` exist (``code`` known;
        level 0, no grouping, is always served)."""
        ...


class AnyLevelMarket:
    """A :class:`Market` of the given codes (``None``: every code ``is_code`` accepts) that
    serves every level: for a server that cannot know better (the gateway) and leaves the
    silence of an unsupported level to Upbit."""

    __slots__ = ("_codes", "_is_code")

    def __init__(
        self, codes: Container[str] | None = None, is_code: Callable[[str], bool] | None = None
    ) -> None:
        self._codes = codes
        self._is_code = is_code

    def knows(self, code: str) -> bool:
        if self._is_code is not None and not self._is_code(code):
            return False
        return self._codes is None or code in self._codes

    def serves_level(self, code: str, level: float) -> bool:
        return True


def error_frame(name: str, message: str) -> bytes:
    """Upbit's error frame shape (always full names, never wrapped in a list)."""
    return build_error_frame(name, message)


@dataclass(frozen=True, slots=True)
class Stream:
    """One stream a connection receives: (type, code), with depth and level for orderbook."""

    type: str
    code: str
    depth: int = 30
    level: float = 0.0


# -- outcomes of one message --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """Send ``frame`` (an error), then close with 1000. ``rate_limited`` for the counters."""

    frame: bytes
    rate_limited: bool = False


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The set was replaced: send these snapshots now, then stream ``Session.streams``."""

    snapshots: tuple[Stream, ...]


@dataclass(frozen=True, slots=True)
class Listed:
    """Send ``frame``, the LIST_SUBSCRIPTIONS answer."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Pinged:
    """A text PING; ``first`` when it started the UP cycle."""

    first: bool


Outcome = Refused | Subscribed | Listed | Pinged


class Session:
    """Subscription set, format, message budget and PING state of one connection.

    Args:
        market: which codes exist and which levels they serve.
        message_rate: (per second, per minute) messages allowed; ``None``: no limit.
        refuse_codes: fault injection: a data request naming one of these codes is refused
            with ``INVALID_PARAM`` (real Upbit ignores unknown codes; this stands for whatever
            it may refuse).
    """

    def __init__(
        self,
        market: Market,
        message_rate: tuple[int, int] | None = UPBIT_MESSAGE_RATE,
        *,
        refuse_codes: tuple[str, ...] = (),
    ) -> None:
        self._market = market
        self._refuse_codes = frozenset(refuse_codes)
        self._budget = (
            RateBudget(per_second=message_rate[0], per_minute=message_rate[1])
            if message_rate is not None
            else None
        )
        self.format = Format.DEFAULT
        self.streams: tuple[Stream, ...] = ()  # what REALTIME frames go to
        self.listed: tuple[Subscription, ...] = ()  # what LIST_SUBSCRIPTIONS reports
        self.pinged = False
        self.requests = 0

    def receive(self, data: str | bytes, now: float) -> Outcome:
        """Read one client message received at ``now`` (seconds, monotonic)."""
        self.requests += 1
        budget = self._budget
        if budget is not None:
            if not budget.allows(now):
                return Refused(error_frame(*TOO_MANY_REQUESTS), rate_limited=True)
            budget.record(now)
        if len(data) <= 16 and _is_ping(data):
            first = not self.pinged
            self.pinged = True
            return Pinged(first)
        try:
            request = parse_request(data)
        except RequestError as exc:
            return Refused(error_frame(exc.name, exc.message))
        if request.method == LIST_SUBSCRIPTIONS:
            if request.format is not None:
                self.format = request.format
            return Listed(self._list_frame(request.ticket))
        refused = self._refused_code(request.subscriptions)
        if refused is not None:
            return Refused(error_frame("INVALID_PARAM", f"{refused} is not supported."))
        self.format = request.format or Format.DEFAULT
        return Subscribed(self._replace(request.subscriptions))

    def _refused_code(self, subs: tuple[Subscription, ...]) -> str | None:
        if not self._refuse_codes:
            return None
        for sub in subs:
            for raw in sub.codes:
                if raw.split(".", 1)[0] in self._refuse_codes:
                    return raw
        return None

    # -- subscriptions ------------------------------------------------------------------------

    def _known(self, type_: str, raw: str) -> tuple[str, int] | None:
        if type_ == DataType.ORDERBOOK:
            code, depth = split_depth(raw)
            depth = depth or 30
        else:
            code, depth = raw, 30
        return (code, depth) if self._market.knows(code) else None

    def _replace(self, subs: tuple[Subscription, ...]) -> tuple[Stream, ...]:
        # key -> [depth, wants snapshot, wants realtime], in request order
        wanted: dict[tuple[str, str, float], list[Any]] = {}
        listed: list[Subscription] = []
        market = self._market
        for sub in subs:
            level = float(sub.level or 0.0) if sub.type == DataType.ORDERBOOK else 0.0
            kept: list[str] = []
            for raw in sub.codes:
                known = self._known(sub.type, raw)
                if known is None:
                    continue  # Upbit ignores unknown and lower-case codes silently
                kept.append(raw)
                code, depth = known
                if level and not market.serves_level(code, level):
                    continue  # subscribed, but silent
                entry = wanted.setdefault((sub.type, code, level), [depth, False, False])
                entry[0] = max(entry[0], depth)
                entry[1] = entry[1] or not sub.is_only_realtime
                entry[2] = entry[2] or not sub.is_only_snapshot
            if kept and not sub.is_only_snapshot:
                listed.append(
                    Subscription(
                        sub.type,
                        tuple(kept),
                        level=sub.level if sub.type == DataType.ORDERBOOK else None,
                        is_only_realtime=sub.is_only_realtime,
                    )
                )
        self.listed = tuple(listed)
        self.streams = tuple(Stream(t, c, d, lv) for (t, c, lv), (d, _, rt) in wanted.items() if rt)
        return tuple(Stream(t, c, d, lv) for (t, c, lv), (d, snap, _) in wanted.items() if snap)

    def subscription_set(self) -> SubscriptionSet:
        """What this connection is subscribed to, as the protocol core's value type."""
        return SubscriptionSet.from_subscriptions(self.listed)

    def realtime_set(self) -> SubscriptionSet:
        """The streams REALTIME frames go to, with their depths (what a lease asks for)."""
        return SubscriptionSet({StreamKey(s.type, s.code, s.level): s.depth for s in self.streams})

    def _list_frame(self, ticket: str) -> bytes:
        result: list[dict[str, Any]] = []
        for sub in self.listed:
            entry: dict[str, Any] = {"type": sub.type, "codes": list(sub.codes)}
            if sub.type == DataType.ORDERBOOK:
                level = sub.level or 0
                entry["level"] = int(level) if level == int(level) else level
            result.append(entry)
        body: dict[str, Any] = {"method": LIST_SUBSCRIPTIONS, "result": result, "ticket": ticket}
        if self.format.is_simple:
            names = fields.LIST_SUBSCRIPTIONS
            body = {
                names["method"]: LIST_SUBSCRIPTIONS,
                names["result"]: [{names[k]: v for k, v in e.items()} for e in result],
                names["ticket"]: ticket,
            }
        return _encoder.encode(body)


__all__ = [
    "PING_TEXT",
    "UPBIT_MESSAGE_RATE",
    "UP_FRAME",
    "AnyLevelMarket",
    "Listed",
    "Market",
    "Outcome",
    "Pinged",
    "Refused",
    "Session",
    "Stream",
    "Subscribed",
    "error_frame",
]
