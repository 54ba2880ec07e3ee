"""Redis at maxmemory: whether it refuses the broker's writes, since when, and by how much
(pure: no I/O, no clock of its own).

With ``maxmemory`` set and the ``noeviction`` policy (the compose file sets both on purpose:
leases and status must never be evicted silently), Redis refuses every command flagged
``denyoom`` (SET, HSET, RPUSH, INCR, ZADD, a MULTI that queues one ...) with ``-OOM command
not allowed when used memory > 'maxmemory'``, while PUBLISH, DEL, EXPIRE/PEXPIRE, LPOP and reads
keep working. Frames keep flowing then, but every write of the broker's that would grow memory
fails: docs/design.md ("Redis at maxmemory") says which, and what the broker does about each.

The I/O adapters count the refusals they see (``PublishStats.oom_refusals``,
``BrokerStats.oom_refusals``) and the leader reads ``INFO memory`` once per status write; the
:class:`OomWatch` is fed both at that pace and turns them into episodes: one WARNING when Redis
starts refusing writes, one when it has accepted them again for :data:`OOM_CLEAR_AFTER_MS`
(so a Redis hovering at its limit does not log at every burst), and the status fields that name
the cause (``redis_oom_since_ms``, ``redis_oom_refusals``, ``redis_used_memory``,
``redis_maxmemory``, ``redis_maxmemory_policy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: an episode ends once Redis has refused nothing (and INFO shows it under its limit) this long
OOM_CLEAR_AFTER_MS = 2_000


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """What ``INFO memory`` says about the limit (bytes)."""

    used: int
    #: 0: no limit
    maxmemory: int
    #: ``noeviction``, ``allkeys-lru`` ...
    policy: str
    #: replica output buffers and the AOF buffer: Redis leaves them out of the comparison
    not_counted: int = 0

    @classmethod
    def parse(cls, info: Mapping[str, object]) -> MemoryInfo | None:
        """From an ``INFO memory`` answer (redis-py's dict); None when it lacks the fields."""
        try:
            return cls(
                used=int(str(info["used_memory"])),
                maxmemory=int(str(info["maxmemory"])),
                policy=str(info.get("maxmemory_policy", "")),
                not_counted=int(str(info.get("mem_not_counted_for_evict", 0))),
            )
        except (KeyError, ValueError):
            return None

    @property
    def over_limit(self) -> bool:
        """Above maxmemory the way Redis counts it before each write."""
        return self.maxmemory > 0 and self.used - self.not_counted > self.maxmemory

    @property
    def refuses_writes(self) -> bool:
        """Over the limit with nothing to evict by policy: ``denyoom`` commands fail. (Other
        policies evict first; they refuse only when nothing can be evicted, which only a
        refusal tells.)"""
        return self.over_limit and self.policy == "noeviction"

    def describe(self) -> str:
        """``maxmemory N, used M, policy P`` (bytes), as ``check`` and the logs say it."""
        return f"maxmemory {self.maxmemory}, used {self.used}, policy {self.policy}"


class OomWatch:
    """Episodes of Redis refusing writes for memory, from refusal counts and INFO readings.

    Fed by :meth:`observe` once per status write (wall-clock ``now_ms``); the status reads
    :attr:`since_ms`, :attr:`refusals` and :attr:`memory`.
    """

    def __init__(self) -> None:
        #: when the current episode began (0: Redis is not refusing writes)
        self.since_ms = 0
        #: writes Redis refused for memory since the broker started (every episode)
        self.refusals = 0
        #: episodes so far
        self.episodes = 0
        #: the last INFO memory reading (None: never read, or INFO is not allowed)
        self.memory: MemoryInfo | None = None
        self._last_oom_ms = 0
        self._refusals_at_start = 0

    @property
    def out_of_memory(self) -> bool:
        return self.since_ms > 0

    def observe(
        self,
        now_ms: int,
        refusals: int,
        memory: MemoryInfo | None,
    ) -> str | None:
        """Feed the refusals counted so far (a running total) and a fresh INFO reading (None:
        unavailable). Returns the line to log at WARNING when an episode begins or ends."""
        before = self.refusals
        refused = refusals > before
        self.refusals = max(before, refusals)
        if memory is not None:
            self.memory = memory
        if refused or (memory is not None and memory.refuses_writes):
            self._last_oom_ms = now_ms
            if self.since_ms:
                return None
            self.since_ms = now_ms
            self.episodes += 1
            self._refusals_at_start = before
            return self._began()
        if self.since_ms and now_ms - self._last_oom_ms >= OOM_CLEAR_AFTER_MS:
            if memory is not None and memory.over_limit:
                return None  # another policy may still fail to evict: wait for it to drop
            return self._ended(now_ms)
        return None

    def _figures(self) -> str:
        return self.memory.describe() if self.memory is not None else "memory figures unknown"

    def _began(self) -> str:
        return (
            f"redis is out of memory ({self._figures()}): it refuses writes (OOM command not "
            "allowed when used memory > 'maxmemory'); frames still flow, the last-value cache "
            "is frozen (snapshots are fetched upstream), consumers cannot queue commands; "
            "free memory or raise maxmemory"
        )

    def _ended(self, now_ms: int) -> str:
        lasted = (now_ms - self.since_ms) / 1000
        refused = self.refusals - self._refusals_at_start
        self.since_ms = 0
        return (
            f"redis accepts writes again ({self._figures()}) after {lasted:.1f} s out of "
            f"memory ({refused} writes refused)"
        )


def inherited_cache_stale_since(cache_stale_since_ms: object, redis_oom_since_ms: object) -> int:
    """Since when the last-value cache may hold entries a previous leader could not update,
    from that leader's last status (its ``cache_stale_since_ms`` and ``redis_oom_since_ms``, as
    Redis returns them: bytes, str or None); 0: it held the newest frame of every stream.

    Redis refusing writes (``redis_oom_since_ms``) counts even with the cache current at that
    status write: the leader's bursts after it may have been refused before it wrote another."""
    for value in (cache_stale_since_ms, redis_oom_since_ms):
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        try:
            since = int(str(value or 0))
        except ValueError:
            continue
        if since > 0:
            return since
    return 0


__all__ = ["OOM_CLEAR_AFTER_MS", "MemoryInfo", "OomWatch", "inherited_cache_stale_since"]
