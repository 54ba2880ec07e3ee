"""The leader lock: which broker holds the one upstream connection (I/O adapter over Redis).

``{ns}:leader`` is a STRING ``"{broker_id} {token}"`` with a PX TTL: the leader's broker id (a
label for people, :meth:`LeaderLock.holder`) and a random token made per lock object, so per
process. The token, never the id, is the fence: two processes started with the same
``--broker-id`` (a fixed id in an orchestrator, a restart) are two contenders, and only one of
them holds the lock. The leader renews it well within the TTL; when the leader dies, the key
expires and a standby's next :meth:`LeaderLock.try_acquire` wins. Every check-and-act is one
Lua script comparing the whole value, so a process never extends or deletes a lock another
process holds.

Takeover. A new leader announces a ``takeover`` gap when the status it finds was written by
another process: ``LeaderCore.took_lead`` (broker.core.leader) compares the status's
``leader_token`` (the writer's :attr:`LeaderLock.token`) with its own token, never the ids (a
restart with the same id is a takeover; leading again after a lapse in the same process is
not).

Fencing. Redis cannot fence PUBLISH (there is no token a channel could check), so the lock alone
does not stop a leader that lost it from publishing. We bound that window locally instead:

* Before each acquire/renew round trip we read ``time.monotonic()`` (``t0``). Redis sets the
  TTL when the command *arrives*, which is after ``t0``, so the key lives at least until
  ``t0 + ttl`` of real time. The broker treats itself as leader only until
  ``valid_until = t0 + ttl * VALIDITY_RATIO``; the ``1 - VALIDITY_RATIO`` margin (500 ms of a
  5 s TTL) absorbs clock-rate differences between this host's monotonic clock and the Redis
  server's clock, and lets a publish batch begun just before ``valid_until`` land in Redis
  before the key can expire.
* A renew that fails (the lock is someone else's) drops validity at once; a renew that cannot
  reach Redis leaves the old ``valid_until`` to run out, so an isolated leader stops publishing
  *before* its key can expire in Redis and a standby take over.
* The service must call :meth:`LeaderLock.is_valid` before every upstream action and publish
  batch. What remains unfenced is a process paused (GC, SIGSTOP, swapped) between that check and
  its write reaching Redis: its late frames are duplicates of real upstream data, and consumers
  learn of the takeover from the ``leader`` event and the epoch counter (``{ns}:epoch``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from redis.asyncio import Redis

from broker.errors import ConfigError
from broker.keys import Keys, validate_name
from broker.redis_client import is_cluster_client
from broker.redis_oom import AllowOomScript

#: Fraction of the TTL, counted from before the round trip, during which we act as leader.
VALIDITY_RATIO = 0.9

# KEYS: leader key. ARGV: lock value ("{broker_id} {token}"), ttl_ms. Idempotent, so
# redis-py's retry of a command whose reply was lost cannot make us refuse a lock we just took:
# SET NX, or refresh if already ours (this process's value, not merely our broker id).
# Run with allow-oom (broker.redis_oom): SET is refused at maxmemory, and a standby that cannot
# take the lock after the leader died leaves nobody leading. The key is one short string per
# namespace, so the flag cannot grow memory by more than that. Renew (GET, PEXPIRE) and release
# (DEL) are not refused at maxmemory and need no flag.
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: leader key. ARGV: lock value, ttl_ms. Extend only a lock this process holds.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: leader key. ARGV: lock value. Delete only a lock this process holds.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockHolder(NamedTuple):
    """Who holds the lock: a broker id (a label) and its process's token (the fence)."""

    broker_id: str
    #: "" for a lock written by a broker older than tokens (its value is the bare id)
    token: str


def new_token() -> str:
    """A fresh random lock token: 16 hex digits (64 bits), never shared by two processes."""
    return secrets.token_hex(8)


def lock_value(broker_id: str, token: str) -> str:
    """The lock's value: ``"{broker_id} {token}"`` (a broker id holds no space)."""
    return f"{broker_id} {token}"


def parse_lock_value(value: bytes | str) -> LockHolder:
    """The holder a lock value names (a bare id, as older brokers wrote it: token ``""``)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    broker_id, _, token = text.partition(" ")
    return LockHolder(broker_id, token)


class LeaderLock:
    """One broker process's handle on ``{ns}:leader``, with a local validity deadline.

    Args:
        redis: a ``redis.asyncio.Redis`` client.
        namespace: the key prefix.
        broker_id: this broker's id (written into the lock's value as a label).
        ttl_ms: the lock's TTL in Redis; renew well within it (e.g. every ``ttl / 3``).
        clock: monotonic seconds; tests may pass a fake.
        token: this process's fence (default: :func:`new_token`; tests may fix one).

    Redis errors (``redis.RedisError``) propagate from every method; they never extend validity.
    """

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        broker_id: str,
        ttl_ms: int = 5000,
        *,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            raise ConfigError(f"leader ttl_ms must be a positive integer, got {ttl_ms!r}")
        token = new_token() if token is None else token
        if not token or not token.isascii() or not token.isalnum():
            raise ConfigError(f"leader token must be letters and digits, got {token!r}")
        self.redis = redis
        self.key = Keys(namespace, hash_tag=is_cluster_client(redis)).leader
        self.broker_id = validate_name(broker_id, "broker id")
        #: this process's fence: the status carries it (``leader_token``) while we lead
        self.token = token
        self.value = lock_value(self.broker_id, token)
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._valid_until = 0.0
        self._acquire = AllowOomScript(redis, _ACQUIRE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    @property
    def valid_until(self) -> float:
        """The ``clock()`` time after which this broker must not act as leader (0: not held)."""
        return self._valid_until

    def is_valid(self, now: float | None = None) -> bool:
        """True while this broker holds the lock by its local, conservative deadline."""
        return (self._clock() if now is None else now) < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lock if it is free (or already ours, which refreshes it)."""
        return await self._run(self._acquire)

    async def renew(self) -> bool:
        """Extend the lock if we still hold it; False (and invalid at once) if we do not."""
        return await self._run(self._renew)

    async def release(self) -> bool:
        """Give the lock up if we hold it; validity ends before the round trip."""
        self._valid_until = 0.0
        reply = await self._release(keys=[self.key], args=[self.value])
        return bool(reply)

    async def holder(self) -> str | None:
        """The broker id holding the lock now (a label: it may be ours, held by another
        process started with the same id), or None."""
        held = await self.read()
        return None if held is None else held.broker_id

    async def read(self) -> LockHolder | None:
        """Who holds the lock now (id and token), or None."""
        value = await self.redis.get(self.key)
        return None if value is None else parse_lock_value(value)

    def is_mine(self, holder: LockHolder | None) -> bool:
        """Whether ``holder`` (from :meth:`read`) is this process."""
        return holder is not None and holder == (self.broker_id, self.token)

    async def _run(self, script: Callable[..., Awaitable[Any]]) -> bool:
        t0 = self._clock()  # before the round trip: Redis starts the TTL later than this
        reply = await script(keys=[self.key], args=[self.value, self.ttl_ms])
        if reply:
            self._valid_until = t0 + self.ttl_ms * VALIDITY_RATIO / 1000
            return True
        self._valid_until = 0.0
        return False
