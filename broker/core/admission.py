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
from broker.upbit.requests import GROUP_BYTES, code_bytes, request_size_bound
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
    _served: dict[str, SubscriptionSet] = field(default_factory=dict)
    _strikes: dict[str, _Strikes] = field(default_factory=dict)
    #: client ids admitted (or probing) since the last request Upbit accepted
    _unverified: set[str] = field(default_factory=set)
    _probing: str | None = None
    _filtered: dict[int, tuple[SubscriptionSet, SubscriptionSet, tuple[Rejected, ...]]] = field(
        default_factory=dict
    )
    #: requests Upbit refused (1009 or an error frame)
    refusals: int = 0
    #: bumped by every change of the bounds: an admission with the same leases may differ
    version: int = 0

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
        due = any(0 < s.until <= now for s in self._strikes.values())
        for strikes in self._strikes.values():
            if 0 < strikes.until <= now:
                strikes.until = 0.0  # the strike count stays: the next one waits longer
        if due:
            self.version += 1
        return due

    # -- what upstream says -------------------------------------------------------------------

    def markets_listed(self, codes: Iterable[str]) -> None:
        """A fresh market list: unlisted streams get another chance."""
        markets = frozenset(codes)
        if markets == self.markets and not self.unlisted:
            return
        self.markets = markets
        self.unlisted.clear()
        self._filtered.clear()
        self.version += 1

    def not_listed(self, keys: Iterable[StreamKey]) -> None:
        """Streams Upbit keeps leaving out of LIST_SUBSCRIPTIONS (see the controller)."""
        before = len(self.unlisted)
        self.unlisted.update(keys)
        if len(self.unlisted) != before:
            self._filtered.clear()
            self.version += 1

    def accepted(self) -> None:
        """Upbit verified the last request: what was admitted is safe."""
        if self._probing is not None:
            self.version += 1  # the next quarantined lease may be probed
        self._unverified.clear()
        self._probing = None

    def too_big(self, request_bytes: int) -> None:
        """Upbit closed with 1009 after a request of ``request_bytes``: allow three quarters
        of it (again after each refusal: the cap converges on what Upbit takes)."""
        self.refusals += 1
        learned = max(MIN_LEARNED_BYTES, request_bytes * 3 // 4)
        self.learned_bytes = (
            learned if self.learned_bytes is None else min(self.learned_bytes, learned)
        )
        self.version += 1

    def error_frame(self, why: str, now: float) -> list[str]:
        """Upbit refused the last request with an error frame: quarantine the leases admitted
        since the last accepted request (returns their ids, oldest first)."""
        self.refusals += 1
        suspects = [c for c in self._served if c in self._unverified]
        if self._probing is not None:
            suspects = [self._probing]
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
        filtered = [self._filter(lease) for lease in leases]
        # Served with the very same streams first (the parse and filter memos keep the set
        # object of an unchanged lease), then the oldest.
        filtered.sort(
            key=lambda lease: (
                previous.get(lease.client_id) is not lease.subscriptions,
                lease.created_ms,
                lease.client_id,
            )
        )
        depths: dict[StreamKey, int] = dict(base.depths)
        groups = {(key.type, key.level) for key in depths}
        size = request_size_bound(base)
        served: dict[str, SubscriptionSet] = {}
        refused: dict[str, str] = {}
        probe_taken = False
        for lease in filtered:
            wanted = lease.subscriptions
            client_id = lease.client_id
            before = previous.get(client_id)
            was_served = before is wanted or (before is not None and before == wanted)
            strikes = self._strikes.get(client_id)
            if strikes is not None and strikes.count and not was_served:
                if now < strikes.until:
                    refused[client_id] = strikes.why
                    continue
                # Past its quarantine: probe it alone, after the previous request verified.
                if probe_taken or (self._unverified and self._probing != client_id):
                    refused[client_id] = strikes.why + " (waiting for its turn to be retried)"
                    continue
                probe_taken = True
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
            if not was_served:
                self._unverified.add(client_id)
                if strikes is not None and strikes.count:
                    self._probing = client_id
        self._served = served
        return Admitted(SubscriptionSet(depths), filtered, refused, size)

    # -- rules --------------------------------------------------------------------------------

    def _filter(self, lease: Lease) -> Lease:
        """``lease`` without the codes Upbit does not know (moved to ``rejected``)."""
        if self.markets is None and not self.unlisted:
            return lease
        subs = lease.subscriptions
        memo = self._filtered.get(id(subs))
        if memo is None or memo[0] is not subs:
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
            memo = (subs, kept, tuple(sorted(rejected, key=lambda r: (r.stream, r.code))))
            self._filtered[id(subs)] = memo
        _, kept, rejected_entries = memo
        if not rejected_entries:
            return lease
        return replace(lease, subscriptions=kept, rejected=lease.rejected + rejected_entries)

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
