"""What a consumer receives: data messages, gap notices, lease notices (pure: msgspec and the
wire contract, ``broker.contract``).

Every item a :class:`~consumers.client.BrokerClient` hands to an application is a
:class:`StreamMessage` (one frame of one stream, exact bytes as the broker published them), a
:class:`Gap` (data of some streams may be missing between two instants) or a
:class:`LeaseNotice` (the broker's word about this client's own lease: not served, served in
part, expired, or served again). Each carries ``kind`` (``data``, ``gap``, ``lease``) so an
application can dispatch on a string as easily as on the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from broker.clock import now_ms
from broker.contract import GAP_REASONS, Event, GapEvent, LeaseEvent, UnknownEvent, decode_event

if TYPE_CHECKING:
    from broker.upbit.messages import Message

#: Reasons a gap can have. The broker's (design.md "Events") and the client's own.
BROKER_GAP_REASONS = GAP_REASONS
#: The client's pub/sub connection dropped (Redis restarted, network): nothing was received.
CONSUMER_DISCONNECTED = "consumer-disconnected"
#: This consumer could not keep up: Redis dropped it at its output-buffer limit, or the
#: in-process queue overflowed and its oldest messages were discarded.
FELL_BEHIND = "fell-behind"
#: This consumer's lease lapsed (it was paused longer than its TTL: a GC or VM pause,
#: SIGSTOP) and its next renewal had to re-create it: the broker stopped serving its streams
#: from the old deadline until that renewal (design.md "Lease", "A lapsed lease").
LEASE_LAPSED = "lease-lapsed"
#: A durable consumer (``BrokerClient(durable=True)``) fell off the retained window of a
#: stream's history: the entries after ``Gap.from_offset`` and before ``Gap.to_offset`` were
#: trimmed before it read them (``consumers.history_reader``). Also a stream deleted or
#: recreated (DEL, FLUSHALL, eviction): then ``dropped`` is 0, the count being unknown.
TRIMMED = "trimmed"
#: The reasons of the gaps a client produces itself (``Gap.source == "local"``).
CONSUMER_GAP_REASONS = (CONSUMER_DISCONNECTED, FELL_BEHIND, LEASE_LAPSED, TRIMMED)


class StreamMessage:
    """One frame of one stream: ``raw`` bytes exactly as published, decoded on first use.

    ``type`` is the data type (``ticker``, ``orderbook``, ``candle.1m`` ...), ``stream`` the
    channel's stream name (``orderbook@10000`` for a grouped orderbook), ``level`` its orderbook
    level (0 otherwise). ``message`` is the typed model from ``broker.upbit.messages``; decoding
    is lazy so an application that only forwards bytes never pays for it.

    A message of a durable stream (``BrokerClient(durable=True)``) carries ``offset``, the id
    of its entry in the stream's history (``1700000000000-0``: increasing per stream; pass the
    last one handled as ``start=`` to resume after it), and ``backfilled``, True when the broker
    fetched the frame over REST after a gap instead of receiving it live. Over pub/sub
    ``offset`` is ``None``.
    """

    __slots__ = (
        "_decoded",
        "backfilled",
        "channel",
        "code",
        "level",
        "offset",
        "raw",
        "received_ms",
        "stream",
        "type",
    )

    kind: Literal["data"] = "data"

    def __init__(
        self,
        *,
        channel: str,
        type: str,
        stream: str,
        code: str,
        level: float,
        raw: bytes,
        received_ms: int,
        offset: str | None = None,
        backfilled: bool = False,
    ) -> None:
        self.channel = channel
        self.type = type
        self.stream = stream
        self.code = code
        self.level = level
        self.raw = raw
        self.received_ms = received_ms
        self.offset = offset
        self.backfilled = backfilled
        self._decoded: Message | None = None

    @property
    def message(self) -> Message:
        """The typed model (``Ticker``, ``Trade``, ``Orderbook``, ``Candle`` ...).

        Raises whatever ``decode_message`` raises for a frame it cannot read
        (``broker.errors.FrameError``).
        """
        if self._decoded is None:
            from broker.upbit.messages import decode_message

            self._decoded = decode_message(self.raw)
        return self._decoded

    def json(self) -> Any:
        """The frame as plain JSON values (a dict), without the typed model."""
        return msgspec.json.decode(self.raw)

    def __repr__(self) -> str:
        offset = "" if self.offset is None else f"offset={self.offset!r}, "
        backfilled = "backfilled=True, " if self.backfilled else ""
        return (
            f"StreamMessage(channel={self.channel!r}, {offset}{backfilled}"
            f"received_ms={self.received_ms}, "
            f"raw={self.raw[:60]!r}{'...' if len(self.raw) > 60 else ''})"
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """Data published between ``since_ms`` and ``until_ms`` may be missing.

    ``source`` is ``"broker"`` for the broker's gap events (its upstream connection broke; every
    stream is affected) or ``"local"`` for this client's own losses (its pub/sub connection broke,
    it fell behind, or its lease lapsed). ``channels`` names the affected channels, empty
    meaning all of them. ``dropped`` counts messages this client discarded itself (queue
    overflow) or never got (trimmed from a stream's history), when known. A ``trimmed`` gap
    (a durable stream's history) also names the entries lost, exclusive at both ends: those
    after ``from_offset`` (the last one delivered) and before ``to_offset`` (the oldest one
    retained, delivered next); for a stream deleted or recreated, whatever it had not read of
    the old one (``to_offset``: the new one's oldest entry, ``None`` while there is none;
    ``from_offset`` ``None`` when the client found out only after reading on in the new one).

    A gap with ``state`` set is not a new loss: it is the broker's follow-up of the gap it
    announced earlier (the same ``epoch``, ``since_ms``, ``until_ms`` and ``reason``), once it
    back-filled the missed trades and candles into the history over Upbit's REST API: ``filled``
    (the history lacks nothing Upbit still returned), ``partial`` or ``lost``; ``restored``
    names the types the new connection's SNAPSHOT frames restored (ticker, orderbook) and
    ``backfill`` its counts (``streams``, ``appended``, ``failed``). A durable consumer reads the
    back-filled entries from the history (``item.backfilled``); a pub/sub one can read them with
    ``XRANGE``.
    """

    reason: str
    source: Literal["broker", "local"]
    since_ms: int
    until_ms: int
    epoch: int | None = None
    broker: str | None = None
    detail: str = ""
    dropped: int = 0
    channels: tuple[str, ...] = ()
    from_offset: str | None = None
    to_offset: str | None = None
    #: None: the announcement of a loss; set: its follow-up after the back-fill
    state: str | None = None
    restored: tuple[str, ...] = ()
    backfill: dict[str, int] | None = None

    kind: Literal["gap"] = "gap"

    @property
    def is_follow_up(self) -> bool:
        """The broker's follow-up of an earlier gap (``state`` says what the back-fill did)."""
        return self.state is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in the shape of the broker's gap event, plus the local fields."""
        return {
            "event": "gap",
            "reason": self.reason,
            "source": self.source,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "epoch": self.epoch,
            "broker": self.broker,
            "detail": self.detail,
            "dropped": self.dropped,
            "channels": list(self.channels),
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            **(
                {"state": self.state, "restored": list(self.restored), "backfill": self.backfill}
                if self.state is not None
                else {}
            ),
        }


@dataclass(frozen=True, slots=True)
class LeaseNotice:
    """The broker's word about this client's own lease (a ``lease`` event, design.md).

    ``state`` is ``invalid`` (nothing of the lease is served), ``partial`` (the entries in
    ``rejected``, ``{stream: [codes]}`` as written, are not served; the rest is), ``expired``
    (the lease was not renewed in time: its streams may have stopped; the client renews it at
    once) or ``ok`` (a lease announced in one of those states is fully served again). ``why``
    says why in words; ``rejected_count`` counts every rejected entry (``rejected`` lists the
    first 50).
    """

    state: str
    client_id: str
    why: str = ""
    rejected: dict[str, list[str]] = field(default_factory=dict)
    rejected_count: int = 0
    broker: str | None = None
    ts_ms: int = 0

    kind: Literal["lease"] = "lease"

    def to_dict(self) -> dict[str, Any]:
        """The broker's ``lease`` event as a JSON-ready dict."""
        return {
            "event": "lease",
            "client_id": self.client_id,
            "state": self.state,
            "why": self.why,
            "rejected": {stream: list(codes) for stream, codes in self.rejected.items()},
            "rejected_count": self.rejected_count,
            "broker": self.broker,
            "ts_ms": self.ts_ms,
        }


#: What ``BrokerClient.messages()`` yields.
Item = StreamMessage | Gap | LeaseNotice


class _Stamp(msgspec.Struct):
    timestamp: int | float | None = None
    tms: int | float | None = None


_stamp_decoder = msgspec.json.Decoder(_Stamp)


def gap_start_ms(last_rx_ms: int, last_data: bytes | None) -> int:
    """Where a gap after the last message received (at ``last_rx_ms``, carrying
    ``last_data``) starts: lost messages were published after it, and its own timestamp,
    which precedes its publication, bounds that better than a late receive time (a stopped
    or slow process reads a backlog)."""
    stamp = frame_time_ms(last_data)
    return last_rx_ms if stamp is None else min(last_rx_ms, stamp)


def frame_time_ms(data: bytes | None) -> int | None:
    """The ``timestamp`` (DEFAULT) or ``tms`` (SIMPLE) of a frame, or ``None``.

    The frame was published after this instant, so it bounds from below when a frame that
    was received later (or lost) can have been published: gap windows start here.
    """
    if not data:
        return None
    try:
        stamp = _stamp_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    value = stamp.timestamp if stamp.timestamp is not None else stamp.tms
    return int(value) if value is not None else None


def parse_event(data: bytes) -> Gap | LeaseNotice | None:
    """A :class:`Gap` from a broker ``gap`` event, a :class:`LeaseNotice` from a ``lease``
    event (``broker.contract.decode_event``); ``None`` for other events (``connected``,
    ``leader``, and kinds this version does not know).

    It does not say who published the event: ``BrokerClient`` hands an event to the
    application only when it comes from the leader (design.md "Who may publish events").

    Raises ``ValueError`` (``broker.contract.ContractError``) for bytes that are not an event.
    """
    event = decode_event(data)
    if isinstance(event, UnknownEvent):
        return None
    return event_item(event)


def event_item(event: Event) -> Gap | LeaseNotice | None:
    """What a decoded event gives the application: a ``gap`` a :class:`Gap`, a ``lease`` a
    :class:`LeaseNotice`, the others (``connected``, ``leader``) nothing."""
    if isinstance(event, LeaseEvent):
        rejected = event.rejected or {}
        counted = event.rejected_count or sum(len(codes) for codes in rejected.values())
        return LeaseNotice(
            state=event.state,
            client_id=event.client_id,
            why=event.why,
            rejected=rejected,
            rejected_count=counted,
            broker=event.broker,
            ts_ms=event.ts_ms or 0,
        )
    if not isinstance(event, GapEvent):
        return None
    until = event.until_ms if event.until_ms is not None else now_ms()
    follow_up = isinstance(event.state, str)
    return Gap(
        reason=event.reason,
        source="broker",
        since_ms=event.since_ms if event.since_ms is not None else until,
        until_ms=until,
        epoch=event.epoch,
        broker=event.broker,
        state=event.state if isinstance(event.state, str) else None,
        restored=tuple(event.restored) if follow_up and isinstance(event.restored, list) else (),
        backfill=dict(event.backfill) if follow_up and isinstance(event.backfill, dict) else None,
    )
