"""The leader lock: which broker holds the one upstream connection (I/O adapter over Redis).

``{ns}:leader`` is a STRING holding the leader's broker id with a PX TTL. The leader renews it
well within the TTL; when the leader dies, the key expires and a standby's next
:meth:`LeaderLock.try_acquire` wins. Every check-and-act is one Lua script, so a broker never
extends or deletes a lock another broker holds.

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

import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from broker.errors import ConfigError
from broker.keys import Keys, validate_name

#: Fraction of the TTL, counted from before the round trip, during which we act as leader.
VALIDITY_RATIO = 0.9

# KEYS: leader key. ARGV: broker id, ttl_ms. Idempotent, so redis-py's retry of a command whose
# reply was lost cannot make us refuse a lock we just took: SET NX, or refresh if already ours.
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: leader key. ARGV: broker id, ttl_ms. Extend only a lock we hold.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: leader key. ARGV: broker id. Delete only a lock we hold.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLock:
    """One broker's handle on ``{ns}:leader``, with a local validity deadline.

    Args:
        redis: a ``redis.asyncio.Redis`` client.
        namespace: the key prefix.
        broker_id: this broker's id (written as the lock's value).
        ttl_ms: the lock's TTL in Redis; renew well within it (e.g. every ``ttl / 3``).
        clock: monotonic seconds; tests may pass a fake.

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
    ) -> None:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            raise ConfigError(f"leader ttl_ms must be a positive integer, got {ttl_ms!r}")
        self.redis = redis
        self.key = Keys(namespace).leader
        self.broker_id = validate_name(broker_id, "broker id")
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._valid_until = 0.0
        self._acquire = redis.register_script(_ACQUIRE_LUA)
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
        reply = await self._release(keys=[self.key], args=[self.broker_id])
        return bool(reply)

    async def holder(self) -> str | None:
        """The broker id holding the lock now, or None."""
        value = await self.redis.get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _run(self, script: AsyncScript) -> bool:
        t0 = self._clock()  # before the round trip: Redis starts the TTL later than this
        reply = await script(keys=[self.key], args=[self.broker_id, self.ttl_ms])
        if reply:
            self._valid_until = t0 + self.ttl_ms * VALIDITY_RATIO / 1000
            return True
        self._valid_until = 0.0
        return False
