"""Announced loss, against a real redis-server and the simulator (issue 12, items 7 and 8).

- Frames dropped when the broker's publish connection breaks (``CLIENT KILL`` of it while
  frames flow) are announced to consumers as a ``redis`` gap, and the gaps cover every frame
  counted dropped meanwhile.
- A fleet restart's worth of commands at once (1,000 snapshots, 200 resubscribes) is answered
  in full, and the leader lock's renewal and the status never starve behind them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.clock import now_ms
from broker.contract import ResubscribeCommand, SnapshotCommand, encode_command
from broker.core.leader import MAX_SNAPSHOT_WAITERS
from broker.keys import Keys
from broker.service import Broker
from broker.testing import wait_for, write_lease
from consumers.items import Gap, parse_event
from tests.support.broker_env import EventTap, fast_settings, started_broker
from tests.support.sim import running_simulator

CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA"]


def _drops(broker: Broker) -> int:
    pub = broker.counters.publish
    return pub.dropped_redis + pub.dropped_not_leader


def _published_past(broker: Broker, published: int) -> Callable[[], bool]:
    return lambda: broker.counters.publish.published > published


async def _publisher_connection(redis: aioredis.Redis) -> str | None:
    """The id of the broker's raw RESP publish connection in ``CLIENT LIST``: it sets no
    name (redis-py's clients are ``broker:{id}``) and only ever PUBLISHes and HSETs."""
    clients: list[dict[str, Any]] = await redis.client_list()
    for client in clients:
        if not client.get("name") and client.get("cmd") in ("publish", "hset"):
            return str(client["id"])
    return None


async def test_a_killed_publish_connection_is_announced_as_a_redis_gap(
    redis_client: aioredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        running_simulator(seed=7, rate=2000) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
        EventTap(redis_client) as tap,
    ):
        await write_lease(redis_client, "c", {"ticker": CODES, "trade": CODES})
        pub = broker.counters.publish
        await wait_for(lambda: pub.published > 200, 10.0, message="frames flow")
        before_drops, epoch = _drops(broker), broker.epoch
        started_ms = now_ms()
        # Kill the publisher's connection while frames flow until some are lost (a kill that
        # falls between two bursts may lose none: then nothing is owed, and we kill again).
        for _ in range(20):
            conn_id = await wait_for(
                lambda: _publisher_connection(redis_client), 5.0, message="publish connection"
            )
            published = pub.published
            assert await redis_client.client_kill_filter(_id=conn_id) == 1
            await wait_for(_published_past(broker, published), 10.0, message="publishing again")
            if _drops(broker) > before_drops:
                break
        assert _drops(broker) > before_drops, "no kill lost a frame"

        gaps = await wait_for(
            lambda: [e for e in tap.of("gap") if e.get("reason") == "redis"],
            10.0,
            message="a redis gap event",
        )
        # The gaps cover exactly the frames counted dropped while publishing was broken:
        # unconfirmed ones (``redis``) and those held back until the lock was renewed.
        await wait_for(
            lambda: broker.core.gaps.redis_frames == _drops(broker) - before_drops,
            10.0,
            message="every dropped frame announced",
        )
        for gap in gaps:
            assert started_ms - 5_000 <= gap["since_ms"] <= gap["until_ms"] <= now_ms()
            assert gap["epoch"] == epoch == broker.epoch  # upstream never broke
            assert gap["broker"] == broker.settings.broker_id
        # The consumer library takes it as a broker gap with its reason.
        item = parse_event(
            b'{"event":"gap","epoch":1,"since_ms":1,"until_ms":2,"reason":"redis","broker":"b"}'
        )
        assert isinstance(item, Gap) and item.reason == "redis" and item.source == "broker"
        assert not [e for e in tap.of("gap") if e.get("reason") != "redis"]
        assert "frames never reached redis" in caplog.text


async def test_a_thousand_commands_at_once_are_all_answered_without_starving_the_lock(
    redis_client: aioredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keys = Keys("t")
    async with (
        running_simulator(seed=8, rate=200) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
    ):
        await write_lease(redis_client, "c", {"ticker": CODES[:3]})
        await wait_for(
            lambda: redis_client.hlen(keys.last_values("ticker")),
            10.0,
            message="the cache fills",
        )
        lock_before = await redis_client.get(keys.leader)
        assert lock_before is not None
        # Flowing codes come from the cache, the others wait for upstream (short timeouts).
        commands: list[bytes] = []
        for i in range(1_000):
            codes = CODES[:3] if i % 2 else [CODES[3 + i % 3], CODES[i % 3]]
            commands.append(
                encode_command(
                    SnapshotCommand(id=f"s{i}", type="ticker", codes=codes, timeout_ms=1_500)
                )
            )
        commands += [encode_command(ResubscribeCommand(id=f"r{i}")) for i in range(200)]
        ids = [f"s{i}" for i in range(1_000)] + [f"r{i}" for i in range(200)]
        updates: list[int] = []

        async def answered() -> bool:
            updated = await redis_client.hget(keys.status, "updated_ms")
            if updated is not None and (not updates or int(updated) != updates[-1]):
                updates.append(int(updated))
            async with redis_client.pipeline(transaction=False) as pipe:
                for request_id in ids:
                    pipe.exists(keys.reply(request_id))
                return all(await pipe.execute())

        async with redis_client.pipeline(transaction=False) as pipe:
            pipe.rpush(keys.requests, *commands)
            pipe.publish(keys.control, "request")
            await pipe.execute()
        started = time.monotonic()
        await wait_for(answered, 30.0, interval=0.05, message="every command answered")
        took = time.monotonic() - started

        async with redis_client.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.lindex(keys.reply(request_id), 0)
            raw = await pipe.execute()
        replies = [json.loads(data) for data in raw]
        refused = [r for r in replies if not r.get("ok")]
        assert refused == []
        snapshots = replies[:1_000]
        assert all(set(r["frames"]) | set(r["missing"]) for r in snapshots)
        assert all(r["epoch"] == broker.epoch for r in replies[1_000:])

        # The lock was renewed, never lost: same holder and token, no phase ended, and the
        # status kept being written while the commands were served.
        assert await redis_client.get(keys.leader) == lock_before
        assert broker.is_leader
        assert "leader phase ended" not in caplog.text
        assert len(updates) >= min(3, int(took / broker.settings.status_interval) - 1), (
            updates,
            took,
        )


async def test_snapshot_requests_past_the_cap_are_refused_with_a_clear_error(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    keys = Keys("t")
    over = 50
    async with (
        running_simulator(seed=9) as sim,
        started_broker(fast_settings(redis_url, sim.url)),
    ):
        # Codes nobody serves: every request waits for upstream until its deadline.
        ids = [f"w{i}" for i in range(MAX_SNAPSHOT_WAITERS + over)]
        commands = [
            encode_command(
                SnapshotCommand(id=rid, type="ticker", codes=["KRW-NOPE"], timeout_ms=2_000)
            )
            for rid in ids
        ]
        async with redis_client.pipeline(transaction=False) as pipe:
            pipe.rpush(keys.requests, *commands)
            pipe.publish(keys.control, "request")
            await pipe.execute()

        async def answered() -> bool:
            async with redis_client.pipeline(transaction=False) as pipe:
                for request_id in ids:
                    pipe.exists(keys.reply(request_id))
                return all(await pipe.execute())

        await wait_for(answered, 30.0, interval=0.05, message="every command answered")
        async with redis_client.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.lindex(keys.reply(request_id), 0)
            replies = [json.loads(data) for data in await pipe.execute()]
        refused = [r for r in replies if not r["ok"]]
        assert [r["id"] for r in refused] == ids[MAX_SNAPSHOT_WAITERS:]
        assert all("too many snapshot requests in progress" in r["error"] for r in refused)
        assert all(r["missing"] == ["KRW-NOPE"] for r in replies if r["ok"])
