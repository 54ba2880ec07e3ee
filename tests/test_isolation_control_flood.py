"""Isolation: a flood on the control channel hurts nobody (issue 12, item 4).

The documented least-privilege consumer ACL (docs/reliability.md, ``ACL_CONSUMER``) lets any
consumer PUBLISH on ``{ns}:control``. Before the fix, one client publishing 50,000 messages a
second cost the broker most of a core: redis-py's pub/sub parse (~13 us a message), the core fed
and the lease task woken once per message, a full listing every coalescing window for messages
naming nothing, an HGETALL for every made-up client id, an LPOP for every ``request``. Now the
channel is read in bursts (``broker.control_channel``), folded per tick
(``broker.core.control_messages``), and the reads it can cause are bounded
(``broker.core.reconcile``: unknown ids per read, one asked listing per ``LISTING_GAP``).

The fast tests hold the pure rules; the slow one floods a real broker process through the
consumer ACL and counts what the flood made the broker do in Redis (``INFO commandstats``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker import control_channel, resp
from broker.contract import Status, decode_status
from broker.core.control_messages import MAX_BATCH_IDS, ControlBatch
from broker.core.leader import LeaderCore, Wake
from broker.core.lease import Lease, LeaseListing, LeaseReads
from broker.core.reconcile import (
    ASKED_LEASES_PER_S,
    LISTING_GAP,
    MAX_NAMED_READS,
    MAX_UNKNOWN_READS,
    LeaseReconciler,
)
from broker.settings import BrokerSettings
from broker.testing import (
    RedisServer,
    broker_process,
    consumer_process,
    read_status,
    scaled,
    simulator_process,
    wait_for,
    write_lease,
)
from broker.testing.processes import ManagedProcess, spawn
from broker.upbit.types import SubscriptionSet
from tests.support.broker_env import fast_settings, started_broker
from tests.support.sim import running_simulator
from tests.test_security_auth import (
    ADMIN,
    BROKER_PW,
    CONSUMER_PW,
)

COALESCE = 0.05
INTERVAL = 1.0
T0_MS = 1_700_000_000_000


# -- the pure rules ---------------------------------------------------------------------------


def batch_of(*messages: bytes) -> ControlBatch:
    batch = ControlBatch()
    for data in messages:
        batch.add(data)
    return batch


def test_a_tick_of_messages_folds_into_one_batch() -> None:
    heartbeats = [b"lease a"] * 1000
    batch = batch_of(*heartbeats, b"release b", b"request", b"request", b"hello", b"lease ")
    assert batch.messages == 1005
    assert batch.ids == {b"a", b"b"}  # a thousand heartbeats of one lease: one read
    assert batch.commands and batch.read_all
    assert batch.ignored == 2  # "hello" and "lease " name neither a lease nor a command
    quiet = batch_of(b"lease a", b"lease a")
    assert not quiet.read_all and not quiet.commands and quiet.ignored == 0
    assert not ControlBatch()


def test_a_batch_keeps_a_bounded_number_of_ids_and_asks_for_a_listing_past_them() -> None:
    batch = batch_of(*(b"lease ghost-%d" % i for i in range(MAX_BATCH_IDS + 10)))
    assert len(batch.ids) == MAX_BATCH_IDS
    assert batch.read_all and batch.ignored == 10
    batch.add(b"lease ghost-0")  # an id already kept is still kept
    assert batch.ignored == 10


def reconciler() -> LeaseReconciler:
    r = LeaseReconciler(interval=INTERVAL, coalesce_delay=COALESCE)
    r.begin(0.0)
    r.listed(LeaseListing([], [], [], T0_MS), 0.0)
    return r


def lease(client_id: str) -> Lease:
    return Lease(
        client_id=client_id,
        host="h",
        pid=1,
        subscriptions=SubscriptionSet.of({"ticker": ["KRW-BTC"]}),
        ttl_ms=60_000,
        created_ms=T0_MS,
        renewed_ms=T0_MS,
        deadline_ms=T0_MS + 60_000,
    )


def test_messages_naming_nothing_cost_one_full_listing_per_gap_however_many() -> None:
    r = reconciler()
    listings = 0
    now = 0.1
    while now < 1.0 - 1e-9:  # a flood: a message every millisecond until the periodic listing
        r.read_all_soon(now)
        if r.due() <= now:
            assert r.begin(now).full
            r.listed(LeaseListing([], [], [], T0_MS), now)
            listings += 1
        now += 0.001
    # at 0.25, 0.5 and 0.75 (the old rule: one every coalescing window, 17 here)
    assert listings == 3


def test_unknown_ids_are_read_a_bounded_number_per_read_known_ones_always() -> None:
    r = reconciler()
    r.begin(0.0)
    r.listed(LeaseListing([lease("known")], [], [], T0_MS), 0.0)
    taken = [r.named(f"ghost-{i}", 0.1) for i in range(MAX_UNKNOWN_READS + 100)]
    assert taken.count(True) == MAX_UNKNOWN_READS  # the rest: a full listing covers them
    assert r.named("known", 0.1)  # a lease we serve is read whatever the flood
    assert not r.named("not an id!", 0.1)  # names no lease hash: never read by itself
    read = r.begin(0.1 + COALESCE)
    assert not read.full  # the asked listing waits for its gap; the named ids do not
    assert len(read.ids) == MAX_UNKNOWN_READS + 1 and "known" in read.ids
    assert r.due() == pytest.approx(LISTING_GAP)
    assert r.begin(LISTING_GAP).full
    # the next read takes unknown ids again
    assert r.named("ghost-new", 0.3)


def test_known_ids_are_read_a_bounded_number_per_read_too() -> None:
    # ids of served leases may be learned (lease events name them): a flood naming all of them
    # must not cost a listing's worth of reads every window
    r = reconciler()
    many = [lease(f"c{i}") for i in range(MAX_NAMED_READS + 50)]
    r.begin(0.0)
    r.listed(LeaseListing(many, [], [], T0_MS), 0.0)
    taken = [r.named(f"c{i}", 0.1) for i in range(len(many))]
    assert taken.count(True) == MAX_NAMED_READS
    assert len(r.begin(0.1 + COALESCE).ids) == MAX_NAMED_READS
    assert r.begin(r.due()).full  # the rest: the asked listing


@pytest.mark.parametrize(
    ("leases", "gap"),
    [
        (10, LISTING_GAP),  # few leases: the gap that keeps a newcomer within 0.5 s
        (1_000, 1_000 / ASKED_LEASES_PER_S),  # many: asked listings read a bounded rate
        # 25 s: the periodic listing, at most PERIODIC_LEASES_PER_S, is further off still
        (50_000, 50_000 / ASKED_LEASES_PER_S),
    ],
)
def test_the_gap_between_asked_listings_grows_with_the_leases(leases: int, gap: float) -> None:
    r = LeaseReconciler(interval=INTERVAL, coalesce_delay=COALESCE)
    r.begin(0.0)
    r.listed(LeaseListing([lease(f"c{i}") for i in range(leases)], [], [], T0_MS), 0.0)
    r.read_all_soon(0.01)
    assert r.due() == pytest.approx(gap)


def test_a_real_change_is_read_one_window_after_its_message_while_a_listing_waits() -> None:
    r = reconciler()
    r.read_all_soon(0.1)  # garbage: a listing at LISTING_GAP
    assert r.named("newcomer", 0.12)
    assert r.due() == pytest.approx(0.12 + COALESCE)
    read = r.begin(0.12 + COALESCE)
    assert not read.full and read.ids == {"newcomer"} and read.noticed_at == 0.12
    r.read(LeaseReads([lease("newcomer")], [], [], T0_MS), 0.12 + COALESCE)
    assert "newcomer" in r.leases
    read = r.begin(r.due())
    assert read.full and r.due() > LISTING_GAP


def test_the_core_is_fed_once_per_tick_counts_the_flood_and_wakes_each_task_once() -> None:
    core = LeaderCore(BrokerSettings(coalesce_delay=COALESCE, reconcile_interval=INTERVAL))
    core.took_lead(T0_MS)
    core.begin_lease_read(0.0)
    core.leases_listed(LeaseListing([], [], [], T0_MS), 0.0, T0_MS)
    flood = [b"lease a", b"request", b"garbage", b"lease not an id!"] * 250
    assert core.control_messages(batch_of(*flood), 0.1) == {Wake.LEASES, Wake.COMMANDS}
    assert core.control_messages(batch_of(b"request"), 0.2) == {Wake.COMMANDS}
    assert core.control_messages(batch_of(b"lease a"), 0.3) == {Wake.LEASES}
    # garbage (250) and the one distinct id that is no client id
    assert (core.stats.control_messages, core.stats.control_ignored) == (1002, 251)
    status = core.status(0.3, T0_MS)
    assert (status.control_messages, status.control_ignored) == (1002, 251)


# -- the subscription, read in bursts (broker.control_channel) ---------------------------------


async def publish_many(redis: aioredis.Redis, messages: list[bytes]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for data in messages:
            pipe.publish("t:control", data)
        await pipe.execute()


@pytest.mark.parametrize("road", ["raw", "redis-py"])
async def test_the_subscription_folds_what_arrived_and_reports_a_break(
    redis_client: aioredis.Redis, road: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if road == "redis-py":  # a client the raw road cannot reach (a fake, a credential provider)
        monkeypatch.setattr(resp.RespAddress, "from_client", lambda _: None)
    sub = await control_channel.subscribe_control(redis_client, "t:control")
    try:
        assert type(sub).__name__ == ("_RawControl" if road == "raw" else "_PubSubControl")
        await publish_many(redis_client, [b"lease a"] * 500 + [b"request", b"junk"])
        batches: list[ControlBatch] = []
        while sum(b.messages for b in batches) < 502:
            async with asyncio.timeout(5):
                batches.append(await sub.take(time.monotonic() + 0.05))
        assert len(batches) <= 3  # folded by the chunk, not one per message
        assert set().union(*(b.ids for b in batches)) == {b"a"}
        assert any(b.commands for b in batches) and any(b.read_all for b in batches)
        if road == "raw":  # the raw road owns its connection: a kill is an error, not a retry
            assert await redis_client.client_kill_filter(_type="pubsub") == 1
            with pytest.raises(RedisConnectionError):
                async with asyncio.timeout(5):
                    await sub.take(0)
    finally:
        await sub.aclose()


async def test_a_subscription_whose_pings_go_unanswered_is_broken(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_channel, "IDLE_PING", 0.2)
    sub = await control_channel.subscribe_control(redis_client, "t:control")
    try:
        # an idle channel is PINGed and stays up while Redis answers
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.7):
                await sub.take(0)
        # a Redis that answers nothing (paused) breaks it within two PING intervals
        await redis_client.client_pause(1000, all=True)
        try:
            with pytest.raises(RedisConnectionError, match="PING unanswered"):
                async with asyncio.timeout(2):
                    await sub.take(0)
        finally:
            await redis_client.client_unpause()
    finally:
        await sub.aclose()


async def subscribers(redis: aioredis.Redis) -> int:
    return int((await redis.pubsub_numsub("t:control"))[0][1])


async def test_a_killed_control_subscription_is_noticed_and_every_lease_read_again(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=5) as sim,
        started_broker(fast_settings(redis_url, sim.url, reconcile_interval=60.0)) as broker,
    ):
        await write_lease(redis_client, "a", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_for(lambda: broker.stats.leases == 1, 5, message="a served")
        # nothing due before the periodic listing, a minute away (the start's are done)
        await wait_for(lambda: broker.core.next_lease_read() > time.monotonic() + 30, 5)
        listings, errors = broker.stats.lease_listings, broker.stats.redis_errors
        assert await redis_client.client_kill_filter(_type="pubsub") == 1
        await wait_for(lambda: subscribers(redis_client), 5, message="resubscribed")
        # the messages that may have been missed meanwhile are covered by a full listing
        await wait_for(lambda: broker.stats.lease_listings > listings, 5, message="a listing")
        assert broker.stats.redis_errors > errors
        await write_lease(redis_client, "b", {"ticker": ["KRW-ETH"]}, ttl_ms=60_000)
        await wait_for(lambda: broker.stats.leases == 2, 5, message="b read by a message")
        assert broker.stats.control_messages >= 1


# -- a flood against a real broker ------------------------------------------------------------

# One raw socket, AUTH as the least-privilege consumer, then pipelined PUBLISH at a paced rate;
# the replies are read and dropped by a thread. Prints one JSON line: what it sent, how fast.
FLOODER = r"""
import json, socket, sys, threading, time
host, port, user, password, channel, rate, seconds, kind = sys.argv[1:9]
rate, seconds, channel = float(rate), float(seconds), channel.encode()
def pack(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)
def message(i):
    if kind == "ids":  # made-up client ids, never the same twice
        return b"lease ghost-%d" % i
    if kind == "requests":  # "commands wait" (none do)
        return b"request"
    # mixed: garbage, made-up ids, commands, a real lease's id
    return (b"hello %d" % i, b"lease ghost-%d" % i, b"request", b"release victim")[i % 4]
