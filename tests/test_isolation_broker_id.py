"""Two broker processes with one ``--broker-id`` (issue 12, item 5): the id is a label, never the
fence. Real processes: a redis-server, the simulator, ``upbit-broker run`` twice, a consumer.

Orchestrators often give every replica a fixed id (and a restart keeps it). Before the lock
carried a per-process token, the second process took the "already ours" branch of the acquire
script: both led, the simulator saw two upstream connections and consumers got almost every
frame twice. And a restart with the same id announced no takeover gap (the frames lost in
between went unannounced).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.leader import parse_lock_value
from broker.testing import (
    ConsumerProcess,
    RedisServer,
    broker_process,
    consumer_process,
    read_status,
    wait_for,
)
from broker.upbit.router import route_frame
from simulator.sends import frame_key
from tests.support.broker_env import EventTap
from tests.support.processes import record_data_sends, sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(120)

SUBS = {"trade": ["KRW-BTC", "KRW-ETH", "KRW-XRP"], "ticker": ["KRW-BTC"]}
UNION = {t: set(c) for t, c in SUBS.items()}
LEADER_TTL = 1.5  # FAST_BROKER_ENV
#: how long both processes run side by side: the second one's standby polls the lock every
#: TTL/3, and the old code connected upstream within a second of starting
SIDE_BY_SIDE = 3.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.asynccontextmanager
async def sampling(sim: Any, interval: float = 0.01) -> AsyncIterator[list[int]]:
    """Upstream connections open at the simulator at once (subscribed or not), sampled."""
    counts: list[int] = []

    async def run() -> None:
        while True:
            counts.append(len(sim.state()["connections"]))
            await asyncio.sleep(interval)

    task = asyncio.create_task(run())
    try:
        yield counts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def realtime_duplicates(consumer: ConsumerProcess) -> int:
    """REALTIME frames the consumer received more than once (two leaders publishing)."""
    seen: Counter[int] = Counter()
    for message in consumer.messages():
        raw = message["raw"].encode()
        if route_frame(raw).stream_type == "REALTIME":
            seen[frame_key(raw)] += 1
    return sum(n - 1 for n in seen.values() if n > 1)


async def test_two_brokers_with_one_id_never_both_lead(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    url = redis_server.url
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_simulator(seed=61, rate=300) as sim:
        record_data_sends(sim)
        async with (
            consumer_process(url, "twin-c", SUBS, tmp_path, lease_ttl=5.0) as consumer,
            broker_process(url, sim.url, "twin", tmp_path / "a") as first,
        ):
            await wait_for(lambda: sim_upstream(sim) == UNION, 20, message="union upstream")
            async with (
                broker_process(url, sim.url, "twin", tmp_path / "b") as second,
                sampling(sim) as counts,
            ):
                # the second process is up and has met the lock (as standby, or as a leader)
                await wait_for(
                    lambda: "leader" in second.output(), 20, message="second broker at the lock"
                )
                side_by_side_from = now_ms()
                await asyncio.sleep(SIDE_BY_SIDE)  # an observation window, not a wait
                frames_side_by_side = sum(
                    1 for m in consumer.messages() if m["t"] > side_by_side_from
                )
                opened = sim.state()["totals"]["connections_opened"]
                duplicates = realtime_duplicates(consumer)
                value = await redis_client.get("t:leader")
                print(
                    f"\n[figures] two brokers, one --broker-id: max_upstream_connections_at_once="
                    f"{max(counts)}, connections_opened={opened}, "
                    f"frames_received_side_by_side={frames_side_by_side}, "
                    f"realtime_frames_received_twice={duplicates}, lock={value!r}"
                )
                assert first.alive and second.alive, (first.output(), second.output())
                assert frames_side_by_side > 0  # the consumer was served all along
                assert max(counts) == 1 and opened == 1, (counts[-5:], opened)
                assert duplicates == 0
                assert value is not None and parse_lock_value(value).broker_id == "twin"
                assert parse_lock_value(value).token  # a token fences the lock, not the id

                # the second one is a working standby: it takes over when the first dies
                first.kill()
                await wait_for(
                    lambda: sim.state()["totals"]["connections_opened"] == 2,
                    LEADER_TTL + 10,
                    message="the standby (same id) connected upstream",
                )
                await wait_for(lambda: sim_upstream(sim) == UNION, 10, message="union again")


async def test_a_restart_with_the_same_id_announces_a_takeover_gap(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    url = redis_server.url
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    async with (
        running_simulator(seed=62, rate=300) as sim,
        EventTap(redis_client) as tap,
        consumer_process(url, "restart-c", SUBS, tmp_path, lease_ttl=5.0) as consumer,
    ):
        async with broker_process(url, sim.url, "fixed", tmp_path / "1"):
            await wait_for(lambda: sim_upstream(sim) == UNION, 20, message="union upstream")
            await wait_for(lambda: len(consumer.messages()) >= 20, 10, message="frames")

            async def status_has_a_frame() -> bool:
                status = await read_status(redis_client)
                return int(status.get("last_frame_ms", "0") or 0) > 0

            # what a successor reads: the status names the last frame published
            await wait_for(status_has_a_frame, 10, message="a status with last_frame_ms")
            first_epoch = max(e["epoch"] for e in tap.of("connected"))
        stopped_ms = now_ms()  # SIGTERM: a clean stop, the lock released
        async with broker_process(url, sim.url, "fixed", tmp_path / "2"):

            def reconnected() -> list[dict[str, Any]]:
                return [e for e in tap.of("connected") if e["epoch"] > first_epoch]

            connected = (await wait_for(reconnected, 20, message="the restart connected"))[0]
            # frames of the new connection reach the consumer after its events did
            await wait_for(
                lambda: any(m["t"] > connected["ts_ms"] for m in consumer.messages()),
                10,
                message="frames after the restart",
            )
    gaps = [g for g in tap.of("gap") if g["epoch"] == connected["epoch"]]
    print(f"\n[figures] restart with a fixed broker id: gap events at the restart={gaps}")
    assert len(gaps) == 1 and gaps[0]["reason"] == "takeover", gaps
    assert gaps[0]["broker"] == "fixed"
    assert gaps[0]["since_ms"] <= stopped_ms <= gaps[0]["until_ms"], gaps[0]
