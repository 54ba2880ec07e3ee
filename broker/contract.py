"""The typed wire contract of the Redis interface, one Struct per object (pure: msgspec,
stdlib, ``broker.keys`` and ``broker.upbit``; no I/O).

``broker.keys`` names the keys and channels; this module says what travels in them
(docs/design.md has the same tables, and ``tests/test_contract.py`` holds the two together):

    {ns}:lease:{client_id}   HASH     :class:`LeaseRecord` (field set only: ``broker.leases``
                                      validates a lease, entry by entry)
    {ns}:status              HASH     :class:`Status`: :func:`encode_status` / :func:`decode_status`
    {ns}:events              CHANNEL  :data:`Event`, tagged on ``event``: :func:`encode_event` /
                                      :func:`decode_event`
    {ns}:requests            LIST     :data:`Command`, tagged on ``op``: :func:`encode_command` /
                                      :func:`decode_command`
    {ns}:reply:{id}          LIST     :data:`Reply`: :func:`encode_reply` / :func:`decode_reply`

The broker encodes status, events and replies; the CLI, the metrics, the consumer library (and
any other reader) decode them with the same Structs, so nobody guesses a type from a field name.
Encoders write exactly the bytes the broker wrote before this module existed (only the status
gained fields). Decoders are tolerant where an older or newer broker may differ: a field that
is missing takes its default, an unknown field is ignored. A field that is present but of the
wrong type is a :class:`ContractError` naming it (never a silent default): the writer is broken
or foreign, and the reader says so.

``check``'s health rule (:func:`check_health`) lives here, next to :class:`Status`, so
``upbit-broker status`` and ``upbit-broker check`` judge a status the same way.

One module on purpose: every object of the contract side by side, as design.md lists them,
which takes it past 500 lines (a third of them docstrings).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, NamedTuple, TypeAlias, overload

import msgspec

from broker.errors import BrokerError
from broker.keys import parse_stream_name, validate_name
from broker.upbit.codes import is_valid_code

#: ``gap`` event reasons (the broker's; consumers add their own local ones)
GAP_REASONS: Final = ("reconnect", "takeover", "stall", "error", "redis")
#: the ``state`` of a gap's follow-up event (after the back-fill)
GAP_STATES: Final = ("filled", "partial", "lost")
#: ``lease`` event states
LEASE_STATES: Final = ("ok", "partial", "invalid", "refused", "expired")
#: most codes one snapshot command may name
MAX_SNAPSHOT_CODES: Final = 100
#: a status older than this many of its writer's intervals was not written by a running leader
STALE_AFTER_INTERVALS: Final = 3


class ContractError(BrokerError, ValueError):
    """A status, event, command or reply that cannot be decoded as the contract says; the
    message names the field."""


class CommandError(ContractError):
    """A command the leader cannot act on. ``request_id`` is its id when that id can name a
    reply key (the leader refuses it there), else ``None`` (nobody can be answered)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# -- lease (HASH {ns}:lease:{client_id}) --------------------------------------------------------


class LeaseRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The fields of a lease hash, every one required (design.md "Lease").

    Written by ``broker/lease.lua``; read and validated (entry by entry) by
    ``broker.leases.parse_lease``. This Struct states the field set and types; it is not a
    second validator.
    """

    v: int
    client_id: str
    host: str
    pid: int
    subs: dict[str, list[str]]
    ttl_ms: int
    created_ms: int
    renewed_ms: int
    deadline_ms: int


#: every field of a lease hash, in the order the script writes them
LEASE_FIELDS: Final = LeaseRecord.__struct_fields__


# -- status (HASH {ns}:status) ------------------------------------------------------------------


class DroppedFrames(msgspec.Struct, kw_only=True, frozen=True):
    """Frames received upstream that did not reach Redis, by reason (design.md "Status").

    The one definition shared by ``frames_dropped`` in the status and
    ``upbit_broker_frames_dropped_total{reason}`` in the metrics. Frames that are not data
    (Upbit's status frames, error frames, LIST_SUBSCRIPTIONS answers) are not meant for Redis
    and are not dropped frames.
    """

    unleased: int = 0
    malformed: int = 0
    overflow: int = 0
    not_leader: int = 0
    redis: int = 0

    def total(self) -> int:
        return self.unleased + self.malformed + self.overflow + self.not_leader + self.redis


#: the reasons of :class:`DroppedFrames` (the metrics' ``reason`` label values)
DROP_REASONS: Final = DroppedFrames.__struct_fields__


class Status(msgspec.Struct, kw_only=True, frozen=True):
    """The leader's state, the hash ``{ns}:status``: design.md "Status" says what each field
    means (``tests/test_contract.py`` holds its table and these fields together).

    Every field has a default, so a status written by an older broker (fewer fields) decodes;
    ``status_interval_ms`` 0 means one that did not say. ``frames_dropped`` and
    ``frames_malformed`` follow from ``frames_dropped_by_reason`` when it counts anything:
    build a Status with the breakdown alone.
    """

    leader: str = ""
    leader_token: str = ""
    connected: bool = False
    epoch: int = 0
    reconnects: int = 0
    resubscribes: int = 0
    list_requests: int = 0
    verify_mismatches: int = 0
    deferred_sends: int = 0
    desired: dict[str, list[str]] = {}
    upstream: dict[str, list[str]] = {}
    last_error: str = ""
    frames_in: int = 0
    frames_published: int = 0
    frames_dropped: int = 0
    frames_dropped_by_reason: DroppedFrames = DroppedFrames()
    frames_malformed: int = 0
    leases: int = 0
    invalid_leases: int = 0
    partial_leases: int = 0
    rejected_streams: int = 0
    redis_errors: int = 0
    last_frame_ms: int = 0
    updated_ms: int = 0
    status_interval_ms: int = 0
    upstream_url: str = ""
    quiet_codes: list[str] = []
    upstream_unconfirmed: int = 0
    refused_leases: int = 0
    refused: dict[str, str] = {}
    unknown_codes: list[str] = []
    markets: int = 0
    request_bytes: int = 0
    request_bytes_cap: int = 0
    upstream_refusals: int = 0
    control_messages: int = 0
    control_ignored: int = 0
    redis_oom_since_ms: int = 0
    redis_oom_refusals: int = 0
    redis_used_memory: int = 0
    redis_maxmemory: int = 0
    redis_maxmemory_policy: str = ""
    cache_stale_since_ms: int = 0
    history: str = ""
    history_written: int = 0
    history_refused: int = 0
    backfill_pending: int = 0
    backfill_since_ms: int = 0
    backfill_appended: int = 0
    backfill_streams_failed: int = 0
    backfill_requests: int = 0
    backfill_rate_limited: int = 0
    gaps_filled: int = 0
    gaps_partial: int = 0
    gaps_lost: int = 0

    def __post_init__(self) -> None:
        dropped = self.frames_dropped_by_reason
        if dropped.total():
            msgspec.structs.force_setattr(self, "frames_dropped", dropped.total())
            msgspec.structs.force_setattr(self, "frames_malformed", dropped.malformed)

    # -- freshness (the rule ``status`` and ``check`` share) ---------------------------------

    def interval_s(self, default_s: float) -> float:
        """The interval this status is rewritten at: its own ``status_interval_ms``, else
        ``default_s`` (the reader's setting) for a broker that did not say."""
        return self.status_interval_ms / 1000 if self.status_interval_ms > 0 else default_s

    def stale_after_ms(self, default_interval_s: float) -> int:
        """Age beyond which the status was not written by a running leader (three intervals:
        the key outlives its leader on purpose, so a successor can read it)."""
        return int(self.interval_s(default_interval_s) * STALE_AFTER_INTERVALS * 1000)

    def age_ms(self, server_now_ms: int) -> int | None:
        """How old the status is by the Redis server clock; ``None`` when it carries no date."""
        return server_now_ms - self.updated_ms if self.updated_ms > 0 else None

    def is_stale(self, server_now_ms: int, default_interval_s: float) -> bool:
        """Older than :meth:`stale_after_ms`, or undated."""
        age = self.age_ms(server_now_ms)
        return age is None or age > self.stale_after_ms(default_interval_s)


#: every field of the status hash
STATUS_FIELDS: Final = Status.__struct_fields__


class Health(NamedTuple):
    """``check``'s verdict: healthy or not, and the one line that says why."""

    ok: bool
    line: str


def check_health(status: Status | None, server_now_ms: int, default_interval_s: float) -> Health:
    """Healthy when a leader is named, its status is fresh and it is connected upstream.

    Args:
        status: the decoded status hash; ``None`` when there is none.
        server_now_ms: the Redis server clock, by which ``updated_ms`` is judged.
        default_interval_s: the status interval to assume when the status does not carry one.
    """
    if status is None:
        return Health(False, "no broker status: no leader is running")
    if not status.leader:
        return Health(False, "status names no leader")
    leader = status.leader
    age = status.age_ms(server_now_ms)
    if age is None:
        return Health(False, f"leader {leader}: status has no updated_ms")
    limit_ms = status.stale_after_ms(default_interval_s)
    if age > limit_ms:
        return Health(
            False, f"leader {leader}: status is stale ({age} ms old, limit {limit_ms} ms)"
        )
    if not status.connected:
        error = status.last_error or "no error recorded"
        return Health(False, f"leader {leader} is not connected upstream ({error})")
    return Health(True, f"ok: leader {leader} connected, epoch {status.epoch}, status {age} ms old")


_json = msgspec.json.Encoder()
_INT_RE = re.compile(r"-?[0-9]{1,19}")
_BOOL = {"1": True, "0": False}


def _field_codecs(
    struct: type[msgspec.Struct],
) -> dict[str, type | msgspec.json.Decoder[Any]]:
    """How each field of a hash Struct is written as a string: ``int``, ``bool`` (``1``/``0``),
    ``str`` as they are, anything else as JSON (decoded with its own typed decoder)."""
    codecs: dict[str, type | msgspec.json.Decoder[Any]] = {}
    for field in msgspec.structs.fields(struct):
        if field.type in (bool, int, str):
            codecs[field.name] = field.type
        else:
            codecs[field.name] = msgspec.json.Decoder(field.type)
    return codecs


_STATUS_CODECS = _field_codecs(Status)


def encode_status(status: Status) -> dict[str, str]:
    """The mapping to HSET as ``{ns}:status``: every value a string (integers in decimal,
    ``connected`` as ``1``/``0``, structured fields as compact JSON)."""
    out: dict[str, str] = {}
    for name, codec in _STATUS_CODECS.items():
        value = getattr(status, name)
        if codec is bool:
            out[name] = "1" if value else "0"
        elif codec is int:
            out[name] = str(value)
        elif codec is str:
            out[name] = value
        else:
            out[name] = _json.encode(value).decode()
    return out


def decode_status(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Status:
    """The hash ``{ns}:status`` (as HGETALL returns it, bytes or text) as a :class:`Status`.

    Missing fields take their defaults (an older broker), unknown fields are ignored (a newer
    one).

    Raises:
        ContractError: a field that is present but not of its type (``epoch`` not an integer,
            ``connected`` not ``1``/``0``, ``desired`` not JSON ``{stream: [codes]}`` ...).
    """
    values: dict[str, Any] = {}
    for raw_name, raw_value in fields.items():
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
        codec = _STATUS_CODECS.get(name)
        if codec is None:
            continue
        text = raw_value.decode("utf-8", "replace") if isinstance(raw_value, bytes) else raw_value
        if codec is str:
            values[name] = text
        elif codec is bool:
            if text not in _BOOL:
                raise ContractError(f"status field {name}: expected 1 or 0, got {text[:40]!r}")
            values[name] = _BOOL[text]
        elif codec is int:
            if _INT_RE.fullmatch(text) is None:
                raise ContractError(f"status field {name}: expected an integer, got {text[:40]!r}")
            values[name] = int(text)
        else:
            assert isinstance(codec, msgspec.json.Decoder)
            try:
                values[name] = codec.decode(text)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                raise ContractError(f"status field {name}: {exc} (got {text[:40]!r})") from None
    return Status(**values)


# -- events (CHANNEL {ns}:events, JSON tagged on "event") ---------------------------------------
#
# Fields with a default are always written by the broker; the defaults let a reader take an
# event from an older or foreign writer that left one out.


class LeaderEvent(msgspec.Struct, tag="leader", tag_field="event", kw_only=True, frozen=True):
    """This broker took the leader lock."""

    broker: str | None = None
    ts_ms: int | None = None


class ConnectedEvent(msgspec.Struct, tag="connected", tag_field="event", kw_only=True, frozen=True):
    """A new upstream connection that may follow a loss (a new ``epoch``)."""

    epoch: int | None = None
    broker: str | None = None
    ts_ms: int | None = None


class GapEvent(msgspec.Struct, tag="gap", tag_field="event", kw_only=True, frozen=True):
    """Data published between ``since_ms`` and ``until_ms`` may be missing.

    ``reason`` ``redis``: the broker's publish connection to Redis broke (a reset, ``CLIENT
    KILL``, a timeout) with frames Redis never confirmed; ``since_ms`` is the last confirmed
    publish (or the first unconfirmed frame's write, if earlier), ``until_ms`` when Redis
    confirmed a publish again, ``epoch`` the upstream connection, which stayed up. Also
    announced when another Redis server answers than before: a Redis failover (Sentinel
    promoted a replica) or a restart (``INFO`` ``run_id`` changed), from 1 s before the old
    server was lost to when the new one was seen, since the old master's last writes may
    never have reached the replica that replaced it.
    """

    epoch: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    #: one of :data:`GAP_REASONS` (an unknown one is kept, not refused)
    reason: str = "unknown"
    broker: str | None = None
    #: absent on the announcement; the follow-up, once the broker back-filled the gap's
    #: trade and candle streams into the history (``{ns}:hist:...``) over REST, says one of
    #: :data:`GAP_STATES`: ``filled`` (every missed trade/candle is in the history now),
    #: ``partial`` (some streams could not be fetched), ``lost`` (none could)
    state: str | msgspec.UnsetType = msgspec.UNSET
    #: on the follow-up: the stream types whose state the new connection's SNAPSHOT frames
    #: restored (ticker, orderbook: each frame supersedes the last, nothing to back-fill)
    restored: list[str] | msgspec.UnsetType = msgspec.UNSET
    #: on the follow-up: counts, ``streams`` (back-filled), ``appended`` (entries added to the
    #: history), ``failed`` (streams not completely back-filled: the fetch failed, the page
    #: limit, the deadline)
    backfill: dict[str, int] | msgspec.UnsetType = msgspec.UNSET


_NonEmpty = msgspec.Meta(min_length=1)


class LeaseEvent(msgspec.Struct, tag="lease", tag_field="event", kw_only=True, frozen=True):
    """The state of one lease changed (``broker.core.lease_feedback``).

    ``rejected`` (at most 50 entries, as written) and ``rejected_count`` (all of them) are on
    the wire only when entries were rejected; left :data:`msgspec.UNSET`, they are not written.
    """

    client_id: Annotated[str, _NonEmpty]
    #: one of :data:`LEASE_STATES` (an unknown one is kept, not refused)
    state: Annotated[str, _NonEmpty]
    why: str = ""
    rejected: dict[str, list[str]] | msgspec.UnsetType = msgspec.UNSET
    rejected_count: int | msgspec.UnsetType = msgspec.UNSET
    broker: str | None = None
    ts_ms: int | None = None


class UnknownEvent(msgspec.Struct, kw_only=True, frozen=True):
    """An event of a kind this version does not know (a newer broker): readers skip it."""

    event: str


#: what the broker publishes on ``{ns}:events``
Event: TypeAlias = LeaderEvent | ConnectedEvent | GapEvent | LeaseEvent
#: the event Structs, one per ``event`` tag
EVENT_TYPES: Final = (LeaderEvent, ConnectedEvent, GapEvent, LeaseEvent)

_event_decoder = msgspec.json.Decoder(Event)
_event_head_decoder = msgspec.json.Decoder(UnknownEvent)
_EVENT_TAGS = frozenset(t.__struct_config__.tag for t in EVENT_TYPES)


def encode_event(event: Event) -> bytes:
    """The JSON object to PUBLISH on ``{ns}:events``."""
    return _json.encode(event)


def decode_event(data: bytes) -> Event | UnknownEvent:
    """One message of ``{ns}:events``; an :class:`UnknownEvent` for a kind not known here.

    Raises:
        ContractError: not a JSON object with a string ``event``, or a known event with a
            field of the wrong type (or a ``lease`` event without ``client_id`` or ``state``).
    """
    try:
        return _event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        error = exc
    try:
        head = _event_head_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        head = None
    if head is not None and head.event not in _EVENT_TAGS:
        return head
    raise ContractError(f"malformed event {data[:80]!r}: {error}")


# -- commands (LIST {ns}:requests, JSON tagged on "op") -----------------------------------------


class SnapshotCommand(msgspec.Struct, tag="snapshot", tag_field="op", kw_only=True, frozen=True):
    """The latest frame of each code of one stream (from the cache, or fetched upstream).

    A decoded (or constructed) one is valid: ``type`` a stream name, 1 to
    :data:`MAX_SNAPSHOT_CODES` codes of Upbit's shape, ``level`` (which overrides the one in
    ``type`` when not 0) only on an orderbook, finite and >= 0. The leader caps ``timeout_ms``.
    """

    id: str
    type: str
    codes: list[str]
    level: float = 0.0
    timeout_ms: float = 3000

    def __post_init__(self) -> None:
        data_type, level = self.stream()
        if not math.isfinite(level) or level < 0 or (level and data_type != "orderbook"):
            raise ValueError(f"invalid level {self.level!r} for {self.type!r}")
        if not self.codes:
            raise ValueError("codes must be a non-empty list")
        if len(self.codes) > MAX_SNAPSHOT_CODES:
            raise ValueError(f"at most {MAX_SNAPSHOT_CODES} codes per snapshot request")
        bad = [code for code in self.codes if not is_valid_code(code)]
        if bad:
            raise ValueError(f"invalid codes: {bad[:5]}")

    def stream(self) -> tuple[str, float]:
        """``(data type, level)`` asked for: ``level`` when given, else the one in ``type``.

        Raises:
            ConfigError: ``type`` names no stream.
        """
        data_type, level = parse_stream_name(self.type)
        return data_type, (self.level or level)


class ResubscribeCommand(
    msgspec.Struct, tag="resubscribe", tag_field="op", kw_only=True, frozen=True
):
    """Resend the full subscription upstream; answered once LIST_SUBSCRIPTIONS confirms it."""

    id: str


#: what a client RPUSHes to ``{ns}:requests``
Command: TypeAlias = SnapshotCommand | ResubscribeCommand
#: the command Structs, one per ``op`` tag
COMMAND_TYPES: Final = (SnapshotCommand, ResubscribeCommand)

_command_decoder = msgspec.json.Decoder(Command)
_any_decoder = msgspec.json.Decoder()


def encode_command(command: Command) -> bytes:
    """The JSON object to RPUSH to ``{ns}:requests``."""
    return _json.encode(command)


def decode_command(data: bytes) -> Command:
    """One entry of ``{ns}:requests``.

    Raises:
        CommandError: with ``request_id`` set when the command has an id that can name a reply
            key (a string, or an integer, as a reply key name allows) but cannot be acted on
            (an unknown or missing ``op``, a field of the wrong type, an invalid snapshot);
            with ``request_id`` ``None`` when nobody can be answered (not JSON, not an
            object, no usable id).
    """
    try:
        command = _command_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        error: Exception = exc
    else:
        if _reply_id(command.id) is not None:
            return command
        raise CommandError(f"command id {command.id[:40]!r} cannot name a reply key")
    try:
        body = _any_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise CommandError(f"unreadable command {data[:100]!r}: {error}") from None
    if not isinstance(body, dict):
        raise CommandError(f"command {data[:100]!r} is not a JSON object")
    request_id = _reply_id(body.get("id"))
    op = body.get("op")
    if op not in _COMMAND_OPS:
        raise CommandError(f"unknown op {op!r}", request_id)
    lenient = _lenient(body)
    if lenient is not None:
        return lenient
    raise CommandError(f"invalid {op} command: {error}", request_id)


def _lenient(body: dict[str, Any]) -> Command | None:
    """What brokers before the typed contract served too: an integer ``id`` (answered on the
    reply key of its decimal text) and ``level``/``timeout_ms`` given as numeric strings."""
    fixed = dict(body)
    if type(fixed.get("id")) is int:
        fixed["id"] = str(fixed["id"])
    for name in ("level", "timeout_ms"):
        value = fixed.get(name)
        if isinstance(value, str):
            try:
                fixed[name] = float(value)
            except ValueError:
                return None
    if fixed == body:
        return None  # nothing to be lenient about: the strict error stands
    try:
        command = msgspec.convert(fixed, Command)
    except (msgspec.ValidationError, ValueError):
        return None
    return command if _reply_id(command.id) is not None else None


_COMMAND_OPS = frozenset(t.__struct_config__.tag for t in COMMAND_TYPES)


def _reply_id(value: object) -> str | None:
    """A command id as the name of its reply key; ``None`` when it cannot be one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    try:
        return validate_name(value, "request id")
    except ValueError:
        return None


# -- replies (LIST {ns}:reply:{id}, one JSON object) --------------------------------------------
#
# Replies carry no ``op``: the caller knows what it asked (``decode_reply`` takes the op).


class SnapshotReply(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to a :class:`SnapshotCommand`."""

    id: str
    ok: bool = True
    frames: dict[str, msgspec.Raw] = {}
    missing: list[str] = []
    source: dict[str, str] = {}


class ResubscribeReply(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to a :class:`ResubscribeCommand`, once upstream confirmed the full set."""

    id: str
    ok: bool = True
    epoch: int = 0
    upstream: dict[str, list[str]] = {}


class ErrorReply(msgspec.Struct, kw_only=True, frozen=True):
    """A refusal of any command."""

    id: str
    ok: bool = False
    error: str = ""


#: what the leader RPUSHes to ``{ns}:reply:{id}``
Reply: TypeAlias = SnapshotReply | ResubscribeReply | ErrorReply
#: the reply Structs: the ``ok`` answer to each op, and the refusal
REPLY_TYPES: Final = {
    "snapshot": SnapshotReply,
    "resubscribe": ResubscribeReply,
    "error": ErrorReply,
}


class _ReplyHead(msgspec.Struct):
    ok: bool = False


_reply_head_decoder = msgspec.json.Decoder(_ReplyHead)
_reply_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(struct) for name, struct in REPLY_TYPES.items()
}


def encode_reply(reply: Reply) -> bytes:
    """The JSON object to RPUSH to ``{ns}:reply:{id}``."""
    return _json.encode(reply)


@overload
def decode_reply(data: bytes, op: Literal["snapshot"]) -> SnapshotReply | ErrorReply: ...
@overload
def decode_reply(data: bytes, op: Literal["resubscribe"]) -> ResubscribeReply | ErrorReply: ...
def decode_reply(data: bytes, op: Literal["snapshot", "resubscribe"]) -> Reply:
    """The leader's reply to a command of ``op``: its ``ok`` answer, or an :class:`ErrorReply`
    (``ok`` false or missing).

    Raises:
        ContractError: not a JSON object of that shape.
    """
    try:
        ok = _reply_head_decoder.decode(data).ok
        reply: Reply = _reply_decoders[op if ok else "error"].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ContractError(f"unreadable reply {data[:80]!r}: {exc}") from None
    return reply


__all__ = [
    "COMMAND_TYPES",
    "DROP_REASONS",
    "EVENT_TYPES",
    "GAP_REASONS",
    "GAP_STATES",
    "LEASE_FIELDS",
    "LEASE_STATES",
    "MAX_SNAPSHOT_CODES",
    "REPLY_TYPES",
    "STALE_AFTER_INTERVALS",
    "STATUS_FIELDS",
    "Command",
    "CommandError",
    "ConnectedEvent",
    "ContractError",
    "DroppedFrames",
    "ErrorReply",
    "Event",
    "GapEvent",
    "Health",
    "LeaderEvent",
    "LeaseEvent",
    "LeaseRecord",
    "Reply",
    "ResubscribeCommand",
    "ResubscribeReply",
    "SnapshotCommand",
    "SnapshotReply",
    "Status",
    "UnknownEvent",
    "check_health",
    "decode_command",
    "decode_event",
    "decode_reply",
    "decode_status",
    "encode_command",
    "encode_event",
    "encode_reply",
    "encode_status",
]
