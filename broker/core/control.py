"""The subscription controller: what to send upstream, and when (pure; no asyncio, no I/O).

Upbit replaces a connection's whole subscription set on every request, so the broker owns one
connection and always sends the FULL set. This class holds the protocol state of that
connection and decides every message sent on it; the upstream adapter feeds it events and
drains its output, like a sans-I/O protocol:

    feed:   connection_opened(now) / connection_closed(now) / set_desired(set, now)
            request_snapshot(set, now) / force_resubscribe(request_id, now)
            list_reply(listed_set, now)
    drain:  data_to_send(now) -> [bytes]      (within the rate budget)
            confirmations() -> [request ids]  (resubscribes verified by LIST_SUBSCRIPTIONS)
    drain:  take_verdict() -> Verdict | None  (what the last LIST_SUBSCRIPTIONS settled)
    ask:    next_wakeup(now), wants_fresh_connection, routable, upstream, held,
            last_request_bytes, request_unverified

Rules it enforces:
- every subscribe request carries the full desired set; the latest desired set always wins, and
  a burst of changes within ``coalesce_delay`` becomes one request;
- never more than the budget (below Upbit's 5/s and 100/min): subscribes, LIST_SUBSCRIPTIONS and
  the keepalive text PING all count;
- streams already flowing are re-sent with ``is_only_realtime`` (no needless SNAPSHOT burst);
  new streams get their SNAPSHOT; snapshot-only fetches ride along with ``is_only_snapshot``, so
  a snapshot request never breaks anyone's realtime stream;
- an empty desired set cannot be expressed (Upbit refuses empty codes and has no unsubscribe),
  so shrinking to nothing asks the adapter for a fresh connection (make before break);
- after a subscribe, LIST_SUBSCRIPTIONS confirms what upstream holds (:attr:`held`); a
  mismatch is resent, at most ``MAX_RESENDS`` times for the same set: then what Upbit keeps
  leaving out is reported (:meth:`take_verdict`) instead of resent forever (Upbit ignores codes
  it does not know without a word, so such a set never verifies);
- a request is never larger than ``max_request_bytes``: the union is admitted under a smaller
  cap (``broker.core.admission``) and snapshot-only fetches ride along only in the room left,
  the rest in the next request.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

from broker.core.stats import ControllerStats
from broker.upbit.ratelimit import Pacer, RateBudget
from broker.upbit.requests import (
    GROUP_BYTES,
    build_list_subscriptions_request,
    build_subscribe_request,
    code_bytes,
    request_size_bound,
)
from broker.upbit.types import (
    EMPTY,
    Format,
    StreamKey,
    Subscription,
    SubscriptionSet,
    restrict,
    union,
)

#: how long after a subscribe request we ask LIST_SUBSCRIPTIONS (lets the server apply it)
VERIFY_DELAY = 0.5
#: how long to wait for a LIST_SUBSCRIPTIONS reply before asking again
VERIFY_TIMEOUT = 5.0
#: keepalive: the text PING that starts Upbit's 10-s {"status":"UP"} cycle
TEXT_PING = "PING"
#: a set LIST_SUBSCRIPTIONS does not match is resent at most this many times
MAX_RESENDS = 2
#: the request size allowed when no cap is given
DEFAULT_MAX_REQUEST_BYTES = 131_072


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a LIST_SUBSCRIPTIONS reply settled about the last subscribe request.

    ``accepted``: Upbit holds what was sent (the request is safe). ``unlisted``: after
    ``MAX_RESENDS`` resends, the streams Upbit still leaves out (given up on, not resent).
    """

    accepted: bool
    unlisted: frozenset[StreamKey] = frozenset()
    #: what Upbit holds of the request, and the request's size bound
    held: SubscriptionSet = EMPTY
    request_bytes: int = 0


