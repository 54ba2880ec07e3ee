"""The lease store: consumers' subscription leases in Redis (I/O adapter, shared with consumers).

A lease is the HASH ``{ns}:lease:{client_id}`` (PEXPIRE = its TTL) indexed by the ZSET
``{ns}:leases`` (client id -> deadline); ``docs/design.md`` is the contract. Every timestamp is
the Redis server's clock (``TIME``, read inside the scripts), never a client's, so consumers and
brokers on hosts with skewed clocks agree on who has expired.

A lease is served while its hash exists and its ``deadline_ms`` field is later than the server
clock; the key's expiry only cleans up, and the index score only helps find leases.

The pure half (:class:`Lease`, :func:`encode_lease_fields`, :func:`parse_lease`) holds the
validation rules; :class:`LeaseStore` only moves fields between Redis and them. Redis errors
(``redis.RedisError``) propagate unchanged; a lease that cannot be read is a :class:`LeaseError`.

A lease is judged entry by entry: a ``subs`` of the right shape whose entries are partly bad
(``{"ticker":["KRW-BTC","krw-eth"]}``) is served for its good entries and keeps the bad ones in
:attr:`Lease.rejected`; only a lease that is wrong as a whole (a missing or malformed field,
``subs`` that is not JSON ``{stream: [codes]}``, too many entries, nothing servable) is invalid.

The writes are the Lua scripts shipped next to this module (``lease.lua``,
``lease_release.lua``): the same files a consumer in another language runs (README, "The
lease contract").
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.errors import ConfigError, LeaseError
from broker.keys import DEFAULT_NAMESPACE, Keys, parse_stream_name, validate_name
from broker.upbit.codes import is_valid_code, normalize_depth, split_depth
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
# The depth suffix of an orderbook code: ``KRW-BTC.15``. Unsupported counts still mean 30.
_DEPTH_SUFFIX_RE = re.compile(r"[0-9]{1,4}")
# Bytes of ``subs`` JSON allowed per stream (before decoding, so a huge value costs nothing).
_SUBS_BYTES_PER_STREAM = 64
_SCAN_COUNT = 1000

_subs_decoder = msgspec.json.Decoder(dict[str, list[str]])
_subs_encoder = msgspec.json.Encoder(order="sorted")
#: reasons a summary of rejected entries names before "and N more"
_REJECTED_SHOWN = 5


def lua_script(name: str) -> str:
    """The text of a Lua script shipped in this package (``lease.lua``, ``lease_release.lua``)."""
    return resources.files("broker").joinpath(name).read_text(encoding="utf-8")


#: The lease write (and heartbeat) script; README "The lease contract" quotes this file.
LEASE_LUA = lua_script("lease.lua")
#: The release script.
RELEASE_LUA = lua_script("lease_release.lua")


# -- the pure half ----------------------------------------------------------------------------


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
    """What :meth:`LeaseStore.list` found.

    Attributes:
        leases: every valid lease, sorted by client id (a partly served one carries its
            rejected entries in :attr:`Lease.rejected`).
        invalid: ``(client_id, reason)`` of every lease that could not be used (skipped).
        expired: client ids that were in the index but whose hash is gone (removed from it),
            and those whose hash is still there past its ``deadline_ms`` (not served; a hash
            written without PEXPIRE), sorted.
        server_now_ms: the Redis server clock when the listing started.
        unindexed: client ids whose hash was found by SCAN but is missing from the index
            (they are also in ``leases`` or ``invalid``); always empty without ``scan=True``.
    """

    leases: list[Lease]
    invalid: list[tuple[str, str]]
    expired: list[str]
    server_now_ms: int
    unindexed: list[str] = field(default_factory=list)


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
    _check_name(client_id)
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
    _check_name(client_id)
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
    if type_ != DataType.ORDERBOOK:
        if not is_valid_code(raw):
            raise LeaseError(f"invalid market code {raw!r} in {type_}")
        return raw, None
    _, dot, suffix = raw.partition(".")
    if dot and _DEPTH_SUFFIX_RE.fullmatch(suffix) is None:
        raise LeaseError(f"invalid orderbook depth suffix in {raw!r}")
    code, depth = split_depth(raw)
    if not is_valid_code(code):
        raise LeaseError(f"invalid market code {raw!r} in {type_}")
    return code, depth


def _check_stream_key(key: StreamKey) -> None:
    if key.type not in PUBLIC_TYPES:
        raise LeaseError(f"unknown data type {key.type!r}")
    if not is_valid_code(key.code):
        raise LeaseError(f"invalid market code {key.code!r}")
    level = key.level
    if level and (key.type != DataType.ORDERBOOK or not math.isfinite(level) or level < 0):
        raise LeaseError(f"bad level {level!r} for {key.type}")


def _check_name(client_id: str) -> None:
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


# -- the Redis half ---------------------------------------------------------------------------

# KEYS: index, then one lease hash per client id in ARGV. ZREMs each id whose hash is gone,
# atomically, so a lease re-written since the caller looked is never dropped from the index.
_DROP_GONE_LUA = """
local dropped = {}
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
"""

# KEYS: index. Returns {now_ms, ids whose deadline is <= now_ms}, by the server clock.
_DUE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)}
"""


