"""The publisher on a real three-master cluster, driven directly (broker/sharded.py): every
burst is accounted for exactly once, whatever reads its replies (a burst's own reply may be read
while it is still being written: the polled road); a seed that does not answer costs the
connect a stagger, not the whole timeout; a master dying with nothing in flight still fences
the leader when it holds the lock, and not when it does not."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from broker.cluster_slots import key_slot
from broker.keys import Keys
from broker.publisher import Publisher
from broker.redis_client import redis_client
from broker.testing import scaled, wait_for
from broker.testing.cluster import ClusterSetup, running_cluster
from broker.upbit.types import StreamKey

KEYS = Keys("t", hash_tag=True)
CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA", "KRW-TRX", "KRW-AVAX"]


async def _drive(publisher: Publisher, bursts: int) -> int:
    """``bursts`` bursts of 1-8 ticker frames over the eight codes, one every 2 ms."""
    targets = [publisher.target(KEYS, StreamKey("ticker", c)) for c in CODES]
    sent = 0
    for i in range(bursts):
        burst = [(t, b'{"ty":"ticker","n":%d}' % sent) for t in targets[: 1 + i % 8]]
        publisher.enqueue_burst(burst)
        sent += len(burst)
        await asyncio.sleep(0.002)
    return sent


async def test_every_burst_is_answered_once(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cl:
        redis = redis_client(cl.url(), connect_timeout=None)
        publisher = Publisher(redis, history_caps={"ticker": 1000})
        task = asyncio.create_task(publisher.run(lambda: True))
        try:
            sent = await _drive(publisher, 600)
            stats = publisher.stats
            await wait_for(lambda: stats.published == sent, scaled(10), message="all published")
            conn = publisher._conn
            assert conn is not None and not conn.closed
            await wait_for(lambda: conn.unanswered_since is None, scaled(5), message="answered")
            assert not conn._unanswered  # type: ignore[union-attr]  # (nothing parked)
            assert stats.dropped_redis == stats.redis_errors == 0
            assert stats.history_written == sent
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await redis.aclose()


async def test_a_seed_that_does_not_answer_costs_a_stagger(tmp_path: Path) -> None:
    """The first seed frozen (SIGSTOP: it accepts nothing, answers nothing): the publisher
    still connects through the next seeds and publishes to the two other masters."""
    async with running_cluster(tmp_path) as cl:
        frozen = cl.nodes[0]
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cl.nodes)
        redis = redis_client(url, connect_timeout=None)
        publisher = Publisher(redis)
        task = asyncio.create_task(publisher.run(lambda: True))
        # streams only on the masters that will answer (asked before one stops answering)
        healthy = [c for c in CODES if await _owner(cl, KEYS.channel("ticker", c)) != frozen.port]
        assert frozen.proc is not None
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            targets = [publisher.target(KEYS, StreamKey("ticker", c)) for c in healthy]
            for i in range(50):
                publisher.enqueue_burst([(t, b'{"n":%d}' % i) for t in targets])
                await asyncio.sleep(0.01)
            await wait_for(lambda: publisher.stats.published > 0, scaled(8), message="published")
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await redis.aclose()


async def _owner(cl: ClusterSetup, key: str) -> int:
    return await cl.owner(key_slot(key))


async def test_an_idle_masters_death_fences_only_if_it_holds_the_lock(tmp_path: Path) -> None:
    """A master dies with no burst in flight: losing the lock's master counts a fencing error
    (the leader must renew before publishing again), losing another does not."""
    async with running_cluster(tmp_path) as cl:
        redis = redis_client(cl.url(), connect_timeout=None)
        lock_master = await cl.owner(key_slot(KEYS.leader))
        publisher = Publisher(redis, fence_slot=key_slot(KEYS.leader))
        task = asyncio.create_task(publisher.run(lambda: True))
        try:
            await _drive(publisher, 20)  # connects to every master
            await wait_for(lambda: publisher.stats.published > 0, scaled(5), message="up")
            conn = publisher._conn
            await wait_for(lambda: conn.unanswered_since is None, scaled(5), message="idle")
            other = next(n for n in cl.nodes if n.port != lock_master)
            other.kill()
            await wait_for(lambda: publisher.stats.redis_errors == 1, scaled(5), message="lost")
            assert publisher.fence_errors == 0
            cl.node_on(lock_master).kill()
            await wait_for(lambda: publisher.stats.redis_errors == 2, scaled(5), message="lost")
            assert publisher.fence_errors == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await redis.aclose()
