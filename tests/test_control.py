"""The subscription controller, driven without sockets or an event loop."""

from __future__ import annotations

import itertools
import json

import pytest

from broker.core.control import TEXT_PING, VERIFY_DELAY, SubscriptionController
from broker.upbit.types import SubscriptionSet


def sset(**streams: list[str]) -> SubscriptionSet:
    return SubscriptionSet.of(streams)


def body(message: bytes | str) -> list[dict[str, object]]:
    assert isinstance(message, bytes)
    out = json.loads(message)
    assert isinstance(out, list)
    return out


def type_objects(message: bytes | str) -> list[dict[str, object]]:
    return [o for o in body(message) if "type" in o]


def connected(**kw: object) -> SubscriptionController:
    c = SubscriptionController(coalesce_delay=0.05, **kw)  # type: ignore[arg-type]
    c.connection_opened(0.0)
    return c


def test_nothing_sent_before_connection() -> None:
    c = SubscriptionController()
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    assert c.data_to_send(10.0) == []
    assert c.next_wakeup(10.0) is None


def test_first_send_is_the_full_set_then_keepalive_ping() -> None:
    c = connected()
    c.set_desired(sset(ticker=["KRW-ETH", "KRW-BTC"], trade=["KRW-BTC"]), 0.0)
    first = c.data_to_send(0.1)
    assert len(first) == 1
    objs = type_objects(first[0])
    assert objs == [
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"type": "trade", "codes": ["KRW-BTC"]},
    ]
    assert body(first[0])[-1] == {"format": "DEFAULT"}
    assert c.data_to_send(0.2) == [TEXT_PING]
    assert c.upstream == sset(ticker=["KRW-BTC", "KRW-ETH"], trade=["KRW-BTC"])


def test_burst_of_changes_coalesces_into_one_request_with_the_latest_union() -> None:
    c = connected()
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 0.01)
    c.set_desired(sset(ticker=["KRW-ETH", "KRW-XRP"]), 0.02)
    assert c.data_to_send(0.03) == []  # still inside the coalescing window
    sent = c.data_to_send(0.06)
    assert len(sent) == 1
    assert type_objects(sent[0]) == [{"type": "ticker", "codes": ["KRW-ETH", "KRW-XRP"]}]


def test_a_caller_that_already_coalesced_is_not_held_back_by_a_second_window() -> None:
    c = connected()
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.data_to_send(0.06)  # the first set goes out; the next change starts a new window
    # The broker heard of a lease change at 1.00, gathered writes for 50 ms, then computed
    # the union at 1.06: the window counts from 1.00, so the request goes out at once.
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 1.06, noticed_at=1.0)
    assert [m for m in c.data_to_send(1.06) if m != TEXT_PING] != []
    # Without noticed_at the window counts from the call.
    d = connected()
    d.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    d.data_to_send(0.06)
    d.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 1.06)
    assert [m for m in d.data_to_send(1.06) if m != TEXT_PING] == []


def test_streams_already_flowing_are_resent_realtime_only() -> None:
    c = connected(verify=False)
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.data_to_send(1.0)
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 2.0)
    (req,) = [m for m in c.data_to_send(3.0) if m != TEXT_PING]
    assert type_objects(req) == [
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"type": "ticker", "codes": ["KRW-ETH"]},
    ]


def test_rate_budget_is_never_exceeded_under_churn() -> None:
    c = connected(per_second=4, per_minute=90, verify=False)
    sends: list[float] = []
    t = 0.0
    for i in range(6000):  # 100 changes a second for 60 s
        t = i * 0.01
        c.set_desired(sset(ticker=[f"KRW-C{i % 50}", "KRW-BTC"]), t)
        for m in c.data_to_send(t):
            sends.append(t)
            del m
    for i, at in enumerate(sends):
        assert sum(1 for s in sends[i:] if s < at + 1.0) <= 4
        assert sum(1 for s in sends[i:] if s < at + 60.0) <= 90
    # The latest union wins once the budget allows.
    final = sset(ticker=["KRW-BTC", "KRW-LAST"])
    c.set_desired(final, t)
    while c.upstream != final:
        t += 0.1
        c.data_to_send(t)
        assert t < 200
    assert c.upstream == final


def test_shrinking_to_nothing_asks_for_a_fresh_connection() -> None:
    c = connected()
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.data_to_send(1.0)
    c.set_desired(SubscriptionSet(), 2.0)
    assert c.wants_fresh_connection
    assert all(m == TEXT_PING or b"LIST" in m for m in c.data_to_send(3.0))  # type: ignore[operator]
    c.connection_closed(3.0)
    c.connection_opened(3.0)
    assert not c.wants_fresh_connection
    assert c.data_to_send(3.1) == [TEXT_PING]


