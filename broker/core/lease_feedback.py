"""What each lease holder is told about its own lease (pure: no I/O).

A consumer whose lease is rejected, trimmed or expired would otherwise only meet silence. The
leader keeps the last state it announced for each client id and, after every lease read,
publishes one ``lease`` event on ``{ns}:events`` per change (design.md, "Events"; the states
are ``broker.contract.LEASE_STATES``):

    {"event":"lease","client_id":ID,"state":"invalid|partial|refused|expired|ok","why":TEXT,
     "rejected":{stream:[codes]},"rejected_count":N,"broker":BROKER,"ts_ms":T}

* ``partial``: some entries of ``subs`` are served, the others (``rejected``) are not.
* ``invalid``: nothing of the lease is served (``why`` says what is wrong with it).
* ``refused``: a valid lease not served for now: it would push the union over its bounds, or
  Upbit refused the request that added it (``broker.core.admission``; ``why`` says which).
* ``expired``: the lease was not renewed before its deadline (or vanished without a release).
* ``ok``: a lease that was announced in one of the states above is fully served again.

A lease that is fine from the start, and a release, produce no event. A new leader starts
with no memory, so it announces every partial or invalid lease once when it takes over.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.contract import LeaseEvent

# The pure half of broker.leases (the lease values and how rejected entries are described);
# that module also holds the Redis store, so importing it brings redis along.
from broker.core.lease import describe_rejected, rejected_by_type
from broker.errors import ConfigError
from broker.keys import validate_name

if TYPE_CHECKING:
    from broker.core.lease import Lease, Rejected

OK = "ok"
PARTIAL = "partial"
INVALID = "invalid"
REFUSED = "refused"
EXPIRED = "expired"
#: rejected entries one event lists (``rejected_count`` has them all)
MAX_REJECTED_IN_EVENT = 50

_EXPIRED_WHY = "not renewed before its deadline; renew every ttl_ms/3 (the heartbeat)"
_VANISHED_WHY = "the lease disappeared without a release (it expired, or was deleted)"
_OK_WHY = "every entry is served"


class LeaseView(Protocol):
    """Every lease as now known: ``broker.leases.LeaseListing``, or the leader's own view
    between two listings."""

    @property
    def leases(self) -> Sequence[Lease]: ...

    @property
    def invalid(self) -> Sequence[tuple[str, str]]: ...

    @property
    def expired(self) -> Sequence[str]: ...

    @property
    def refused(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class LeaseState:
    """What was (or is to be) announced about one lease."""

    state: str
    why: str = ""
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """One announcement: ``client_id`` is now in ``state`` (it was in ``previous``)."""

    client_id: str
    state: str
    why: str
    rejected: tuple[Rejected, ...] = ()
    previous: str | None = None

    @property
    def has_holder(self) -> bool:
        """False for a garbage index member or key name: nobody to tell (log it only)."""
        return _is_client_id(self.client_id)

    def event(self, broker: str, ts_ms: int) -> LeaseEvent:
        """The event published on ``{ns}:events`` (``broker.contract.LeaseEvent``)."""
        if not self.rejected:
            return LeaseEvent(
                client_id=self.client_id, state=self.state, why=self.why, broker=broker, ts_ms=ts_ms
            )
        return LeaseEvent(
            client_id=self.client_id,
            state=self.state,
            why=self.why,
            rejected=rejected_by_type(self.rejected[:MAX_REJECTED_IN_EVENT]),
            rejected_count=len(self.rejected),
            broker=broker,
            ts_ms=ts_ms,
        )


def _partial_why(served: int, rejected: tuple[Rejected, ...]) -> str:
    return (
        f"serving {served} stream{'s' * (served != 1)}, rejected {len(rejected)} "
        f"entr{'ies' if len(rejected) != 1 else 'y'}: {describe_rejected(rejected)}"
    )


def _is_client_id(value: str) -> bool:
    try:
        validate_name(value, "client id")
    except ConfigError:
        return False
    return True


class LeaseFeedback:
    """The states announced so far; :meth:`update` returns what changed since."""

    def __init__(self) -> None:
        self._states: dict[str, LeaseState] = {}

    def state_of(self, client_id: str) -> str | None:
        """The state last seen for ``client_id`` (None: never seen, or forgotten)."""
        known = self._states.get(client_id)
        return known.state if known is not None else None

    def reset(self) -> None:
        """Forget everything: the next :meth:`update` announces every non-ok lease again
        (after announcements may have been lost, e.g. a failed PUBLISH)."""
        self._states.clear()

    def update(
        self, listing: LeaseView, *, named: Collection[str] = (), quiet: bool = False
    ) -> list[LeaseChange]:
        """Fold in a complete view of the leases; return the changes to announce, by client id.

        Args:
            listing: every lease as now known (valid, invalid, expired).
            named: client ids named on the control channel since the last update: one that
                vanished was released (or re-written), which is no news to its holder.
            quiet: vanished leases are forgotten without a word (Redis lost its data: every
                holder re-asserts its lease within a heartbeat).
        """
        current: dict[str, LeaseState] = {}
        refused = listing.refused
        for lease in listing.leases:
            why = refused.get(lease.client_id)
            if why is not None:
                current[lease.client_id] = LeaseState(REFUSED, why)
            elif lease.rejected:
                why = _partial_why(len(lease.subscriptions), lease.rejected)
                current[lease.client_id] = LeaseState(PARTIAL, why, lease.rejected)
            else:
                current[lease.client_id] = LeaseState(OK)
        for client_id, reason in listing.invalid:
            current[client_id] = LeaseState(INVALID, reason)
        for client_id in listing.expired:
            current[client_id] = LeaseState(EXPIRED, _EXPIRED_WHY)

        changes: list[LeaseChange] = []
        for client_id, now in current.items():
            old = self._states.get(client_id)
            if old == now:
                continue
            if now.state == OK and (old is None or old.state == OK):
                continue  # fine from the start: nothing to say
            why = _OK_WHY if now.state == OK else now.why
            previous = old.state if old is not None else None
            changes.append(LeaseChange(client_id, now.state, why, now.rejected, previous))
        for client_id, old in self._states.items():
            if client_id in current or quiet or client_id in named or old.state == EXPIRED:
                continue
            changes.append(LeaseChange(client_id, EXPIRED, _VANISHED_WHY, previous=old.state))
        self._states = current
        changes.sort(key=lambda change: change.client_id)
        return changes


def log_changes(changes: Sequence[LeaseChange], log: logging.Logger) -> int:
    """Log each change of a lease's state (a warning for what is not served, expiries in one
    line); returns how many leases expired."""
    expired = [change.client_id for change in changes if change.state == EXPIRED]
    for change in changes:
        if change.state == INVALID:
            log.warning("skipped invalid lease %s: %s", change.client_id, change.why)
        elif change.state == PARTIAL:
            log.warning("lease %s served in part: %s", change.client_id, change.why)
        elif change.state == REFUSED:
            log.warning("lease %s refused: %s", change.client_id, change.why)
        elif change.state != EXPIRED:
            log.info("lease %s is fully served again", change.client_id)
    if expired:
        log.info(
            "leases expired: %s",
            ", ".join(expired),
            extra={"event": "lease_expired", "client_ids": expired},
        )
    return len(expired)


__all__ = [
    "EXPIRED",
    "INVALID",
    "MAX_REJECTED_IN_EVENT",
    "OK",
    "PARTIAL",
    "REFUSED",
    "LeaseChange",
    "LeaseFeedback",
    "LeaseState",
    "LeaseView",
    "log_changes",
]
