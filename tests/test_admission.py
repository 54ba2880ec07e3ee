"""The union's bounds (pure): which leases are served when they cannot all be (issue 12, items
1 and 2). The processes-level behaviour is in ``tests/test_isolation_union.py``."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.admission import (
    QUARANTINE_FIRST,
    UNION_SHARE,
    UNKNOWN_MARKET,
    UNLISTED,
    Refusal,
    UnionAdmission,
)
from broker.core.control import MAX_RESENDS, SubscriptionController
from broker.core.gaps import Loss
from broker.core.leader import LeaderCore
from broker.core.stats import Counters
from broker.leases import Lease, LeaseListing, parse_lease
from broker.settings import BrokerSettings
from broker.upbit.requests import build_subscribe_request, request_size_bound
from broker.upbit.types import EMPTY, StreamKey, SubscriptionSet

T0_MS = 1_700_000_000_000


def lease(client_id: str, subs: dict[str, list[str]], created_ms: int = 1) -> Lease:
    fields = {
        "v": "1",
        "client_id": client_id,
        "host": "h",
        "pid": "1",
        "subs": json.dumps(subs),
        "ttl_ms": "10000",
        "created_ms": str(created_ms),
        "renewed_ms": str(created_ms),
        "deadline_ms": str(T0_MS + 60_000),
    }
    return parse_lease(client_id, fields)


def codes(prefix: str, n: int) -> list[str]:
    return [f"KRW-{prefix}{i:04d}" for i in range(n)]


def sset(**streams: list[str]) -> SubscriptionSet:
    return SubscriptionSet.of(streams)


# -- the request size bound ---------------------------------------------------------------------


def test_the_size_bound_is_never_below_the_request_sent() -> None:
    rng = random.Random(7)
    types = ["ticker", "trade", "orderbook", "candle.1s", "candle.240m"]
    for _ in range(200):
        streams: dict[str, list[str]] = {}
        for type_ in rng.sample(types, rng.randint(1, len(types))):
            name = type_ if type_ != "orderbook" or rng.random() < 0.5 else "orderbook@0.00001"
            n = rng.randint(1, 40)
            suffix = ".15" if type_ == "orderbook" and rng.random() < 0.5 else ""
            streams[name] = [f"KRW-{rng.randrange(10**6)}{suffix}" for _ in range(n)]
        s = SubscriptionSet.of(streams)
        bound = request_size_bound(s)
        keys = sorted(s)
        half = len(keys) // 2
        flowing = SubscriptionSet({k: s.depths[k] for k in keys[:half]})
        new = SubscriptionSet({k: s.depths[k] for k in keys[half:]})
        # the worst split the controller makes: flowing, new and snapshot-only objects
        subs = [
            *flowing.to_subscriptions(is_only_realtime=True),
            *new.to_subscriptions(),
            *new.to_subscriptions(is_only_snapshot=True),
        ]
        ticket = "b" * 128 + "-123456789-abcdef12"
        sent = build_subscribe_request(subs, ticket=ticket)
        # the snapshot-only copy of ``new`` counts as its own streams in a real request
        assert len(sent) <= bound + request_size_bound(new), (len(sent), bound)
        assert bound <= 2 * len(build_subscribe_request(s.to_subscriptions(), ticket=ticket)) + 2000


# -- the caps -------------------------------------------------------------------------------------


def test_newest_leases_past_the_stream_cap_are_refused_and_served_when_room_frees() -> None:
    a = lease("a", {"ticker": codes("A", 40)}, created_ms=1)
    b = lease("b", {"ticker": codes("B", 40)}, created_ms=2)
    c = lease("c", {"ticker": codes("C", 30)}, created_ms=3)
    shared = lease("d", {"ticker": codes("A", 10)}, created_ms=4)  # rides on a's streams
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    out = adm.admit([c, b, a, shared], 0.0)
    assert set(out.refused) == {"c"}
    assert "cap of 100 streams" in out.refused["c"] and "add 30" in out.refused["c"]
    assert len(out.union) == 80
    # an older lease arriving later does not displace those served (created_ms is only a tiebreak)
    early = lease("e", {"trade": codes("E", 30)}, created_ms=0)
    out = adm.admit([a, b, c, shared, early], 1.0)
    assert set(out.refused) == {"c", "e"}
    # room frees: the oldest waiting lease comes in first
    out = adm.admit([a, c, shared, early], 2.0)
    assert out.refused == {} and len(out.union) == 100


def test_the_byte_cap_counts_the_request_and_leaves_room_for_snapshots() -> None:
    first = lease("first", {"ticker": codes("X", 270)}, created_ms=1)
    second = lease("second", {"trade": codes("Y", 270)}, created_ms=2)
    adm = UnionAdmission(max_streams=10**6, max_bytes=10_000)
    out = adm.admit([second, first], 0.0)
    assert set(out.refused) == {"second"} and "over the cap of" in out.refused["second"]
    assert out.request_bytes <= 10_000 * UNION_SHARE


def test_no_single_lease_may_take_more_than_half_the_request() -> None:
    """One lease of many orderbook levels (each its own request object) would fill the cap
    and refuse every newer lease: it is refused itself instead."""
    levels = lease("levels", {f"orderbook@{i}": ["KRW-BTC"] for i in range(1, 300)}, created_ms=1)
    small = lease("small", {"ticker": ["KRW-BTC"]}, created_ms=2)
    adm = UnionAdmission(max_streams=10**6, max_bytes=65536)
    out = adm.admit([levels, small], 0.0)
    assert set(out.refused) == {"levels"} and "more than half" in out.refused["levels"]
    assert out.union == sset(ticker=["KRW-BTC"])


def test_a_1009_cuts_the_byte_cap_and_the_newest_lease_goes() -> None:
    a = lease("a", {"ticker": codes("A", 100)}, created_ms=1)
    b = lease("b", {"ticker": codes("B", 100)}, created_ms=2)
    adm = UnionAdmission(max_streams=10**6, max_bytes=10**6)
    first = adm.admit([a, b], 0.0)
    assert first.refused == {}
    adm.too_big(first.request_bytes)  # Upbit closed with 1009 after that request
    assert adm.learned_bytes == first.request_bytes * 3 // 4  # nothing verified yet
    second = adm.admit([a, b], 1.0)
    assert set(second.refused) == {"b"} and "1009" in second.refused["b"]
    assert second.request_bytes <= adm.union_byte_cap


def test_a_1009_never_cuts_below_halfway_to_the_largest_verified_request() -> None:
    adm = UnionAdmission(max_streams=10**6, max_bytes=10**6)
    adm.accepted(EMPTY, request_bytes=20_000)  # Upbit took a request of 20,000 (bound)
    adm.too_big(40_000)
    assert adm.learned_bytes == 30_000  # not 3/4 x 40,000: halfway to what Upbit took


def test_an_error_frame_quarantines_only_what_the_refused_request_added() -> None:
    a = lease("a", {"ticker": ["KRW-BTC"]}, created_ms=1)
    bad = lease("bad", {"ticker": ["KRW-BAD"]}, created_ms=2)
    good = lease("good", {"ticker": ["KRW-ETH"]}, created_ms=3)
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    adm.admit([a], 0.0)
    adm.accepted(a.subscriptions)  # Upbit verified {a}
    adm.admit([a, bad, good], 1.0)
    assert adm.error_frame("INVALID_PARAM", 2.0) == ["bad", "good"]  # both arrived since
    out = adm.admit([a, bad, good], 2.0)
    assert set(out.refused) == {"bad", "good"} and out.union == sset(ticker=["KRW-BTC"])
    assert adm.next_expiry(2.0) == 2.0 + QUARANTINE_FIRST
    # the quarantine ends: one suspect at a time, oldest first, each after a verified request
    assert adm.expire(2.0 + QUARANTINE_FIRST)
    out = adm.admit([a, bad, good], 2.0 + QUARANTINE_FIRST)
    assert set(out.refused) == {"good"}  # "bad" is probed alone
    assert adm.error_frame("INVALID_PARAM", 40.0) == ["bad"]  # refused again: it was bad
    out = adm.admit([a, bad, good], 40.0)
    assert set(out.refused) == {"bad"}  # good is probed next (bad waits twice as long now)
    assert adm.next_expiry(40.0) == 40.0 + 2 * QUARANTINE_FIRST
    adm.accepted(sset(ticker=["KRW-BTC", "KRW-ETH"]))
    out = adm.admit([a, bad, good], 41.0)
    assert set(out.refused) == {"bad"} and out.union == sset(ticker=["KRW-BTC", "KRW-ETH"])


def test_an_older_requests_verification_does_not_clear_a_newer_suspect() -> None:
    """Request N is verified after a lease was admitted for request N+1: Upbit's refusal of
    N+1 must still find that lease (before: none was left to blame, and it looped)."""
    a = lease("a", {"ticker": ["KRW-BTC"]}, created_ms=1)
    hostile = lease("hostile", {"ticker": ["KRW-BAD"]}, created_ms=2)
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    adm.admit([a], 0.0)
    adm.admit([a, hostile], 0.3)  # admitted before N's LIST_SUBSCRIPTIONS reply
    adm.accepted(a.subscriptions)  # N's reply: Upbit holds {a} only
    assert adm.error_frame("INVALID_PARAM", 1.0) == ["hostile"]


def test_a_refusal_with_no_new_lease_still_isolates_the_newest() -> None:
    a = lease("a", {"ticker": ["KRW-BTC"]}, created_ms=1)
    b = lease("b", {"ticker": ["KRW-ETH"]}, created_ms=2)
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    adm.admit([a, b], 0.0)
    adm.accepted(sset(ticker=["KRW-BTC", "KRW-ETH"]))
    assert adm.error_frame("INVALID_PARAM", 1.0) == ["b"]


def test_a_forged_created_ms_does_not_jump_the_queue() -> None:
    """``created_ms`` is the holder's word: the queue is the order this broker saw leases, and
    an incumbent stays one however its set object was re-parsed."""
    a = lease("a", {"ticker": codes("A", 3)}, created_ms=5)
    late = lease("late", {"ticker": codes("L", 3)}, created_ms=0)  # forged: "oldest"
    adm = UnionAdmission(max_streams=4, max_bytes=10**6)
    assert adm.admit([a], 0.0).refused == {}
    again = lease("a", {"ticker": codes("A", 3)}, created_ms=5)  # re-parsed: another object
    assert again.subscriptions is not a.subscriptions
    assert set(adm.admit([again, late], 1.0).refused) == {"late"}
    waiting = lease("waiting", {"ticker": codes("W", 3)}, created_ms=9)
    adm.admit([again, waiting], 2.0)  # "waiting" is refused (full) but queued
    out = adm.admit([waiting, late], 3.0)  # "a" left: the first to queue comes in
    assert set(out.refused) == {"late"}


def test_a_new_leader_queues_what_its_predecessor_refused_behind_the_rest() -> None:
    old = lease("old", {"ticker": codes("A", 3)}, created_ms=5)
    forged = lease("forged", {"ticker": codes("F", 3)}, created_ms=0)
    adm = UnionAdmission(max_streams=4, max_bytes=10**6)
    adm.previously_refused(["forged"])
    assert set(adm.admit([old, forged], 0.0).refused) == {"forged"}


def test_the_memo_holds_only_live_leases() -> None:
    adm = UnionAdmission(max_streams=10**6, max_bytes=10**6)
    adm.markets_listed(["KRW-BTC"])
    for i in range(500):  # one client rewriting its lease 500 times
        adm.admit([lease("c", {"ticker": [f"KRW-X{i}", "KRW-BTC"]})], float(i))
    assert len(adm._memo) <= 2


# -- unknown codes --------------------------------------------------------------------------------


def test_codes_not_on_the_market_list_are_rejected_entries_of_their_lease() -> None:
    mixed = lease("m", {"ticker": ["KRW-BTC", "KRW-NOPE"], "trade": ["KRW-NOPE"]})
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    assert adm.admit([mixed], 0.0).union == sset(ticker=["KRW-BTC", "KRW-NOPE"], trade=["KRW-NOPE"])
    adm.markets_listed(["KRW-BTC", "KRW-ETH"])
    out = adm.admit([mixed], 1.0)
    assert out.union == sset(ticker=["KRW-BTC"])
    [served] = out.leases
    assert [(r.stream, r.code, r.reason) for r in served.rejected] == [
        ("ticker", "KRW-NOPE", UNKNOWN_MARKET),
        ("trade", "KRW-NOPE", UNKNOWN_MARKET),
    ]


def test_streams_upbit_never_lists_are_kept_out_until_the_market_list_is_read_again() -> None:
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    mixed = lease("m", {"ticker": ["KRW-BTC", "KRW-GONE"]})
    adm.not_listed({StreamKey("ticker", "KRW-GONE")})
    out = adm.admit([mixed], 0.0)
    assert out.union == sset(ticker=["KRW-BTC"])
    assert [r.reason for r in out.leases[0].rejected] == [UNLISTED]
    adm.markets_listed(["KRW-BTC", "KRW-GONE"])  # listed again (relisted?): another chance
    assert adm.admit([mixed], 1.0).union == sset(ticker=["KRW-BTC", "KRW-GONE"])


# -- the controller converges -------------------------------------------------------------------


def test_a_set_upbit_never_lists_is_resent_at_most_max_resends_times() -> None:
    c = SubscriptionController(coalesce_delay=0.0, per_second=5, per_minute=100)
    c.connection_opened(0.0)
    c.set_desired(sset(ticker=["KRW-BTC", "KRW-NOPE"]), 0.0)
    listed = sset(ticker=["KRW-BTC"])  # Upbit ignores the unknown code without a word
    requests = 0
    for step in range(40):  # 24 s of a send loop answering every LIST_SUBSCRIPTIONS at once
        now = step * 0.6
        for message in c.data_to_send(now):
            if isinstance(message, bytes) and b'"type"' in message:
                requests += 1
            elif isinstance(message, bytes) and b"LIST_SUBSCRIPTIONS" in message:
                c.list_reply(listed, now + 0.01)
    assert requests == 1 + MAX_RESENDS
    verdict = c.take_verdict()
    assert verdict is not None and verdict.unlisted == {StreamKey("ticker", "KRW-NOPE")}
    assert c.held == listed and c.upstream == sset(ticker=["KRW-BTC", "KRW-NOPE"])


def test_snapshot_fetches_ride_along_only_in_the_room_left() -> None:
    c = SubscriptionController(coalesce_delay=0.0, max_request_bytes=4096)
    c.connection_opened(0.0)
    c.set_desired(sset(ticker=["KRW-BTC"]), 0.0)
    c.request_snapshot(sset(trade=codes("S", 500)), 0.0)
    sizes, fetched = [], 0
    for step in range(40):
        for message in c.data_to_send(step * 1.0):
            if isinstance(message, bytes) and b'"type"' in message:
                sizes.append(len(message))
                objs = msgspec.json.decode(message)
                fetched += sum(len(o["codes"]) for o in objs if o.get("is_only_snapshot"))
    assert max(sizes) <= 4096 and len(sizes) > 1
    assert fetched == 500  # every fetch went out, over several requests


# -- the leader core: holders told, status says it ----------------------------------------------


def core_with(**overrides: Any) -> LeaderCore:
    settings = BrokerSettings(broker_id="b1", upstream_url="ws://sim:1/websocket/v1", **overrides)
    core = LeaderCore(settings, Counters())
    core.took_lead(T0_MS)
    core.events_to_publish()
    return core


def listed(core: LeaderCore, now: float, *leases: Lease) -> None:
    assert core.begin_lease_read(now).full
    core.leases_listed(LeaseListing(list(leases), [], [], T0_MS), now, T0_MS)


def lease_events(core: LeaderCore) -> dict[str, dict[str, Any]]:
    out = [msgspec.json.decode(e.data) for e in core.events_to_publish()]
    return {e["client_id"]: e for e in out if e["event"] == "lease"}


def test_the_core_tells_refused_holders_and_names_them_in_the_status() -> None:
    core = core_with(max_union_streams=2)
    old = lease("old", {"ticker": ["KRW-BTC", "KRW-ETH"]}, created_ms=1)
    new = lease("new", {"ticker": ["KRW-XRP"]}, created_ms=2)
    listed(core, 0.0, old, new)
    assert core.desired == sset(ticker=["KRW-BTC", "KRW-ETH"])
    event = lease_events(core)["new"]
    assert event["state"] == "refused" and "max_union_streams" in event["why"]
    status = core.status(0.0, T0_MS)
    assert status.refused_leases == 1 and "new" in status.refused
    listed(core, 1.0, new)  # "old" released: room
    assert core.desired == sset(ticker=["KRW-XRP"])
    assert lease_events(core)["new"]["state"] == "ok"


def test_the_core_keeps_unknown_codes_out_and_reports_them() -> None:
    core = core_with()
    mixed = lease("m", {"ticker": ["KRW-BTC", "KRW-NOPE"]})
    listed(core, 0.0, mixed)
    core.markets_listed(["KRW-BTC", "KRW-ETH"], 0.5, T0_MS)
    assert core.desired == sset(ticker=["KRW-BTC"])
    event = lease_events(core)["m"]
    assert event["state"] == "partial" and event["rejected"] == {"ticker": ["KRW-NOPE"]}
    assert core.status(1.0, T0_MS).unknown_codes == ["ticker:KRW-NOPE"]
    assert core.status(1.0, T0_MS).markets == 2


@pytest.mark.parametrize("too_big", [True, False])
def test_a_refused_request_is_not_sent_again(too_big: bool) -> None:
    core = core_with(max_request_bytes=10**6)
    a = lease("a", {"ticker": codes("A", 200)}, created_ms=1)
    b = lease("b", {"ticker": codes("B", 200)}, created_ms=2)
    listed(core, 0.0, a)
    core.admission.accepted(core.desired)
    listed(core, 1.0, a, b)
    sent = core.desired
    refusal = Refusal(too_big, request_size_bound(sent), "connection closed (1009)")
    core.upstream_lost(Loss.CLOSED, T0_MS + 2_000, 0, refusal, 2.0)
    assert core.desired != sent and core.desired == SubscriptionSet.of({"ticker": codes("A", 200)})
    assert lease_events(core)["b"]["state"] == "refused"
    assert core.status(2.0, T0_MS).upstream_refusals == 1


def test_a_code_the_market_list_lacks_asks_for_an_early_reread_once() -> None:
    core = core_with()
    core.markets_listed(["KRW-BTC"], 0.0, T0_MS)
    assert not core.take_market_refresh()
    listed(core, 1.0, lease("new", {"ticker": ["KRW-NEWCOIN"]}))
    assert core.take_market_refresh()  # a new listing, perhaps
    listed(
        core, 2.0, lease("new", {"ticker": ["KRW-NEWCOIN"]}), lease("b", {"ticker": ["KRW-BTC"]})
    )
    assert not core.take_market_refresh()  # the same unknown code: asked once


def test_a_repeated_admission_of_the_same_sets_gives_the_same_union() -> None:
    # Every heartbeat re-reads a lease: the same sets come back in new Lease objects. An
    # admission that served everyone is not redone (the whole market is 2,586 streams a lease).
    a = lease("a", {"ticker": codes("A", 40), "orderbook": ["KRW-A0001.15"]})
    b = lease("b", {"ticker": codes("A", 20), "trade": codes("B", 10)}, created_ms=2)
    adm = UnionAdmission(max_streams=100, max_bytes=10**6)
    first = adm.admit([a, b], 0.0)
    assert first.refused == {} and len(first.union) == 51
    renewed = [replace(x, deadline_ms=x.deadline_ms + 5_000) for x in (a, b)]
    again = adm.admit(renewed, 1.0)
    assert again.union is first.union and again.request_bytes == first.request_bytes
    assert again.leases == renewed and again.refused == {}
    # a set that changed, a base, new bounds: admitted afresh
    c = replace(b, subscriptions=sset(ticker=codes("A", 20), trade=codes("B", 11)))
    assert len(adm.admit([a, c], 2.0).union) == 52
    base = sset(candle=["KRW-X"])
    assert len(adm.admit([a, c], 3.0, base=base).union) == 53
    adm.too_big(first.request_bytes)  # a 1009: the cap shrinks below this union's request
    after = adm.admit([a, c], 4.0, base=base)
    assert after.refused and len(after.union) < 53
    # last time refused someone: the same sets are admitted afresh, with the same answer
    assert adm.admit([a, c], 5.0, base=base).refused == after.refused


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=6), min_size=1, max_size=8))
def test_repeated_admissions_match_a_fresh_one(calls: list[list[int]]) -> None:
    pool = [
        lease(f"c{i}", {"ticker": codes(f"P{i % 3}", 5 + 7 * i), "trade": codes("Q", i)})
        for i in range(6)
    ]
    adm = UnionAdmission(max_streams=60, max_bytes=10**6)
    for now, picks in enumerate(calls):
        leases = [pool[i] for i in dict.fromkeys(picks)]
        out = adm.admit(leases, float(now))
        fresh = UnionAdmission(max_streams=60, max_bytes=10**6).admit(leases, float(now))
        if not out.refused and not fresh.refused:
            assert out.union == fresh.union and out.request_bytes == fresh.request_bytes
        assert set(out.refused) | {x.client_id for x in leases} == {x.client_id for x in leases}
