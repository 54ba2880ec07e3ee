"""Consumer faults with real processes: SIGKILLed consumers, and one that stops reading.

A killed consumer never releases its lease: the lease expires after its TTL and the broker
must shrink the union within TTL + 1 s, without the survivors' streams pausing. A consumer
that stops reading (SIGSTOP) must be dropped by Redis at its pub/sub output-buffer limit,
without slowing the broker or anyone else, and must notice, recover and report the loss.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, consumer_process, wait_for
from broker.testing import read_status as redis_status
from tests.support.broker_env import EventTap
from tests.support.processes import (
    audit_consumer,
    delivered_past,
    gap_windows,
    record_data_sends,
    sim_upstream,
    union_of,
)
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(120)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def max_gap_ms(times: list[int]) -> int:
    return max((b - a for a, b in itertools.pairwise(times)), default=0)


def streams_of(subs: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(t, c) for t, codes in subs.items() for c in codes}


@pytest.mark.slow
async def test_killed_consumers_expire_and_survivors_never_pause(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    ttl = 2.0
    survivor_subs = {"trade": ["KRW-BTC"], "ticker": ["KRW-BTC"]}
    victims_subs = [
        {"ticker": ["KRW-ETH"]},
        {"trade": ["KRW-XRP"], "ticker": ["KRW-BTC"]},  # shares a stream with the survivor
        {"orderbook": ["KRW-SOL"]},
    ]
    async with running_simulator(seed=61, rate=300) as sim, EventTap(redis_client) as tap:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "kill-1", tmp_path, lease_ttl=ttl) as broker,
            consumer_process(url, "survivor", survivor_subs, tmp_path, lease_ttl=ttl) as sv,
            consumer_process(url, "victim-0", victims_subs[0], tmp_path, lease_ttl=ttl) as v0,
            consumer_process(url, "victim-1", victims_subs[1], tmp_path, lease_ttl=ttl) as v1,
            consumer_process(url, "victim-2", victims_subs[2], tmp_path, lease_ttl=ttl) as v2,
        ):
            union = union_of(survivor_subs, *victims_subs)
            await wait_for(lambda: sim_upstream(sim) == union, 20, message="full union")
            await asyncio.sleep(2.0)  # a baseline of the survivor's stream
            conn = sim.state()["connections"][0]["id"]
            for victim in (v0, v1, v2):
                victim.kill()
            killed = time.monotonic()
            killed_ms = now_ms()
            shrunk_to = {t: set(c) for t, c in survivor_subs.items()}
            await wait_for(lambda: sim_upstream(sim) == shrunk_to, ttl + 5, interval=0.01)
            shrink_s = time.monotonic() - killed
            await asyncio.sleep(2.0)
            end_ms = now_ms() - 500
            await delivered_past(log, sv, streams_of(survivor_subs), end_ms)
            gone = [await redis_client.exists(f"t:lease:victim-{i}") for i in range(3)]
            indexed = await redis_client.zrange("t:leases", 0, -1)
            status = await redis_status(redis_client)
            same_connection = sim.state()["connections"][0]["id"] == conn
            busy = "t:trade:KRW-BTC"
            times = [m["t"] for m in sv.messages(busy)]
            before = [t for t in times if killed_ms - 2000 <= t < killed_ms]
            around = [t for t in times if killed_ms <= t <= killed_ms + int(shrink_s * 1000) + 2000]
            audit = audit_consumer(
                log,
                sv,
                streams_of(survivor_subs),
                gap_windows(sv, tap.events),
                start_ms=sv.ready_ms(),
                end_ms=end_ms,
            )
            assert broker.alive
    print(
        f"\n[figures] consumers SIGKILLed: kills_injected=3, lease_ttl_s={ttl}, "
        f"union_shrunk_after_s={shrink_s:.2f}, survivor_busy_code_frames={len(around)}, "
        f"survivor_max_gap_ms_baseline={max_gap_ms(before)}, "
        f"survivor_max_gap_ms_during_shrink={max_gap_ms([killed_ms, *around])}, "
        f"same_upstream_connection={same_connection}, gap_events={len(tap.of('gap'))}"
    )
    print(f"[audit] {audit.line()}")
    # after the TTL, and promptly (a margin for a loaded CI machine)
    assert shrink_s <= ttl + 2.5, shrink_s
    assert gone == [0, 0, 0] and indexed == [b"survivor"]
    assert status["leases"] == "1"
    assert same_connection and tap.of("gap") == []
    # the survivor's busy stream never paused: no gap longer than its own baseline's worst
    # plus a margin, and about a second at worst on a loaded machine
    assert max_gap_ms([killed_ms, *around]) < max(1200, 3 * max_gap_ms(before))
    assert audit.lost_silently == 0 and audit.duplicates == 0, (audit.line(), audit.examples)


@pytest_asyncio.fixture
async def small_buffer_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer(extra_args=("--client-output-buffer-limit", "pubsub 256kb 128kb 1"))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_a_consumer_that_stops_reading_is_dropped_and_recovers(
    small_buffer_redis: RedisServer, tmp_path: Any
) -> None:
    url = small_buffer_redis.url
    codes = ["KRW-BTC", "KRW-XRP", "KRW-ETH", "KRW-SOL", "KRW-DOGE", "KRW-USDT", "KRW-ADA"]
    subs = {"orderbook": codes, "trade": codes, "ticker": codes}
    redis = aioredis.Redis.from_url(url)
    try:
        async with running_simulator(seed=62, rate=600) as sim:
            log = record_data_sends(sim)
            async with (
                broker_process(url, sim.url, "slow-1", tmp_path) as broker,
                consumer_process(url, "fast", subs, tmp_path) as fast,
                consumer_process(url, "slow", subs, tmp_path) as slow,
                EventTap(redis) as tap,
            ):
                await wait_for(lambda: sim_upstream(sim) is not None, 20)
                await wait_for(lambda: len(slow.messages()) > 200, 20, message="slow flowing")
                await asyncio.sleep(1.0)
                published_before = int((await redis_status(redis))["frames_published"])
                t_stop = time.monotonic()
                stop_ms = now_ms()
                os.kill(slow.pid, signal.SIGSTOP)
                try:

                    async def dropped() -> bool:
                        names = [c.get("name") for c in await redis.client_list()]
                        return "slow:sub" not in names

                    await wait_for(dropped, 20, message="redis drops the stopped consumer")
                    dropped_after = time.monotonic() - t_stop
                    await asyncio.sleep(1.0)
                finally:
                    os.kill(slow.pid, signal.SIGCONT)
                cont_ms = now_ms()
                stopped_s = time.monotonic() - t_stop
                published_during = int((await redis_status(redis))["frames_published"])
                await wait_for(
                    lambda: any(g["reason"] == "fell-behind" for g in slow.gaps()),
                    15,
                    message="the slow consumer reports it fell behind",
                )
                await wait_for(
                    lambda: slow.last_stats().get("fell_behind", 0) >= 1, 5, message="stats"
                )
                await wait_for(
                    lambda: len([m for m in slow.messages() if m["t"] > cont_ms + 500]) > 50,
                    10,
                    message="the slow consumer receives again",
                )
                await asyncio.sleep(1.0)
                end_ms = now_ms() - 500
                for c in (fast, slow):
                    await delivered_past(log, c, streams_of(subs), end_ms)
                status = await redis_status(redis)
                fast_rate_before = _rate(fast.messages(), stop_ms - 3000, stop_ms)
                fast_rate_during = _rate(fast.messages(), stop_ms, cont_ms)
                fast_gap = max_gap_ms(
                    [m["t"] for m in fast.messages("t:trade:KRW-BTC") if stop_ms <= m["t"]]
                )
                streams = streams_of(subs)
                audits = [
                    audit_consumer(
                        log,
                        c,
                        streams,
                        gap_windows(c, tap.events),
                        start_ms=c.ready_ms(),
                        end_ms=end_ms,
                    )
                    for c in (fast, slow)
                ]
                slow_gap = next(g for g in slow.gaps() if g["reason"] == "fell-behind")
                fast_stats, slow_stats = fast.last_stats(), slow.last_stats()
                assert broker.alive
    finally:
        await redis.aclose()
    broker_rate_during = (published_during - published_before) / stopped_s
    print(
        f"\n[figures] slow consumer (SIGSTOP) with 'pubsub 256kb 128kb 1': stops_injected=1, "
        f"dropped_by_redis_after_s={dropped_after:.2f}, "
        f"slow_fell_behind={slow_stats['fell_behind']}, "
        f"slow_reconnects={slow_stats['reconnects']}, slow_gap_span_ms="
        f"{slow_gap['until_ms'] - slow_gap['since_ms']}, "
        f"fast_rate_before={fast_rate_before:.0f}/s, "
        f"fast_rate_during={fast_rate_during:.0f}/s, fast_max_gap_ms={fast_gap}, "
        f"fast_reconnects={fast_stats['reconnects']}, broker_publish_rate_during="
        f"{broker_rate_during:.0f}/s, broker_frames_dropped={status['frames_dropped']}"
    )
    for audit in audits:
        print(f"[audit] {audit.line()}")
    fast_audit, slow_audit = audits
    assert fast_stats["reconnects"] == 0 and fast_stats["fell_behind"] == 0
    assert fast_rate_during >= 0.5 * fast_rate_before
    assert fast_gap < 2000
    assert fast_audit.lost_silently == 0 and fast_audit.lost_in_gaps == 0, fast_audit.line()
    assert status["frames_dropped"] == "0"
    assert slow_stats["reconnects"] >= 1
    # every frame the slow consumer missed lies inside the gap it reported
    assert slow_audit.lost_in_gaps > 0
    assert slow_audit.lost_silently == 0, (slow_audit.line(), slow_audit.examples, slow_gap)


def _rate(messages: list[dict[str, Any]], since_ms: int, until_ms: int) -> float:
    n = sum(1 for m in messages if since_ms <= m["t"] < until_ms)
    return n / max(0.001, (until_ms - since_ms) / 1000)
