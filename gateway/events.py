"""Which broker gap events the gateway acts on (gateway layer, pure: fed events and the status).

Anyone who may publish on ``{ns}:events`` could forge a gap, and a gap makes the gateway re-send
snapshots to (or close) every client: so, as the consumer library does (design.md "Who may
publish events"), a gap is believed only from the broker that ``{ns}:status`` names as leader,
with an epoch that never goes back. A gap naming another broker is judged again after the status
was re-read (a new leader announces its takeover gap as it starts). A gap's follow-up (it carries
``state``: the back-fill of the history) reports no new loss and is skipped.
"""

from __future__ import annotations

from enum import Enum

from broker.contract import GapEvent


class Verdict(Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    #: re-read the status, then :meth:`GapGate.settle`
    CHECK = "check"


class GapGate:
    """The leader the status names, and the highest epoch of a gap believed."""

    def __init__(self) -> None:
        self.leader: str | None = None
        self.epoch: int | None = None
        self.rejected = 0

    def status_read(self, leader: str | None) -> None:
        """The status's ``leader`` as just read (``None`` or ``""``: no leader named)."""
        self.leader = leader or None

    def judge(self, event: GapEvent) -> Verdict:
        """What to do with a gap event now."""
        if isinstance(event.state, str):
            return Verdict.REJECT  # a follow-up: nothing new was lost
        if not event.broker:
            self.rejected += 1
            return Verdict.REJECT
        if event.broker != self.leader:
            return Verdict.CHECK
        return self._epoch_rule(event)

    def settle(self, event: GapEvent) -> Verdict:
        """The verdict once the status was re-read."""
        if not event.broker or event.broker != self.leader:
            self.rejected += 1
            return Verdict.REJECT
        return self._epoch_rule(event)

    def _epoch_rule(self, event: GapEvent) -> Verdict:
        if event.epoch is not None:
            if self.epoch is not None and event.epoch < self.epoch:
                self.rejected += 1
                return Verdict.REJECT
            self.epoch = event.epoch
        return Verdict.ACCEPT

    def reconnected(self) -> None:
        """Our pub/sub connection broke: Redis may have restarted empty (epochs restart)."""
        self.epoch = None


__all__ = ["GapGate", "Verdict"]