def test_snapshot_rides_along_without_breaking_realtime_streams() -> None:
    c = connected(verify=False)
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.data_to_send(1.0)
    c.request_snapshot(sset(ticker=["KRW-ETH"]), 2.0)
    (req,) = [m for m in c.data_to_send(3.0) if m != TEXT_PING]
    assert type_objects(req) == [
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"type": "ticker", "codes": ["KRW-ETH"], "is_only_snapshot": True},
    ]
    assert c.upstream == sset(ticker=["KRW-BTC"])
    assert {k.code for k in c.routable} == {"KRW-BTC", "KRW-ETH"}


def test_snapshot_of_a_streaming_code_refreshes_it_with_a_snapshot() -> None:
    c = connected(verify=False)
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 0.0)
    c.data_to_send(1.0)
    c.request_snapshot(sset(ticker=["KRW-ETH"]), 2.0)
    (req,) = [m for m in c.data_to_send(3.0) if m != TEXT_PING]
    assert type_objects(req) == [
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"type": "ticker", "codes": ["KRW-ETH"]},
    ]


@pytest.mark.parametrize(
    ("listed", "ok"),
    [
        (sset(ticker=["KRW-BTC", "KRW-ETH"]), True),
        (sset(ticker=["KRW-BTC"]), False),
        (sset(ticker=["KRW-BTC", "KRW-ETH", "KRW-XRP"]), False),
    ],
)
def test_list_subscriptions_verifies_and_resends_on_mismatch(
    listed: SubscriptionSet, ok: bool
) -> None:
    c = connected()
    c.force_resubscribe("req-1", 0.0)
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-ETH"]), 0.0)
    c.data_to_send(1.0)
    t = 1.0 + VERIFY_DELAY
    out = c.data_to_send(t) + c.data_to_send(t + 1.0)
    assert any(isinstance(m, bytes) and b"LIST_SUBSCRIPTIONS" in m for m in out)
    assert c.list_reply(listed, t + 1.1) is ok
    if ok:
        assert c.confirmations() == ["req-1"]
        assert c.data_to_send(t + 2) == []
    else:
        assert c.confirmations() == []
        assert c.stats.verify_mismatches == 1
        resent = c.data_to_send(t + 2)
        assert any(isinstance(m, bytes) and b'"type"' in m for m in resent)


def test_new_connection_restores_the_full_union_with_snapshots() -> None:
    c = connected(verify=False)
    c.set_desired(sset(ticker=["KRW-BTC"], orderbook=["KRW-ETH.15"]), 0.0)
    c.data_to_send(1.0)
    c.connection_closed(2.0)
    assert c.data_to_send(2.5) == []
    c.connection_opened(3.0)
    (req,) = c.data_to_send(3.0)
    assert type_objects(req) == [
        {"type": "orderbook", "codes": ["KRW-ETH.15"]},
        {"type": "ticker", "codes": ["KRW-BTC"]},
    ]


def test_resubscribe_with_nothing_wanted_is_confirmed_at_once() -> None:
    c = connected()
    c.force_resubscribe("r-empty", 0.0)
    c.data_to_send(0.1)
    assert c.confirmations() == ["r-empty"]


def test_sustained_churn_is_paced_across_the_minute() -> None:
    """90/min spent in a burst would leave a lease change waiting ~40 s; paced, ~1 s."""
    c = connected(per_second=4, per_minute=90, verify=False)
    sends: list[float] = []
    for i in range(12_000):  # 100 changes a second for 120 s
        t = i * 0.01
        c.set_desired(sset(ticker=[f"KRW-C{i % 50}"]), t)
        sends.extend(t for m in c.data_to_send(t) if m != TEXT_PING)
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert max(gaps) < 1.5, max(gaps)
    for i, at in enumerate(sends):
        assert sum(1 for s in sends[i:] if s < at + 60.0) <= 90


def test_a_send_waiting_for_the_pacer_never_busy_loops() -> None:
    """While the set waits for the budget, the keepalive must not ask for an instant wake-up."""
    c = connected(per_second=4, per_minute=90, verify=False)
    t = 0.0
    for i in range(400):  # spend the pacer's burst
        t = i * 0.01
        c.set_desired(sset(ticker=[f"KRW-C{i % 50}"]), t)
        c.data_to_send(t)
    c.set_desired(sset(ticker=["KRW-LAST"]), t)
    wakeups = 0
    while c.upstream != sset(ticker=["KRW-LAST"]):
        wake = c.next_wakeup(t)
        assert wake is not None and wake > t - 1e-6
        t = max(wake, t + 1e-6)
        c.data_to_send(t)
        wakeups += 1
        assert wakeups < 20, "the controller asked to be woken again and again"
