"""The per-connection message budget: sliding windows of one second and one minute."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.upbit.ratelimit import RateBudget


def test_refuses_an_empty_budget() -> None:
    with pytest.raises(ValueError):
        RateBudget(per_second=0)
    with pytest.raises(ValueError):
        RateBudget(per_minute=0)


def test_per_second_window() -> None:
    budget = RateBudget(per_second=4, per_minute=90)
    for t in (0.0, 0.1, 0.2, 0.3):
        assert budget.allows(t)
        budget.record(t)
    assert not budget.allows(0.3)
    assert budget.next_allowed(0.5) == 1.0  # the send at 0.0 leaves the window
    assert not budget.allows(0.999)
    assert budget.allows(1.0)
    budget.record(1.0)
    assert budget.next_allowed(1.0) == 1.1
    assert budget.sent_within(1.0, 1.0) == 4


def test_per_minute_window() -> None:
    budget = RateBudget(per_second=100, per_minute=3)
    for t in (0.0, 10.0, 20.0):
        budget.record(t)
    assert budget.next_allowed(21.0) == 60.0
    assert not budget.allows(59.5)
    assert budget.allows(60.0)
    budget.record(60.0)
    assert budget.next_allowed(60.0) == 70.0


def test_both_windows_take_the_later_time() -> None:
    budget = RateBudget(per_second=2, per_minute=3)
    for t in (0.0, 59.5, 59.6):
        budget.record(t)
    # the second window frees at 60.5, the minute window at 60.0: the later one wins
    assert budget.next_allowed(59.7) == pytest.approx(60.5)


def test_next_allowed_is_never_in_the_past() -> None:
    budget = RateBudget()
    assert budget.next_allowed(123.0) == 123.0
    budget.record(123.0)
    assert budget.next_allowed(500.0) == 500.0


def test_old_sends_are_forgotten_when_recording() -> None:
    budget = RateBudget(per_second=1000, per_minute=1000)
    for i in range(10_000):
        budget.record(float(i))
    assert len(budget._sent) <= 61
    assert budget.sent_within(9999.0, 60.0) == 60


# Times on a 1/64 s grid are exact in binary floating point, so window edges are exact too.
GAPS = st.lists(st.integers(0, 128).map(lambda n: n / 64), min_size=1, max_size=150)


@settings(max_examples=100, deadline=None)
@given(GAPS, st.integers(1, 6), st.integers(1, 20))
def test_sending_when_allowed_never_exceeds_a_window(
    gaps: list[float], per_second: int, per_minute: int
) -> None:
    budget = RateBudget(per_second=per_second, per_minute=per_minute)
    sent: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        at = budget.next_allowed(now)
        assert at >= now
        assert budget.allows(at)
        budget.record(at)
        sent.append(at)
        now = at
    for t in sent:
        assert sum(1 for u in sent if t <= u < t + 1.0) <= per_second
        assert sum(1 for u in sent if t <= u < t + 60.0) <= per_minute