class SubscriptionController:
    """Protocol state of the one upstream connection. Times are monotonic seconds."""

    def __init__(
        self,
        *,
        fmt: Format = Format.DEFAULT,
        per_second: int = 4,
        per_minute: int = 90,
        coalesce_delay: float = 0.05,
        verify: bool = True,
        ticket_prefix: str = "upbit-broker",
        stats: ControllerStats | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.fmt = fmt
        #: no request is larger (the leader core lowers it after Upbit refused a big one)
        self.max_request_bytes = max_request_bytes
        self.per_second = per_second
        self.per_minute = per_minute
        self.coalesce_delay = coalesce_delay
        self.verify = verify
        self.stats = ControllerStats() if stats is None else stats
        self._ticket_prefix = ticket_prefix
        self._tickets = itertools.count(1)
        self._desired: SubscriptionSet = EMPTY
        self._connected = False
        self._verdict: Verdict | None = None
        #: the size of the last subscribe request (and its bound: ``request_size_bound`` of what
        #: it carried), and whether Upbit has not verified it yet
        self.last_request_bytes = 0
        self.last_request_bound = 0
        self.request_unverified = False
        self._reset_connection_state()

    def _reset_connection_state(self) -> None:
        self.budget = RateBudget(self.per_second, self.per_minute)
        self.pacer = Pacer(self.per_minute)  # subscribes only: spread them over the minute
        self._upstream: SubscriptionSet = EMPTY  # realtime streams last sent
        self._held: SubscriptionSet = EMPTY  # ... of which LIST_SUBSCRIPTIONS confirmed these
        self._resends = 0  # resends of the same set after a mismatch
        self._snapshot_only: SubscriptionSet = EMPTY  # is_only_snapshot streams last sent
        self._snapshot_routable: frozenset[StreamKey] = frozenset()  # ... not yet delivered
        self._pending_snapshots: SubscriptionSet = EMPTY  # waiting to be sent
        self._refresh: set[StreamKey] = set()  # realtime streams that need a new SNAPSHOT
        self._dirty_at: float | None = None
        self._force = False
        self._ping_due = True
        self._verify_at: float | None = None
        self._verify_sent_at: float | None = None
        self._sends_since_verify = 0
        self._awaiting_confirmation: list[str] = []
        self._confirmed: list[str] = []

    # -- feed ---------------------------------------------------------------------------------

    def connection_opened(self, now: float) -> None:
        """A new connection: fresh budget, nothing upstream yet; the full set goes out first."""
        waiting = self._awaiting_confirmation
        pending = self._pending_snapshots
        self._reset_connection_state()
        self._connected = True
        self._awaiting_confirmation = waiting
        self._pending_snapshots = pending
        if self._desired or self._pending_snapshots:
            self._dirty_at = now - self.coalesce_delay  # no reason to wait
            self._force = True

    def connection_closed(self, now: float) -> None:
        self._connected = False
        self._upstream = EMPTY
        self._held = EMPTY
        self._snapshot_only = EMPTY
        self._snapshot_routable = frozenset()
        self._verify_at = None
        self._verify_sent_at = None

    def set_desired(
        self, desired: SubscriptionSet, now: float, noticed_at: float | None = None
    ) -> None:
        """The union of all leases changed (or was recomputed: equal sets are a no-op).

        ``noticed_at``: when the caller first heard of the change, if it already waited to
        gather a burst of changes before computing this set; the coalescing window counts from
        then, so a change is not held back by two windows in a row.
        """
        if desired == self._desired:
            return
        self._desired = desired
        self._resends = 0
        if self._dirty_at is None:
            self._dirty_at = now if noticed_at is None else min(now, noticed_at)

    def request_snapshot(self, streams: SubscriptionSet, now: float) -> None:
        """Fetch one SNAPSHOT of ``streams`` upstream without disturbing realtime streams."""
        if not streams:
            return
        self._pending_snapshots = union(self._pending_snapshots, streams)
        for key in streams:
            if key in self._desired:
                self._refresh.add(key)
        if self._dirty_at is None:
            self._dirty_at = now

    def force_resubscribe(self, request_id: str | None, now: float) -> None:
        """Resend the full set (operator command); confirm ``request_id`` once verified."""
        self._force = True
        if request_id is not None:
            self._awaiting_confirmation.append(request_id)
        if self._dirty_at is None:
            self._dirty_at = now

    def list_reply(self, listed: SubscriptionSet, now: float) -> bool:
        """LIST_SUBSCRIPTIONS answered; returns True when it matches what we sent.

        A reply is only judged when no subscribe went out after the LIST request (otherwise it
        may describe either set). Streams only fetched as snapshots may or may not be listed.
        """
        if self._verify_sent_at is None:
            return False
        self._verify_sent_at = None
        if self._sends_since_verify:
            self._verify_at = now  # ask again about the newer request
            return False
        listed_keys = listed.keys()
        wanted = self._upstream.keys()
        extra = listed_keys - wanted - self._snapshot_only.keys()
        if wanted <= listed_keys and not extra:
            self.stats.verified += 1
            self._held = self._upstream
            self._resends = 0
            self.request_unverified = False
            self._verdict = Verdict(True, held=self._held, request_bytes=self.last_request_bound)
            self._confirmed.extend(self._awaiting_confirmation)
            self._awaiting_confirmation.clear()
            return True
        self.stats.verify_mismatches += 1
        self._held = restrict(self._upstream, wanted & listed_keys)
        if self._resends >= MAX_RESENDS:
            # Give up on this set: Upbit keeps leaving these out (unknown codes are ignored
            # without a word). Reported, not resent: the budget belongs to real changes.
            self.stats.verify_given_up += 1
            self.request_unverified = False
            self._verdict = Verdict(
                True, frozenset(wanted - listed_keys), self._held, self.last_request_bound
            )
            self._confirmed.extend(self._awaiting_confirmation)
            self._awaiting_confirmation.clear()
            return False
        self._resends += 1
        self._force = True
        if self._dirty_at is None:
            self._dirty_at = now
        return False

    # -- ask ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def desired(self) -> SubscriptionSet:
        return self._desired

    @property
    def upstream(self) -> SubscriptionSet:
        """The realtime set the connection holds (as last sent)."""
        return self._upstream

    @property
    def held(self) -> SubscriptionSet:
        """What Upbit confirmed it holds (LIST_SUBSCRIPTIONS) of :attr:`upstream`; the set as
        sent when verification is off."""
        return self._held if self.verify else self._upstream

    def take_verdict(self) -> Verdict | None:
        """The verdict of the last LIST_SUBSCRIPTIONS reply, once."""
        verdict, self._verdict = self._verdict, None
        return verdict

    @property
    def routable(self) -> frozenset[StreamKey]:
        """Streams whose frames are wanted now: realtime upstream plus snapshot fetches."""
        return self._upstream.keys() | self._snapshot_routable

    @property
    def wants_fresh_connection(self) -> bool:
        """Upstream holds streams but nobody wants any: only a new connection can say so."""
        return (
            self._connected
            and not self._desired
            and not self._pending_snapshots
            and bool(self._upstream)
        )

    def _send_wanted(self) -> bool:
        if not self._connected or self._dirty_at is None:
            return False
        if not self._desired and not self._pending_snapshots:
            return False  # nothing expressible; see wants_fresh_connection
        return (
            self._force
            or bool(self._pending_snapshots)
            or self._desired != self._upstream
            or bool(self._refresh)
        )

    def next_wakeup(self, now: float) -> float | None:
        """When ``data_to_send`` may next have something (``None``: only on new input)."""
        if not self._connected:
            return None
        if self._send_wanted():
            # The keepalive and verification wait until the set is out (see data_to_send).
            assert self._dirty_at is not None
            return max(
                self._dirty_at + self.coalesce_delay,
                self.budget.next_allowed(now),
                self.pacer.next_allowed(now),
            )
        times: list[float] = []
        if self._ping_due:
            times.append(self.budget.next_allowed(now))
        if self._verify_at is not None:
            times.append(max(self._verify_at, self.budget.next_allowed(now)))
        if self._verify_sent_at is not None:
            times.append(self._verify_sent_at + VERIFY_TIMEOUT)
        return min(times) if times else None

    # -- drain --------------------------------------------------------------------------------

    def _ticket(self) -> str:
        return f"{self._ticket_prefix}-{next(self._tickets)}-{uuid.uuid4().hex[:8]}"

    def build_full_request(self) -> tuple[bytes, SubscriptionSet, SubscriptionSet]:
        """The request for the current desired set plus pending snapshots (no state change)."""
        desired = self._desired
        fresh = desired.keys() - self._upstream.keys() | self._refresh
        flowing = restrict(desired, desired.keys() - fresh)
        new = restrict(desired, fresh & desired.keys())
        snapshot_only = self._snapshots_that_fit(
            restrict(self._pending_snapshots, self._pending_snapshots.keys() - desired.keys()),
            self.max_request_bytes - request_size_bound(desired),
        )
        subs: list[Subscription] = []
        subs += flowing.to_subscriptions(is_only_realtime=True)
        subs += new.to_subscriptions()
        subs += snapshot_only.to_subscriptions(is_only_snapshot=True)
        return (
            build_subscribe_request(subs, ticket=self._ticket(), fmt=self.fmt),
            desired,
            snapshot_only,
        )

    def data_to_send(self, now: float) -> list[bytes | str]:
        """Messages to send now, in order; empty when nothing is due or the budget is spent."""
        out: list[bytes | str] = []
        if not self._connected:
            return out
        if self._send_wanted():
            assert self._dirty_at is not None
            if now >= self._dirty_at + self.coalesce_delay:
                if self.budget.allows(now) and self.pacer.next_allowed(now) <= now:
                    request, sent, snapshot_only = self.build_full_request()
                    self.budget.record(now)
                    self.pacer.record(now)
                    out.append(request)
                    self.stats.subscribe_requests += 1
                    self._upstream = sent
                    self._snapshot_only = snapshot_only
                    self._snapshot_routable = snapshot_only.keys()
                    # What did not fit waits for the next request (it is still pending);
                    # if nothing fit, there is no room at all: drop rather than resend forever.
                    left = self._pending_snapshots.keys() - sent.keys() - snapshot_only.keys()
                    if left and not snapshot_only:
                        self.stats.snapshot_fetches_dropped += len(left)
                        left = frozenset()
                    self._pending_snapshots = restrict(self._pending_snapshots, left)
                    self.last_request_bytes = len(request)
                    self.last_request_bound = request_size_bound(sent) + request_size_bound(
                        snapshot_only
                    )
                    self.request_unverified = True
                    self._refresh.clear()
                    self._dirty_at = now if self._pending_snapshots else None
                    self._force = False
                    self._sends_since_verify += 1
                    # Verification off: the request counts as taken once it went unrefused
                    # this long (an error frame or a 1009 comes within milliseconds).
                    self._verify_at = now + VERIFY_DELAY
                else:
                    self.stats.deferred += 1
            return out  # the keepalive and verification wait until the set is out
        if self._ping_due and self.budget.allows(now):
            self.budget.record(now)
            self._ping_due = False
            self.stats.pings += 1
            out.append(TEXT_PING)
        if self._verify_sent_at is not None and now >= self._verify_sent_at + VERIFY_TIMEOUT:
            self._verify_sent_at = None  # lost reply: ask again
            self._verify_at = now
        if not self.verify and self._verify_at is not None and now >= self._verify_at:
            self._verify_at = None
            self.request_unverified = False
            self._verdict = Verdict(
                True, held=self._upstream, request_bytes=self.last_request_bound
            )
        if (
            self._verify_at is not None
            and now >= self._verify_at
            and self._verify_sent_at is None
            and self.budget.allows(now)
        ):
            self.budget.record(now)
            self._verify_at = None
            self._verify_sent_at = now
            self._sends_since_verify = 0
            self.stats.list_requests += 1
            # No format object: it would switch the format of the running streams.
            out.append(build_list_subscriptions_request(ticket=self._ticket()))
        nothing_to_hold = not self._desired and not self._pending_snapshots and not self._upstream
        # Nothing to verify when verification is off, or when nobody wants anything.
        settled = not self._send_wanted()
        if self._awaiting_confirmation and settled and (not self.verify or nothing_to_hold):
            self._confirmed.extend(self._awaiting_confirmation)
            self._awaiting_confirmation.clear()
        return out

    @staticmethod
    def _snapshots_that_fit(streams: SubscriptionSet, room: int) -> SubscriptionSet:
        """The first of ``streams`` (sorted) whose request share fits in ``room`` bytes."""
        if request_size_bound(streams) <= room:
            return streams
        keep: list[StreamKey] = []
        groups: set[tuple[str, float]] = set()
        used = 0
        for key in streams:
            cost = code_bytes(key.code)
            if (key.type, key.level) not in groups:
                cost += GROUP_BYTES
            if used + cost > room:
                break
            used += cost
            groups.add((key.type, key.level))
            keep.append(key)
        return restrict(streams, keep)

    def confirmations(self) -> list[str]:
        """Resubscribe request ids confirmed since the last call."""
        out, self._confirmed = self._confirmed, []
        return out

    def snapshot_streams_done(self, keys: set[StreamKey]) -> None:
        """Snapshot-only streams that delivered: stop routing them (Upbit sends nothing more)."""
        self._snapshot_routable = self._snapshot_routable - keys


__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_RESENDS",
    "TEXT_PING",
    "VERIFY_DELAY",
    "VERIFY_TIMEOUT",
    "SubscriptionController",
    "Verdict",
]
