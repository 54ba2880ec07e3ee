"""The broker against a real redis-server and the simulator over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from broker.leases import LeaseStore
from broker.testing import wait_for, write_lease
from tests.support.broker_env import EventTap, fast_settings, sim_connections, started_broker
from tests.support.sim import running_simulator


def upstream_set(sim: Any) -> dict[str, set[str]] | None:
    """The one connection's subscription set as the simulator holds it (None: not exactly one)."""
    conns = sim_connections(sim)
    if len(conns) != 1:
        return None
    return {t: set(codes) for t, codes in conns[0]["subscriptions"].items()}


async def wait_upstream(sim: Any, expected: dict[str, set[str]], timeout: float = 10.0) -> None:
    await wait_for(
        lambda: upstream_set(sim) == expected, timeout, message=f"upstream == {expected}"
    )


async def test_seed_scenario_step_by_step(redis_client: aioredis.Redis, redis_url: str) -> None:
    async with running_simulator(seed=1) as sim, started_broker(fast_settings(redis_url, sim.url)):
        await write_lease(redis_client, "client-a", {"ticker": ["KRW-BTC"]}, ttl_ms=1500)
        await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
        await write_lease(
            redis_client, "client-b", {"ticker": ["KRW-ETH", "KRW-XRP"]}, ttl_ms=60_000
        )
        await write_lease(redis_client, "client-a", {"ticker": ["KRW-BTC"]}, ttl_ms=1500)
        await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH", "KRW-XRP"}})
        await write_lease(redis_client, "client-b", {"ticker": ["KRW-ETH"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH"}})
        # A is "killed": it stops renewing. Its lease must stop counting within TTL + 1 s.
        killed_at = time.monotonic()
        await wait_upstream(sim, {"ticker": {"KRW-ETH"}}, timeout=5.0)
        assert time.monotonic() - killed_at < 1.5 + 1.0 + 0.5


async def test_frames_reach_per_symbol_channels_unchanged(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with running_simulator(seed=2) as sim, started_broker(fast_settings(redis_url, sim.url)):
        pubsub = redis_client.pubsub()
        await pubsub.subscribe("t:ticker:KRW-BTC", "t:trade:KRW-ETH")
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"], "trade": ["KRW-ETH"]})
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg:
                seen[msg["channel"].decode()] = json.loads(msg["data"])
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert seen["t:ticker:KRW-BTC"]["type"] == "ticker"
        assert seen["t:ticker:KRW-BTC"]["code"] == "KRW-BTC"
        assert seen["t:trade:KRW-ETH"]["type"] == "trade"
        # The last-value cache holds the newest frame of each stream.
        cached = await redis_client.hget("t:last:ticker", "KRW-BTC")  # type: ignore[misc]
        assert cached is not None and json.loads(cached)["code"] == "KRW-BTC"


async def test_burst_of_200_lease_changes_coalesces(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=3, markets=40) as sim,
        started_broker(fast_settings(redis_url, sim.url, verify_subscriptions=False)) as broker,
    ):
        codes = [f"KRW-SIM{i:04d}" for i in range(1, 41)]
        store = LeaseStore(redis_client, "t")
        from broker.upbit.types import SubscriptionSet

        started = time.monotonic()
        for i in range(200):
            await store.write(
                f"churn-{i % 20}",
                SubscriptionSet.of({"ticker": [codes[(i * 7) % 40], codes[(i * 3) % 40]]}),
                ttl_ms=60_000,
                host="h",
                pid=1,
            )
        elapsed = time.monotonic() - started
        listing = await store.list_all()
        from broker.upbit.types import union

        expected = union(*(lease.subscriptions for lease in listing.leases)).by_type()
        await wait_upstream(sim, {t: set(c) for t, c in expected.items()})
        assert broker.controller is not None
        sent = broker.controller.stats.subscribe_requests
        # 200 changes became a handful of requests, within 4/s over the burst.
        assert sent <= 4 * (elapsed + 2) + 1, (sent, elapsed)
        state = sim.state()
        assert state["totals"]["rate_limited_messages"] == 0


async def test_upstream_drop_restores_union_and_publishes_gap(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=4) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
        EventTap(redis_client) as tap,
    ):
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC", "KRW-ETH"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH"}})
        await wait_for(lambda: broker.publisher and broker.publisher.stats.published > 0, 10)
        epoch = broker.epoch
        sim.drop()
        await wait_for(lambda: broker.epoch > epoch and broker.ready.is_set(), 10)
        await wait_upstream(sim, {"ticker": {"KRW-BTC", "KRW-ETH"}})
        gaps = await wait_for(lambda: tap.of("gap"), 5, message="gap event")
        assert gaps[-1]["epoch"] == broker.epoch
        assert gaps[-1]["reason"] == "reconnect"
        assert gaps[-1]["since_ms"] <= gaps[-1]["until_ms"]


