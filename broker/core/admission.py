"""Which leases the union serves: the bounds on the one upstream request (pure: no I/O).

The union of the leases is one request on one connection; a request Upbit refuses takes every
consumer offline at once. So the union is admitted, lease by lease, under bounds:

- **known markets**: a code that is not on Upbit's market list (``/v1/market/all``: a typo, a
  delisted coin, ``KRW-NOPE``) is silently ignored by Upbit, and would never verify. It is left
  out of the union and reported to its holder as a rejected entry (the lease is ``partial``).
  Streams that LIST_SUBSCRIPTIONS keeps leaving out after resends (``unlisted``) are treated the
  same way until the market list is read again: verification converges whatever Upbit answers.
- **the caps**: at most ``max_streams`` streams, and a request estimated at most
  ``UNION_SHARE`` of ``max_bytes`` (:func:`broker.upbit.requests.request_size_bound`; the rest
  is room for snapshot-only fetches riding along, so no request exceeds ``max_bytes``).
  Leases are admitted in order: those already served with the same streams first (everyone
  already served keeps flowing), then the rest oldest first (``created_ms``, then client id).
  A lease whose new streams would push the union over a cap is refused as a whole (``refused``,
  told to its holder) until room frees. Streams shared with admitted leases cost nothing.
- **upstream refusals**: a request closed with 1009 (too big) cuts the byte cap the broker
  allows itself to three quarters of that request (``learned_bytes``); a request answered with
  an error frame (not a rate limit) quarantines the leases that added streams to the last
  request Upbit accepted, with a back-off
  that doubles per strike and client (a hostile lease costs everyone one reconnect per strike,
  then less and less often). Quarantined leases are re-admitted one at a time, oldest first,
  each after the previous request verified: the cause is isolated, the innocent come back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from broker.core.lease import Rejected
from broker.upbit.requests import BASE_BYTES, GROUP_BYTES, code_bytes, request_size_bound
from broker.upbit.types import EMPTY, StreamKey, SubscriptionSet, restrict

if TYPE_CHECKING:
    from broker.core.lease import Lease

#: the first quarantine after an error frame, and the longest (it doubles per strike)
QUARANTINE_FIRST = 30.0
QUARANTINE_MAX = 3600.0
#: the byte cap a 1009 refusal can teach is never set below this (one small request)
MIN_LEARNED_BYTES = 1024
#: the share of the request cap the union may use (the rest: snapshot-only fetches)
UNION_SHARE = 7 / 8

UNKNOWN_MARKET = "not an Upbit market (not in /v1/market/all): a typo or a delisted code?"
UNLISTED = "Upbit does not list it after the request (LIST_SUBSCRIPTIONS): unknown or delisted?"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Upbit ended the connection refusing the last subscribe request.

    ``too_big``: closed with 1009 (message too big); else an error frame (not a rate limit).
    ``request_bytes``: the refused request's size bound (``request_size_bound``), the unit of
    every byte cap here.
    """

    too_big: bool
    request_bytes: int
    why: str


@dataclass(frozen=True, slots=True)
class Admitted:
    """The outcome of one admission.

    Attributes:
        union: what upstream should hold (admitted leases plus the ``base`` set).
        leases: every valid lease as served: unknown codes moved to ``rejected``; refused ones
            included (their holders are told by ``refused``).
        refused: client id -> why nothing of its lease is served.
        request_bytes: the size bound of the union's request.
    """

    union: SubscriptionSet
    leases: list[Lease]
    refused: dict[str, str]
    request_bytes: int


@dataclass(slots=True)
class _Strikes:
    count: int = 0
    until: float = 0.0
    why: str = ""


@dataclass(frozen=True, slots=True)
class _Filtered:
    """One lease's streams as admitted: without unknown codes, and its own request share."""

    subs: SubscriptionSet  # as parsed (the memo's key object, kept alive with it)
    kept: SubscriptionSet
    rejected: tuple[Rejected, ...]
    own_bytes: int


@dataclass(frozen=True, slots=True)
class _LastAdmission:
    """What an admission that refused nothing was given, and the union it made."""

    bounds: tuple[int, int, int, int]  # version, stream cap, union byte cap, byte cap
    client_ids: tuple[str, ...]
    sets: tuple[SubscriptionSet, ...]  # the filtered leases' sets (kept alive: compared by id)
    base: SubscriptionSet
    union: SubscriptionSet
    request_bytes: int


