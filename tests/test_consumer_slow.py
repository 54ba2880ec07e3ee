"""A slow consumer is dropped by Redis, notices, reports it and recovers; a fast one is unharmed.

Redis runs with a small pub/sub output-buffer limit. The slow consumer is a SyncBrokerClient
(its own event loop on a thread) whose callback blocks that loop once; the fast consumer is an
async BrokerClient in the test's loop. The test paces publishing by the fast consumer's
progress, so only the blocked one falls past the limit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, scaled, wait_for, wait_for_sync
from broker.testing import RedisServer as running_redis
from consumers import FELL_BEHIND, BrokerClient, Gap, StreamMessage, SyncBrokerClient

CHANNEL = "upbit:trade:KRW-BTC"
PAYLOAD = b'{"type":"trade","code":"KRW-BTC","pad":"' + b"x" * 4000 + b'","n":%d}'


@pytest.fixture
def small_buffer_redis() -> Iterator[RedisServer]:
    with running_redis(("--client-output-buffer-limit", "pubsub 256kb 128kb 1")) as server:
        yield server


async def test_slow_consumer_is_dropped_notices_and_recovers(
    small_buffer_redis: RedisServer,
) -> None:
    url = small_buffer_redis.url
    blocking = threading.Event()
    release = threading.Event()
    slow_seen: list[StreamMessage] = []
    slow_gaps: list[Gap] = []

    def slow_callback(item: StreamMessage) -> None:
        slow_seen.append(item)
        if len(slow_seen) == 1:
            blocking.set()
            release.wait(scaled(20))  # blocks the slow client's event loop, so its reader too

    fast_seen: list[bytes] = []
    progress = asyncio.Event()

    def fast_callback(item: StreamMessage) -> None:
        fast_seen.append(item.raw)
        progress.set()

    slow = SyncBrokerClient(redis_url=url, client_id="slow", on_gap=slow_gaps.append)
    publisher = aioredis.Redis.from_url(url)
    try:
        async with BrokerClient(redis_url=url, client_id="fast") as fast:
            await fast.subscribe("trade", ["KRW-BTC"], fast_callback)
            await asyncio.to_thread(slow.subscribe, "trade", ["KRW-BTC"], slow_callback)

            await publisher.publish(CHANNEL, PAYLOAD % 0)
            assert await asyncio.to_thread(blocking.wait, scaled(5))

            # ~24 MB while the slow one is blocked: far past 256 kB plus the kernel's socket
            # buffers. Batches of 8 (32 kB) wait for the fast consumer, who stays under limit.
            total = 6000
            n = 1
            while n < total:
                async with publisher.pipeline(transaction=False) as pipe:
                    for i in range(n, min(n + 8, total)):
                        pipe.publish(CHANNEL, PAYLOAD % i)
                    await pipe.execute()
                n = min(n + 8, total)
                while len(fast_seen) < n:
                    progress.clear()
                    async with asyncio.timeout(scaled(5)):
                        await progress.wait()
            release.set()

            # the fast consumer got everything, in order, and never reconnected
            assert fast_seen == [PAYLOAD % i for i in range(total)]
            assert fast.stats.reconnects == 0 and fast.stats.fell_behind == 0

            # the slow one noticed being dropped, reported it, and resubscribed
            wait_for_sync(lambda: slow.stats.fell_behind >= 1, timeout=10, message="fell_behind")
            assert slow.stats.reconnects >= 1
            await wait_for(lambda: slow_gaps, message="gap on the slow client")
            assert slow_gaps[0].reason == FELL_BEHIND and slow_gaps[0].source == "local"
            assert len(slow_seen) < total

            # ...and receives again
            before = len(slow_seen)
            await publisher.publish(CHANNEL, PAYLOAD % 99_999)
            await wait_for(
                lambda: any(m.raw == PAYLOAD % 99_999 for m in slow_seen[before:]),
                message="delivery after recovery",
            )
            await wait_for(lambda: fast.stats.messages == total + 1, message="fast got it too")
    finally:
        release.set()
        await asyncio.to_thread(slow.close)
        await publisher.aclose()