async def test_upstream_stall_is_detected_and_recovered(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=5) as sim,
        started_broker(
            fast_settings(redis_url, sim.url, stall_timeout=1.0, ping_interval=30.0)
        ) as broker,
        EventTap(redis_client) as tap,
    ):
        await write_lease(redis_client, "c", {"trade": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"trade": {"KRW-BTC"}})
        epoch = broker.epoch
        sim.stall(3.0)
        await wait_for(lambda: broker.epoch > epoch and broker.ready.is_set(), 10)
        gaps = await wait_for(lambda: tap.of("gap"), 5, message="gap event")
        assert gaps[-1]["reason"] == "stall"
        assert broker.upstream is not None and broker.upstream.stats.stalls >= 1


async def test_zero_leases_keeps_the_connection_open(redis_url: str) -> None:
    async with (
        running_simulator(seed=6, idle_timeout=1.5) as sim,
        started_broker(fast_settings(redis_url, sim.url, ping_interval=0.5)) as broker,
    ):
        await wait_for(lambda: len(sim_connections(sim)) == 1, 5)
        first = sim_connections(sim)[0]["id"]
        await asyncio.sleep(3.5)  # longer than the simulator's idle cut: the point of the test
        conns = sim_connections(sim)
        assert [c["id"] for c in conns] == [first]
        assert broker.upstream is not None and broker.upstream.stats.reconnects == 0


async def test_shrinking_to_empty_opens_a_fresh_connection(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=7) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
    ):
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
        await LeaseStore(redis_client, "t").release("c")
        await wait_upstream(sim, {})
        assert broker.upstream is not None
        assert broker.upstream.stats.fresh_connection_switches == 1
        assert broker.upstream.stats.reconnects == 0


async def test_snapshot_while_others_stream(redis_client: aioredis.Redis, redis_url: str) -> None:
    async with (
        running_simulator(seed=8) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
    ):
        await write_lease(redis_client, "streamer", {"trade": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"trade": {"KRW-BTC"}})
        pubsub = redis_client.pubsub()
        await pubsub.subscribe("t:trade:KRW-BTC")
        # A snapshot of something nobody streams, plus an unknown code.
        await redis_client.rpush(  # type: ignore[misc]
            "t:requests",
            json.dumps(
                {
                    "op": "snapshot",
                    "id": "s1",
                    "type": "ticker",
                    "codes": ["KRW-ETH", "KRW-NOPE"],
                    "timeout_ms": 2000,
                }
            ),
        )
        await redis_client.publish("t:control", "request")
        reply = await redis_client.blpop(["t:reply:s1"], timeout=10)  # type: ignore[misc]
        assert reply is not None
        answer = json.loads(reply[1])
        assert answer["ok"] is True
        assert answer["frames"]["KRW-ETH"]["code"] == "KRW-ETH"
        assert answer["source"]["KRW-ETH"] == "upstream"
        assert answer["missing"] == ["KRW-NOPE"]
        # The realtime stream never stopped: upstream still holds it and frames keep coming.
        assert upstream_set(sim) is not None and "KRW-BTC" in upstream_set(sim).get("trade", set())  # type: ignore[union-attr]
        answered_ms = int(time.time() * 1000)
        fresh = 0
        deadline = time.monotonic() + 10
        while fresh < 3 and time.monotonic() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg and json.loads(msg["data"])["timestamp"] > answered_ms:
                fresh += 1  # a trade that happened after the snapshot was answered
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert fresh >= 3
        assert broker.publisher is not None
        # A second snapshot of a streaming code comes from the cache.
        await redis_client.rpush(  # type: ignore[misc]
            "t:requests",
            json.dumps({"op": "snapshot", "id": "s2", "type": "trade", "codes": ["KRW-BTC"]}),
        )
        await redis_client.publish("t:control", "request")
        reply = await redis_client.blpop(["t:reply:s2"], timeout=10)  # type: ignore[misc]
        assert reply is not None
        answer = json.loads(reply[1])
        assert answer["source"] == {"KRW-BTC": "cache"}


