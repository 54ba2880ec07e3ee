"""Which events readers believe (``broker.event_gate``): the leader's only, epochs never going
back; the rule the consumer library and the gateway share (pure, no event loop)."""

from __future__ import annotations

from typing import Any

from broker.contract import ConnectedEvent, GapEvent, LeaderEvent, LeaseEvent
from broker.event_gate import EventGate, Verdict
from tests.support.imports import IO_AND_OUTER_LAYERS, modules_loaded_by


def gap(broker: str | None, epoch: int | None = 3, **extra: Any) -> GapEvent:
    return GapEvent(broker=broker, epoch=epoch, since_ms=1, until_ms=2, reason="reconnect", **extra)


def test_only_the_leaders_gaps_are_believed() -> None:
    gate = EventGate()
    assert gate.judge(gap("b1"))[0] is Verdict.CHECK  # no status read yet
    gate.status_read("b1")
    assert gate.judge(gap("b1", 3)) == (Verdict.ACCEPT, "")
    verdict, why = gate.judge(gap("b1", 2))  # an older epoch: replayed or forged
    assert verdict is Verdict.REJECT and why == "epoch 2 is older than 3, already seen"
    assert gate.judge(gap(None)) == (Verdict.REJECT, "it names no broker")
    assert gate.judge(gap("b2", 4))[0] is Verdict.CHECK
    verdict, why = gate.settle(gap("b2", 4))
    assert verdict is Verdict.REJECT and "the status names b1" in why
    gate.status_read("b2")  # a takeover
    assert gate.settle(gap("b2", 4))[0] is Verdict.ACCEPT
    gate.reconnected()  # Redis may have restarted empty: epochs start again
    assert gate.judge(gap("b2", 1))[0] is Verdict.ACCEPT


def test_a_follow_up_is_the_leaders_but_moves_no_epoch_floor() -> None:
    gate = EventGate()
    gate.status_read("b1")
    assert gate.judge(gap("b1", 5))[0] is Verdict.ACCEPT
    assert gate.judge(gap("b1", 4, state="filled"))[0] is Verdict.ACCEPT  # of an older gap
    assert gate.epoch == 5
    assert gate.judge(gap("b2", 6, state="filled"))[0] is Verdict.CHECK  # still the leader's only


def test_connected_events_count_epochs_and_a_leader_event_is_always_checked() -> None:
    gate = EventGate()
    gate.status_read("b1", "tok", 7)
    connected = ConnectedEvent(broker="b1", epoch=7)
    assert gate.judge(connected)[0] is Verdict.ACCEPT
    assert gate.judge(ConnectedEvent(broker="b1", epoch=6))[0] is Verdict.REJECT
    assert gate.judge(LeaderEvent(broker="b1"))[0] is Verdict.CHECK  # a takeover to confirm
    lease = LeaseEvent(broker="b1", client_id="c1", state="ok")
    assert gate.judge(lease) == (Verdict.ACCEPT, "")  # no epoch: the leader's word is enough
    assert gate.token == "tok"


def test_a_status_epoch_below_the_floor_restarts_it() -> None:
    gate = EventGate()
    gate.status_read("b1", None, 9)
    assert gate.judge(gap("b1", 9))[0] is Verdict.ACCEPT
    gate.status_read("b1", None, 1)  # Redis lost its epoch counter (restarted empty)
    assert gate.judge(gap("b1", 2))[0] is Verdict.ACCEPT
    gate.status_read("", None, None)  # no leader named
    assert gate.leader is None and gate.judge(gap("b1", 3))[0] is Verdict.CHECK


def test_verdicts_read_as_the_strings_the_consumer_library_compares() -> None:
    assert (Verdict.ACCEPT, Verdict.REJECT, Verdict.CHECK) == ("accept", "reject", "check")


def test_the_gate_is_pure() -> None:
    loaded = modules_loaded_by("import broker.event_gate")
    outer = sorted(m for m in loaded if m.split(".")[0] in (*IO_AND_OUTER_LAYERS, "gateway"))
    assert outer == []
