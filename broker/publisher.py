"""Fan-out: routed frames to their Redis channels, pipelined per burst (I/O adapter).

The upstream receive loop only appends ``(target, frame)`` to a list (no await per frame); this
publisher's task wakes, swaps the list out, and sends the whole burst as ONE pipeline of
PUBLISH commands, plus one HSET per stream for the last-value cache (only the newest frame per
code in the burst is written). While a pipeline is in flight the next burst accumulates, so the
batch size adapts to load by itself. The list is bounded: past ``max_pending`` the oldest frames
are dropped and counted (Redis is down or slower than upstream; consumers get a gap event).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.keys import Keys
from broker.upbit.types import StreamKey

logger = logging.getLogger(__name__)

#: a pipeline larger than this is split, so one burst never builds a huge buffer
MAX_PIPELINE = 2048
#: one pipeline must complete within this, or Redis is considered unreachable
PIPELINE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where the frames of one stream go; built once per stream, reused for every frame."""

    key: StreamKey
    channel: bytes
    cache_key: bytes
    code: bytes


def make_target(keys: Keys, key: StreamKey) -> Target:
    return Target(
        key=key,
        channel=keys.channel(key.type, key.code, key.level).encode(),
        cache_key=keys.last_values(key.type, key.level).encode(),
        code=key.code.encode(),
    )


@dataclass(slots=True)
class PublishStats:
    published: int = 0
    batches: int = 0
    largest_batch: int = 0
    dropped_overflow: int = 0
    dropped_not_leader: int = 0
    redis_errors: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # drained by metrics


class Publisher:
    """Pipelined PUBLISH of frame bursts plus the last-value cache."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        last_value_cache: bool = True,
        max_pending: int = 100_000,
        on_published: Callable[[list[tuple[Target, bytes]]], None] | None = None,
    ) -> None:
        self._redis = redis
        self._cache = last_value_cache
        self._max_pending = max_pending
        self._on_published = on_published
        self.pending: list[tuple[Target, bytes]] = []
        self.wake = asyncio.Event()
        self.stats = PublishStats()
        #: monotonic time of the last successful publish per stream (quiet-code detection)
        self.last_seen: dict[StreamKey, float] = {}
        self.last_publish_ms: int = 0
        #: frames published per stream type (read by metrics at scrape time)
        self.published_by_type: dict[str, int] = {}

    def enqueue(self, target: Target, frame: bytes) -> None:
        """Hot path: queue one frame. The caller may instead append to ``pending`` and set
        ``wake`` itself; this is the readable version."""
        self.pending.append((target, frame))
        self.wake.set()

    def _take_batch(self) -> list[tuple[Target, bytes]]:
        batch, self.pending = self.pending, []
        if len(batch) > self._max_pending:
            dropped = len(batch) - self._max_pending
            self.stats.dropped_overflow += dropped
            logger.warning(
                "publish backlog over %d frames: dropped %d oldest", self._max_pending, dropped
            )
            batch = batch[dropped:]
        return batch

    async def run(self, may_publish: Callable[[], bool]) -> None:
        """Publish bursts until cancelled. ``may_publish`` is checked before every burst, so a
        broker that lost leadership stops publishing at once."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch = self._take_batch()
            if not batch:
                continue
            if not may_publish():
                self.stats.dropped_not_leader += len(batch)
                continue
            for start in range(0, len(batch), MAX_PIPELINE):
                await self._publish(batch[start : start + MAX_PIPELINE])

    async def flush(self) -> None:
        """Publish whatever is pending now (tests and shutdown)."""
        batch = self._take_batch()
        for start in range(0, len(batch), MAX_PIPELINE):
            await self._publish(batch[start : start + MAX_PIPELINE])

    async def _publish(self, batch: list[tuple[Target, bytes]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        command = pipe.execute_command
        newest: dict[Target, bytes] = {}
        counts: dict[Target, int] = {}
        for target, frame in batch:
            command("PUBLISH", target.channel, frame)
            newest[target] = frame
            counts[target] = counts.get(target, 0) + 1
        if self._cache:
            per_hash: dict[bytes, dict[bytes, bytes]] = {}
            for target, frame in newest.items():
                per_hash.setdefault(target.cache_key, {})[target.code] = frame
            for cache_key, mapping in per_hash.items():
                pipe.hset(cache_key, mapping=mapping)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("publish of %d frames failed: %s", len(batch), exc)
            return
        now = time.monotonic()
        by_type = self.published_by_type
        for target, n_frames in counts.items():
            self.last_seen[target.key] = now
            by_type[target.key.type] = by_type.get(target.key.type, 0) + n_frames
        self.last_publish_ms = int(time.time() * 1000)
        n = len(batch)
        self.stats.published += n
        self.stats.batches += 1
        if n > self.stats.largest_batch:
            self.stats.largest_batch = n
        if len(self.stats.batch_sizes) < 10_000:
            self.stats.batch_sizes.append(n)
        if self._on_published is not None:
            self._on_published(batch)
