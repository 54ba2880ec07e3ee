"""Upbit's per-connection message limit as a pure sliding-window budget.

Upbit allows 5 messages a second and 100 a minute per connection; every subscribe request,
every LIST_SUBSCRIPTIONS and (treated as counted) every text ``PING`` is a message. The
budget keeps a margin under both so clock skew between us and Upbit never costs a refusal.
Times are plain floats (seconds, monotonic) passed in by the caller: no clock is read here.
"""

from __future__ import annotations

from collections import deque


class RateBudget:
    """Sliding windows of one second and one minute over the sends of one connection."""

    def __init__(self, per_second: int = 4, per_minute: int = 90) -> None:
        if per_second < 1 or per_minute < 1:
            raise ValueError("a rate budget needs at least one message per window")
        self.per_second = per_second
        self.per_minute = per_minute
        self._sent: deque[float] = deque()

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - 60.0:
            self._sent.popleft()

    def next_allowed(self, now: float) -> float:
        """The earliest time (>= ``now``) at which one more message fits both windows."""
        self._forget(now)
        at = now
        if len(self._sent) >= self.per_minute:
            at = max(at, self._sent[-self.per_minute] + 60.0)
        if len(self._sent) >= self.per_second:
            at = max(at, self._sent[-self.per_second] + 1.0)
        return at

    def allows(self, now: float) -> bool:
        """True when one more message sent at ``now`` fits both windows."""
        return self.next_allowed(now) <= now

    def record(self, now: float) -> None:
        """Count one message sent at ``now``."""
        # Forget here too: a caller that records without asking must not grow the deque.
        self._forget(now)
        self._sent.append(now)

    def sent_within(self, now: float, seconds: float) -> int:
        """How many recorded messages fall in ``(now - seconds, now]``."""
        return sum(1 for t in self._sent if t > now - seconds)


class Pacer:
    """A token bucket that spreads sends over the minute instead of spending it in a burst.

    The sliding windows alone let 90 requests go out in the first ~22 s of a churning minute
    and then nothing for ~40 s, so a lease change could wait that long. With ``capacity``
    tokens refilled at ``(per_minute - capacity) / 60`` a second, no 60-s window can hold more
    than ``per_minute`` sends, and under sustained churn one goes out every ~0.9 s.
    """

    def __init__(self, per_minute: int = 90, capacity: int = 20) -> None:
        self.capacity = float(max(1, min(capacity, per_minute // 2)))
        self.rate = (per_minute - self.capacity) / 60.0
        self._tokens = self.capacity
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def next_allowed(self, now: float) -> float:
        self._refill(now)
        if self._tokens >= 1.0 - 1e-9 or self.rate <= 0:  # float dust must not cost a wake-up
            return now
        return now + (1.0 - self._tokens) / self.rate

    def record(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1.0


__all__ = ["Pacer", "RateBudget"]
