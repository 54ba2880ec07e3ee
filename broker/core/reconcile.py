"""Which leases to read when, and what they add up to (pure: no I/O).

The service's lease task asks :meth:`LeaseReconciler.begin` what to read, reads it from Redis
(``LeaseStore.list_all`` or ``read_many``) and feeds the result back (:meth:`listed`,
:meth:`read`, :meth:`failed`). This class keeps the valid, invalid and expired leases between
reads, their union, and the schedule:

- a control message names its lease (``lease <id>``, ``release <id>``): a change, or a
  heartbeat, costs a read of that lease, not of all of them (1,000 consumers renewing every few
  seconds kept half a core busy re-reading every lease on every renewal);
- every lease is read when a message names nothing readable, when the control channel was
  (re)subscribed (messages may have been missed), after a failed read, every
  ``reconcile_interval`` (less often with many leases: :data:`PERIODIC_LEASES_PER_S`; every
  fifth of those listings also SCANs for hashes missing from the index), and just after the
  earliest lease deadline (server clock), so an expiry is seen within ~20 ms; a deadline that
  passed with its lease still there (Redis expires keys a little late) is retried at a calm
  0.1 s, not every 10 ms;
- a full listing also reads the leases served now that are missing from the index
  (:attr:`LeaseRead.known`): the index is a hint that any consumer may ZREM from, so a lease
  whose hash exists stays served (and is re-indexed) whatever happens to its index entry;
- a burst of messages is read once, ``coalesce_delay`` after the first: listing 1,000 leases
  costs ~0.1 s. That wait is the coalescing window; the controller does not add another.

What a flood of control messages can cost is bounded (any consumer may PUBLISH on the channel;
issue 12, item 4). Per message, nothing here: the watcher folds a tick's messages into one
feed (``broker.core.control_messages``). Per read:

- a message that names nothing readable (garbage, a string that is no client id) asks for a
  full listing, and such listings follow the previous full listing no sooner than
  :data:`LISTING_GAP` (longer with many leases: they read at most
  :data:`ASKED_LEASES_PER_S` leases a second, and never wait longer than the periodic
  listing would): a flood of them costs at most one listing per gap, however many;
- ids are read one by one, at most :data:`MAX_NAMED_READS` per read, of which at most
  :data:`MAX_UNKNOWN_READS` ids no lease is known for (a new consumer's, or a name made up by a
  flood). Past that, a full listing covers the rest (a new lease is in the index), spaced like
  the others: heartbeats of thousands of leases fit, a flood does not multiply reads;
- a read of named ids never waits for such a listing: a real lease change among a flood still
  goes out one coalescing window after its message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.core.lease import check_client_id
from broker.errors import LeaseError
from broker.upbit.types import SubscriptionSet, union

if TYPE_CHECKING:
    from broker.core.lease import Lease, LeaseListing, LeaseReads

#: every this many full listings, one also SCANs for lease hashes missing from the index
SCAN_EVERY = 5
#: a full listing this long after the earliest deadline (Redis may expire keys a little late)
AFTER_DEADLINE = 0.02
#: a deadline that passed but whose lease is still there is looked at again this much later
OVERDUE_RETRY = 0.1
#: the soonest a listing for a deadline follows the previous read
MIN_WAIT = 0.01
#: a full listing asked by control messages follows the previous full listing no sooner than
#: this: a flood of messages naming nothing costs at most four listings a second, and a new
#: lease lost among made-up ids is still read within the 0.5 s issue 12 asks for
LISTING_GAP = 0.25
#: leases a second that asked listings read at most (the gap grows with the leases: 0.5 s at
#: 1,000; a listing costs ~0.1 ms of broker CPU a lease)
ASKED_LEASES_PER_S = 2_000
#: leases a second the periodic listing reads at most: with many leases it comes less often than
#: ``reconcile_interval`` (every 10 s at 1,000 leases), so that this safety net costs at most
#: ~1% of a core (~0.1 ms of broker CPU a lease) and stalls publishing that much less often
#: (issue 14: 1,000 gateway clients are 1,000 leases). Changes and heartbeats are read as they
#: are announced and expiries at their deadlines, whatever this says.
PERIODIC_LEASES_PER_S = 100
#: client ids read one by one per read at most (5,000 leases renewing every 3 s name ~80 per
#: 0.05 s window); the rest wait for a full listing
MAX_NAMED_READS = 256
#: of those, ids no lease is known for (a new consumer's, or made up): a flood of made-up ids
#: once cost an HGETALL each, ~21,000 a second, a whole core
MAX_UNKNOWN_READS = 64


@dataclass(frozen=True, slots=True)
class LeaseRead:
    """What to read now.

    Attributes:
        full: list every lease (``LeaseStore.list_all``); else read ``ids`` (``read_many``).
        scan: the full listing also SCANs for hashes missing from the index.
        ids: the client ids named on the control channel since the last read.
        noticed_at: when the first of those messages arrived (None: a scheduled read).
        known: for a full listing, the client ids served now (``LeaseStore.list_all``'s
            ``known``): read even when missing from the index, so a ZREM never drops a lease.
    """

    full: bool
    scan: bool
    ids: frozenset[str]
    noticed_at: float | None
    known: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """Every lease as known after the last read (a ``LeaseView`` for the lease feedback)."""

    leases: list[Lease]
    invalid: list[tuple[str, str]]
    expired: list[str]
    #: client id -> why its valid lease is not served (``broker.core.admission``)
    refused: dict[str, str] = field(default_factory=dict)


def merge_reads(
    cache: dict[str, Lease],
    invalid: dict[str, str],
    reads: LeaseReads,
    expired: set[str] | None = None,
) -> bool:
    """Fold :meth:`LeaseStore.read_many` results into the cached leases (and the invalid and
    expired ones); True when the union may have changed (a lease came, went, or asks for other
    streams: a renewal of the same ``subs`` text gives the very same set object, see
    ``parse_lease``'s memo)."""
    expired = set() if expired is None else expired
    changed = False
    for client_id in reads.gone:
        invalid.pop(client_id, None)
        expired.discard(client_id)
        changed |= cache.pop(client_id, None) is not None
    for client_id in reads.expired:
        invalid.pop(client_id, None)
        expired.add(client_id)
        changed |= cache.pop(client_id, None) is not None
    for client_id, reason in reads.invalid:
        invalid[client_id] = reason
        expired.discard(client_id)
        changed |= cache.pop(client_id, None) is not None
    for lease in reads.leases:
        invalid.pop(lease.client_id, None)
        expired.discard(lease.client_id)
        old = cache.get(lease.client_id)
        cache[lease.client_id] = lease
        changed |= old is None or old.subscriptions is not lease.subscriptions
    return changed


class LeaseReconciler:
    """The leases as last read, and when to read them again. Times are monotonic seconds."""

    def __init__(self, *, interval: float, coalesce_delay: float) -> None:
        self.interval = interval
        self.coalesce_delay = coalesce_delay
        #: the valid leases, by client id
        self.leases: dict[str, Lease] = {}
        #: client id -> why its lease is skipped
        self.invalid: dict[str, str] = {}
        #: client ids whose lease expired (since the last full listing)
        self.expired: set[str] = set()
        #: the union of the valid leases (None: nothing read yet)
        self.union: SubscriptionSet | None = None
        self.listings = 0
        self._server_now_ms = 0
        self._named: set[str] = set()
        self._unknown_named = 0  # how many of _named no lease is known for
        self._full = True  # the next read must list every lease
        self._full_at = 0.0  # when the next full listing is due (0: at once)
        self._noticed_at: float | None = None  # the first message naming a lease, unread
        self._asked_at: float | None = None  # the first message asking for a full listing
        self._last_listing = float("-inf")  # when the last full listing began
        self._reading: LeaseRead | None = None

    # -- feed ---------------------------------------------------------------------------------

    def named(self, client_id: str, now: float) -> bool:
        """A control message named this lease (written, renewed or released). True when it
        is read by itself; False when only a full listing can cover it (not a client id, or
        :data:`MAX_NAMED_READS` ids, or :data:`MAX_UNKNOWN_READS` unknown ones, already wait):
        one is asked then (:meth:`read_all_soon`)."""
        if client_id in self._named:
            return True
        known = self._knows(client_id)
        if len(self._named) >= MAX_NAMED_READS or (
            not known and self._unknown_named >= MAX_UNKNOWN_READS
        ):
            self.read_all_soon(now)  # (checked first: a flood of made-up ids skips the regex)
            return False
        try:
            check_client_id(client_id)
        except LeaseError:
            self.read_all_soon(now)
            return False
        if not known:
            self._unknown_named += 1
        self._named.add(client_id)
        self._notice(now)
        return True

    def read_all_soon(self, now: float) -> None:
        """Something may have been missed (a message naming no lease, a resubscribed control
        channel): list every lease, one coalescing window from now but no sooner than
        :data:`LISTING_GAP` after the last full listing."""
        if self._asked_at is None:
            self._asked_at = now

    def read_all_now(self) -> None:
        """The next read lists every lease, whenever it is (Redis lost its data)."""
        self._full = True

    def begin(self, now: float) -> LeaseRead:
        """Start a read (due or not: :meth:`due` says when); feed its result back.

        A full listing asked by messages but not due yet stays asked: the ids named meanwhile
        are read now, by themselves."""
        named, self._named = self._named, set()
        self._unknown_named = 0
        asked = self._asked_at is not None and now >= self._asked_due()
        full = self._full or now >= self._full_at or asked or not named
        noticed = self._noticed_at
        if full:
            if self._asked_at is not None:
                noticed = self._asked_at if noticed is None else min(noticed, self._asked_at)
            self._full = False
            self._asked_at = None
            self._last_listing = now
        scan = full and self.listings % SCAN_EVERY == 0
        known = frozenset(self.leases) if full else frozenset()
        self._reading = LeaseRead(full, scan, frozenset(named), noticed, known)
        self._noticed_at = None
        return self._reading

    def listed(self, listing: LeaseListing, now: float) -> None:
        """A full listing arrived."""
        self._reading = None
        self.listings += 1
        self.leases = {lease.client_id: lease for lease in listing.leases}
        self.invalid = dict(listing.invalid)
        self.expired = set(listing.expired)
        self.union = union(*(lease.subscriptions for lease in self.leases.values()))
        self._server_now_ms = listing.server_now_ms
        self._full_at = now + self.periodic_interval()
        self._after_deadline(now)

    def read(self, reads: LeaseReads, now: float) -> bool:
        """Single leases arrived; True when the union may have changed."""
        self._reading = None
        if reads.ignored:  # a message that cannot be pinned to a lease: read them all
            self.read_all_soon(now)
        changed = merge_reads(self.leases, self.invalid, reads, self.expired)
        if changed or self.union is None:
            self.union = union(*(lease.subscriptions for lease in self.leases.values()))
        self._server_now_ms = reads.server_now_ms
        self._after_deadline(now)
        return changed

    def failed(self, now: float) -> None:
        """The read failed: read everything (and the ids it was to read) once Redis answers,
        at the next message or one interval from now."""
        if self._reading is not None:
            self._named |= self._reading.ids
            self._unknown_named += len(self._reading.ids)  # a bound, not a count
            self._reading = None
        self._full = True
        self._full_at = now + self.interval
        # The change that woke us is covered by that full read: not due again before it, or a
        # Redis outage would be retried as fast as the loop can fail.
        self._noticed_at = None
        self._asked_at = None

    # -- ask ----------------------------------------------------------------------------------

    def due(self) -> float:
        """When the next read is due (monotonic): the next full listing, one coalescing
        window after the first message naming a lease since the last read, or when a full
        listing asked by messages may follow the last one."""
        at = self._full_at
        if self._noticed_at is not None:
            at = min(at, self._noticed_at + self.coalesce_delay)
        if self._asked_at is not None:
            at = min(at, self._asked_due())
        return at

    @property
    def reading(self) -> LeaseRead | None:
        """The read begun and not yet fed back."""
        return self._reading

    def snapshot(self) -> LeaseSnapshot:
        """Every lease as now known: valid, invalid (sorted) and expired (sorted)."""
        return LeaseSnapshot(
            leases=list(self.leases.values()),
            invalid=sorted(self.invalid.items()),
            expired=sorted(self.expired),
        )

    # -- rules --------------------------------------------------------------------------------

    def _notice(self, now: float) -> None:
        if self._noticed_at is None:
            self._noticed_at = now

    def _knows(self, client_id: str) -> bool:
        """A lease of this id was seen (served, invalid or expired)."""
        return client_id in self.leases or client_id in self.invalid or client_id in self.expired

    def periodic_interval(self) -> float:
        """Seconds from one full listing to the next periodic one: ``interval``, longer with
        many leases (:data:`PERIODIC_LEASES_PER_S`)."""
        return max(self.interval, len(self.leases) / PERIODIC_LEASES_PER_S)

    def _asked_due(self) -> float:
        """When the full listing asked by messages may begin."""
        assert self._asked_at is not None
        gap = min(self.periodic_interval(), max(LISTING_GAP, len(self.leases) / ASKED_LEASES_PER_S))
        return max(self._asked_at + self.coalesce_delay, self._last_listing + gap)

    def _after_deadline(self, now: float) -> None:
        """A full listing just after the earliest lease would expire (by the server clock)."""
        if not self.leases:
            return
        earliest = min(lease.deadline_ms for lease in self.leases.values())
        until = (earliest - self._server_now_ms) / 1000 + AFTER_DEADLINE
        wait = max(MIN_WAIT, until) if until > 0 else OVERDUE_RETRY
        self._full_at = min(self._full_at, now + wait)


__all__ = [
    "ASKED_LEASES_PER_S",
    "LISTING_GAP",
    "MAX_NAMED_READS",
    "MAX_UNKNOWN_READS",
    "PERIODIC_LEASES_PER_S",
    "LeaseRead",
    "LeaseReconciler",
    "LeaseSnapshot",
    "merge_reads",
]