@dataclass(slots=True)
class UnionAdmission:
    """The bounds, what upstream taught us, and the leases served last time."""

    max_streams: int
    max_bytes: int
    #: the market codes Upbit lists (None: not known, every well-formed code is admitted)
    markets: frozenset[str] | None = None
    #: a byte cap learned from a 1009 refusal (None: none yet)
    learned_bytes: int | None = None
    #: streams Upbit did not list after resends (kept out until the market list is re-read)
    unlisted: set[StreamKey] = field(default_factory=set)
    #: requests Upbit refused (1009 or an error frame)
    refusals: int = 0
    #: bumped by every change of the bounds: an admission with the same leases may differ
    version: int = 0
    _served: dict[str, SubscriptionSet] = field(default_factory=dict)
    #: when this broker first saw each live client id (its place in the queue; ``created_ms``
    #: is the holder's word and would let a lease jump ahead of those waiting)
    _seen: dict[str, int] = field(default_factory=dict)
    _seen_count: int = 0
    #: ids the previous leader refused (its status): they queue behind the others at first
    _demoted: frozenset[str] = frozenset()
    _strikes: dict[str, _Strikes] = field(default_factory=dict)
    #: client ids admitted whose streams Upbit has not verified yet (suspects of a refusal)
    _unverified: set[str] = field(default_factory=set)
    _verified: frozenset[StreamKey] = frozenset()
    #: the size bound of the largest request Upbit verified
    _largest_verified: int = 0
    _probing: str | None = None
    _memo: dict[int, _Filtered] = field(default_factory=dict)
    #: the last admission that served every lease (see :meth:`admit`'s shortcut)
    _last: _LastAdmission | None = None

    @property
    def byte_cap(self) -> int:
        """The largest request (the configured cap, or what a 1009 taught)."""
        if self.learned_bytes is None:
            return self.max_bytes
        return min(self.max_bytes, self.learned_bytes)

    @property
    def union_byte_cap(self) -> int:
        """The largest request the union alone may need."""
        return int(self.byte_cap * UNION_SHARE)

    def next_expiry(self, now: float) -> float | None:
        """When the next quarantine ends (None: none pending)."""
        ends = [s.until for s in self._strikes.values() if s.until > now]
        return min(ends, default=None)

    def expire(self, now: float) -> bool:
        """True (once) when a quarantine ended since the last call: admit again."""
        due = False
        for strikes in self._strikes.values():
            if 0 < strikes.until <= now:
                strikes.until = 0.0  # the strike count stays: the next one waits longer
                due = True
        if due:
            self.version += 1
        return due

    def previously_refused(self, client_ids: Iterable[str]) -> None:
        """A new leader: the leases its predecessor refused queue behind the others."""
        self._demoted = frozenset(client_ids)

    # -- what upstream says -------------------------------------------------------------------

    def markets_listed(self, codes: Iterable[str]) -> None:
        """A fresh market list: unlisted streams get another chance."""
        markets = frozenset(codes)
        if markets == self.markets and not self.unlisted:
            return
        self.markets = markets
        self.unlisted.clear()
        self._memo.clear()
        self.version += 1

    def not_listed(self, keys: Iterable[StreamKey]) -> None:
        """Streams Upbit keeps leaving out of LIST_SUBSCRIPTIONS (see the controller)."""
        before = len(self.unlisted)
        self.unlisted.update(keys)
        if len(self.unlisted) != before:
            self._memo.clear()
            self.version += 1

    def accepted(self, held: SubscriptionSet, request_bytes: int = 0) -> None:
        """Upbit verified a request: it holds ``held`` (the request's size bound was
        ``request_bytes``). The leases whose streams it holds are no suspects any more; a lease
        admitted after that request was sent stays one until a later request is verified."""
        self._verified = held.keys()
        self._largest_verified = max(self._largest_verified, request_bytes)
        cleared = {
            client_id
            for client_id in self._unverified
            if (subs := self._served.get(client_id)) is None or subs.keys() <= self._verified
        }
        if not cleared:
            return
        self._unverified -= cleared
        if self._probing in cleared:
            self._probing = None
        if self._strikes:
            self.version += 1  # the next quarantined lease may be probed

    def too_big(self, request_bytes: int) -> None:
        """Upbit closed with 1009 after a request whose size bound was ``request_bytes``: allow
        three quarters of it, or halfway down to the largest request Upbit verified (again
        after each refusal: the cap converges on what Upbit takes)."""
        self.refusals += 1
        learned = max(MIN_LEARNED_BYTES, request_bytes * 3 // 4)
        if 0 < self._largest_verified < request_bytes:
            learned = max(learned, (self._largest_verified + request_bytes) // 2)
        self.learned_bytes = (
            learned if self.learned_bytes is None else min(self.learned_bytes, learned)
        )
        self.version += 1

    def error_frame(self, why: str, now: float) -> list[str]:
        """Upbit refused the last request with an error frame: quarantine the leases admitted
        since the last verified request (returns their ids, in queue order). With none (the
        request held nothing new), the newest served lease: a refusal always isolates someone,
        so the same request is never sent again and again."""
        self.refusals += 1
        if self._probing is not None:
            suspects = [self._probing]
        else:
            suspects = [c for c in self._served if c in self._unverified]
        if not suspects and self._served:
            suspects = [max(self._served, key=lambda c: self._seen.get(c, 0))]
        for client_id in suspects:
            self._served.pop(client_id, None)  # no longer an incumbent: it waits its turn
            strikes = self._strikes.setdefault(client_id, _Strikes())
            strikes.count += 1
            wait = min(QUARANTINE_MAX, QUARANTINE_FIRST * 2 ** (strikes.count - 1))
            strikes.until = now + wait
            strikes.why = (
                f"Upbit refused the request that added this lease ({why}); retried in {wait:.0f}s"
            )
        self._unverified.clear()
        self._probing = None
        self.version += 1
        return suspects

    # -- admission ----------------------------------------------------------------------------

    def admit(self, leases: Sequence[Lease], now: float, base: SubscriptionSet = EMPTY) -> Admitted:
        """Admit ``leases`` on top of ``base`` (a union held during a grace) under the bounds.

        One pass over the leases' streams (1,000 leases of 10 streams: a few ms): the union,
        its (type, level) groups and its size bound grow as leases are admitted.
        """
        cap_streams, cap_bytes = self.max_streams, self.union_byte_cap
        previous = self._served
        memo, self._memo = self._memo, {}
        filtered = [self._filter(lease, memo) for lease in leases]
        self._queue(filtered)
        seen, demoted = self._seen, self._demoted

        def rank(lease: Lease) -> tuple[bool, bool, int, str]:
            before = previous.get(lease.client_id)
            incumbent = before is not None and (
                before is lease.subscriptions or before == lease.subscriptions
            )
            # Served with the same streams first; then in the order this broker saw them.
            cid = lease.client_id
            return (not incumbent, cid in demoted, seen[cid], cid)

        filtered.sort(key=rank)
        bounds = (self.version, cap_streams, cap_bytes, self.max_bytes)
        client_ids = tuple(lease.client_id for lease in filtered)
        sets = tuple(lease.subscriptions for lease in filtered)
        last = self._last
        if (
            last is not None
            and not self._strikes
            and last.bounds == bounds
            and last.base is base
            and last.client_ids == client_ids
            and all(a is b for a, b in zip(last.sets, sets, strict=True))
        ):
            # The same sets under the same bounds, and last time every lease was served: the
            # union cannot differ (every partial union is within the whole, which fitted, in
            # any order), and no lease would become a suspect (each was served already). Only
            # the queue order is kept fresh (an error frame names its suspects in it).
            # Each heartbeat re-reads a lease: with Upbit's whole market leased, walking its
            # 2,586 streams again on each was ~7% of the broker's CPU (issue 16).
            self._served = dict(zip(client_ids, sets, strict=True))
            return Admitted(last.union, filtered, {}, last.request_bytes)
        depths: dict[StreamKey, int] = dict(base.depths)
        groups = {(key.type, key.level) for key in depths}
        size = request_size_bound(base)
        served: dict[str, SubscriptionSet] = {}
        refused: dict[str, str] = {}
        probe_taken = False
        # One lease may use half of the configured room (not of a cap a 1009 taught: then the
        # union as a whole is what Upbit refused), so no single lease shuts out every newer one.
        lease_cap = int(self.max_bytes * UNION_SHARE) // 2
        for lease in filtered:
            wanted = lease.subscriptions
            client_id = lease.client_id
            before = previous.get(client_id)
            was_served = before is wanted or (before is not None and before == wanted)
            own = self._memo[id(lease.subscriptions)].own_bytes
            if own > lease_cap:
                refused[client_id] = (
                    f"this lease alone needs ~{own} bytes of the subscribe request, more than "
                    f"half of the room for the union ({lease_cap * 2} of max_request_bytes)"
                )
                continue
            strikes = self._strikes.get(client_id)
            probing = False
            if strikes is not None and strikes.count and not was_served:
                if now < strikes.until:
                    refused[client_id] = strikes.why
                    continue
                # Past its quarantine: probe it alone, after the previous request verified.
                if probe_taken or self._unverified - {client_id}:
                    refused[client_id] = strikes.why + " (waiting for its turn to be retried)"
                    continue
                probe_taken = probing = True
            added = extra = 0
            new_groups: set[tuple[str, float]] = set()
            new: list[tuple[StreamKey, int]] = []
            for key, depth in wanted.depths.items():
                have = depths.get(key)
                if have is not None and have >= depth:
                    continue  # shared with what is admitted: free
                new.append((key, depth))
                if have is None:  # a deeper orderbook on a stream already there costs no byte
                    added += 1
                    extra += code_bytes(key.code)
                    group = (key.type, key.level)
                    if group not in groups and group not in new_groups:
                        new_groups.add(group)
                        extra += GROUP_BYTES
            if added and len(depths) + added > cap_streams:
                refused[client_id] = (
                    f"the union is at its cap of {cap_streams} streams (max_union_streams): "
                    f"this lease would add {added}; served when room frees"
                )
                continue
            if extra and size + extra > cap_bytes:
                refused[client_id] = (
                    f"the subscribe request would reach ~{size + extra} bytes, over the cap of "
                    f"{cap_bytes} ({self._bytes_cap_source()}); served when room frees"
                )
                continue
            depths.update(new)
            groups |= new_groups
            size += extra
            served[client_id] = wanted
            if was_served or wanted.keys() <= self._verified:
                continue  # nothing Upbit has not taken already: no suspect, no probe to wait for
            self._unverified.add(client_id)
            if probing:
                self._probing = client_id
        self._served = served
        self._unverified &= served.keys()
        if self._probing is not None and self._probing not in served:
            self._probing = None
        self._prune(now)
        union = SubscriptionSet(depths)
        self._last = (
            _LastAdmission(bounds, client_ids, sets, base, union, size) if not refused else None
        )
        return Admitted(union, filtered, refused, size)

    # -- rules --------------------------------------------------------------------------------

    def _queue(self, leases: list[Lease]) -> None:
        """Give each client id seen for the first time its place (by ``created_ms`` among those
        that arrive together, e.g. every lease when a new leader starts); forget the others."""
        live = {lease.client_id for lease in leases}
        seen = {cid: n for cid, n in self._seen.items() if cid in live}
        for lease in sorted(leases, key=lambda lease: (lease.created_ms, lease.client_id)):
            if lease.client_id not in seen:
                self._seen_count += 1
                seen[lease.client_id] = self._seen_count
        self._seen = seen

    def _prune(self, now: float) -> None:
        """Forget the strikes of leases gone for longer than any quarantine (bounded memory;
        a lease that comes back sooner keeps its count)."""
        if len(self._strikes) <= len(self._seen):
            return
        self._strikes = {
            cid: s
            for cid, s in self._strikes.items()
            if cid in self._seen or s.until > now - QUARANTINE_MAX
        }

    def _filter(self, lease: Lease, memo: dict[int, _Filtered]) -> Lease:
        """``lease`` without the codes Upbit does not know (moved to ``rejected``). The memo
        keeps only the live leases' entries (rebuilt every admission from the last one)."""
        subs = lease.subscriptions
        entry = memo.get(id(subs))
        if entry is None or entry.subs is not subs:
            markets, unlisted = self.markets, self.unlisted
            keep: list[StreamKey] = []
            rejected: list[Rejected] = []
            for key in subs.depths:
                if markets is not None and key.code not in markets:
                    rejected.append(Rejected(_stream_name(key), key.code, UNKNOWN_MARKET))
                elif key in unlisted:
                    rejected.append(Rejected(_stream_name(key), key.code, UNLISTED))
                else:
                    keep.append(key)
            kept = subs if not rejected else restrict(subs, keep)
            entry = _Filtered(
                subs,
                kept,
                tuple(sorted(rejected, key=lambda r: (r.stream, r.code))),
                request_size_bound(kept) - BASE_BYTES,
            )
        self._memo[id(subs)] = entry
        if entry.kept is not subs:
            self._memo[id(entry.kept)] = entry
        if not entry.rejected:
            return lease
        return replace(lease, subscriptions=entry.kept, rejected=lease.rejected + entry.rejected)

    def _bytes_cap_source(self) -> str:
        if self.learned_bytes is not None and self.learned_bytes < self.max_bytes:
            return "learned from Upbit closing a larger request with 1009"
        return "max_request_bytes"


def _stream_name(key: StreamKey) -> str:
    """The ``subs`` key of a stream: ``ticker``, ``orderbook@10000``."""
    return next(iter(SubscriptionSet({key: 30}).by_type()))


__all__ = [
    "MIN_LEARNED_BYTES",
    "QUARANTINE_FIRST",
    "QUARANTINE_MAX",
    "UNION_SHARE",
    "UNKNOWN_MARKET",
    "UNLISTED",
    "Admitted",
    "Refusal",
    "UnionAdmission",
]
