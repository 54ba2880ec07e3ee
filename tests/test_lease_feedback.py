"""What a lease holder is told (pure): one event per change of its lease's state, never per read."""

from __future__ import annotations

import json
from collections.abc import Sequence

import msgspec

from broker.core.lease_feedback import MAX_REJECTED_IN_EVENT, LeaseChange, LeaseFeedback
from broker.core.reconcile import LeaseSnapshot
from broker.leases import Lease, Rejected, parse_lease


def lease(client_id: str, subs: object) -> Lease:
    fields = {
        "v": "1",
        "client_id": client_id,
        "host": "h",
        "pid": "1",
        "subs": json.dumps(subs),
        "ttl_ms": "10000",
        "created_ms": "1",
        "renewed_ms": "1",
        "deadline_ms": "10001",
    }
    return parse_lease(client_id, fields)


def listing(
    leases: Sequence[Lease] = (),
    invalid: Sequence[tuple[str, str]] = (),
    expired: Sequence[str] = (),
    refused: dict[str, str] | None = None,
) -> LeaseSnapshot:
    return LeaseSnapshot(list(leases), list(invalid), list(expired), refused or {})


def states(changes: list[LeaseChange]) -> list[tuple[str, str]]:
    return [(c.client_id, c.state) for c in changes]


GOOD = lease("good", {"ticker": ["KRW-BTC"]})
PARTIAL = lease("part", {"ticker": ["KRW-BTC", "krw-eth"]})
FIXED = lease("part", {"ticker": ["KRW-BTC"]})


def test_a_lease_fine_from_the_start_and_its_heartbeats_say_nothing() -> None:
    feedback = LeaseFeedback()
    assert feedback.update(listing([GOOD])) == []
    assert feedback.update(listing([GOOD])) == []
    assert feedback.state_of("good") == "ok"


def test_partial_once_then_ok_once_when_fixed() -> None:
    feedback = LeaseFeedback()
    [change] = feedback.update(listing([GOOD, PARTIAL]))
    assert (change.client_id, change.state, change.previous) == ("part", "partial", None)
    assert change.rejected == (
        Rejected("ticker", "krw-eth", "invalid market code 'krw-eth' in ticker"),
    )
    assert change.why == (
        "serving 1 stream, rejected 1 entry: invalid market code 'krw-eth' in ticker"
    )
    assert feedback.update(listing([GOOD, PARTIAL])) == []  # the same partial lease again
    other = lease("part", {"ticker": ["KRW-BTC", "KRW-*"]})
    assert states(feedback.update(listing([GOOD, other]))) == [("part", "partial")]  # new why
    [fixed] = feedback.update(listing([GOOD, FIXED]))
    assert (fixed.state, fixed.previous, fixed.why) == ("ok", "partial", "every entry is served")
    assert feedback.update(listing([GOOD, FIXED])) == []


def test_invalid_and_expired_are_told_once() -> None:
    feedback = LeaseFeedback()
    invalid = [("bad", "subs is not JSON"), ("bad:member", "bad index")]
    changes = feedback.update(listing([GOOD], invalid))
    assert states(changes) == [("bad", "invalid"), ("bad:member", "invalid")]
    assert [c.has_holder for c in changes] == [True, False]  # a garbage member: log it only
    assert feedback.update(listing([GOOD], invalid)) == []
    # the good lease's hash is gone but its index entry is not: it expired
    changes = feedback.update(listing(invalid=invalid, expired=["good"]))
    assert states(changes) == [("good", "expired")]
    assert "not renewed" in changes[0].why
    # next read: the index entry was dropped, so it vanishes: already told
    assert feedback.update(listing(invalid=invalid)) == []
    assert feedback.state_of("good") is None


def test_a_hash_past_its_deadline_stays_expired_without_repeating() -> None:
    feedback = LeaseFeedback()
    feedback.update(listing([GOOD]))
    assert states(feedback.update(listing(expired=["good"]))) == [("good", "expired")]
    assert feedback.update(listing(expired=["good"])) == []
    [back] = feedback.update(listing([GOOD]))  # renewed
    assert (back.state, back.previous) == ("ok", "expired")


def test_a_lease_that_vanishes_is_expired_unless_released_or_redis_lost_it() -> None:
    feedback = LeaseFeedback()
    feedback.update(listing([GOOD, PARTIAL]))
    # released: the control channel named it
    assert feedback.update(listing([PARTIAL]), named={"good"}) == []
    # Redis restarted empty: every holder re-asserts its lease, no news for anyone
    assert feedback.update(listing(), quiet=True) == []
    feedback.update(listing([GOOD]))
    # gone without a word (deleted by hand, or expired and unindexed by someone else)
    [gone] = feedback.update(listing())
    assert (gone.client_id, gone.state, gone.previous) == ("good", "expired", "ok")
    assert "without a release" in gone.why


def test_reset_announces_every_non_ok_lease_again() -> None:
    feedback = LeaseFeedback()
    view = listing([GOOD, PARTIAL], invalid=[("bad", "why")])
    assert states(feedback.update(view)) == [("bad", "invalid"), ("part", "partial")]
    feedback.reset()  # the events could not be published
    assert states(feedback.update(view)) == [("bad", "invalid"), ("part", "partial")]


def test_the_event_lists_rejected_entries_in_the_shape_of_subs() -> None:
    codes = [f"krw-c{i}" for i in range(MAX_REJECTED_IN_EVENT + 10)]
    big = lease("big", {"ticker": ["KRW-BTC", *codes], "tick": ["KRW-ETH"]})
    [change] = LeaseFeedback().update(listing([big]))
    event = msgspec.to_builtins(change.event("b1", 1234))
    assert event["event"] == "lease" and event["client_id"] == "big"
    assert event["state"] == "partial" and event["broker"] == "b1" and event["ts_ms"] == 1234
    assert event["rejected_count"] == len(codes) + 1
    assert event["rejected"] == {"ticker": codes[:MAX_REJECTED_IN_EVENT]}
    assert "and 56 more" in event["why"]  # 61 reasons (one per code, one for 'tick'): 5 shown
    plain = msgspec.to_builtins(LeaseChange("c", "invalid", "subs is not JSON").event("b1", 1))
    assert "rejected" not in plain and plain["why"] == "subs is not JSON"
