"""The leader core (broker/core/leader.py) and the lease reconciler, on virtual time: no Redis,
no sockets, no event loop. Each rule the service used to hold is a table here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from broker.contract import GAP_REASONS, encode_status
from broker.core.gaps import GapReason, Loss
from broker.core.leader import MAX_SNAPSHOT_WAITERS, LeaderCore, Wake
from broker.core.oom import MemoryInfo
from broker.core.reconcile import (
    AFTER_DEADLINE,
    ASKED_LEASES_PER_S,
    LISTING_GAP,
    OVERDUE_RETRY,
    PERIODIC_LEASES_PER_S,
    SCAN_EVERY,
    LeaseReconciler,
)
from broker.core.snapshots import MAX_SNAPSHOT_TIMEOUT
from broker.core.stats import Counters
from broker.leases import Lease, LeaseListing, LeaseReads, ParsedSubs, parse_lease
from broker.settings import BrokerSettings
from broker.upbit.types import StreamKey, SubscriptionSet

TTL = 10.0  # lease_ttl: the length of a union grace
QUIET = 5.0  # quiet_after
COALESCE = 0.05
INTERVAL = 1.0  # reconcile_interval and status_interval
T0_MS = 1_700_000_000_000  # the wall clock when the phase starts

_memo: dict[str, ParsedSubs] = {}  # the same subs text gives the same set object (heartbeats)


def settings(**overrides: Any) -> BrokerSettings:
    values: dict[str, Any] = {
        "broker_id": "b1",
        "upstream_url": "wss://user:secret@upbit.example/websocket/v1",
        "lease_ttl": TTL,
        "quiet_after": QUIET,
        "coalesce_delay": COALESCE,
        "reconcile_interval": INTERVAL,
        "status_interval": INTERVAL,
    }
    return BrokerSettings(**{**values, **overrides})


def lease(client_id: str, subs: dict[str, list[str]], deadline_ms: int = T0_MS + 60_000) -> Lease:
    fields = {
        "v": "1",
        "client_id": client_id,
        "host": "h",
        "pid": "1",
        "subs": json.dumps(subs),
        "ttl_ms": "10000",
        "created_ms": "1",
        "renewed_ms": "1",
        "deadline_ms": str(deadline_ms),
    }
    return parse_lease(client_id, fields, memo=_memo)


def listing(
    *leases: Lease,
    invalid: Sequence[tuple[str, str]] = (),
    expired: Sequence[str] = (),
    now_ms: int = T0_MS,
) -> LeaseListing:
    return LeaseListing(list(leases), list(invalid), list(expired), server_now_ms=now_ms)


def sset(**streams: list[str]) -> SubscriptionSet:
    return SubscriptionSet.of(streams)


def leading(**overrides: Any) -> LeaderCore:
    core = LeaderCore(settings(**overrides), Counters())
    core.took_lead(T0_MS)
    core.events_to_publish()  # the leader event (tested on its own)
    return core


def list_leases(core: LeaderCore, now: float, *leases: Lease, **kw: Any) -> None:
    """One full lease read, as the lease task does it."""
    read = core.begin_lease_read(now)
    assert read.full
    core.leases_listed(listing(*leases, **kw), now, T0_MS + int(now * 1000))


def connect(core: LeaderCore, now: float, *, epoch: int = 1) -> None:
    """The upstream adapter connected; the connection holds the desired set."""
    core.controller.connection_opened(now)
    if core.upstream_connected(now, T0_MS + int(now * 1000), fresh=False):
        core.epoch_assigned(epoch)
    core.controller.data_to_send(now + COALESCE)


def events(core: LeaderCore) -> list[dict[str, Any]]:
    return [msgspec.json.decode(out.data) for out in core.events_to_publish()]


def replies(core: LeaderCore) -> dict[str, dict[str, Any]]:
    return {out.request_id: msgspec.json.decode(out.data) for out in core.replies_to_send()}


# -- union grace (a Redis that lost its data, a lost control channel) --------------------------


BTC = lease("a", {"ticker": ["KRW-BTC"]})
ETH = lease("b", {"trade": ["KRW-ETH"]})


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (lambda core, now: core.redis_emptied(now), "redis lost its data"),
        (lambda core, now: core.control_lost("Connection reset", now), "control channel lost"),
    ],
)
def test_a_grace_holds_the_union_for_one_lease_ttl(cause: Any, reason: str, caplog: Any) -> None:
    core = leading()
    list_leases(core, 0.0, BTC, ETH)
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    cause(core, 1.0)
    assert reason in caplog.text and "holding the union (2 streams) for 10s" in caplog.text
    list_leases(core, 1.5)  # Redis is empty: no lease at all
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])  # nothing unsubscribed
    assert core.in_grace(1.0 + TTL - 0.001) and not core.in_grace(1.0 + TTL)
    assert core.next_wakeup(2.0) == 1.0 + TTL
    list_leases(core, 3.0, BTC)  # one holder re-asserted: still held
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core.tick(1.0 + TTL)  # the grace ends: only what the leases ask
    assert core.desired == sset(ticker=["KRW-BTC"])
    assert core.take_controller_changed()
    assert not core.in_grace(1.0 + TTL) and core.next_wakeup(1.0 + TTL) is None


def test_a_second_hold_within_a_grace_extends_it_and_keeps_both_sets() -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    core.redis_emptied(1.0)
    list_leases(core, 1.1, ETH)  # a different lease arrives while BTC is held
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core.control_lost("gone", 5.0)
    list_leases(core, 5.1)
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core.tick(1.0 + TTL)
    assert core.in_grace(1.0 + TTL) and core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core.tick(5.0 + TTL)
    assert core.desired == sset()


def test_no_expiry_is_announced_during_a_grace() -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    core.redis_emptied(1.0)
    list_leases(core, 1.1)  # "a" vanished with the data: no news to its holder
    assert events(core) == []
    assert core.stats.lease_expiries == 0
    # Outside a grace, a lease that vanishes unnamed has expired.
    core.tick(1.0 + TTL)
    list_leases(core, 12.0, BTC)
    list_leases(core, 13.0)
    assert [(e["client_id"], e["state"]) for e in events(core)] == [("a", "expired")]


def test_the_epoch_key_is_watched_only_once_an_epoch_exists() -> None:
    core = leading()
    assert not core.watches_epoch_key
    connect(core, 0.0, epoch=7)
    assert core.watches_epoch_key
    assert LeaderCore(settings(), epoch=3).watches_epoch_key


# -- gaps and connection events ----------------------------------------------------------------


def test_gap_reasons_are_the_documented_ones() -> None:
    assert {reason.value for reason in GapReason} == set(GAP_REASONS)


@pytest.mark.parametrize(
    ("loss", "reason"),
    [
        (Loss.CLOSED, "reconnect"),
        (Loss.STALL, "stall"),
        (Loss.ERROR_FRAME, "error"),
        (Loss.FRESH_SWITCH, None),
    ],
)
def test_each_loss_announces_its_gap(loss: Loss, reason: str | None) -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    connect(core, 0.0, epoch=1)
    assert [e["event"] for e in events(core)] == ["connected"]
    last_frame_ms = T0_MS + 4_000
    core.upstream_lost(loss, T0_MS + 5_000, last_frame_ms)
    assert not core.connected
    fresh = loss is Loss.FRESH_SWITCH
    needs_epoch = core.upstream_connected(6.0, T0_MS + 6_000, fresh=fresh)
    assert needs_epoch is not fresh
    if not needs_epoch:  # the planned switch: same epoch, nothing announced
        assert core.epoch == 1 and events(core) == []
        return
    core.epoch_assigned(2)
    gap, connected = events(core)
    assert gap == {
        "event": "gap",
        "epoch": 2,
        "since_ms": last_frame_ms,
        "until_ms": T0_MS + 6_000,
        "reason": reason,
        "broker": "b1",
    }
    assert connected == {"event": "connected", "epoch": 2, "broker": "b1", "ts_ms": T0_MS + 6_000}


@pytest.mark.parametrize(
    ("last_frame_ms", "since_ms"),
    [
        (T0_MS + 4_000, T0_MS + 4_000),  # the last frame before the loss
        (0, T0_MS + 5_000),  # nothing published yet: from the loss itself
        (T0_MS - 1, T0_MS + 5_000),  # a frame of an earlier phase of this broker: not ours now
    ],
)
def test_a_gap_starts_at_the_last_frame_of_this_phase(last_frame_ms: int, since_ms: int) -> None:
    core = leading()
    connect(core, 0.0)
    events(core)
    core.upstream_lost(Loss.CLOSED, T0_MS + 5_000, last_frame_ms)
    core.upstream_connected(6.0, T0_MS + 6_000, fresh=False)
    core.epoch_assigned(2)
    assert events(core)[0]["since_ms"] == since_ms


@pytest.mark.parametrize("frames", [1, 35, 62])
def test_frames_lost_on_the_way_to_redis_are_announced_once_as_a_redis_gap(frames: int) -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    connect(core, 0.0, epoch=4)
    events(core)
    core.publish_lost(T0_MS + 1_000, T0_MS + 1_250, frames)
    assert events(core) == [
        {
            "event": "gap",
            "epoch": 4,
            "since_ms": T0_MS + 1_000,
            "until_ms": T0_MS + 1_250,
            "reason": "redis",
            "broker": "b1",
        }
    ]
    assert core.gaps.redis_frames == frames
    assert core.connected  # upstream never broke: no reconnect gap owed
    core.upstream_lost(Loss.CLOSED, T0_MS + 2_000, T0_MS + 1_900)
    connect(core, 3.0, epoch=5)
    assert [e.get("reason") for e in events(core) if e["event"] == "gap"] == ["reconnect"]


def test_a_redis_loss_that_dropped_nothing_announces_nothing() -> None:
    core = leading()
    connect(core, 0.0)
    events(core)
    core.publish_lost(T0_MS + 1_000, T0_MS + 1_100, 0)
    assert events(core) == [] and core.gaps.redis_frames == 0


def test_snapshot_requests_in_progress_are_capped_and_the_rest_refused() -> None:
    core = leading(status_interval=60.0)
    connect(core, 0.0)
    core.tick(0.0)
    for i in range(MAX_SNAPSHOT_WAITERS):  # nothing flows: each waits for upstream
        assert core.command(snapshot(f"w{i}", ["KRW-NOPE"], timeout_ms=1000), 1.0) is None
    assert replies(core) == {}
    core.command(snapshot("over", ["KRW-NOPE"]), 1.0)
    refused = replies(core)["over"]
    assert refused["ok"] is False and "too many snapshot requests" in refused["error"]
    core.tick(2.0)  # the waiters' deadline: every one is answered, the desk is free again
    assert len(replies(core)) == MAX_SNAPSHOT_WAITERS
    core.command(snapshot("again", ["KRW-NOPE"], timeout_ms=-1), 3.0)
    assert replies(core)["again"]["ok"] is True


def test_a_fresh_switch_keeps_an_earlier_loss_for_the_next_connection() -> None:
    core = leading()
    connect(core, 0.0)
    core.upstream_lost(Loss.STALL, T0_MS + 5_000, 0)
    connect(core, 6.0, epoch=2)
    assert [e["reason"] for e in events(core) if e["event"] == "gap"] == ["stall"]
    core.upstream_lost(Loss.FRESH_SWITCH, T0_MS + 9_000, 0)
    assert not core.upstream_connected(9.0, T0_MS + 9_000, fresh=True)
    assert events(core) == [] and core.epoch == 2


@pytest.mark.parametrize(
    ("previous_token", "previous_last_frame_ms", "gap"),
    [
        ("other", T0_MS - 2_000, "takeover"),  # another process published until then
        # this very process leads again after a lapse: its connection was torn down
        ("mine", T0_MS - 2_000, "reconnect"),
        ("other", 0, None),  # the previous leader published nothing
        ("mine", 0, None),
        ("", T0_MS - 2_000, "takeover"),  # a broker older than tokens: another process
    ],
)
def test_the_first_connection_after_a_takeover_announces_it(
    previous_token: str, previous_last_frame_ms: int, gap: str | None
) -> None:
    # The token is the fence, never the broker id: a restart with the same --broker-id is
    # another process (issue 12 item 5).
    core = LeaderCore(settings(), Counters(), token="mine")
    core.took_lead(T0_MS, previous_token, previous_last_frame_ms)
    assert events(core) == [{"event": "leader", "broker": "b1", "ts_ms": T0_MS}]
    connect(core, 1.0, epoch=5)
    announced = events(core)
    gaps = [e for e in announced if e["event"] == "gap"]
    assert [e["event"] for e in announced][-1] == "connected"
    if gap:
        assert gaps == [
            {
                "event": "gap",
                "epoch": 5,
                "since_ms": previous_last_frame_ms,
                "until_ms": T0_MS + 1_000,
                "reason": gap,
                "broker": "b1",
            }
        ]
    else:
        assert gaps == []
    # The takeover is announced once; a reconnect later is a reconnect.
    core.upstream_lost(Loss.CLOSED, T0_MS + 2_000, 0)
    connect(core, 3.0, epoch=6)
    assert [e["reason"] for e in events(core) if e["event"] == "gap"] == ["reconnect"]


def test_an_epoch_redis_did_not_give_is_counted_on_locally() -> None:
    core = LeaderCore(settings(), Counters(), epoch=4)
    core.took_lead(T0_MS)
    core.upstream_connected(0.0, T0_MS, fresh=False)
    core.epoch_assigned(None)
    assert core.epoch == 5 and events(core)[-1]["epoch"] == 5


# -- commands and replies ----------------------------------------------------------------------


def command(**body: Any) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (command(op="launch", id="r1"), "unknown op 'launch'"),
        (command(id="r1"), "unknown op None"),
        (command(op="snapshot", id="r1", type="ticker", codes=[]), "non-empty"),
        (command(op="snapshot", id="r1", type="ticker", codes=["krw-btc"]), "invalid codes"),
        (
            command(op="snapshot", id="r1", type="ticker", codes=[f"KRW-C{i}" for i in range(101)]),
            "100",
        ),
        (command(op="snapshot", id="r1", type="tickr", codes=["KRW-BTC"]), "tickr"),
        (command(op="snapshot", id="r1", type="ticker", codes=["KRW-BTC"], level=5), "level"),
        (command(op="snapshot", id="r1", type="orderbook", codes=["KRW-BTC"], level=-1), "level"),
    ],
)
def test_a_command_that_cannot_be_acted_on_is_refused_with_a_reason(raw: bytes, error: str) -> None:
    core = leading()
    assert core.command(raw, 0.0) is None
    [(rid, reply)] = replies(core).items()
    assert rid == "r1" and reply["ok"] is False and error in reply["error"]
    assert core.stats.commands == core.stats.bad_commands == 1


@pytest.mark.parametrize(
    "raw",
    [b"garbage", b"", b"[1,2]", command(op="resubscribe"), command(op="snapshot", id="a b")],
)
def test_a_command_nobody_can_be_answered_for_is_dropped_and_counted(raw: bytes) -> None:
    core = leading()
    assert core.command(raw, 0.0) is None
    assert core.replies_to_send() == [] and core.stats.bad_commands == 1


def test_a_resubscribe_is_answered_once_upstream_confirms_it() -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    connect(core, 0.0, epoch=3)
    core.take_controller_changed()
    assert core.command(command(op="resubscribe", id="r9"), 1.0) is None
    assert core.take_controller_changed()  # the send loop must resend the full set
    assert core.stats.resubscribes_forced == 1 and core.replies_to_send() == []
    assert core.controller.data_to_send(1.0 + COALESCE)  # the full set goes out
    *_, list_request = core.controller.data_to_send(2.0)  # (after the keepalive PING)
    assert b"LIST_SUBSCRIPTIONS" in bytes(list_request)
    assert core.controller.list_reply(SubscriptionSet.of({"ticker": ["KRW-BTC"]}), 2.1)
    core.resubscribes_confirmed(core.controller.confirmations())
    assert replies(core) == {
        "r9": {"id": "r9", "ok": True, "epoch": 3, "upstream": {"ticker": ["KRW-BTC"]}}
    }


def snapshot(rid: str, codes: list[str], **fields: Any) -> bytes:
    return command(op="snapshot", id=rid, type="ticker", codes=codes, **fields)


def test_a_snapshot_of_flowing_streams_asks_the_cache_first() -> None:
    core = leading()
    list_leases(core, 0.0, lease("a", {"ticker": ["KRW-BTC", "KRW-ETH"]}))
    connect(core, 0.0)
    query = core.command(snapshot("s1", ["KRW-XRP", "KRW-ETH", "KRW-BTC"]), 1.0)
    assert query is not None
    assert (query.type, query.level, query.codes) == ("ticker", 0.0, ("KRW-BTC", "KRW-ETH"))
    core.take_controller_changed()
    core.cached(query, [b'{"code":"KRW-BTC"}', None], 1.0)
    # XRP does not flow and ETH was not cached: both are fetched upstream, with a snapshot.
    assert core.take_controller_changed()
    assert core.awaited_streams == {StreamKey("ticker", "KRW-ETH"), StreamKey("ticker", "KRW-XRP")}
    assert core.stats.snapshots_from_cache == 1 and core.stats.snapshots_from_upstream == 1
    [request] = core.controller.data_to_send(1.0 + COALESCE)
    assert isinstance(request, bytes) and b"is_only_snapshot" in request
    core.published([(StreamKey("ticker", "KRW-ETH"), b'{"code":"KRW-ETH"}')], 1.2)
    assert replies(core) == {}  # still waiting for XRP
    core.published([(StreamKey("ticker", "KRW-XRP"), b'{"code":"KRW-XRP"}')], 1.3)
    assert replies(core) == {
        "s1": {
            "id": "s1",
            "ok": True,
            "frames": {
                "KRW-BTC": {"code": "KRW-BTC"},
                "KRW-ETH": {"code": "KRW-ETH"},
                "KRW-XRP": {"code": "KRW-XRP"},
            },
            "missing": [],
            "source": {"KRW-BTC": "cache", "KRW-ETH": "upstream", "KRW-XRP": "upstream"},
        }
    }
    assert core.awaited_streams == frozenset()


@pytest.mark.parametrize(
    ("fields", "deadline"),
    [
        ({}, 1.0 + 3.0),  # the default timeout
        ({"timeout_ms": 500}, 1.5),
        ({"timeout_ms": -5}, 1.0),  # answered at once
        ({"timeout_ms": 1e300}, 1.0 + MAX_SNAPSHOT_TIMEOUT),  # capped
    ],
)
def test_a_snapshot_is_answered_at_its_deadline_with_the_rest_missing(
    fields: dict[str, Any], deadline: float
) -> None:
    core = leading(status_interval=60.0)  # no quiet check in the way
    connect(core, 0.0)
    core.tick(0.0)
    assert core.command(snapshot("s2", ["KRW-NOPE"], **fields), 1.0) is None  # nothing flows
    if deadline > 1.0:
        assert core.replies_to_send() == [] and core.next_wakeup(1.0) == deadline
        core.tick(deadline - 0.001)
        assert core.replies_to_send() == []
        core.tick(deadline)
    assert replies(core)["s2"] == {
        "id": "s2",
        "ok": True,
        "frames": {},
        "missing": ["KRW-NOPE"],
        "source": {},
    }
    assert core.stats.snapshot_codes_missing == 1


def test_the_cache_is_not_asked_when_it_is_off() -> None:
    core = leading(last_value_cache=False)
    list_leases(core, 0.0, BTC)
    connect(core, 0.0)
    assert core.command(snapshot("s3", ["KRW-BTC"]), 1.0) is None
    assert core.awaited_streams == {StreamKey("ticker", "KRW-BTC")}


# -- quiet streams -----------------------------------------------------------------------------


def quiet_core() -> LeaderCore:
    core = leading()
    list_leases(core, 0.0, lease("a", {"trade": ["KRW-BTC", "KRW-ETH"]}))
    connect(core, 0.0)
    return core


def test_a_quiet_stream_gets_one_fresh_snapshot_request_per_quiet_after() -> None:
    core = quiet_core()
    seen = core.counters.publish.last_seen
    btc, eth = StreamKey("trade", "KRW-BTC"), StreamKey("trade", "KRW-ETH")
    for now in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        seen[btc] = now  # BTC flows, ETH says nothing
        core.tick(now)
    assert core.quiet_codes(6.0) == ["trade:KRW-ETH"]
    assert core.stats.quiet_refreshes == 1 and core.take_controller_changed()
    [request] = core.controller.data_to_send(6.0 + COALESCE)
    assert isinstance(request, bytes)
    body = json.loads(request)
    assert {"type": "trade", "codes": ["KRW-BTC"], "is_only_realtime": True} in body
    assert {"type": "trade", "codes": ["KRW-ETH"]} in body  # a new SNAPSHOT for ETH
    for now in (7.0, 8.0, 9.0, 10.0):
        seen[btc] = now
        core.tick(now)
    assert core.stats.quiet_refreshes == 1  # not again within quiet_after
    seen[btc] = 11.0
    core.tick(11.0)
    assert core.stats.quiet_refreshes == 2
    seen[eth] = 11.5  # ETH is back
    assert core.quiet_codes(11.5) == []


@pytest.mark.parametrize(
    ("btc_seen", "connected", "refreshes"),
    [
        (None, True, 0),  # everything quiet: the stall detector's business
        (5.5, False, 0),  # disconnected: nothing is quiet, nothing asked
        (5.5, True, 1),
    ],
)
def test_quiet_refresh_needs_a_connection_and_something_flowing(
    btc_seen: float | None, connected: bool, refreshes: int
) -> None:
    core = quiet_core()
    if btc_seen is not None:
        core.counters.publish.last_seen[StreamKey("trade", "KRW-BTC")] = btc_seen
    if not connected:
        core.upstream_lost(Loss.CLOSED, T0_MS, 0)
        assert core.quiet_codes(6.0) == [] and core.next_wakeup(6.0) is None
    core.tick(6.0)
    assert core.stats.quiet_refreshes == refreshes


def test_the_quiet_check_runs_once_per_status_interval_while_connected() -> None:
    core = quiet_core()
    core.tick(2.0)
    assert core.next_wakeup(2.0) == 2.0 + INTERVAL
    core.tick(2.5)  # not due: no check
    assert core.next_wakeup(2.5) == 2.0 + INTERVAL


# -- leases: union, counts, events -------------------------------------------------------------


def test_lease_reads_set_the_union_and_the_counts() -> None:
    core = leading()
    part = lease("p", {"ticker": ["KRW-XRP", "krw-eth"]})
    list_leases(core, 0.0, BTC, part, invalid=[("bad", "subs is not JSON")])
    assert core.desired == sset(ticker=["KRW-BTC", "KRW-XRP"])
    assert core.take_controller_changed() and not core.take_controller_changed()
    s = core.stats
    assert (s.leases, s.invalid_leases, s.partial_leases, s.rejected_streams) == (2, 1, 1, 1)
    assert (s.union_recomputes, s.lease_listings) == (1, 1)
    announced = events(core)
    assert [(e["client_id"], e["state"]) for e in announced] == [
        ("bad", "invalid"),
        ("p", "partial"),
    ]
    assert announced[1]["rejected"] == {"ticker": ["krw-eth"]} and announced[1]["broker"] == "b1"
    # The same leases again: no news, no recompute.
    list_leases(core, 1.5, BTC, part, invalid=[("bad", "subs is not JSON")])
    assert events(core) == [] and s.union_recomputes == 1 and not core.take_controller_changed()


def test_lease_events_that_could_not_be_published_are_announced_again() -> None:
    core = leading()
    list_leases(core, 0.0, lease("p", {"ticker": ["KRW-XRP", "krw-eth"]}))
    lost = core.events_to_publish()
    core.events_sent(lost, ok=False)
    list_leases(core, 1.5, lease("p", {"ticker": ["KRW-XRP", "krw-eth"]}))
    again = core.events_to_publish()
    assert [out.data for out in again] == [
        out.data.replace(b"1700000000000", b"1700000001500") for out in lost
    ]
    core.events_sent(again, ok=True)
    assert core.stats.lease_events == 1


def test_a_heartbeat_read_alone_changes_nothing_and_a_change_reaches_the_controller() -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    core.take_controller_changed()
    assert core.control_message(b"lease a", 0.2) is Wake.LEASES
    assert core.next_lease_read() == 0.2 + COALESCE
    read = core.begin_lease_read(0.2 + COALESCE)
    assert (read.full, read.ids, read.noticed_at) == (False, {"a"}, 0.2)
    core.leases_read(LeaseReads([lease("a", {"ticker": ["KRW-BTC"]})], [], [], T0_MS), 0.25, T0_MS)
    assert core.stats.lease_reads == 1 and not core.take_controller_changed()
    core.control_message(b"lease a", 0.5)
    core.begin_lease_read(0.55)
    core.leases_read(LeaseReads([ETH_AS_A], [], [], T0_MS), 0.55, T0_MS)
    assert core.desired == sset(trade=["KRW-ETH"]) and core.take_controller_changed()


ETH_AS_A = lease("a", {"trade": ["KRW-ETH"]})


def test_control_messages_wake_the_right_task() -> None:
    core = leading()
    list_leases(core, 0.0)
    assert core.control_message(b"request", 1.0) is Wake.COMMANDS
    assert core.next_lease_read() == INTERVAL  # a command wakes no lease read
    assert core.control_message(b"release a", 1.2) is Wake.LEASES
    assert core.control_message(b"something else", 1.3) is Wake.LEASES
    read = core.begin_lease_read(1.25)
    assert read.full and read.ids == {"a"}  # a message naming nothing: every lease is read


# -- the lease read schedule (broker.core.reconcile) ------------------------------------------


def reconciler() -> LeaseReconciler:
    return LeaseReconciler(interval=INTERVAL, coalesce_delay=COALESCE)


def test_the_first_read_is_a_full_listing_at_once_with_a_scan() -> None:
    r = reconciler()
    assert r.due() == 0.0
    read = r.begin(0.0)
    assert read.full and read.scan and read.ids == frozenset() and read.noticed_at is None


def test_every_fifth_listing_scans() -> None:
    r = reconciler()
    scans = []
    for i in range(2 * SCAN_EVERY):
        now = i * INTERVAL
        assert r.due() <= now
        scans.append(r.begin(now).scan)
        r.listed(listing(), now)
    assert scans == [True, False, False, False, False] * 2


@pytest.mark.parametrize(
    ("deadline_in_ms", "due"),
    [
        (300, 0.3 + AFTER_DEADLINE),  # just after the earliest lease would expire
        (5_000, INTERVAL),  # later than the next periodic listing
        (-5, 0.015),  # due within the 20 ms Redis may take to expire it
        (-20, OVERDUE_RETRY),  # past its deadline but still listed: a calm retry
        (-5_000, OVERDUE_RETRY),
    ],
)
def test_a_full_listing_follows_the_earliest_deadline(deadline_in_ms: int, due: float) -> None:
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(lease("x", {"ticker": ["KRW-BTC"]}, T0_MS + deadline_in_ms)), 0.0)
    assert r.due() == pytest.approx(due)


@pytest.mark.parametrize(("leases", "due"), [(1, INTERVAL), (1_000, 10.0), (5_000, 50.0)])
def test_the_periodic_listing_spaces_out_with_many_leases(leases: int, due: float) -> None:
    # 1,000 gateway clients are 1,000 leases: listing them all every second took ~0.1 s of the
    # broker's loop each time (publishing stalled). Renewals are read as they are announced
    # and expiries at their deadlines; only the safety net slows down.
    far = T0_MS + 3_600_000
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(*(lease(f"c{i}", {"ticker": ["KRW-BTC"]}, far) for i in range(leases))), 0.0)
    assert r.due() == pytest.approx(max(INTERVAL, leases / PERIODIC_LEASES_PER_S)) == due
    # a renewal is read by itself, a coalescing window after its message, not as a listing
    assert r.named("c7", 1.0) and r.due() == pytest.approx(min(due, 1.0 + COALESCE))
    read = r.begin(1.0 + COALESCE)
    assert read.full == (due <= 1.0 + COALESCE) and read.ids == {"c7"}
    if read.full:
        r.listed(
            listing(*(lease(f"c{i}", {"ticker": ["KRW-BTC"]}, far) for i in range(leases))),
            1.0 + COALESCE,
        )
    else:
        r.read(
            LeaseReads([lease("c7", {"ticker": ["KRW-BTC"]}, far)], [], [], T0_MS), 1.0 + COALESCE
        )
    # a message naming nothing still gets its listing within seconds, not at the periodic one
    r.read_all_soon(2.0)
    asked = max(2.0 + COALESCE, min(due, max(LISTING_GAP, leases / ASKED_LEASES_PER_S)))
    assert r.due() == pytest.approx(asked) and asked <= 2.5


def test_a_burst_of_messages_is_read_once_a_window_after_the_first() -> None:
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(), 0.0)
    for i, name in enumerate(("a", "b", "c")):
        r.named(name, 0.2 + i * 0.01)
    assert r.due() == pytest.approx(0.2 + COALESCE)
    read = r.begin(0.25)
    assert not read.full and read.ids == {"a", "b", "c"} and read.noticed_at == 0.2
    assert r.due() == INTERVAL  # nothing pending but the periodic listing


def test_an_id_that_cannot_be_read_asks_for_a_full_listing() -> None:
    # "lease not an id" names no lease hash: a full listing covers it (no sooner than
    # LISTING_GAP after the last one: a flood of them is one listing per gap), never a read
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(), 0.0)
    assert not r.named("not an id", 0.2)
    assert r.due() == pytest.approx(max(0.2 + COALESCE, LISTING_GAP))
    read = r.begin(0.25)
    assert read.full and read.ids == frozenset() and read.noticed_at == 0.2
    r.listed(listing(), 0.25)
    # a read that could not pin an id (``ignored``) asks for one the same way
    r.named("a", 0.3)
    r.begin(0.35)
    r.read(LeaseReads([], [], [], T0_MS, ignored=["a"]), 0.35)
    assert r.due() == pytest.approx(0.25 + LISTING_GAP) and r.begin(0.5).full


def test_a_failed_read_keeps_its_ids_and_lists_everything_next() -> None:
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(), 0.0)
    r.named("a", 0.2)
    r.begin(0.25)
    r.failed(0.3)
    assert r.due() == 0.3 + INTERVAL  # no hot retry while Redis is down
    r.named("b", 0.5)  # a message: retry one window later, reading everything
    assert r.due() == 0.5 + COALESCE
    read = r.begin(0.55)
    assert read.full and read.ids == {"a", "b"}


def test_a_failure_before_the_read_began_is_not_retried_at_once() -> None:
    # A control message was noticed, then Redis failed before the read began (the epoch
    # check): the retry waits for the interval, not for the next turn of the loop.
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(), 0.0)
    r.named("a", 0.2)
    r.failed(0.3)
    assert r.due() == 0.3 + INTERVAL
    read = r.begin(0.3 + INTERVAL)
    assert read.full and "a" in read.ids


def test_a_read_past_the_next_listing_becomes_the_listing() -> None:
    r = reconciler()
    r.begin(0.0)
    r.listed(listing(), 0.0)
    r.named("a", 0.98)
    assert r.begin(1.03).full


def test_a_full_listing_also_reads_the_served_leases_missing_from_the_index() -> None:
    # the index is a hint any consumer may ZREM from: the listing is told which leases are
    # served now (LeaseStore.list_all's ``known``), so a ZREM never drops a live lease
    r = reconciler()
    assert r.begin(0.0).known == frozenset()  # nothing served yet
    r.listed(listing(lease("a", {"ticker": ["KRW-BTC"]}), lease("b", {"trade": ["KRW-ETH"]})), 0.0)
    r.named("a", 0.2)
    assert r.begin(0.25).known == frozenset()  # a targeted read reads its ids, nothing more
    r.read(LeaseReads([lease("a", {"ticker": ["KRW-BTC"]})], [], [], T0_MS), 0.25)
    assert r.begin(INTERVAL).known == {"a", "b"}


def test_a_lease_listed_outside_the_index_stays_in_the_union() -> None:
    core = leading()
    a = lease("a", {"ticker": ["KRW-BTC"]})
    list_leases(core, 0.0, a)
    assert core.desired == sset(ticker=["KRW-BTC"])
    read = core.begin_lease_read(INTERVAL)
    assert read.full and read.known == {"a"}
    # what list_all(known={"a"}) answers once a's index entry was ZREMed: read, re-indexed
    found = LeaseListing([a], [], [], T0_MS, unindexed=["a"], reindexed=["a"])
    core.leases_listed(found, INTERVAL, T0_MS + 1000)
    assert core.desired == sset(ticker=["KRW-BTC"])


# -- status and the one controller signal ------------------------------------------------------


def test_the_status_names_every_field_with_the_counters() -> None:
    counters = Counters()
    core = LeaderCore(settings(), counters)
    idle = encode_status(core.status(0.0, T0_MS))
    assert (idle["leader"], idle["connected"], idle["epoch"]) == ("", "0", "0")
    core.took_lead(T0_MS)
    list_leases(core, 0.0, BTC)
    connect(core, 0.0, epoch=2)
    counters.upstream.frames_in = 10
    counters.upstream.dropped_unleased = 1
    counters.upstream.malformed = 2
    counters.upstream.last_error = "connection closed (1006)"
    counters.publish.published = 7
    counters.publish.dropped_overflow = 3
    counters.publish.dropped_redis = 4
    counters.publish.redis_errors = 1
    counters.publish.last_publish_ms = T0_MS + 5
    counters.broker.redis_errors = 2
    counters.publish.cache_stale_since_ms = T0_MS + 3
    counters.oom.observe(T0_MS + 4, 2, MemoryInfo(used=9, maxmemory=8, policy="noeviction"))
    counters.publish.history_written = 11
    counters.publish.history_refused = 12
    fill = counters.backfill
    fill.appended, fill.streams_failed, fill.requests, fill.rate_limited = 13, 14, 15, 16
    fill.filled, fill.partial, fill.lost = 17, 18, 19
    status = encode_status(core.status(1.0, T0_MS + 1_000))
    assert status == {
        "leader": "b1",
        "leader_token": "",
        "connected": "1",
        "epoch": "2",
        "reconnects": "0",
        "resubscribes": "1",
        "list_requests": "0",
        "verify_mismatches": "0",
        "deferred_sends": "0",
        "desired": '{"ticker":["KRW-BTC"]}',
        "upstream": "{}",  # sent, not yet confirmed by LIST_SUBSCRIPTIONS
        "last_error": "connection closed (1006)",
        "frames_in": "10",
        "frames_published": "7",
        # every frame received that did not reach Redis: 1 + 2 + 3 + 0 + 4
        "frames_dropped": "10",
        "frames_dropped_by_reason": (
            '{"unleased":1,"malformed":2,"overflow":3,"not_leader":0,"redis":4}'
        ),
        "frames_malformed": "2",
        "leases": "1",
        "invalid_leases": "0",
        "partial_leases": "0",
        "rejected_streams": "0",
        "last_frame_ms": str(T0_MS + 5),
        "updated_ms": str(T0_MS + 1_000),
        "status_interval_ms": "1000",
        "upstream_url": "wss://user:***@upbit.example/websocket/v1",
        "quiet_codes": "[]",
        "redis_errors": "3",
        "upstream_unconfirmed": "1",
        "refused_leases": "0",
        "refused": "{}",
        "unknown_codes": "[]",
        "markets": "0",
        "request_bytes": "569",
        "request_bytes_cap": "262144",
        "upstream_refusals": "0",
        "control_messages": "0",
        "control_ignored": "0",
        "redis_oom_since_ms": str(T0_MS + 4),
        "redis_oom_refusals": "2",
        "redis_used_memory": "9",
        "redis_maxmemory": "8",
        "redis_maxmemory_policy": "noeviction",
        "cache_stale_since_ms": str(T0_MS + 3),
        "history": "trade=10000,candle=1000,ticker=100,orderbook=100",
        "history_written": "11",
        "history_refused": "12",
        "backfill_pending": "0",
        "backfill_since_ms": "0",
        "backfill_appended": "13",
        "backfill_streams_failed": "14",
        "backfill_requests": "15",
        "backfill_rate_limited": "16",
        "gaps_filled": "17",
        "gaps_partial": "18",
        "gaps_lost": "19",
    }
    core.phase_ended()
    ended = core.status(2.0, T0_MS)
    assert ended.leader == "" and ended.connected is False


def test_counters_outlive_the_phase() -> None:
    counters = Counters()
    first = LeaderCore(settings(), counters)
    first.took_lead(T0_MS)
    first.command(b"garbage", 0.0)
    second = LeaderCore(settings(), counters, epoch=first.epoch)
    assert second.stats.bad_commands == 1 and second.controller.stats is counters.control


def test_the_controller_signal_fires_once_per_change() -> None:
    core = leading()
    assert not core.take_controller_changed()
    list_leases(core, 0.0, BTC)
    assert core.take_controller_changed() and not core.take_controller_changed()