async def test_garbage_leases_are_skipped_and_counted(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with running_simulator(seed=9) as sim, started_broker(fast_settings(redis_url, sim.url)):
        deadline_ms = int(time.time() * 1000) + 60_000
        await redis_client.hset("t:lease:bad1", mapping={"v": "1", "subs": "{not json"})  # type: ignore[misc]
        await redis_client.hset(  # type: ignore[misc]
            "t:lease:bad2", mapping={"v": "1", "client_id": "bad2", "subs": '{"ticker":["KRW-*"]}'}
        )
        await redis_client.zadd("t:leases", {"bad1": deadline_ms, "bad2": deadline_ms})
        await write_lease(redis_client, "good", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC"}})

        async def invalid_count() -> int:
            raw = await redis_client.hget("t:status", "invalid_leases")  # type: ignore[misc]
            return int(raw or 0)

        assert await wait_for(invalid_count, 5) == 2


async def test_resubscribe_command_is_confirmed(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with running_simulator(seed=10) as sim, started_broker(fast_settings(redis_url, sim.url)):
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
        await redis_client.rpush("t:requests", json.dumps({"op": "resubscribe", "id": "r1"}))  # type: ignore[misc]
        await redis_client.publish("t:control", "request")
        reply = await redis_client.blpop(["t:reply:r1"], timeout=10)  # type: ignore[misc]
        assert reply is not None
        answer = json.loads(reply[1])
        assert answer["ok"] is True
        assert answer["upstream"] == {"ticker": ["KRW-BTC"]}


async def test_status_hash_describes_the_leader(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=11) as sim,
        started_broker(fast_settings(redis_url, sim.url, broker_id="b-1")),
    ):
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"ticker": {"KRW-BTC"}})

        async def status() -> dict[str, Any] | None:
            raw = await redis_client.hgetall("t:status")  # type: ignore[misc]
            st = {k.decode(): v.decode() for k, v in raw.items()}
            return st if st.get("upstream") == '{"ticker":["KRW-BTC"]}' else None

        st = await wait_for(status, 5)
        assert st is not None
        assert st["leader"] == "b-1"
        assert st["connected"] == "1"
        assert json.loads(st["desired"]) == {"ticker": ["KRW-BTC"]}
        assert int(st["epoch"]) >= 1