CHUNK = 500
chunks = [b"".join(pack(b"PUBLISH", channel, message(c * CHUNK + j)) for j in range(CHUNK))
          for c in range(200)]
s = socket.create_connection((host, int(port)))
s.sendall(pack(b"AUTH", user.encode(), password.encode()))
assert s.recv(64).startswith(b"+OK"), "AUTH refused"
def drain():
    try:
        while s.recv(1 << 20):
            pass
    except OSError:
        pass
threading.Thread(target=drain, daemon=True).start()
print(json.dumps({"started": time.time()}), flush=True)
start, sent, i = time.monotonic(), 0, 0
while (now := time.monotonic()) - start < seconds:
    ahead = sent / rate - (now - start)
    if ahead > 0:
        time.sleep(ahead)
    s.sendall(chunks[i % len(chunks)])
    sent += CHUNK
    i += 1
elapsed = time.monotonic() - start
print(json.dumps({"sent": sent, "seconds": elapsed, "rate": sent / elapsed}), flush=True)
s.close()
"""

FLOOD_RATE = 50_000
FLOOD_S = 8.0
CHANGES = ("KRW-ETH", "KRW-XRP", "KRW-SOL")
# What the flood may make the broker do in Redis, per second, whatever its rate. The broker runs
# FAST_BROKER_ENV (coalescing window 0.02 s, periodic listing every 0.5 s); the rules are
# reconcile.LISTING_GAP (0.25 s), reconcile.MAX_UNKNOWN_READS (64 per read) and
# leader_phase.CONTROL_TICK (0.01 s). Written out, so a change of those rules shows here.
MAX_LISTINGS_PER_S = 1 / 0.25 + 1 / 0.5 + 2  # asked + periodic + slack (old: one per window)
MAX_HGETALL_PER_S = (64 + 8) / 0.02  # unknown + known ids per window (old: one per made-up id)
MAX_LPOP_PER_S = 1 / 0.01 + 5  # one per tick, the 1 s timer, slack (old: one per message)


async def command_calls(admin: aioredis.Redis) -> dict[str, int]:
    """``INFO commandstats``: calls per command so far (every client's, scripts' included)."""
    stats: dict[str, Any] = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def upstream_tickers(sim: Any) -> set[str]:
    conn = await sim.connection()
    return set() if conn is None else set(conn["subscriptions"].get("ticker", []))


async def broker_status(admin: aioredis.Redis) -> Status | None:
    raw = await read_status(admin)
    return decode_status(raw) if raw else None


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mixed", "ids", "requests"])
async def test_a_control_flood_costs_little_and_a_real_lease_change_still_goes_out(
    acl_redis: RedisServer, tmp_path: Path, kind: str
) -> None:
    admin_url = acl_redis.url_for(password=ADMIN)
    admin = aioredis.Redis.from_url(admin_url)
    try:
        async with (
            simulator_process(tmp_path, rate=200, seed=12, markets=20) as sim,
            broker_process(  # the broker under its documented ACL: the raw road AUTHs as it
                acl_redis.url_for("broker", BROKER_PW), sim.url, "b1", tmp_path
            ) as broker,
            consumer_process(admin_url, "victim", {"ticker": ["KRW-BTC"]}, tmp_path) as victim,
        ):
            await wait_for(lambda: upstream_tickers(sim), 15, message="the victim upstream")
            await wait_for(lambda: victim.messages(), 10, message="the victim's first frame")

            flooder = ManagedProcess(
                spawn(
                    [
                        sys.executable,
                        "-c",
                        FLOODER,
                        "127.0.0.1",
                        str(acl_redis.port),
                        "consumer-a",  # the documented least-privilege consumer, nothing more
                        CONSUMER_PW,
                        "t:control",
                        str(FLOOD_RATE),
                        str(FLOOD_S),
                        kind,
                    ],
                    tmp_path / "flooder.log",
                ),
                "flooder",
                tmp_path / "flooder.log",
            )
            try:
                await wait_for(lambda: "started" in flooder.output(), 10, message="the flood")
                # let the flood reach its pace before measuring
                await wait_for(
                    lambda: _status_says(admin, lambda s: s.control_messages > FLOOD_RATE),
                    10,
                    message="the broker reading the flood",
                )
                calls_before = await command_calls(admin)
                cpu_before, t_before = broker.cpu_seconds(), time.monotonic()
                victim_before = len(victim.messages())

                latencies: list[float] = []
                for code in CHANGES:  # a newcomer's lease, written by the consumers' script
                    written = time.monotonic()
                    await write_lease(admin, f"new-{code}", {"ticker": [code]}, ttl_ms=60_000)
                    await wait_for(_holding(sim, code), 10, 0.005, message=f"{code} upstream")
                    latencies.append(time.monotonic() - written)
                # a second consumer process adds a code of its own, and receives it
                async with consumer_process(
                    admin_url, "second", {"ticker": ["KRW-ADA"]}, tmp_path
                ) as second:
                    await wait_for(
                        lambda: second.messages("t:ticker:KRW-ADA"), 10, message="ADA frames"
                    )
                assert flooder.alive, "the flood ended before the changes were made"
                # the measurement window: from the flood's full pace to its end
                await wait_for(lambda: not flooder.alive, FLOOD_S + 10, message="flood over")
                calls_after = await command_calls(admin)
                cpu_after, t_after = broker.cpu_seconds(), time.monotonic()
                victim_during = len(victim.messages()) - victim_before
            finally:
                flooder.kill()
            flood = json.loads(flooder.output().strip().splitlines()[-1])
            status = await wait_for(
                lambda: _status_says(admin, lambda s: s.control_messages >= flood["sent"]),
                10,
                message="the broker read every flood message",
            )
            gaps = victim.gaps()
    finally:
        await admin.aclose()

    window = t_after - t_before
    per_s = {
        name: (calls_after.get(name, 0) - calls_before.get(name, 0)) / window
        for name in ("zrange", "hgetall", "lpop")
    }
    cpu = cpu_after - cpu_before
    print(
        f"\n[figures] control flood ({kind}): {flood['sent']} messages at {flood['rate']:.0f}/s"
        f"; measured over {window:.1f} s: "
        f"broker cpu={cpu:.2f} s ({cpu / window:.2f} core), "
        f"full listings (ZRANGE)={per_s['zrange']:.1f}/s, HGETALL={per_s['hgetall']:.0f}/s, "
        f"LPOP={per_s['lpop']:.0f}/s; lease change latency="
        f"{', '.join(f'{x:.3f}' for x in latencies)} s; victim frames={victim_during}; "
        f"status control_messages={status.control_messages} "
        f"control_ignored={status.control_ignored}"
    )
    assert flood["rate"] > 0.8 * FLOOD_RATE, "the flooder could not reach its rate"
    # what the flood made the broker do is bounded, whatever its rate
    assert per_s["zrange"] <= MAX_LISTINGS_PER_S
    assert per_s["hgetall"] <= MAX_HGETALL_PER_S
    assert per_s["lpop"] <= MAX_LPOP_PER_S
    # the broker kept up (it read every message: no backlog holds a real one back), and says so
    if kind == "mixed":
        assert status.control_ignored >= flood["sent"] // 4  # the garbage, at least
    # the victim kept receiving, and nobody lost anything
    assert victim_during > 0 and gaps == []
    # the goal: a real change goes out within 0.5 s of its write (measured: <= 0.26 s;
    # the slowest road is a newcomer's id lost among made-up ones, read by the asked listing)
    assert max(latencies) < scaled(0.5), latencies


async def _status_says(admin: aioredis.Redis, predicate: Any) -> Any:
    status = await broker_status(admin)
    return status if status is not None and predicate(status) else None


def _holding(sim: Any, code: str) -> Callable[[], Awaitable[bool]]:
    async def holds() -> bool:
        return code in await upstream_tickers(sim)

    return holds
