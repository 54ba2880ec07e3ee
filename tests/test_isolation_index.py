"""Isolation: no consumer can starve another through the lease index (issue 12, item 3).

The documented least-privilege consumer ACL (docs/reliability.md, ``ACL_CONSUMER``) allows ZREM
on ``{ns}:leases``: the index is shared by every consumer. The broker treats it as a hint: a
lease whose hash exists is served whether or not its index entry does, and the broker puts the
entry back. Before the fix, a client removing another's entry every 0.2 s made each full
listing drop that lease from the union (54 -> 19 msg/s, holes of 1.9 s, no gap announced).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, wait_for, write_lease
from tests.support.broker_env import fast_settings, sim_connections, started_broker
from tests.support.sim import running_simulator
from tests.test_security_auth import (
    ADMIN,
    BROKER_PW,
    CONSUMER_PW,
)

pytestmark = pytest.mark.timeout(60)

VICTIM = {"ticker": ["KRW-BTC", "KRW-ETH"]}
OTHER = {"ticker": ["KRW-XRP"]}
ATTACK_S = 3.0  # six periodic listings (reconcile_interval 0.5 s), at least one with SCAN
ZREM_EVERY = 0.2  # the attack's cadence, as in the probe


def upstream_ticker(sim: object) -> set[str]:
    """The ticker codes the simulator's one connection holds (empty: not exactly one)."""
    conns = sim_connections(sim)
    if len(conns) != 1:
        return set()
    return set(conns[0]["subscriptions"].get("ticker", []))


async def test_zrem_of_another_clients_index_entry_never_drops_its_streams(
    acl_redis: RedisServer,
) -> None:
    admin_url = acl_redis.url_for(password=ADMIN)
    admin = aioredis.Redis.from_url(admin_url)
    # the hostile client: the documented least-privilege consumer user, nothing more
    hostile = aioredis.Redis.from_url(acl_redis.url_for("consumer-a", CONSUMER_PW))
    victim_codes = set(VICTIM["ticker"])
    try:
        async with (
            running_simulator(seed=12, markets=4, rate=200) as sim,
            # the broker under its documented ACL too: the repair needs no more rights
            started_broker(fast_settings(acl_redis.url_for("broker", BROKER_PW), sim.url)),
        ):
            pubsub = admin.pubsub()
            await pubsub.subscribe(*(f"t:ticker:{code}" for code in victim_codes))
            # long TTLs: no heartbeat re-indexes the victim during the attack, only the broker
            await write_lease(admin, "victim", VICTIM, ttl_ms=60_000)
            await write_lease(admin, "other", OTHER, ttl_ms=60_000)
            want = victim_codes | set(OTHER["ticker"])
            await wait_for(lambda: upstream_ticker(sim) == want, 10, message="union upstream")
            await wait_for(lambda: pubsub.get_message(timeout=0.1), 10, message="a frame")

            frames: list[float] = []
            missing: list[tuple[float, set[str]]] = []  # samples without the victim's codes
            samples = 0
            stop = asyncio.Event()

            async def count_frames() -> None:
                while not stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    if msg is not None:
                        frames.append(time.monotonic())

            async def sample_upstream() -> None:
                nonlocal samples
                while not stop.is_set():
                    held = upstream_ticker(sim)
                    samples += 1
                    if not victim_codes <= held:
                        missing.append((time.monotonic() - started, held))
                    await asyncio.sleep(0.01)  # sampling cadence, not a synchronisation

            zrems = removed = 0
            started = time.monotonic()
            tasks = [asyncio.create_task(count_frames()), asyncio.create_task(sample_upstream())]
            try:
                while time.monotonic() - started < ATTACK_S:
                    removed += await hostile.zrem("t:leases", "victim")
                    zrems += 1
                    await asyncio.sleep(ZREM_EVERY)  # the attack's pace
            finally:
                stop.set()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await pubsub.aclose()  # type: ignore[no-untyped-call]

            assert missing == [], f"the victim's streams left the union: {missing[:3]}"
            # the broker puts the entry back, scored by the lease's own deadline
            raw_deadline = await admin.hget("t:lease:victim", "deadline_ms")  # type: ignore[misc]
            assert raw_deadline is not None
            deadline = int(raw_deadline)
            await wait_for(
                lambda: admin.zscore("t:leases", "victim"), 5, message="victim re-indexed"
            )
            score = await admin.zscore("t:leases", "victim")
            acl_denials = await admin.acl_log(10)
    finally:
        await admin.aclose()
        await hostile.aclose()

    in_attack = [t - started for t in frames if t >= started]
    holes = [b - a for a, b in itertools.pairwise(in_attack)]
    print(
        f"\n[figures] index ZREM attack: zrems={zrems}, entries_removed={removed}, "
        f"upstream_samples={samples}, samples_without_victim={len(missing)}, "
        f"victim_frames={len(in_attack)} ({len(in_attack) / ATTACK_S:.0f}/s), "
        f"largest_hole={max(holes, default=0):.2f}s, reindexed_score_ok={score == deadline}"
    )
    # the attack is within the documented consumer ACL, the repair within the broker's
    assert acl_denials == [], acl_denials
    assert removed >= 2, "the hostile client removed the entry the broker had put back"
    assert samples >= 50
    assert len(in_attack) > 0
    assert score == deadline
