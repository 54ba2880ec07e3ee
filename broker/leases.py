"""The lease store: consumers' subscription leases in Redis (I/O adapter, shared with consumers).

A lease is the HASH ``{ns}:lease:{client_id}`` (PEXPIRE = its TTL) indexed by the ZSET
``{ns}:leases`` (client id -> deadline); ``docs/design.md`` is the contract. Every timestamp is
the Redis server's clock (``TIME``, read inside the scripts), never a client's, so consumers and
brokers on hosts with skewed clocks agree on who has expired.

A lease is served while its hash exists and its ``deadline_ms`` field is later than the server
clock; the key's expiry only cleans up, and the index score only helps find leases.

What a lease is (:class:`Lease`, :func:`encode_lease_fields`, :func:`parse_lease`, the
validation rules) lives in the pure :mod:`broker.core.lease`, re-exported here; this module
only moves fields between Redis and them. Redis errors
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

from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from broker.clock import server_time_ms
from broker.coordination import on_coordination_node, queue_time, server_time
from broker.core.lease import (
    LEASE_VERSION,
    MAX_LEASE_STREAMS,
    Lease,
    LeaseListing,
    LeaseReads,
    ParsedSubs,
    Rejected,
    check_client_id,
    describe_rejected,
    encode_lease_fields,
    parse_lease,
    parse_subs,
    rejected_by_type,
)
from broker.errors import ConfigError, LeaseError
from broker.keys import DEFAULT_NAMESPACE, Keys
from broker.redis_client import is_cluster_client
from broker.upbit.types import SubscriptionSet

_SCAN_COUNT = 1000


def lua_script(name: str) -> str:
    """The text of a Lua script shipped in this package (``lease.lua``, ``lease_release.lua``)."""
    return resources.files("broker").joinpath(name).read_text(encoding="utf-8")


#: The lease write (and heartbeat) script; README "The lease contract" quotes this file.
LEASE_LUA = lua_script("lease.lua")
#: The release script.
RELEASE_LUA = lua_script("lease_release.lua")


class LeaseArgs(NamedTuple):
    """``lease.lua``'s ARGV, as README's redis-cli line: ID TTL_MS SUBS HOST PID."""

    client_id: str
    ttl_ms: str
    subs: str
    host: str
    pid: str


def lease_args(
    client_id: str, subscriptions: SubscriptionSet, *, ttl_ms: int, host: str, pid: int
) -> LeaseArgs:
    """The ARGV of ``lease.lua`` that writes this lease (encoded once, sent on every renewal).

    Raises:
        LeaseError: arguments that would make an invalid lease.
    """
    fields = encode_lease_fields(client_id, subscriptions, ttl_ms=ttl_ms, host=host, pid=pid)
    return LeaseArgs(client_id, fields["ttl_ms"], fields["subs"], fields["host"], fields["pid"])


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

# KEYS: index, then one lease hash per client id in ARGV. Puts back in the index each id whose
# hash exists (a hash, with a numeric deadline_ms still in the future), scored by that field as
# it is now, atomically: a lease released (or expired) since the caller looked is never
# re-indexed. Returns the ids indexed. Only TIME, HGET and ZADD: the broker's documented ACL.
_REINDEX_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local done = {}
for i = 1, #ARGV do
  -- a string only from an existing hash (false: no key or no field; a table: another type)
  local field = redis.pcall('HGET', KEYS[i + 1], 'deadline_ms')
  local deadline = type(field) == 'string' and tonumber(field) or nil
  if deadline and deadline > now then
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
    done[#done + 1] = ARGV[i]
  end
end
return done
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
            self.keys = Keys(namespace, hash_tag=is_cluster_client(redis))
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
        check_client_id(client_id)
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
        args = lease_args(client_id, subscriptions, ttl_ms=ttl_ms, host=host, pid=pid)
        reply = await self._write_script(
            keys=[self._lease_key(client_id), self.keys.leases], args=args
        )
        renewed_ms, created_ms, deadline_ms = (int(x) for x in reply)
        return Lease(
            client_id=client_id,
            host=args.host,
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

    async def write_many(
        self, ops: Sequence[tuple[str, LeaseArgs | None]], *, chunk: int = 1_000
    ) -> list[ResponseError | None]:
        """Write (``lease_args``) or release (``None``) many leases, in pipelines of ``chunk``.

        Each is its own run of ``lease.lua`` or ``lease_release.lua``, as :meth:`write` and
        :meth:`release` run them, but a thousand leases cost one round trip: a process holding
        many (the gateway, a lease per client) renews them all at once.

        Returns:
            In the order of ``ops``: ``None`` for each lease written or released, else the
            ``ResponseError`` with which Redis refused it (``lease.lua`` names the broken
            rule); one refusal fails no other lease.

        Raises:
            LeaseError: an invalid client id to release.
            RedisError, OSError: Redis did not run a pipeline (down, or its scripts flushed
                meanwhile: ``NoScriptError``); the pipelines before it were written.
        """
        results: list[ResponseError | None] = []
        for start in range(0, len(ops), chunk):
            batch = ops[start : start + chunk]
            replies = await self._run_scripts(batch)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                # A cluster's pipeline does not load the scripts first (a single server's
                # does), and a failover's new master may not have them: load them on every
                # master and run the batch again (a lease written twice is renewed twice, a
                # release twice is released).
                await self.redis.script_load(LEASE_LUA)
                await self.redis.script_load(RELEASE_LUA)
                replies = await self._run_scripts(batch)
            for reply in replies:
                if isinstance(reply, NoScriptError) or (
                    isinstance(reply, Exception) and not isinstance(reply, ResponseError)
                ):
                    raise reply
                results.append(reply if isinstance(reply, ResponseError) else None)
        return results

    async def _run_scripts(self, batch: Sequence[tuple[str, LeaseArgs | None]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id, args in batch:
                keys = [self._lease_key(client_id), self.keys.leases]
                if args is None:
                    await self._release_script(keys=keys, args=[client_id], client=pipe)
                else:
                    await self._write_script(keys=keys, args=args, client=pipe)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

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
        ids: list[str] = []
        ignored: list[str] = []
        for client_id in client_ids:
            try:
                check_client_id(client_id)
            except LeaseError:
                ignored.append(client_id)
                continue
            ids.append(client_id)
        server_now_ms = server_time_ms(await server_time(self.redis, self.keys))
        memo = self._subs_memo.setdefault(max_streams, {})
        leases: list[Lease] = []
        invalid: list[tuple[str, str]] = []
        gone: list[str] = []
        expired: list[str] = []
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

    async def list_all(
        self,
        *,
        scan: bool = False,
        known: Iterable[str] = (),
        max_streams: int = MAX_LEASE_STREAMS,
    ) -> LeaseListing:
        """Every lease in the index, every ``known`` lease missing from it (and, with ``scan``,
        every lease hash missing from it).

        The index is only a hint: anyone who may write a lease may also ZREM from it. A lease
        found outside it (a ``known`` id, the ones the caller serves, or by SCAN) is listed
        like any other and put back in the index (scored by its ``deadline_ms``), in the same
        round trip as its read, by a script that re-indexes only a hash that still exists, so
        a lease released meanwhile is never re-indexed.

        One bad lease never fails the listing: it goes to ``invalid`` with its reason. Index
        entries whose hash has expired go to ``expired`` and are removed from the index; a hash
        past its ``deadline_ms`` goes there too (not served; it stays until its own TTL).
        ``scan`` adds a SCAN over ``{ns}:lease:*``: use it for periodic reconciles only.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            queue_time(pipe, self.keys)
            pipe.zrange(self.keys.leases, 0, -1)
            server_time, members = await pipe.execute()
        server_now_ms = server_time_ms(server_time)

        invalid: list[tuple[str, str]] = []
        indexed: list[str] = []
        for member in members:
            client_id = _member_text(member)
            try:
                check_client_id(client_id)
            except LeaseError as exc:
                invalid.append((client_id, f"bad index entry: {exc}"))
                continue
            indexed.append(client_id)

        found = await self._hgetall_many(indexed)
        gone = [cid for cid, fields in zip(indexed, found, strict=True) if fields == {}]
        expired = await self._drop_gone(gone) if gone else []

        hashes = {cid: f for cid, f in zip(indexed, found, strict=True) if f != {}}
        seen = set(indexed)
        outside: list[str] = []  # lease hashes to look for outside the index
        for client_id in known:
            if client_id in seen:
                continue
            seen.add(client_id)
            try:
                check_client_id(client_id)
            except LeaseError:
                continue  # names no lease hash
            outside.append(client_id)
        if scan:
            async for key in self.redis.scan_iter(
                match=self._lease_prefix + "*",
                count=_SCAN_COUNT,
                **on_coordination_node(self.redis, self.keys),
            ):
                client_id = _member_text(key)[len(self._lease_prefix) :]
                if client_id in seen:
                    continue
                seen.add(client_id)
                try:
                    check_client_id(client_id)
                except LeaseError as exc:
                    invalid.append((client_id, f"bad lease key: {exc}"))
                    continue
                outside.append(client_id)
        unindexed: list[str] = []
        reindexed: list[str] = []
        if outside:
            found_outside, reindexed = await self._read_and_reindex(outside)
            for client_id, fields in zip(outside, found_outside, strict=True):
                if fields != {}:  # {}: gone (released or expired), or between SCAN and HGETALL
                    unindexed.append(client_id)
                    hashes[client_id] = fields

        memo = self._subs_memo.setdefault(max_streams, {})
        if len(memo) > 2 * len(hashes) + 64:
            memo.clear()  # old texts of changed leases: bounded by the live leases
        leases: list[Lease] = []
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
            reindexed=sorted(reindexed),
        )

    async def next_deadline(self) -> tuple[int | None, int]:
        """The earliest deadline in the index (None when empty) and the server's now, in ms.

        The broker sleeps ``deadline - now`` of the *server* clock, never trusting its own.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            queue_time(pipe, self.keys)
            pipe.zrange(self.keys.leases, 0, 0, withscores=True)
            server_time, first = await pipe.execute()
        deadline = int(first[0][1]) if first else None
        return deadline, server_time_ms(server_time)

    async def sweep_expired(self) -> list[str]:
        """Drop index entries past their deadline whose lease hash is gone; return their ids.

        An entry whose hash still exists (renewed since, so its deadline moved) stays.
        """
        _, due = await self._due_script(keys=[self.keys.leases])
        ids: list[str] = []
        garbage: list[Any] = []  # raw members: a non-UTF-8 one must be ZREMed as is
        for member in due:
            client_id = _member_text(member)
            try:
                check_client_id(client_id)
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
    ) -> list[dict[Any, Any] | ResponseError]:
        """HGETALL each lease in one pipeline; a key of another type gives its ResponseError."""
        ids = list(client_ids)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id in ids:
                pipe.hgetall(self.keys.lease(client_id))
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ResponseError):
                raise result
        return list(results)

    async def _read_and_reindex(
        self, client_ids: list[str]
    ) -> tuple[list[dict[Any, Any] | ResponseError], list[str]]:
        """HGETALL each lease and re-index those whose hash exists (``_REINDEX_LUA``), in one
        pipeline; returns the hashes (as :meth:`_hgetall_many`) and the ids re-indexed.

        The script is sent whole (EVAL, a few hundred bytes): no NOSCRIPT round trip. A refused
        re-index (Redis at maxmemory, a read-only replica) never fails the listing: the leases
        are served all the same, and the next listing tries again.
        """
        keys = [self.keys.lease(c) for c in client_ids]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            pipe.eval(_REINDEX_LUA, len(keys) + 1, self.keys.leases, *keys, *client_ids)
            results = await pipe.execute(raise_on_error=False)
        *hashes, done = results
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ResponseError):
                raise result
        reindexed = [] if isinstance(done, ResponseError) else [_member_text(m) for m in done]
        return hashes, reindexed

    async def _drop_gone(self, client_ids: list[str]) -> list[str]:
        keys = [self.keys.leases, *(self.keys.lease(c) for c in client_ids)]
        reply = await self._drop_gone_script(keys=keys, args=client_ids)
        return [_member_text(m) for m in reply]


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
    "LeaseArgs",
    "LeaseListing",
    "LeaseReads",
    "LeaseStore",
    "ParsedSubs",
    "Rejected",
    "describe_rejected",
    "encode_lease_fields",
    "lease_args",
    "lua_script",
    "parse_lease",
    "parse_subs",
    "rejected_by_type",
]
