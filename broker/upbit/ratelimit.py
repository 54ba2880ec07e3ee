"""Upbit's rate limits as pure sliding-window budgets.

Upbit allows 5 messages a second and 100 a minute per connection; every subscribe request,
every LIST_SUBSCRIPTIONS and (treated as counted) every text ``PING`` is a message. The
budget keeps a margin under both so clock skew between us and Upbit never costs a refusal.

Its quotation REST API allows 10 requests a second per client IP and rate-limit group, and
says what is left in each answer's ``Remaining-Req`` header: :class:`ClientLimiter` is that
limit as a server applies it (the simulator, and the gateway when it emulates Upbit's limits).

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


#: Upbit's quotation REST limit: requests a second per client IP and rate-limit group
QUOTATION_PER_SECOND = 10
#: ``min`` of ``Remaining-Req``: deprecated, "a fixed value" [D-rl]; the old per-minute quota
REMAINING_MIN = 600
#: ``sec`` of ``Remaining-Req`` when no limit applies (never 0: a client pacing by it would wait)
NO_LIMIT_SEC = 999


def remaining_req(group: str, remaining: int) -> str:
    """The ``Remaining-Req`` header of a REST answer: ``remaining`` requests left this second."""
    return f"group={group}; min={REMAINING_MIN}; sec={remaining}"


class ClientLimiter:
    """Upbit's quotation REST limit: ``per_second`` requests per client IP and rate-limit group
    in any one-second window (sliding; Upbit says only "per second").

    A refused request is not counted, so a client that waits gets in again. ``per_second`` 0
    turns the limit off: every request passes with ``unlimited`` left. Once ``prune_at``
    (IP, group) budgets are kept, the idle ones are forgotten.
    """

    def __init__(
        self,
        per_second: int = QUOTATION_PER_SECOND,
        *,
        unlimited: int = NO_LIMIT_SEC,
        prune_at: int = 1024,
    ) -> None:
        if per_second < 0:
            raise ValueError("per_second must be >= 0")
        self.per_second = per_second
        self.unlimited = unlimited
        self._prune_at = prune_at
        self._budgets: dict[tuple[str, str], RateBudget] = {}

    def take(self, ip: str, group: str, now: float) -> int | None:
        """Count one request at ``now`` (seconds): the requests left in the window, or
        ``None`` when it is over the limit (answer 429)."""
        if self.per_second == 0:
            return self.unlimited
        key = (ip, group)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self._prune_at:
                self._prune(now)
            # A minute window the second one never lets fill: only the second one bites.
            budget = self._budgets[key] = RateBudget(self.per_second, self.per_second * 60)
        if not budget.allows(now):
            return None
        budget.record(now)
        return max(0, self.per_second - budget.sent_within(now, 1.0))

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._budgets.items() if not b.sent_within(now, 1.0)]:
            del self._budgets[key]


__all__ = [
    "NO_LIMIT_SEC",
    "QUOTATION_PER_SECOND",
    "REMAINING_MIN",
    "ClientLimiter",
    "Pacer",
    "RateBudget",
    "remaining_req",
]
