"""Fan-out: routed frames to their Redis channels, pipelined per burst (I/O adapter).

The upstream receive loop calls :meth:`Publisher.enqueue` per frame (an append, no await). The
first frame of a burst schedules one callback for when the receive loop next yields, i.e. once
everything that arrived together has been routed; that callback swaps the list out and writes
the whole burst as ONE buffer of PUBLISH commands, then the XADDs that append the same frames
to their streams' history (``{ns}:hist:{stream}:{code}``, capped with ``MAXLEN ~``, for the
types whose history is on), then one HSET per cache hash for the last-value cache (only the
newest frame per code in the burst is written).

The PUBLISHes go first because Redis reads a client's commands 16 KB at a time and sends
subscribers what it has published after each piece: with an XADD before each PUBLISH a burst's
last frames waited for the history of all the others (at 10,000 frames/s, ~100 frames a
burst, about 1.7 ms more added latency at p50 than with the history off; issue 16). Nothing
reads the two roads against each other: durable consumers read the history alone (XREAD), and
a burst is counted published once Redis has answered all of its commands, in any order.

The history is what durable consumers read (``XREAD`` from an offset), so a history entry Redis
refused (at maxmemory: ``-OOM``; any error reply in a burst that carried XADDs counts, since
replies are not told apart) is a frame they will never see: it is counted
(``history_refused``) and announced like a frame that never reached Redis, as a ``redis`` gap
(a :class:`RedisLoss` that stays open until a burst's history is accepted again).

On the raw RESP road (:mod:`broker.resp`: one packed buffer, replies counted by hiredis) the
write does not wait for Redis, and its replies are read by the next burst's write, before it
(:meth:`broker.resp.RespConnection.poll_replies`; a timer reads the last burst's within
``REPLY_POLL_INTERVAL``), so a burst costs one ``write`` and one wake-up: the read of the
upstream socket that brought it. Redis that falls behind fills the transport buffer; the
publisher then stops writing and lets frames accumulate until it drains, and a buffer
unanswered for ``PIPELINE_TIMEOUT`` means Redis is gone (the connection is dropped, the error
counted, the next burst reconnects). A frame counts as published once Redis has answered its
command; frames Redis never confirmed count as ``dropped_redis``. The pending list is bounded:
past ``max_pending`` the oldest frames are dropped and counted (consumers get a gap event).

A loss of frames on the way to Redis (the connection broke, ``CLIENT KILL``, a timeout, Redis
unreachable) opens a :class:`RedisLoss`; the first burst Redis confirms after it closes it, and
it waits in :meth:`Publisher.take_losses` (``watch_wake`` is set) for the leader core, which
announces a ``redis`` gap: one report per loss, never per frame. Its ``frames`` are every frame
dropped while it was open, by ``redis`` or, fenced after the error until the lock was renewed,
by ``not_leader``.

A client raw RESP cannot speak for (a fake or exotic client) gets the same commands in the same
order through redis-py pipelines, from the publisher's task, one pipeline in flight at a time.

Redis at maxmemory (``noeviction``) refuses the cache's HSETs (``-OOM``) and still takes every
PUBLISH: frames flow, the cache freezes. The refusals are counted (``oom_refusals``; the leader's
:class:`broker.core.oom.OomWatch` names the episode), and the cache is marked stale
(``cache_stale_since_ms``: the write time of the first refused burst) instead of silently
falling behind; the leader then fetches snapshots upstream instead of serving them from it.
The cache is not written with allow-oom on purpose: it is the broker's largest key set, written
at every burst, and exempting it from the limit would let the broker itself keep Redis over the
maxmemory its operator set. While stale, bursts stop carrying cache writes except one probe per
:data:`CACHE_PROBE_INTERVAL`; once a probe is accepted, the next burst rewrites the newest frame
of every stream seen (:attr:`Publisher._newest`, one per stream), and its acceptance makes the
cache current again, without a restart.

A publisher only knows the streams of its own phase, and the cache may hold entries frozen
earlier: by an earlier phase of this process that ended with the cache stale (the mark outlives
it in ``stats``), or by a previous leader process that Redis refused (it says so in its status:
:meth:`Publisher.inherit_stale_mark`). So the first time a phase would clear a mark, it first
purges the cache (``SCAN {ns}:last:*`` and DEL, both allowed at maxmemory; a phase that starts
with the mark set purges at its first burst, which also frees the memory the frozen entries
hold): after that every entry was written by this phase, and the rewrite holds the newest frame
of each. A stream quiet since then has no entry, and its snapshot is fetched upstream, instead of
served from a frame it replaced long ago.

Snapshot requests wait for the next frame of some streams: :meth:`Publisher.watch` names them,
and the frames of a burst that belong to them are kept for :meth:`Publisher.take_watched` (one
set lookup per frame of a burst, only while something is watched), and ``watch_wake`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker import resp
from broker.clock import now_ms
from broker.cluster_slots import key_slot, parse_redirect
from broker.core.history import history_cap
from broker.core.oom import inherited_cache_stale_since
from broker.core.stats import PublishStats
from broker.keys import Keys
from broker.redis_oom import is_oom
from broker.sharded import ShardedConnection
from broker.upbit.types import DataType, StreamKey

logger = logging.getLogger(__name__)

#: a pipeline larger than this is split, so one burst never builds a huge buffer
MAX_PIPELINE = 2048
#: one pipeline must complete within this, or Redis is considered unreachable
PIPELINE_TIMEOUT = 5.0
#: while the cache is stale (writes refused for memory), one burst per this many seconds
#: carries its cache write, to learn when Redis accepts writes again
CACHE_PROBE_INTERVAL = 0.5

_CRLF = b"\r\n"
# What a burst's cache write is (the third item of its token): none, the burst's own newest
# frames, or the newest frame of every stream seen (the rewrite that ends a staleness).
_NO_CACHE, _BURST_CACHE, _FULL_CACHE = 0, 1, 2

#: a burst in flight: (write wall clock ms, its frames, which cache write it carries, how many
#: history entries it appends)
_Token = tuple[int, list[tuple["Target", bytes]], int, int]


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
    #: the history stream (empty: this type keeps no history) and its cap (entries)
    history_key: bytes = b""
    history_cap: int = 0
    #: ``XADD key MAXLEN ~ cap * f`` in RESP, up to the frame (empty: no history)
    history_prefix: bytes = b""
    #: commands per frame: the PUBLISH, and the XADD when the history is on
    commands: int = 1
    #: for a trade stream with history: where its SNAPSHOT frames go (:class:`SnapshotTwin`)
    snapshot_twin: Target | None = None
    #: the cache hash's name and the code as RESP bulk strings (the HSET's arguments)
    cache_bulk: bytes = b""
    code_bulk: bytes = b""
    #: on a Redis Cluster: SPUBLISH, and the slots the publisher routes the commands by
    sharded: bool = False
    channel_slot: int = 0
    history_slot: int = 0
    cache_slot: int = 0

    def __post_init__(self) -> None:
        if not self.publish_prefix:
            object.__setattr__(
                self, "publish_prefix", resp.publish_prefix(self.channel, sharded=self.sharded)
            )
        if self.sharded:
            object.__setattr__(self, "channel_slot", key_slot(self.channel))
            object.__setattr__(self, "cache_slot", key_slot(self.cache_key))
            if self.history_key:
                object.__setattr__(self, "history_slot", key_slot(self.history_key))
        if not self.cache_bulk:
            object.__setattr__(self, "cache_bulk", resp.bulk(self.cache_key))
            object.__setattr__(self, "code_bulk", resp.bulk(self.code))
        if self.history_key and self.history_cap > 0:
            object.__setattr__(
                self, "history_prefix", resp.xadd_prefix(self.history_key, self.history_cap)
            )
            object.__setattr__(self, "commands", 2)


class SnapshotTwin(Target):
    """Where the SNAPSHOT frames of a trade stream with history go: published and cached like
    the stream's own, never appended to its history. A trade SNAPSHOT repeats the stream's last
    trade (each new connection, each resubscribe that adds codes, any snapshot request sends
    one), so appending it would hand a durable reader the same trade twice.

    It is the same stream: equal to its :attr:`original` and hashed like it, so that a burst's
    newest frame per stream (``dict(batch)``), the cache and the counters treat both as one key
    (a plain Target compares by identity; the comparison falls back to this class's ``__eq__``).
    """

    __slots__ = ("original",)
    original: Target

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.original

    def __hash__(self) -> int:
        return object.__hash__(self.original)


def make_target(keys: Keys, key: StreamKey, history_caps: dict[str, int] | None = None) -> Target:
    """The target of one stream; ``history_caps`` (``BrokerSettings.history_caps``): the
    history's cap per type (None or a type left out: no history)."""
    cap = history_cap(history_caps, key.type) if history_caps else 0
    target = Target(
        key=key,
        channel=keys.channel(key.type, key.code, key.level).encode(),
        cache_key=keys.last_values(key.type, key.level).encode(),
        code=key.code.encode(),
        history_key=keys.history(key.type, key.code, key.level).encode() if cap else b"",
        history_cap=cap,
        sharded=keys.hash_tag,
    )
    if cap and key.type == DataType.TRADE:
        twin = SnapshotTwin(
            key=target.key,
            channel=target.channel,
            cache_key=target.cache_key,
            code=target.code,
            publish_prefix=target.publish_prefix,
            sharded=target.sharded,
        )
        object.__setattr__(twin, "original", target)
        object.__setattr__(target, "snapshot_twin", twin)
    return target


@dataclass(frozen=True, slots=True)
class RedisLoss:
    """Frames that never reached Redis between two confirmed publishes (wall-clock ms)."""

    #: the last confirmed publish before the loss, or the first unconfirmed burst's write if
    #: earlier (the loss itself when nothing was ever published)
    since_ms: int
    #: when Redis confirmed a publish again
    until_ms: int
    #: frames dropped meanwhile (``dropped_redis`` and ``dropped_not_leader``)
    frames: int


class Publisher:
    """Pipelined PUBLISH of frame bursts plus the last-value cache."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        last_value_cache: bool = True,
        history_caps: dict[str, int] | None = None,
        max_pending: int = 100_000,
        raw_resp: bool = True,
        stats: PublishStats | None = None,
        watch_wake: asyncio.Event | None = None,
        fence_slot: int | None = None,
    ) -> None:
        """Nothing connects until the first burst.

        Args:
            redis: the client whose address the raw road connects to (or whose pipelines the
                redis-py road uses).
            last_value_cache: also HSET the newest frame of each stream in its cache hash.
            history_caps: the history's cap per type (``BrokerSettings.history_caps``); the
                targets are made with them (:meth:`target`); None: no history.
            max_pending: frames held before the oldest are dropped (and counted).
            raw_resp: take the raw RESP road when the client allows it.
            stats: the counters to bump (the broker's, which outlive this publisher).
            watch_wake: set when frames of watched streams were written (see :meth:`watch`).
            fence_slot: on a cluster, the slot of the leader lock: losing another master's
                connection does not stop the leader publishing (:attr:`fence_errors`).
        """
        self._redis = redis
        #: where raw RESP goes; None: publish through redis-py pipelines
        self._address = resp.RespAddress.from_client(redis) if raw_resp and resp.AVAILABLE else None
        #: a Redis Cluster: one connection per master, each command routed by its slot
        self._sharded = self._address is not None and self._address.cluster is not None
        self._conn: resp.RespConnection | ShardedConnection | None = None
        #: which road the bursts take: "resp" or "redis-py"
        self.transport = "resp" if self._address is not None else "redis-py"
        self._cache = last_value_cache
        self.history_caps = dict(history_caps or {})
        #: the token of the last burst whose history Redis refused (its answer must not end the
        #: loss it opened)
        self._history_refused_token: _Token | None = None
        #: the open loss holds refused history: only a burst whose history Redis takes ends it
        self._history_loss = False
        self._max_pending = max_pending
        self._pending: list[tuple[Target, bytes]] = []
        #: wakes the publisher's task: the fast road cannot take this burst (no connection
        #: yet, writing paused, or the redis-py road)
        self.wake = asyncio.Event()
        self._flush_scheduled = False
        self._may_publish: Callable[[], bool] | None = None
        #: Redis errors that put the leader lock in doubt: the leader publishes nothing after
        #: one until a renewal succeeds (``broker.leader_phase``). Every error counts, except a
        #: cluster master lost that does not hold the lock (``fence_slot``'s master)
        self.fence_errors = 0
        self._fence_slot = fence_slot
        self._watchdog: asyncio.TimerHandle | None = None
        self.stats = PublishStats() if stats is None else stats
        self._watch_wake = watch_wake
        self._watched: frozenset[StreamKey] = frozenset()
        self._watched_frames: list[tuple[StreamKey, bytes]] = []
        #: an open loss: (since_ms, frames dropped before it); closed by the next confirmation
        self._loss: tuple[int, int] | None = None
        self._losses: list[RedisLoss] = []
        #: the newest frame of every stream published this phase (with the cache on): what a
        #: rewrite of a stale cache writes (one entry per stream, like the cache itself)
        self._newest: dict[Target, bytes] = {}
        #: a probe was accepted while the cache is stale: the next burst rewrites it in full
        #: (only once this phase purged the cache: see :meth:`_purge_cache`)
        self._rewrite_due = False
        self._rewrites_in_flight = 0
        self._probe_at = 0.0
        #: the cache was purged this phase: every entry in it was written by this phase
        self._purged = False
        #: the cache must be purged before its mark may clear; set at once when the mark is
        #: inherited (an earlier phase ended stale: its streams are unknown here)
        self._purge_due = last_value_cache and bool(self.stats.cache_stale_since_ms)
        self._purge_task: asyncio.Task[None] | None = None
        self._purge_at = 0.0

    def target(self, keys: Keys, key: StreamKey) -> Target:
        """The target of one stream, with this publisher's history caps."""
        return make_target(keys, key, self.history_caps)

    def enqueue(self, target: Target, frame: bytes) -> None:
        """Queue one frame (the hot path: one per frame received); it is written once the
        current burst is routed. Costs an append and one attribute test; one callback per
        burst is scheduled."""
        self._pending.append((target, frame))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_burst)

    def enqueue_burst(self, burst: list[tuple[Target, bytes]]) -> None:
        """Queue the routed frames of one upstream read and write them now, without waiting
        for the loop's next turn: the read callback is the burst (nothing else arrives with
        it), and flushing from within saves a loop iteration per burst."""
        if not burst:
            return
        self._pending += burst
        conn = self._conn
        if self._may_publish is None or conn is None or conn.closed or conn.writing_paused:
            self.wake.set()  # the task connects, waits, or takes the redis-py road
            return
        self._write_pending(conn)

    @property
    def pending(self) -> int:
        """How many frames wait to be written."""
        return len(self._pending)

    @property
    def last_seen(self) -> dict[StreamKey, float]:
        """Monotonic time of the last publish of each stream (``stats.last_seen``)."""
        return self.stats.last_seen

    @property
    def last_publish_ms(self) -> int:
        """Wall clock of the last publish, 0 before the first (``stats.last_publish_ms``)."""
        return self.stats.last_publish_ms

    @property
    def published_by_type(self) -> dict[str, int]:
        """Frames published per stream type (``stats.published_by_type``)."""
        return self.stats.published_by_type

    def watch(self, streams: frozenset[StreamKey]) -> None:
        """Keep the frames of these streams as they are written (for snapshot requests)."""
        self._watched = streams

    def take_watched(self) -> list[tuple[StreamKey, bytes]]:
        """The frames of watched streams written since the last call, in order."""
        frames, self._watched_frames = self._watched_frames, []
        return frames

    def take_losses(self) -> list[RedisLoss]:
        """The losses closed since the last call (publishing was confirmed again after each)."""
        losses, self._losses = self._losses, []
        return losses

    def _dropped(self) -> int:
        stats = self.stats
        return stats.dropped_redis + stats.dropped_not_leader + stats.history_refused

    def _lost(self, frames: int, oldest_write_ms: int = 0) -> None:
        """``frames`` never reached Redis (counted as ``dropped_redis``): open a loss, or add
        to the open one (``oldest_write_ms``: when the oldest of them was written, 0: unknown).
        """
        if self._loss is None:
            times = [t for t in (self.stats.last_publish_ms, oldest_write_ms) if t > 0]
            self._loss = (min(times) if times else now_ms(), self._dropped())
        elif oldest_write_ms and oldest_write_ms < self._loss[0]:
            self._loss = (oldest_write_ms, self._loss[1])
        self.stats.dropped_redis += frames

    def _flush_burst(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        conn = self._conn
        if self._may_publish is None or conn is None or conn.closed or conn.writing_paused:
            self.wake.set()  # the task connects, waits, or takes the redis-py road
            return
        self._write_pending(conn)

    def _take_batch(self) -> list[tuple[Target, bytes]]:
        batch, self._pending = self._pending, []
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
        self._may_publish = may_publish
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if not self._pending:
                    continue
                if not may_publish():
                    self.stats.dropped_not_leader += len(self._take_batch())
                    continue
                if self._address is None:
                    await self._publish_all(self._take_batch())
                    continue
                conn = await self._ready_connection()
                if conn is not None:
                    self._write_pending(conn)
        finally:
            self._may_publish = None
            await self.aclose()

    async def flush(self) -> None:
        """Publish whatever is pending now and wait for Redis to answer (tests and shutdown),
        and for a purge of the cache started meanwhile."""
        await self._flush_pending()
        purge = self._purge_task
        if purge is not None:
            await asyncio.wait([purge])

    async def _flush_pending(self) -> None:
        if self._address is None:
            await self._publish_all(self._take_batch())
            return
        conn = await self._ready_connection()
        if conn is None:
            return
        self._write_all(conn, self._take_batch())
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                await conn.drain()
        except TimeoutError:
            conn.abort(RedisError(f"no reply within {PIPELINE_TIMEOUT:.0f}s"))
            await conn.aclose()  # returns once the loss is reported (and counted)
        except (RedisError, OSError):
            pass  # counted by _connection_lost

    async def _publish_all(self, batch: list[tuple[Target, bytes]]) -> None:
        for start in range(0, len(batch), MAX_PIPELINE):
            await self._publish(batch[start : start + MAX_PIPELINE])

    async def aclose(self) -> None:
        """Close the raw connection (``run`` does this when it ends); the next burst reopens."""
        conn, self._conn = self._conn, None
        if self._purge_task is not None:
            self._purge_task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if conn is not None:
            await conn.aclose()

    # -- the raw RESP road ----------------------------------------------------------------------

    async def _ready_connection(self) -> resp.RespConnection | ShardedConnection | None:
        """A connection that takes writes now: (re)connect, or wait for a full buffer to drain.
        On failure the pending frames are dropped and the error counted (None)."""
        assert self._address is not None
        conn = self._conn
        waiting = False  # connected, and waiting for a full write buffer to drain
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                if conn is None or conn.closed:
                    conn = self._conn = await self._connect(conn)
                    if self._watchdog is not None:
                        self._watchdog.cancel()  # one watchdog, for the newest connection
                    self._arm_watchdog()
                waiting = True
                await conn.wait_writable()
            return conn
        except (RedisError, OSError, TimeoutError) as exc:
            if waiting and conn is not None and conn.closed:
                # Lost while we waited: _connection_lost counted it and woke us for the frames.
                return None
            if conn is not None and not conn.closed:
                conn.abort(RedisError("writes stalled"), report=False)
            self.stats.redis_errors += 1
            self.fence_errors += 1
            lost = len(self._take_batch())
            self._lost(lost)
            logger.warning("publish of %d frames failed: %s", lost, exc or "timed out")
            return None

    async def _connect(
        self, previous: resp.RespConnection | ShardedConnection | None
    ) -> resp.RespConnection | ShardedConnection:
        assert self._address is not None
        if self._sharded:
            address = self._address
            assert address.cluster is not None
            # Seeds: the node a redirect named first (it knows its slots first), then the
            # masters last seen, then the URL's nodes (which may all have failed over since).
            seeds = list(address.cluster.nodes)
            if isinstance(previous, ShardedConnection):
                seeds = list(previous.slots.masters) + seeds
                if previous.redirected_to is not None:
                    seeds.insert(0, previous.redirected_to)
            address = replace(
                address, cluster=replace(address.cluster, nodes=tuple(dict.fromkeys(seeds)))
            )
            return await ShardedConnection.connect(
                address,
                on_answered=self._answered,
                on_lost=self._connection_lost,
                on_refused=self._refused,
                on_dropped=self._dropped_burst,
                fence_slot=self._fence_slot,
            )
        conn = await resp.RespConnection.connect(
            self._address,
            on_answered=self._answered,
            on_lost=self._connection_lost,
            on_refused=self._refused,
        )
        # Replies are read by the next burst's write (or a timer), not by a wake-up of their
        # own: at ~100 bursts a second that wake-up cost as much CPU as the write itself.
        conn.poll_replies()
        return conn

    def _write_pending(self, conn: resp.RespConnection | ShardedConnection) -> None:
        batch = self._take_batch()
        if not batch:
            return
        assert self._may_publish is not None
        if not self._may_publish():
            self.stats.dropped_not_leader += len(batch)
            return
        self._write_all(conn, batch)

    def _write_all(
        self, conn: resp.RespConnection | ShardedConnection, batch: list[tuple[Target, bytes]]
    ) -> None:
        for start in range(0, len(batch), MAX_PIPELINE):
            if isinstance(conn, ShardedConnection):
                self._write_sharded(conn, batch[start : start + MAX_PIPELINE])
            else:
                self._write_raw(conn, batch[start : start + MAX_PIPELINE])

    def _write_raw(self, conn: resp.RespConnection, batch: list[tuple[Target, bytes]]) -> None:
        """The burst as one RESP buffer: every PUBLISH, then every XADD, then one HSET per cache
        hash. Its frames count as published when Redis has answered every command
        (:meth:`_answered`)."""
        # Every PUBLISH first, then the XADDs (see the module's docstring: Redis reads a
        # burst 16 KB at a time and sends subscribers what it has published after each piece).
        # The frames themselves are never copied but by the join (once per command that
        # carries them: PUBLISH's message, XADD's value): only their length lines are built.
        parts: list[bytes] = []
        extend = parts.extend
        if self.history_caps:
            appends: list[bytes] = []
            append_history = appends.extend
            for t, f in batch:
                head = b"$%d\r\n" % len(f)
                extend((t.publish_prefix, head, f, _CRLF))
                if t.history_prefix:
                    append_history((t.history_prefix, head, f, _CRLF))
            extend(appends)
            history = len(appends) // 4
        else:
            for t, f in batch:
                extend((t.publish_prefix, b"$%d\r\n" % len(f), f, _CRLF))
            history = 0
        commands = len(batch) + history
        cache = _NO_CACHE
        if self._cache:
            # Only the newest frame of each stream goes to the cache: dict() keeps the last.
            # One HSET per cache hash, its arguments written straight into the buffer's parts
            # (the frames are copied once, by the join).
            cache, newest = self._plan_cache(dict(batch))
            for _, hset in _cache_hsets(newest):
                extend(hset)
                commands += 1
        try:
            conn.send(b"".join(parts), commands, token=(now_ms(), batch, cache, history))
        except RedisError:
            self._lost(len(batch))  # closed under us (the error is counted)
            self._cache_lost([cache])
            return
        self._sent(batch)

    def _write_sharded(self, conn: ShardedConnection, batch: list[tuple[Target, bytes]]) -> None:
        """:meth:`_write_raw` on a Redis Cluster: each command to the master owning its slot
        (SPUBLISH by channel, XADD by history stream, HSET by cache hash), one buffer per
        master, the burst answered once all are (``broker.sharded``)."""
        owner = conn.owner
        parts: dict[int, list[bytes]] = {}
        counts: dict[int, int] = {}
        appends: dict[int, list[bytes]] = {}  # each master's XADDs, after its SPUBLISHes
        history = 0
        for t, f in batch:
            body = b"$%d\r\n%b\r\n" % (len(f), f)
            if t.history_prefix:
                node = owner[t.history_slot]
                node_parts = appends.get(node)
                if node_parts is None:
                    node_parts = appends[node] = []
                node_parts += (t.history_prefix, body)
                counts[node] = counts.get(node, 0) + 1
                history += 1
            node = owner[t.channel_slot]
            node_parts = parts.get(node)
            if node_parts is None:
                node_parts = parts[node] = []
            node_parts += (t.publish_prefix, body)
            counts[node] = counts.get(node, 0) + 1
        for node, node_appends in appends.items():
            node_parts = parts.get(node)
            if node_parts is None:
                parts[node] = node_appends
            else:
                node_parts += node_appends
        cache = _NO_CACHE
        if self._cache:
            cache, newest = self._plan_cache(dict(batch))
            for slot, hset in _cache_hsets(newest):
                node = owner[slot]
                node_parts = parts.get(node)
                if node_parts is None:
                    node_parts = parts[node] = []
                node_parts += hset
                counts[node] = counts.get(node, 0) + 1
        buffers = {node: (b"".join(p), counts[node]) for node, p in parts.items()}
        try:
            conn.send_parts(buffers, token=(now_ms(), batch, cache, history))
        except RedisError:
            self._lost(len(batch))  # closed under us (the error is counted)
            self._cache_lost([cache])
            return
        self._sent(batch)

    def _answered(self, token: _Token, errors: int) -> None:
        written_ms, batch, cache, history = token
        refused = self._history_refused_token is token
        if refused:
            self._history_refused_token = None
        self._confirmed(
            batch, written_ms, history_written=(0 if refused else history) if history else -1
        )
        if not errors:
            self._cache_answered(cache, written_ms, refused=False)

    def _refused(self, token: _Token, replies: list[Exception]) -> None:
        """Redis answered some commands of a burst with errors (before :meth:`_answered`)."""
        written_ms, batch, cache, history = token
        oom = sum(1 for reply in replies if is_oom(reply))
        other = next((reply for reply in replies if not is_oom(reply)), None)
        self._reply_errors(len(replies), oom, other)
        # On a cluster, an -ASK (a slot migrating) refused a command whose key already left:
        # when it is a cache hash's, the cache missed this burst's frames like at maxmemory
        asked = {r.slot for reply in replies if (r := parse_redirect(reply)) is not None}
        cache_asked = bool(asked) and any(t.cache_slot in asked for t, _ in batch)
        why = "out of memory" if oom else "its slot was migrating"
        self._cache_answered(cache, written_ms, refused=oom > 0 or cache_asked, why=why)
        if history:
            self._history_refused_token = token
            self._history_lost(history, written_ms)

    def _history_lost(self, entries: int, written_ms: int) -> None:
        """Redis refused a burst carrying ``entries`` history entries (which of its commands
        failed is not known: all of them count): a loss for durable consumers, open until a
        burst's history is accepted (:meth:`_confirmed`)."""
        if self._loss is None:
            times = [t for t in (self.stats.last_publish_ms, written_ms) if t > 0]
            self._loss = (min(times) if times else now_ms(), self._dropped())
        self.stats.history_refused += entries
        self._history_loss = True

    def _connection_lost(self, why: Exception, unanswered: list[Any]) -> None:
        self.stats.redis_errors += 1
        if getattr(why, "fences", True):
            self.fence_errors += 1
        lost = sum(len(batch) for _, batch, _, _ in unanswered)
        self._lost(lost, min((written for written, _, _, _ in unanswered), default=0))
        self._cache_lost([cache for _, _, cache, _ in unanswered])
        logger.warning("publish connection lost with %d frames unconfirmed: %s", lost, why)
        if self._pending:
            self.wake.set()  # the task reconnects for them

    def _dropped_burst(self, token: _Token) -> None:
        """A burst had frames for a cluster master with no connection (dead, a failover under
        way): written to the others, counted lost as a whole (``broker.sharded``)."""
        written_ms, batch, cache, _ = token
        self._lost(len(batch), written_ms)
        self._cache_lost([cache])

    def _arm_watchdog(self) -> None:
        """Once a second while connected: a buffer unanswered for ``PIPELINE_TIMEOUT`` means
        Redis is gone (one timer, instead of a timeout around every burst)."""
        conn = self._conn
        if conn is None or conn.closed:
            self._watchdog = None
            return
        since = conn.unanswered_since
        if since is not None and time.monotonic() - since > PIPELINE_TIMEOUT:
            why = RedisError(f"no reply within {PIPELINE_TIMEOUT:.0f}s")
            if isinstance(conn, ShardedConnection):
                # that master is gone; the others go on
                conn.abort_stalled(time.monotonic() - PIPELINE_TIMEOUT, why)
            else:
                conn.abort(why)
                self._watchdog = None
                return
        self._watchdog = asyncio.get_running_loop().call_later(1.0, self._arm_watchdog)

    # -- shared by both roads -------------------------------------------------------------------

    def _confirmed(
        self, batch: list[tuple[Target, bytes]], written_ms: int, history_written: int = -1
    ) -> None:
        """Redis answered every command of ``batch``, written at ``written_ms``: its frames are
        published, and ``history_written`` history entries were accepted (0: refused, the loss
        stays open; -1: the burst carried none)."""
        now = time.monotonic()
        stats = self.stats
        by_type = stats.published_by_type
        last_seen = stats.last_seen
        # A plain loop: a burst is ~8 frames, where building a Counter cost more than it saved.
        for target, _ in batch:
            key = target.key
            last_seen[key] = now
            kind = key.type
            by_type[kind] = by_type.get(kind, 0) + 1
        stats.published += len(batch)
        if history_written == 0 or (history_written < 0 and self._history_loss):
            # The history refused them, or took none since it refused some: the loss stays
            # open, and the last publish stays the last whole one (the status names it: a
            # successor's takeover gap starts there).
            return
        if history_written > 0:
            stats.history_written += history_written
            self._history_loss = False
        # When it was written, not when its replies were read: those may be read late (polled
        # with the next write, or after this process was paused), and a gap that starts at the
        # last publish must not start after frames that were held back meanwhile.
        stats.last_publish_ms = max(stats.last_publish_ms, written_ms)
        if self._loss is not None and not self._master_missing(written_ms):
            self._close_loss(stats.last_publish_ms)

    def _master_missing(self, written_ms: int) -> bool:
        """A cluster master has no connection now, or had none when this burst was written:
        its frames are being dropped, so the loss stays open (one gap for the whole outage,
        not one per burst that happened to avoid that master, and none that ends before a
        burst dropped after it)."""
        conn = self._conn
        if not isinstance(conn, ShardedConnection) or conn.closed:
            return False
        return conn.missing > 0 or written_ms < conn.whole_since_ms

    def _close_loss(self, until_ms: int) -> None:
        """Publishing is confirmed again: the open loss is over (reported if it lost frames)."""
        assert self._loss is not None
        since_ms, dropped_before = self._loss
        self._loss = None
        frames = self._dropped() - dropped_before
        if frames <= 0:
            return
        self._losses.append(RedisLoss(since_ms, until_ms, frames))
        if self._watch_wake is not None:
            self._watch_wake.set()

    def _sent(self, batch: list[tuple[Target, bytes]]) -> None:
        """``batch`` was written (burst statistics; the frames of watched streams are kept)."""
        n = len(batch)
        stats = self.stats
        stats.batches += 1
        if n > stats.largest_batch:
            stats.largest_batch = n
        stats.record_batch(n)
        if self._watched:
            self._keep_watched(batch)

    def _keep_watched(self, batch: list[tuple[Target, bytes]]) -> None:
        watched = self._watched
        kept = [(t.key, frame) for t, frame in batch if t.key in watched]
        if kept:
            self._watched_frames += kept
            if self._watch_wake is not None:
                self._watch_wake.set()

    # -- the redis-py road ----------------------------------------------------------------------

    async def _publish(self, batch: list[tuple[Target, bytes]]) -> None:
        cache, newest = self._plan_cache(dict(batch)) if self._cache else (_NO_CACHE, {})
        written_ms = now_ms()
        history = sum(1 for target, _ in batch if target.history_prefix)
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                errors, oom = await self._send_pipeline(batch, newest)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            self.fence_errors += 1
            self._lost(len(batch))
            self._cache_lost([cache])
            logger.warning("publish of %d frames failed: %s", len(batch), exc)
            return
        if errors and history:
            self._history_lost(history, written_ms)
        self._confirmed(
            batch, written_ms, history_written=(0 if errors else history) if history else -1
        )
        self._sent(batch)
        if errors:
            self._reply_errors(errors, oom)
        self._cache_answered(cache, written_ms, refused=oom > 0)

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

    async def _send_pipeline(
        self, batch: list[tuple[Target, bytes]], newest: dict[Target, bytes]
    ) -> tuple[int, int]:
        """The burst as a redis-py pipeline (clients raw RESP cannot speak for); returns the
        commands Redis refused, and how many of them for memory."""
        pipe = self._redis.pipeline(transaction=False)
        command = pipe.execute_command
        for target, frame in batch:
            command("SPUBLISH" if target.sharded else "PUBLISH", target.channel, frame)
        for target, frame in batch:
            if target.history_prefix:
                command(
                    "XADD", target.history_key, "MAXLEN", "~", target.history_cap, "*", "f", frame
                )
        for cache_key, fields in self._cache_mappings(newest).items():
            command("HSET", cache_key, *fields)
        replies = await pipe.execute(raise_on_error=False)
        refused = [reply for reply in replies if isinstance(reply, Exception)]
        return len(refused), sum(1 for reply in refused if is_oom(reply))

    def _reply_errors(self, errors: int, oom: int = 0, example: object = None) -> None:
        """Redis refused ``errors`` commands of a burst, ``oom`` of them for memory: those are
        counted here and named once per episode by the leader (``broker.core.oom``); the others
        are logged with what Redis said (``example``: one of them, e.g. a ``NOPERM`` from an
        ACL without ``+xadd``: every burst's history is then refused and announced), at the
        first and then every 1000th."""
        stats = self.stats
        stats.reply_errors += errors
        stats.oom_refusals += oom
        others = errors - oom
        so_far = stats.reply_errors - stats.oom_refusals
        if others and (so_far == others or so_far % 1000 < others):
            logger.error(
                "redis refused %d commands of a burst (%d so far): %s",
                others,
                so_far,
                example if example is not None else "(no reply text)",
            )

    # -- the last-value cache while Redis refuses its writes ------------------------------------

    def _plan_cache(self, newest: dict[Target, bytes]) -> tuple[int, dict[Target, bytes]]:
        """Which cache write this burst carries, and its frames (``newest``: the burst's newest
        frame per stream). A current cache: the burst's own. A stale one: nothing, a probe
        (the burst's own) once per :data:`CACHE_PROBE_INTERVAL`, or, once a probe got through,
        the newest frame of every stream seen; bursts written after that rewrite carry their
        own again, so that its acceptance means every frame is in the cache. While a purge
        is due (:meth:`_purge_cache`), none: it would delete them."""
        self._newest.update(newest)
        if not self.stats.cache_stale_since_ms:
            return _BURST_CACHE, newest
        if self._purge_due:
            self._start_purge()
            return _NO_CACHE, {}
        if self._rewrite_due:
            self._rewrite_due = False
            self._rewrites_in_flight += 1
            return _FULL_CACHE, self._newest
        if self._rewrites_in_flight:
            return _BURST_CACHE, newest
        now = time.monotonic()
        if now >= self._probe_at:
            self._probe_at = now + CACHE_PROBE_INTERVAL
            return _BURST_CACHE, newest
        return _NO_CACHE, {}

    def _cache_answered(
        self, cache: int, written_ms: int, *, refused: bool, why: str = "out of memory"
    ) -> None:
        """Redis answered a burst's cache write (``refused``: for memory, or on a cluster a
        slot migrating: ``why``)."""
        if cache == _NO_CACHE:
            return
        stats = self.stats
        if cache == _FULL_CACHE:
            self._rewrites_in_flight -= 1
        if refused:
            self._rewrite_due = False
            self._probe_at = time.monotonic() + CACHE_PROBE_INTERVAL
            if not stats.cache_stale_since_ms:
                stats.cache_stale_since_ms = written_ms
                logger.info(
                    "last-value cache write refused by redis (%s): the cache lacks "
                    "frames since %d; snapshots are fetched upstream until it is rewritten",
                    why,
                    written_ms,
                )
            return
        if not stats.cache_stale_since_ms:
            return
        if cache == _FULL_CACHE:
            # Every burst written before it was answered before it: this rewrite holds the
            # newest frame of each of their streams, and later bursts carry their own.
            logger.info(
                "last-value cache rewritten (%d streams): current again after %.1f s stale",
                len(self._newest),
                (now_ms() - stats.cache_stale_since_ms) / 1000,
            )
            stats.cache_stale_since_ms = 0
        elif not self._rewrites_in_flight:
            self._rewrite_when_purged()  # a probe got through: Redis takes writes again

    def _cache_lost(self, caches: list[int]) -> None:
        """Bursts whose cache writes never got an answer (the connection broke)."""
        rewrites = caches.count(_FULL_CACHE)
        if rewrites:
            self._rewrites_in_flight -= rewrites
        if self.stats.cache_stale_since_ms and not self._rewrites_in_flight:
            self._rewrite_when_purged()  # unknown now: try the rewrite with the next burst

    def _rewrite_when_purged(self) -> None:
        """The next burst rewrites the cache, once this phase has purged it (a rewrite only
        holds this phase's streams: entries it did not write may be frozen)."""
        if self._purged:
            self._rewrite_due = True
        else:
            self._purge_due = True
            self._start_purge()

    def _start_purge(self) -> None:
        """Purge the cache in the background (frames do not wait for it), unless a purge runs,
        or failed less than :data:`CACHE_PROBE_INTERVAL` ago, or no stream names the namespace
        yet (the first burst does)."""
        if self._purge_task is not None or not self._newest:
            return
        if time.monotonic() < self._purge_at:
            return
        pattern = _cache_pattern(next(iter(self._newest)))
        self._purge_task = asyncio.get_running_loop().create_task(
            self._purge_cache(pattern), name="cache-purge"
        )

    async def _purge_cache(self, pattern: bytes) -> None:
        """DEL every cache hash (``pattern``: ``{ns}:last:*``; SCAN and DEL are allowed at
        maxmemory). Until it is done bursts carry no cache write, so that none is deleted; the
        next burst after it rewrites the newest frame of every stream of this phase."""
        deleted = 0
        try:
            if self._may_publish is not None and not self._may_publish():
                self._purge_at = time.monotonic() + CACHE_PROBE_INTERVAL
                return  # not leader (now): a successor may be writing the cache
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                hashes = [key async for key in self._redis.scan_iter(match=pattern, count=1000)]
                for start in range(0, len(hashes), MAX_PIPELINE):
                    deleted += await self._redis.delete(*hashes[start : start + MAX_PIPELINE])
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            self.fence_errors += 1
            self._purge_at = time.monotonic() + CACHE_PROBE_INTERVAL
            logger.warning("last-value cache purge failed (%s): retried with a later burst", exc)
            return
        finally:
            self._purge_task = None
        self._purge_due = False
        self._purged = True
        if self.stats.cache_stale_since_ms and not self._rewrites_in_flight:
            self._rewrite_due = True
        logger.info(
            "last-value cache purged (%d hashes deleted): it may have held frames refused "
            "before this leader phase; the next burst rewrites this phase's %d streams",
            deleted,
            len(self._newest),
        )

    async def inherit_stale_mark(self, status_key: str) -> None:
        """At the start of a phase, before its tasks run (the status still is the previous
        leader's): mark the cache stale if that leader's status says Redis refused its writes
        (:func:`broker.core.oom.inherited_cache_stale_since`), so that it is purged before it
        serves snapshots again. Status unreadable: the same (nothing tells it is current)."""
        if not self._cache:
            return
        fields = ["cache_stale_since_ms", "redis_oom_since_ms"]
        try:
            async with asyncio.timeout(PIPELINE_TIMEOUT):
                stale, oom = await self._redis.hmget(status_key, fields)
            since = inherited_cache_stale_since(stale, oom)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            self.fence_errors += 1
            logger.warning("previous status unreadable (%s): last-value cache held stale", exc)
            since = now_ms()
        if not since:
            return
        if not self.stats.cache_stale_since_ms:
            self.stats.cache_stale_since_ms = since
            logger.info(
                "the previous leader's last-value cache lacks frames since %d (redis refused "
                "its writes): purged and rewritten before snapshots are served from it",
                since,
            )
        if not self._purged:
            self._purge_due = True


def _cache_hsets(newest: dict[Target, bytes]) -> list[tuple[int, list[bytes]]]:
    """One HSET per cache hash for ``newest`` (a frame per stream), as RESP parts written
    straight into a burst's buffer (the frames are copied once, by its join), each with the
    hash's slot (a cluster routes it there)."""
    per_hash: dict[bytes, tuple[int, list[bytes]]] = {}
    for target, frame in newest.items():
        entry = per_hash.get(target.cache_bulk)
        if entry is None:
            entry = per_hash[target.cache_bulk] = (target.cache_slot, [])
        entry[1].extend((target.code_bulk, b"$%d\r\n" % len(frame), frame, b"\r\n"))
    # HSET, the key, then a code and a frame (four parts) per field
    return [
        (slot, [b"*%d\r\n$4\r\nHSET\r\n" % (2 + len(fields) // 2), key_bulk, *fields])
        for key_bulk, (slot, fields) in per_hash.items()
    ]


def _cache_pattern(target: Target) -> bytes:
    """``{ns}:last:*``, every cache hash of the namespace of ``target`` (whose cache hash is
    ``{ns}:last:{stream}``, and a stream name has no ``:``)."""
    return target.cache_key.rpartition(b":")[0] + b":*"
