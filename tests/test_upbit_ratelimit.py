"""The per-connection message budget (sliding windows of one second and one minute) and the
per-client REST limit the simulator and the gateway apply."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.upbit.ratelimit import NO_LIMIT_SEC, ClientLimiter, RateBudget, remaining_req


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


# -- the per-client REST limit (simulator, gateway) --------------------------------------------


def test_client_limiter_is_ten_a_second_per_ip_and_group() -> None:
    limiter = ClientLimiter()
    assert [limiter.take("1.2.3.4", "trade", i * 0.01) for i in range(10)] == list(range(9, -1, -1))
    assert limiter.take("1.2.3.4", "trade", 0.5) is None  # the 11th within the second
    assert limiter.take("1.2.3.4", "trade", 0.6) is None  # a refusal is not counted...
    assert limiter.take("1.2.3.4", "candle", 0.6) == 9  # another group
    assert limiter.take("5.6.7.8", "trade", 0.6) == 9  # another IP
    assert limiter.take("1.2.3.4", "trade", 1.0) == 0  # ...the first left the window
    assert limiter.take("1.2.3.4", "trade", 1.005) is None
    assert limiter.take("1.2.3.4", "trade", 2.5) == 9


def test_client_limiter_off_passes_everything() -> None:
    off = ClientLimiter(0)
    assert all(off.take("1.2.3.4", "trade", 0.0) == NO_LIMIT_SEC for _ in range(100))
    assert ClientLimiter(0, unlimited=9).take("1.2.3.4", "trade", 0.0) == 9
    with pytest.raises(ValueError):
        ClientLimiter(-1)


def test_client_limiter_forgets_idle_clients_only() -> None:
    limiter = ClientLimiter(2, prune_at=3)
    for n in range(3):
        limiter.take(f"10.0.0.{n}", "ticker", 0.0)
    limiter.take("10.0.0.0", "ticker", 5.0)  # still busy when the next one comes
    assert limiter.take("10.0.0.9", "ticker", 5.5) == 1  # a 4th client: the idle are pruned
    assert set(limiter._budgets) == {("10.0.0.0", "ticker"), ("10.0.0.9", "ticker")}
    assert limiter.take("10.0.0.0", "ticker", 5.6) == 0  # its window was kept
    assert limiter.take("10.0.0.0", "ticker", 5.7) is None


def test_remaining_req_spells_upbits_header() -> None:
    assert remaining_req("candle", 7) == "group=candle; min=600; sec=7"
