"""Issue 12, items 6 and 11: a consumer is told of every loss, and only of real ones.

Item 6: a consumer paused longer than its lease TTL (SIGSTOP, a GC or VM pause) has its lease
lapse and its streams dropped from the union, while its pub/sub connection stays up. Its next
renewal re-creates the lease and must hand the application a ``lease-lapsed`` gap covering the
pause, from the old deadline until the renewal.

Item 11: anyone who may PUBLISH can post on ``{ns}:events``. The library accepts events only
from the broker the status names as leader, with an epoch that never goes back; others are
dropped and counted (``stats.events_rejected``).

Real redis-server, simulator and broker; the pause blocks the client's event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, simulator_process, wait_for
from consumers import LEASE_LAPSED, BrokerClient, Gap, StreamMessage
from tests.support.broker_env import fast_settings, started_broker
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

NS = "t"


async def test_a_consumer_paused_past_its_ttl_is_told_of_the_loss(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url, ttl = redis_server.url, 1.0
    lease_key = f"{NS}:lease:sleeper"
    async with (
        simulator_process(tmp_path, rate=200, seed=12) as sim,
        broker_process(url, sim.url, "lapse-b", tmp_path),
        BrokerClient(redis_url=url, namespace=NS, client_id="sleeper", lease_ttl=ttl) as client,
    ):
        await client.subscribe("trade", ["KRW-BTC"])
        await client.subscribe("ticker", ["KRW-ETH"])
        assert isinstance(await client.next_message(timeout=20), StreamMessage)
        old = await redis_client.hgetall(lease_key)
        old_deadline = int(old[b"deadline_ms"])

        async def lapsed_and_dropped() -> None:
            check = aioredis.Redis.from_url(url)

            async def dropped() -> bool:
                desired = await check.hget(f"{NS}:status", "desired")
                return not await check.exists(lease_key) and json.loads(desired or "{}") == {}

            try:
                await wait_for(dropped, 20, message="the lease lapsed, the union shrank")
            finally:
                await check.aclose()

        # A GC or VM pause: this event loop runs nothing (no heartbeat, no reading; the pub/sub
        # connection stays up) until the lease lapsed and the broker dropped its streams.
        failures: list[BaseException] = []

        def pause() -> None:
            try:
                asyncio.run(lapsed_and_dropped())
            except BaseException as exc:
                failures.append(exc)

        paused = threading.Thread(target=pause)
        paused.start()
        paused.join()
        assert not failures, failures

        gap: Gap | None = None
        async with asyncio.timeout(10):  # frames read after the pause come first
            while gap is None:
                item = await client.next_message()
                assert item is not None
                if isinstance(item, Gap):
                    assert item.reason == LEASE_LAPSED, item
                    gap = item
        new = await redis_client.hgetall(lease_key)
        assert gap.source == "local"
        # from the old deadline (when the broker could stop serving) to the re-creation
        assert gap.since_ms == old_deadline
        assert gap.until_ms == int(new[b"created_ms"]) > old_deadline
        assert gap.channels == (f"{NS}:ticker:KRW-ETH", f"{NS}:trade:KRW-BTC")
        assert client.stats.lease_lapses == 1
        # and the streams flow again
        item = await client.next_message(timeout=20)
        while not isinstance(item, StreamMessage):
            assert item is not None
            item = await client.next_message(timeout=20)


async def _gaps_until_marker(client: BrokerClient, redis_client: aioredis.Redis) -> list[Gap]:
    """Every gap ``messages()`` yields before a data frame the test publishes after them."""
    await redis_client.publish(f"{NS}:ticker:KRW-BTC", b'{"type":"ticker","code":"MARKER"}')
    gaps: list[Gap] = []
    while True:
        item = await client.next_message(timeout=10)
        assert item is not None, "no marker"
        if isinstance(item, Gap):
            gaps.append(item)
        elif isinstance(item, StreamMessage) and b"MARKER" in item.raw:
            return gaps


async def test_forged_events_are_dropped_and_the_leaders_are_delivered(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=13, rate=50) as sim,
        started_broker(fast_settings(redis_server.url, sim.url)),
        BrokerClient(
            redis_url=redis_server.url, namespace=NS, client_id="victim", lease_ttl=5
        ) as client,
    ):
        await client.subscribe("ticker", ["KRW-BTC"])
        raw_leader = await redis_client.hget(f"{NS}:status", "leader")
        assert isinstance(raw_leader, bytes)
        leader = raw_leader.decode()
        forged = {
            "event": "gap",
            "epoch": 999,
            "since_ms": 1,
            "until_ms": 2,
            "reason": "reconnect",
            "broker": "mallory",
        }
        await redis_client.publish(f"{NS}:events", json.dumps(forged))
        # a forged lease notice too (it would make the client think its lease is invalid)
        notice = {"event": "lease", "client_id": "victim", "state": "invalid", "broker": "x"}
        await redis_client.publish(f"{NS}:events", json.dumps(notice))
        await wait_for(lambda: client.stats.events_rejected == 2, 10, message="both rejected")

        # the real leader's gap after an upstream drop is delivered
        sim.drop()
        await wait_for(lambda: client.stats.gaps >= 1, 15, message="the broker's gap")
        gaps = await _gaps_until_marker(client, redis_client)
        assert [(g.reason, g.broker) for g in gaps] == [("reconnect", leader)]
        real_epoch = gaps[0].epoch
        assert real_epoch is not None and real_epoch >= 2
        assert client.stats.events_rejected == 2
        assert client.lease_notice is None

        # the real leader's id with an epoch older than the last seen: dropped
        replay = {**forged, "broker": leader, "epoch": real_epoch - 1}
        await redis_client.publish(f"{NS}:events", json.dumps(replay))
        await wait_for(lambda: client.stats.events_rejected == 3, 10, message="old epoch")
        assert await _gaps_until_marker(client, redis_client) == []
        assert client.stats.gaps == 1