async def test_muted_code_is_detected_without_dropping_the_connection(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    async with (
        running_simulator(seed=12, rate=500) as sim,
        started_broker(fast_settings(redis_url, sim.url, quiet_after=1.0)) as broker,
    ):
        await write_lease(redis_client, "c", {"trade": ["KRW-BTC", "KRW-ETH"]}, ttl_ms=60_000)
        await wait_upstream(sim, {"trade": {"KRW-BTC", "KRW-ETH"}})
        assert broker.publisher is not None
        await wait_for(lambda: len(broker.publisher.last_seen) == 2, 10, message="both codes flow")
        epoch = broker.epoch
        sim.mute(["KRW-ETH"], 3.0)
        await wait_for(lambda: broker.quiet_codes() == ["trade:KRW-ETH"], 10, message="ETH quiet")
        assert broker.epoch == epoch  # a quiet code is not a dead connection
        assert broker.upstream is not None and broker.upstream.stats.reconnects == 0
        # Recovered: once the mute ends ETH flows again on the same connection.
        await wait_for(lambda: broker.quiet_codes() == [], 15, message="ETH flows again")
        assert broker.epoch == epoch
        assert broker.stats.quiet_refreshes >= 1


async def test_redis_restart_keeps_the_union_until_leases_are_reasserted(
    redis_server: Any, redis_url: str
) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    client = aioredis.Redis.from_url(
        redis_url, retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=10)
    )
    try:
        async with (
            running_simulator(seed=13) as sim,
            started_broker(fast_settings(redis_url, sim.url)) as broker,
        ):
            await write_lease(client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
            await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
            first = sim_connections(sim)[0]["id"]
            redis_server.restart()  # empty: every lease is gone
            # The broker notices and holds the union; nothing is unsubscribed meanwhile.
            await wait_for(
                lambda: broker.core.in_grace(time.monotonic()), 10, message="broker holds the union"
            )
            assert upstream_set(sim) == {"ticker": {"KRW-BTC"}}
            await write_lease(client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)  # heartbeat

            async def status_back() -> bool:
                return bool(await client.hget("t:status", "leader"))  # type: ignore[misc]

            await wait_for(status_back, 10, message="status rewritten")
            await wait_for(
                lambda: not broker.core.in_grace(time.monotonic()), 10, message="grace over"
            )
            assert upstream_set(sim) == {"ticker": {"KRW-BTC"}}
            assert [c["id"] for c in sim_connections(sim)] == [first]
            assert broker.is_leader
    finally:
        await client.aclose()


async def test_a_control_message_reads_only_its_lease_and_expiry_still_sweeps(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """Heartbeats and changes name their lease on the control channel: the broker reads that
    lease alone (no full listing per heartbeat); a lease that stops renewing is still swept
    by the full listing at its deadline. reconcile_interval is long, so any full listing
    seen here was caused by a deadline, not by the clock."""
    async with running_simulator(seed=5) as sim:
        settings = fast_settings(redis_url, sim.url, reconcile_interval=60.0)
        async with started_broker(settings) as broker:
            await write_lease(redis_client, "steady", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
            await wait_upstream(sim, {"ticker": {"KRW-BTC"}})
            listings, reads = broker.stats.lease_listings, broker.stats.lease_reads
            for _ in range(10):  # heartbeats: the same lease again
                await write_lease(redis_client, "steady", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
            await wait_for(lambda: broker.stats.lease_reads >= reads + 1, 5, message="reads")
            # A change rides the same road: only the named lease is read.
            await write_lease(redis_client, "steady", {"ticker": ["KRW-ETH"]}, ttl_ms=60_000)
            await wait_upstream(sim, {"ticker": {"KRW-ETH"}})
            await write_lease(redis_client, "brief", {"trade": ["KRW-XRP"]}, ttl_ms=3000)
            await wait_upstream(sim, {"ticker": {"KRW-ETH"}, "trade": {"KRW-XRP"}})
            assert broker.stats.lease_listings == listings  # no heartbeat caused a full read
            # "brief" stops renewing: the listing at its deadline sweeps it.
            await wait_upstream(sim, {"ticker": {"KRW-ETH"}}, timeout=10.0)
            assert broker.stats.lease_listings > listings
            assert broker.stats.lease_expiries >= 1
            # A release is read alone too.
            await LeaseStore(redis_client, "t").release("steady")
            await wait_for(lambda: broker.stats.leases == 0, 5, message="released")
            # A message naming no valid client id cannot be pinned: every lease is read.
            listings = broker.stats.lease_listings
            await redis_client.publish("t:control", "lease not a client id")
            await wait_for(
                lambda: broker.stats.lease_listings > listings, 5, message="a full listing"
            )


async def test_a_reconnects_gap_event_comes_before_its_fresh_snapshots(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """On one pub/sub connection (events and the data channel), the `gap` event of a reconnect
    arrives before the SNAPSHOT frames of the new connection: an application that resets its
    state on a gap keeps the snapshots that close it (the connection subscribes only once its
    gap and connected events are out)."""
    received: list[tuple[str, bytes]] = []
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("t:events", "t:ticker:KRW-BTC")

    async def pump() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                received.append((msg["channel"].decode(), msg["data"]))

    def realtime_frames() -> int:
        return sum(1 for ch, d in received if ch.endswith("KRW-BTC") and b"REALTIME" in d)

    task = asyncio.create_task(pump())
    try:
        async with (
            running_simulator(seed=4) as sim,
            started_broker(fast_settings(redis_url, sim.url)) as broker,
        ):
            await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
            await wait_for(lambda: realtime_frames() >= 2, 15, message="realtime frames")
            epoch = broker.epoch
            dropped_at = len(received)
            sim.drop()
            await wait_for(lambda: broker.epoch > epoch, 10, message="reconnected")

            def gap_index() -> int | None:
                for i, (channel, data) in enumerate(received[dropped_at:], dropped_at):
                    event = json.loads(data) if channel == "t:events" else {}
                    if event.get("event") == "gap" and "state" not in event:
                        return i + 1  # never 0: wait_for waits for a true value
                return None

            before_gap = received[dropped_at : await wait_for(gap_index, 10, message="gap") - 1]
            snapshots = [d for ch, d in before_gap if b'"SNAPSHOT"' in d]
            assert snapshots == [], "a fresh SNAPSHOT was published before the gap event"
            await wait_for(
                lambda: any(b'"SNAPSHOT"' in d for _, d in received[dropped_at:]),
                10,
                message="the new connection's snapshot",
            )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
