"""Which events on ``{ns}:events`` a reader believes: the leader's only (pure: fed the status
and the events, no I/O).

Anyone who may publish on ``{ns}:events`` could forge an event, and a gap makes every reader
resynchronise (the consumer library reports it, the gateway re-sends snapshots to or closes
every client). So (design.md "Who may publish events") an event is believed only from the
broker that ``{ns}:status`` names as ``leader``, and a ``gap`` or ``connected`` event only with
an ``epoch`` not lower than the highest believed so far. An event naming another broker is
judged again once the status was re-read: a new leader announces its takeover as it starts,
before a reader has read its name.

The consumer library and the gateway both read events through :class:`EventGate`; what each
then does with a believed one is its own business (the gateway skips a gap's follow-up, which
reports no new loss).
"""

from __future__ import annotations

from enum import StrEnum

from broker.contract import ConnectedEvent, Event, GapEvent, LeaderEvent


class Verdict(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    #: re-read the status, then :meth:`EventGate.settle`
    CHECK = "check"


class EventGate:
    """The leader the status names, and the highest epoch of an event believed."""

    def __init__(self) -> None:
        #: the leader the status named at the last read (None: not read yet, or no status)
        self.leader: str | None = None
        self.token: str | None = None
        #: the highest epoch accepted (None: none yet)
        self.epoch: int | None = None

    def judge(self, event: Event) -> tuple[Verdict, str]:
        """``(verdict, why)`` for an event now; :attr:`Verdict.CHECK`: re-read the status
        first (a ``leader`` event always asks for it), then :meth:`settle`."""
        if not event.broker:
            return Verdict.REJECT, "it names no broker"
        if isinstance(event, LeaderEvent) or event.broker != self.leader:
            return Verdict.CHECK, f"broker {event.broker!r} is not the leader the status names"
        return self._epoch_rule(event)

    def settle(self, event: Event) -> tuple[Verdict, str]:
        """The verdict after the status was re-read: accept only what it names as leader."""
        if not event.broker or event.broker != self.leader:
            return Verdict.REJECT, (
                f"broker {event.broker!r} is not the leader "
                f"(the status names {self.leader or 'none'})"
            )
        return self._epoch_rule(event)

    def _epoch_rule(self, event: Event) -> tuple[Verdict, str]:
        if isinstance(event, GapEvent) and isinstance(event.state, str):
            # A gap's follow-up names the epoch of the gap it follows up, which may be older
            # than connections announced since: it is accepted, and moves no floor.
            return Verdict.ACCEPT, ""
        if isinstance(event, GapEvent | ConnectedEvent) and event.epoch is not None:
            if self.epoch is not None and event.epoch < self.epoch:
                return (
                    Verdict.REJECT,
                    f"epoch {event.epoch} is older than {self.epoch}, already seen",
                )
            self.epoch = event.epoch
        return Verdict.ACCEPT, ""

    def status_read(
        self, leader: str | None, token: str | None = None, epoch: int | None = None
    ) -> None:
        """The status's ``leader`` (``None`` or ``""``: none named), ``leader_token`` and
        ``epoch`` as just read."""
        self.leader = leader or None
        self.token = token
        if epoch is not None and self.epoch is not None and epoch < self.epoch:
            self.epoch = epoch  # Redis lost its epoch counter (restarted empty): start again

    def reconnected(self) -> None:
        """Our pub/sub connection broke: Redis may have restarted empty (epochs restart)."""
        self.epoch = None


__all__ = ["EventGate", "Verdict"]
