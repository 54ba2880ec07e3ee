"""Fan-out: routed frames to their Redis channels, pipelined per burst (I/O adapter).

The upstream receive loop only appends ``(target, frame)`` to a list (no await per frame); this
publisher's task wakes, swaps the list out, and sends the whole burst as ONE pipeline of
PUBLISH commands, plus one HSET per cache hash for the last-value cache (only the newest frame
per code in the burst is written). While a pipeline is in flight the next burst accumulates, so
the batch size adapts to load by itself. The list is bounded: past ``max_pending`` the oldest
frames are dropped and counted (Redis is down or slower than upstream; consumers get a gap
event).

The burst goes out as raw RESP (:mod:`broker.resp`: one packed buffer, replies counted by
hiredis) when the client's address can be expressed that way, which costs a fraction of a
redis-py pipeline per frame (``benchmarks/``); otherwise (a fake or exotic client) through a
redis-py pipeline. Both write the same commands in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker import resp
from broker.keys import Keys
from broker.upbit.types import StreamKey

logger = logging.getLogger(__name__)

#: a pipeline larger than this is split, so one burst never builds a huge buffer
MAX_PIPELINE = 2048
#: one pipeline must complete within this, or Redis is considered unreachable
PIPELINE_TIMEOUT = 5.0


# eq=False: a Target is made once per stream and reused for every frame, so identity is its
# equality, and hashing it (per frame, per burst) stays in C instead of hashing four fields.
@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """Where the frames of one stream go; built once per stream, reused for every frame."""

    key: StreamKey
    channel: bytes
    cache_key: bytes
    code: bytes
    #: ``PUBLISH channel`` in RESP, up to the message (see :func:`broker.resp.publish_prefix`)
    publish_prefix: bytes = b""

    def __post_init__(self) -> None:
        if not self.publish_prefix:
            object.__setattr__(self, "publish_prefix", resp.publish_prefix(self.channel))


def make_target(keys: Keys, key: StreamKey) -> Target:
    return Target(
        key=key,
        channel=keys.channel(key.type, key.code, key.level).encode(),
        cache_key=keys.last_values(key.type, key.level).encode(),
        code=key.code.encode(),
    )


_first = itemgetter(0)


@dataclass(slots=True)
class PublishStats:
    published: int = 0
    batches: int = 0
    largest_batch: int = 0
    dropped_overflow: int = 0
    dropped_not_leader: int = 0
    redis_errors: int = 0
    #: commands Redis answered with an error (their frames still count in ``published``)
    reply_errors: int = 0
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
        raw_resp: bool = True,
    ) -> None:
        self._redis = redis
        #: where raw RESP goes; None: publish through redis-py pipelines
        self._address = resp.RespAddress.from_client(redis) if raw_resp and resp.AVAILABLE else None
        self._conn: resp.RespConnection | None = None
        #: which road the bursts take: "resp" or "redis-py"
        self.transport = "resp" if self._address is not None else "redis-py"
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
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                batch = self._take_batch()
                if not batch:
                    continue
                if not may_publish():
                    self.stats.dropped_not_leader += len(batch)
                    continue
                await self._publish_all(batch)
        finally:
            await self.aclose()

    async def flush(self) -> None:
        """Publish whatever is pending now (tests and shutdown)."""
        await self._publish_all(self._take_batch())

    async def _publish_all(self, batch: list[tuple[Target, bytes]]) -> None:
        for start in range(0, len(batch), MAX_PIPELINE):
            await self._publish(batch[start : start + MAX_PIPELINE])

    async def aclose(self) -> None:
        """Close the raw connection (``run`` does this when it ends); the next burst reopens."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def _publish(self, batch: list[tuple[Target, bytes]]) -> None:
        # Only the newest frame of each stream goes to the cache: dict() keeps the last value.
        newest: dict[Target, bytes] = dict(batch) if self._cache else {}
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                if self._address is not None:
                    await self._send_resp(batch, newest)
                else:
                    await self._send_pipeline(batch, newest)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("publish of %d frames failed: %s", len(batch), exc)
            return
        now = time.monotonic()
        by_type = self.published_by_type
        last_seen = self.last_seen
        for target, n_frames in Counter(map(_first, batch)).items():
            last_seen[target.key] = now
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

    @staticmethod
    def _cache_mappings(newest: dict[Target, bytes]) -> dict[bytes, list[bytes]]:
        """Cache hash -> [code, frame, code, frame, ...] (HSET arguments)."""
        per_hash: dict[bytes, list[bytes]] = {}
        for target, frame in newest.items():
            fields = per_hash.get(target.cache_key)
            if fields is None:
                fields = per_hash[target.cache_key] = []
            fields += (target.code, frame)
        return per_hash

    async def _send_resp(
        self, batch: list[tuple[Target, bytes]], newest: dict[Target, bytes]
    ) -> None:
        """The burst as one RESP buffer: every PUBLISH, then one HSET per cache hash."""
        parts = [b"%b$%d\r\n%b\r\n" % (t.publish_prefix, len(f), f) for t, f in batch]
        commands = len(batch)
        for key, fields in self._cache_mappings(newest).items():
            parts.append(resp.encode_command(b"HSET", key, *fields))
            commands += 1
        conn = self._conn
        if conn is None or conn.closed:
            assert self._address is not None
            conn = self._conn = await resp.RespConnection.connect(self._address)
        errors = await conn.count_errors(b"".join(parts), commands)
        if errors:
            self._reply_errors(errors)

    async def _send_pipeline(
        self, batch: list[tuple[Target, bytes]], newest: dict[Target, bytes]
    ) -> None:
        """The burst as a redis-py pipeline (clients raw RESP cannot speak for)."""
        pipe = self._redis.pipeline(transaction=False)
        command = pipe.execute_command
        for target, frame in batch:
            command("PUBLISH", target.channel, frame)
        for cache_key, fields in self._cache_mappings(newest).items():
            command("HSET", cache_key, *fields)
        replies = await pipe.execute(raise_on_error=False)
        errors = sum(1 for reply in replies if isinstance(reply, Exception))
        if errors:
            self._reply_errors(errors)

    def _reply_errors(self, errors: int) -> None:
        self.stats.reply_errors += errors
        if self.stats.reply_errors == errors or self.stats.reply_errors % 1000 < errors:
            logger.warning(
                "redis refused %d commands of a burst (%d so far)", errors, self.stats.reply_errors
            )