class LeaseStore:
    """Read and write leases in one namespace (used by the broker and by consumers).

    Args:
        redis: a ``redis.asyncio.Redis`` client (either ``decode_responses`` setting works).
        namespace: the key prefix, validated by :func:`broker.keys.validate_name`.
    """

    def __init__(self, redis: Redis, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.redis = redis
        try:
            self.keys = Keys(namespace)
        except ConfigError as exc:
            raise LeaseError(str(exc)) from None
        self._write_script = redis.register_script(LEASE_LUA)
        self._release_script = redis.register_script(RELEASE_LUA)
        self._drop_gone_script = redis.register_script(_DROP_GONE_LUA)
        self._due_script = redis.register_script(_DUE_LUA)
        # "{ns}:lease:" taken from Keys, so the key layout stays defined in one place
        self._lease_prefix = self.keys.lease("x")[:-1]
        #: max_streams -> subs text -> its validated set (see parse_lease's ``memo``)
        self._subs_memo: dict[int, dict[str, ParsedSubs]] = {}

    def _lease_key(self, client_id: str) -> str:
        _check_name(client_id)
        return self.keys.lease(client_id)

    # -- writes -------------------------------------------------------------------------------

    async def write(
        self,
        client_id: str,
        subscriptions: SubscriptionSet,
        *,
        ttl_ms: int,
        host: str,
        pid: int,
    ) -> Lease:
        """Write (or re-assert) the whole lease with ``lease.lua``; returns it as written.

        The script reads the server clock, keeps ``created_ms`` of an existing lease, replaces
        every field, sets PEXPIRE, indexes the deadline and publishes ``lease <client_id>`` on
        the control channel. An empty ``subscriptions`` is a valid lease that wants nothing.

        Raises:
            LeaseError: arguments that would make an invalid lease.
        """
        fields = encode_lease_fields(client_id, subscriptions, ttl_ms=ttl_ms, host=host, pid=pid)
        # ARGV as README's redis-cli line: ID TTL_MS SUBS HOST PID
        args = [client_id, fields["ttl_ms"], fields["subs"], fields["host"], fields["pid"]]
        reply = await self._write_script(
            keys=[self._lease_key(client_id), self.keys.leases], args=args
        )
        renewed_ms, created_ms, deadline_ms = (int(x) for x in reply)
        return Lease(
            client_id=client_id,
            host=fields["host"],
            pid=pid,
            subscriptions=subscriptions,
            ttl_ms=ttl_ms,
            created_ms=created_ms,
            renewed_ms=renewed_ms,
            deadline_ms=deadline_ms,
        )

    async def renew(
        self,
        client_id: str,
        subscriptions: SubscriptionSet,
        *,
        ttl_ms: int,
        host: str,
        pid: int,
    ) -> Lease:
        """The heartbeat: :meth:`write` again, so a Redis restarted empty is refilled."""
        return await self.write(client_id, subscriptions, ttl_ms=ttl_ms, host=host, pid=pid)

    async def release(self, client_id: str) -> bool:
        """Delete the lease, drop it from the index and publish ``release <client_id>``
        (``lease_release.lua``).

        Returns:
            True when there was something to remove.
        """
        reply = await self._release_script(
            keys=[self._lease_key(client_id), self.keys.leases], args=[client_id]
        )
        return bool(reply)

    # -- reads --------------------------------------------------------------------------------

    async def read(self, client_id: str, *, max_streams: int = MAX_LEASE_STREAMS) -> Lease | None:
        """The lease of ``client_id``, or None when there is none.

        Raises:
            LeaseError: the stored lease is not valid.
        """
        key = self._lease_key(client_id)
        try:
            fields = await self.redis.hgetall(key)
        except ResponseError as exc:
            raise LeaseError(f"lease key {key!r} is not a hash: {exc}") from None
        if not fields:
            return None
        return parse_lease(client_id, fields, max_streams=max_streams)

    async def read_many(
        self, client_ids: Iterable[str], *, max_streams: int = MAX_LEASE_STREAMS
    ) -> LeaseReads:
        """The leases of just these clients (the ones a control message named): one TIME and
        one pipeline of HGETALL. Ids that are not client ids at all are not read (``ignored``)."""
        ids: builtins.list[str] = []
        ignored: builtins.list[str] = []
        for client_id in client_ids:
            try:
                _check_name(client_id)
            except LeaseError:
                ignored.append(client_id)
                continue
            ids.append(client_id)
        server_now_ms = _time_ms(await self.redis.time())
        memo = self._subs_memo.setdefault(max_streams, {})
        leases: builtins.list[Lease] = []
        invalid: builtins.list[tuple[str, str]] = []
        gone: builtins.list[str] = []
        expired: builtins.list[str] = []
        for client_id, fields in zip(ids, await self._hgetall_many(ids), strict=True):
            if fields == {}:
                gone.append(client_id)
                continue
            try:
                if isinstance(fields, ResponseError):
                    raise LeaseError(f"lease key of {client_id!r} is not a hash: {fields}")
                lease = parse_lease(client_id, fields, max_streams=max_streams, memo=memo)
            except LeaseError as exc:
                invalid.append((client_id, str(exc)))
                continue
            if lease.deadline_ms <= server_now_ms:
                expired.append(client_id)
            else:
                leases.append(lease)
        return LeaseReads(leases, invalid, gone, server_now_ms, ignored, expired)

    async def list(
        self, *, scan: bool = False, max_streams: int = MAX_LEASE_STREAMS
    ) -> LeaseListing:
        """Every lease in the index (and, with ``scan``, every lease hash missing from it).

        One bad lease never fails the listing: it goes to ``invalid`` with its reason. Index
        entries whose hash has expired go to ``expired`` and are removed from the index; a hash
        past its ``deadline_ms`` goes there too (not served; it stays until its own TTL).
        ``scan`` adds a SCAN over ``{ns}:lease:*``: use it for periodic reconciles only.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(self.keys.leases, 0, -1)
            server_time, members = await pipe.execute()
        server_now_ms = _time_ms(server_time)

        invalid: builtins.list[tuple[str, str]] = []
        indexed: builtins.list[str] = []
        for member in members:
            client_id = _member_text(member)
            try:
                _check_name(client_id)
            except LeaseError as exc:
                invalid.append((client_id, f"bad index entry: {exc}"))
                continue
            indexed.append(client_id)

        found = await self._hgetall_many(indexed)
        gone = [cid for cid, fields in zip(indexed, found, strict=True) if fields == {}]
        expired = await self._drop_gone(gone) if gone else []

        hashes = {cid: f for cid, f in zip(indexed, found, strict=True) if f != {}}
        unindexed: builtins.list[str] = []
        if scan:
            seen = set(indexed)
            stray: builtins.list[str] = []
            async for key in self.redis.scan_iter(
                match=self._lease_prefix + "*", count=_SCAN_COUNT
            ):
                client_id = _member_text(key)[len(self._lease_prefix) :]
                if client_id in seen:
                    continue
                seen.add(client_id)
                try:
                    _check_name(client_id)
                except LeaseError as exc:
                    invalid.append((client_id, f"bad lease key: {exc}"))
                    continue
                stray.append(client_id)
            for client_id, fields in zip(stray, await self._hgetall_many(stray), strict=True):
                if fields != {}:  # {}: expired between SCAN and HGETALL
                    unindexed.append(client_id)
                    hashes[client_id] = fields

        memo = self._subs_memo.setdefault(max_streams, {})
        if len(memo) > 2 * len(hashes) + 64:
            memo.clear()  # old texts of changed leases: bounded by the live leases
        leases: builtins.list[Lease] = []
        for client_id in sorted(hashes):
            fields = hashes[client_id]
            try:
                if isinstance(fields, ResponseError):
                    raise LeaseError(f"lease key of {client_id!r} is not a hash: {fields}")
                lease = parse_lease(client_id, fields, max_streams=max_streams, memo=memo)
            except LeaseError as exc:
                invalid.append((client_id, str(exc)))
                continue
            if lease.deadline_ms <= server_now_ms:
                expired.append(client_id)  # the deadline field wins over a longer key TTL
            else:
                leases.append(lease)
        return LeaseListing(
            leases=leases,
            invalid=sorted(invalid),
            expired=sorted(expired),
            server_now_ms=server_now_ms,
            unindexed=sorted(unindexed),
        )

    async def next_deadline(self) -> tuple[int | None, int]:
        """The earliest deadline in the index (None when empty) and the server's now, in ms.

        The broker sleeps ``deadline - now`` of the *server* clock, never trusting its own.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(self.keys.leases, 0, 0, withscores=True)
            server_time, first = await pipe.execute()
        deadline = int(first[0][1]) if first else None
        return deadline, _time_ms(server_time)

    async def sweep_expired(self) -> builtins.list[str]:
        """Drop index entries past their deadline whose lease hash is gone; return their ids.

        An entry whose hash still exists (renewed since, so its deadline moved) stays.
        """
        _, due = await self._due_script(keys=[self.keys.leases])
        ids: builtins.list[str] = []
        garbage: builtins.list[Any] = []  # raw members: a non-UTF-8 one must be ZREMed as is
        for member in due:
            client_id = _member_text(member)
            try:
                _check_name(client_id)
            except LeaseError:
                garbage.append(member)  # names no lease hash, so nothing can ever renew it
                continue
            ids.append(client_id)
        dropped = await self._drop_gone(ids) if ids else []
        if garbage:
            await self.redis.zrem(self.keys.leases, *garbage)
        return sorted(dropped + [_member_text(m) for m in garbage])

    # -- helpers ------------------------------------------------------------------------------

    async def _hgetall_many(
        self, client_ids: Iterable[str]
    ) -> builtins.list[dict[Any, Any] | ResponseError]:
        """HGETALL each lease in one pipeline; a key of another type gives its ResponseError."""
        ids = builtins.list(client_ids)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id in ids:
                pipe.hgetall(self.keys.lease(client_id))
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ResponseError):
                raise result
        return builtins.list(results)

    async def _drop_gone(self, client_ids: builtins.list[str]) -> builtins.list[str]:
        keys = [self.keys.leases, *(self.keys.lease(c) for c in client_ids)]
        reply = await self._drop_gone_script(keys=keys, args=client_ids)
        return [_member_text(m) for m in reply]


def _time_ms(server_time: tuple[int, int]) -> int:
    seconds, micros = server_time
    return int(seconds) * 1000 + int(micros) // 1000


def _member_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


__all__ = [
    "LEASE_LUA",
    "LEASE_VERSION",
    "MAX_LEASE_STREAMS",
    "RELEASE_LUA",
    "Lease",
    "LeaseListing",
    "LeaseReads",
    "LeaseStore",
    "ParsedSubs",
    "Rejected",
    "describe_rejected",
    "encode_lease_fields",
    "lua_script",
    "parse_lease",
    "parse_subs",
    "rejected_by_type",
]
