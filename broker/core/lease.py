"""What a lease is (pure: stdlib, msgspec and the protocol core; no I/O).

A lease is the HASH ``{ns}:lease:{client_id}`` (docs/design.md "Lease"). This module holds the
rules that say what its fields mean: :func:`parse_lease` validates a hash into a
:class:`Lease`, :func:`encode_lease_fields` builds one, :func:`parse_subs` judges ``subs``
entry by entry. :mod:`broker.leases` (the I/O adapter) moves fields between Redis and these;
the leader core (:mod:`broker.core`) reads :class:`LeaseListing` and :class:`LeaseReads`.

A lease is served while its hash exists and its ``deadline_ms`` field is later than the server
clock. A ``subs`` of the right shape whose entries are partly bad
(``{"ticker":["KRW-BTC","krw-eth"]}``) is served for its good entries and keeps the bad ones in
:attr:`Lease.rejected`; only a lease that is wrong as a whole (a missing or malformed field,
``subs`` that is not JSON ``{stream: [codes]}``, too many entries, nothing servable) is invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from broker.errors import ConfigError, InvalidCodeError, InvalidDepthSuffixError, LeaseError
from broker.keys import parse_stream_name, validate_name
from broker.upbit.codes import is_valid_code, normalize_depth, parse_code
from broker.upbit.types import PUBLIC_TYPES, DataType, StreamKey, SubscriptionSet

#: Contract version written to (and required in) the ``v`` field.
LEASE_VERSION = 1
#: Default largest number of streams one lease may ask for (``BrokerSettings.max_lease_streams``).
MAX_LEASE_STREAMS = 5_000

_REQUIRED_FIELDS = (
    "v",
    "client_id",
    "host",
    "pid",
    "subs",
    "ttl_ms",
    "created_ms",
    "renewed_ms",
    "deadline_ms",
)
_CLOCK_FIELDS = ("created_ms", "renewed_ms", "deadline_ms")
_INT_RE = re.compile(r"-?[0-9]{1,19}")
# An orderbook level as a stream name spells it (``format_level``: ``10000``, ``0.1``, ``1e-05``).
_LEVEL_RE = re.compile(r"[0-9][0-9.eE+-]{0,31}")
# Bytes of ``subs`` JSON allowed per stream (before decoding, so a huge value costs nothing).
_SUBS_BYTES_PER_STREAM = 64

_subs_decoder = msgspec.json.Decoder(dict[str, list[str]])
_subs_encoder = msgspec.json.Encoder(order="sorted")
#: reasons a summary of rejected entries names before "and N more"
_REJECTED_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Rejected:
    """One entry of a lease's ``subs`` that cannot be served, as written (any text), and why.

    ``stream`` is the key of ``subs`` (``ticker``, ``orderbook@10000`` ...), ``code`` one entry of
    its list; an unknown stream rejects each of its codes.
    """

    stream: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedSubs:
    """A validated ``subs`` field: what is served, and the entries that are not."""

    subscriptions: SubscriptionSet
    rejected: tuple[Rejected, ...] = ()


def rejected_by_type(rejected: Iterable[Rejected]) -> dict[str, list[str]]:
    """Rejected entries in the shape of ``subs``: ``{stream: [codes]}``."""
    out: dict[str, list[str]] = {}
    for entry in rejected:
        out.setdefault(entry.stream, []).append(entry.code)
    return out


def describe_rejected(rejected: Sequence[Rejected]) -> str:
    """One line naming why entries were rejected (each reason once, the first few)."""
    reasons = list(dict.fromkeys(entry.reason for entry in rejected))
    text = "; ".join(reasons[:_REJECTED_SHOWN])
    if len(reasons) > _REJECTED_SHOWN:
        text += f"; and {len(reasons) - _REJECTED_SHOWN} more"
    return text


@dataclass(frozen=True)
class Lease:
    """One consumer's lease as stored in Redis; every ``*_ms`` is the Redis server clock.

    ``subscriptions`` is what the broker serves; ``rejected`` the entries of ``subs`` it skips
    (empty for a lease written by this library, which validates before writing).
    """

    client_id: str
    host: str
    pid: int
    subscriptions: SubscriptionSet
    ttl_ms: int
    created_ms: int
    renewed_ms: int
    deadline_ms: int
    rejected: tuple[Rejected, ...] = ()

    def expires_in_ms(self, now_ms: int) -> int:
        """Milliseconds from ``now_ms`` (server clock) to the deadline; negative once past it."""
        return self.deadline_ms - now_ms

    def subs_by_type(self) -> dict[str, list[str]]:
        """``{stream: [codes]}`` as in the ``subs`` field (orderbook depth suffixes, levels)."""
        return self.subscriptions.by_type()

    def rejected_by_type(self) -> dict[str, list[str]]:
        """The rejected entries as ``{stream: [codes]}``, exactly as written."""
        return rejected_by_type(self.rejected)


@dataclass(frozen=True)
class LeaseReads:
    """What :meth:`LeaseStore.read_many` found for the client ids it was given.

    Attributes:
        leases: the valid leases among them (some may carry rejected entries).
        invalid: ``(client_id, reason)`` of those whose stored lease cannot be used.
        gone: those with no lease (released, expired, or never written).
        server_now_ms: the Redis server clock before the reads.
        ignored: ids that are not client ids at all (not read).
        expired: those whose hash is still there but whose ``deadline_ms`` has passed (a hash
            written without PEXPIRE): not served.
    """

    leases: list[Lease]
    invalid: list[tuple[str, str]]
    gone: list[str]
    server_now_ms: int
    ignored: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseListing:
    """What :meth:`LeaseStore.list_all` found.

    Attributes:
        leases: every valid lease, sorted by client id (a partly served one carries its
            rejected entries in :attr:`Lease.rejected`).
        invalid: ``(client_id, reason)`` of every lease that could not be used (skipped).
        expired: client ids that were in the index but whose hash is gone (removed from it),
            and those whose hash is still there past its ``deadline_ms`` (not served; a hash
            written without PEXPIRE), sorted.
        server_now_ms: the Redis server clock when the listing started.
        unindexed: client ids whose hash was found outside the index (a ``known`` id the
            caller serves, or by SCAN; they are also in ``leases`` or ``invalid``).
        reindexed: those of them put back in the index (their hash existed, with a
            ``deadline_ms`` still ahead): the index is a hint, repaired when found wrong.
    """

    leases: list[Lease]
    invalid: list[tuple[str, str]]
    expired: list[str]
    server_now_ms: int
    unindexed: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)


def encode_lease_fields(
    client_id: str,
    subscriptions: SubscriptionSet,
    *,
    ttl_ms: int,
    host: str,
    pid: int,
    created_ms: int | None = None,
    renewed_ms: int | None = None,
    deadline_ms: int | None = None,
) -> dict[str, str]:
    """The HASH fields of a lease, as strings.

    :meth:`LeaseStore.write` passes no ``*_ms`` values: its script adds them from the server
    clock. Pass them to build a complete hash by hand (tests, tools).

    Raises:
        LeaseError: a bad client id, TTL, pid, or a stream that no broker would accept.
    """
    check_client_id(client_id)
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise LeaseError(f"lease ttl_ms must be a positive integer, got {ttl_ms!r}")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise LeaseError(f"lease pid must be an integer, got {pid!r}")
    for key in subscriptions.depths:
        _check_stream_key(key)
    fields = {
        "v": str(LEASE_VERSION),
        "client_id": client_id,
        "host": str(host),
        "pid": str(pid),
        "subs": _subs_encoder.encode(subscriptions.by_type()).decode(),
        "ttl_ms": str(ttl_ms),
    }
    for name, value in zip(_CLOCK_FIELDS, (created_ms, renewed_ms, deadline_ms), strict=True):
        if value is not None:
            fields[name] = str(int(value))
    return fields


def parse_lease(
    client_id: str,
    fields: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
    *,
    max_streams: int = MAX_LEASE_STREAMS,
    memo: dict[str, ParsedSubs] | None = None,
) -> Lease:
    """Validate the HASH fields of ``{ns}:lease:{client_id}`` into a :class:`Lease`.

    Entries of ``subs`` naming an unknown stream or an invalid code are skipped into
    :attr:`Lease.rejected` (see :func:`parse_subs`); the rest is served.

    ``memo`` maps ``subs`` texts already validated (under the same ``max_streams``) to their
    results, and learns new ones: the broker lists every lease each second and a lease's
    ``subs`` rarely changes, so hundreds of streams need not be re-validated every time.

    Raises:
        LeaseError: with the reason, for missing fields, a wrong version, a client id that does
            not match the key, non-integer numbers, ``subs`` that is not JSON
            ``{stream: [codes]}``, more than ``max_streams`` entries, or no servable entry
            among some rejected ones.
    """
    check_client_id(client_id)
    text = {_text(k, "field name"): _text(v, "field value") for k, v in fields.items()}
    missing = [name for name in _REQUIRED_FIELDS if name not in text]
    if missing:
        raise LeaseError(f"lease {client_id!r} lacks field(s) {', '.join(missing)}")
    if text["v"] != str(LEASE_VERSION):
        raise LeaseError(f"lease {client_id!r} has version {text['v']!r}, expected 1")
    if text["client_id"] != client_id:
        raise LeaseError(f"lease {client_id!r} names another client {text['client_id']!r}")
    ttl_ms = _int_field(text, "ttl_ms", client_id)
    if ttl_ms <= 0:
        raise LeaseError(f"lease {client_id!r} has ttl_ms {ttl_ms}, expected > 0")
    pid = _int_field(text, "pid", client_id)
    created_ms = _int_field(text, "created_ms", client_id)
    renewed_ms = _int_field(text, "renewed_ms", client_id)
    deadline_ms = _int_field(text, "deadline_ms", client_id)
    subs = _memo_subs(text["subs"], max_streams, memo)
    return Lease(
        client_id=client_id,
        host=text["host"],
        pid=pid,
        subscriptions=subs.subscriptions,
        ttl_ms=ttl_ms,
        created_ms=created_ms,
        renewed_ms=renewed_ms,
        deadline_ms=deadline_ms,
        rejected=subs.rejected,
    )


def _memo_subs(raw: str, max_streams: int, memo: dict[str, ParsedSubs] | None) -> ParsedSubs:
    if memo is None:
        return parse_subs(raw, max_streams=max_streams)
    known = memo.get(raw)
    if known is None:
        known = memo[raw] = parse_subs(raw, max_streams=max_streams)
    return known


def parse_subs(raw: str, *, max_streams: int = MAX_LEASE_STREAMS) -> ParsedSubs:
    """``{"orderbook@10000": ["KRW-BTC.15"], ...}`` -> what is served, and what is rejected.

    An entry naming an unknown stream, an invalid code (anything but Upbit's ``KRW-BTC`` shape,
    so no ``*``, ``?``, spaces or newlines), or a bad depth suffix (or one outside orderbook)
    is rejected on its own; every other entry is served.

    Raises:
        LeaseError: ``subs`` is too large or not JSON of that shape, has more than
            ``max_streams`` entries, or rejects entries and serves none (``{}`` is valid).
    """
    if len(raw) > max_streams * _SUBS_BYTES_PER_STREAM + 4096:
        raise LeaseError(f"subs is {len(raw)} characters, too large for {max_streams} streams")
    try:
        streams = _subs_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise LeaseError(f"subs is not JSON {{stream: [codes]}}: {exc}") from None
    count = sum(len(codes) for codes in streams.values())
    if count > max_streams:
        raise LeaseError(f"lease asks for {count} streams, more than {max_streams}")
    depths: dict[StreamKey, int] = {}
    rejected: list[Rejected] = []
    for name, codes in streams.items():
        try:
            type_, level = _parse_stream(name)
        except LeaseError as exc:
            rejected += (Rejected(name, raw_code, str(exc)) for raw_code in codes)
            continue
        for raw_code in codes:
            try:
                code, depth = _parse_code(type_, raw_code)
            except LeaseError as exc:
                rejected.append(Rejected(name, raw_code, str(exc)))
                continue
            key = StreamKey(type_, code, level)
            depths[key] = max(depths.get(key, 0), normalize_depth(depth))
    if rejected and not depths:
        raise LeaseError(f"nothing in subs can be served: {describe_rejected(rejected)}")
    return ParsedSubs(SubscriptionSet(depths), tuple(rejected))


def _parse_stream(name: str) -> tuple[str, float]:
    try:
        type_, level = parse_stream_name(name)
    except ConfigError as exc:
        raise LeaseError(f"unknown stream {name!r}: {exc}") from None
    _, at, level_text = name.partition("@")
    bad_text = at and _LEVEL_RE.fullmatch(level_text) is None
    if bad_text or not math.isfinite(level) or level < 0:
        raise LeaseError(f"unknown stream {name!r} (bad orderbook level)")
    return type_, level


def _parse_code(type_: str, raw: str) -> tuple[str, int | None]:
    try:
        return parse_code(raw, depth_suffix=type_ == DataType.ORDERBOOK)
    except InvalidDepthSuffixError as exc:
        raise LeaseError(str(exc)) from None
    except InvalidCodeError as exc:
        raise LeaseError(f"{exc} in {type_}") from None


def _check_stream_key(key: StreamKey) -> None:
    if key.type not in PUBLIC_TYPES:
        raise LeaseError(f"unknown data type {key.type!r}")
    if not is_valid_code(key.code):
        raise LeaseError(f"invalid market code {key.code!r}")
    level = key.level
    if level and (key.type != DataType.ORDERBOOK or not math.isfinite(level) or level < 0):
        raise LeaseError(f"bad level {level!r} for {key.type}")


def check_client_id(client_id: str) -> None:
    try:
        validate_name(client_id, "client id")
    except ConfigError as exc:
        raise LeaseError(str(exc)) from None


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise LeaseError(f"lease {what} is not UTF-8: {bytes(value)[:40]!r}") from None
    raise LeaseError(f"lease {what} is a {type(value).__name__}, expected text")


def _int_field(text: Mapping[str, str], name: str, client_id: str) -> int:
    value = text[name]
    if _INT_RE.fullmatch(value) is None:
        raise LeaseError(f"lease {client_id!r} field {name} is not an integer: {value[:40]!r}")
    return int(value)


__all__ = [
    "LEASE_VERSION",
    "MAX_LEASE_STREAMS",
    "Lease",
    "LeaseListing",
    "LeaseReads",
    "ParsedSubs",
    "Rejected",
    "check_client_id",
    "describe_rejected",
    "encode_lease_fields",
    "parse_lease",
    "parse_subs",
    "rejected_by_type",
]
