"""One leader phase: the leader core and the small I/O tasks around it (I/O).

The tasks run in one TaskGroup; each feeds the core (:class:`broker.core.leader.LeaderCore`)
what it read and writes what the core asks for:

    lock       renew the leader lock every third of its TTL (at once after a publish error)
    control    the ``{ns}:control`` channel: which leases changed, when commands wait (read in
               bursts, fed to the core once per ``CONTROL_TICK`` at most); at each
               (re)subscription, which Redis server answers (INFO ``run_id``: a failover)
    leases     read the leases the core asks for (``LeaseStore``), when it asks
    commands   pop ``{ns}:requests`` in batches; look up the cache values snapshots need
    upstream   the websocket (``broker.upstream``)
    follow     the connection's events, fed to the core in order; a new connection's epoch is
               ``INCR {ns}:epoch``
    publisher  bursts of frames to Redis (``broker.publisher``)
    clock      the core's timers, the frames snapshot requests wait for, and the publisher's
               losses on the way to Redis (each becomes a ``redis`` gap)
    outbox     events and replies: one pipeline per batch, on one connection
    status     the status hash, every ``status_interval``
    markets    Upbit's market list (REST), at the start and every ``markets_refresh``
    backfill   the back-fill jobs the core queues after each gap (``broker.backfill``: missed
               trades and candles from Upbit's REST API into the history), one at a time
    history    the history's upkeep: every ``HISTORY_UPKEEP`` s, each history stream of the union
               is trimmed to ``history_max_age`` (XTRIM MINID) and its key's expiry pushed on,
               so a quiet code keeps minutes, not days, and a stream that left the union is gone
               after ``history_max_age``

After every feed, :meth:`LeaderPhase._forward` hands the core's outputs on (the one place that
does): it wakes the upstream send loop when the desired set or the controller changed, tells
the publisher which streams snapshot requests wait for, and wakes the outbox, the clock and the
back-fill.

Losing the lock (or failing to renew it before its local deadline) ends the TaskGroup at once,
and the publisher checks the lock before every burst, so a deposed leader never publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker.backfill import Backfiller
from broker.clock import now_ms
from broker.cluster_slots import key_slot
from broker.contract import encode_status
from broker.control_channel import ControlSubscription, subscribe_control
from broker.coordination import server_info
from broker.core.backfill import Outcome, StreamResult
from broker.core.history import history_cap
from broker.core.leader import LeaderCore, OutEvent, OutReply, Wake
from broker.core.snapshots import CacheQuery
from broker.core.stats import Counters
from broker.errors import NotLeaderError, describe
from broker.keys import keys_for
from broker.leader import LeaderLock
from broker.leases import LeaseStore
from broker.markets import fetch_market_codes
from broker.publisher import Publisher
from broker.redis_oom import AllowOomScript, is_oom, read_memory
from broker.rest import RestClient
from broker.settings import BrokerSettings
from broker.upbit.types import SubscriptionSet
from broker.upstream import Confirmed, Connected, Lost, Upstream, Verified

logger = logging.getLogger(__name__)

#: every Redis call of a phase is bounded by this (the clients have no socket timeout)
REDIS_TIMEOUT = 5.0
#: commands popped per wake-up (the rest on the next)
COMMAND_BATCH = 100
#: events (and, apart, replies) written per pipeline
OUTBOX_BATCH = 500
#: the status hash outlives its leader by this much (then it is garbage)
STATUS_TTL_MS = 24 * 3600 * 1000
#: replies live this long in Redis if nobody picks them up
REPLY_TTL_MS = 60_000
#: KEYS: the status hash. ARGV: its TTL in ms, then field, value, field, value ... Run with
#: allow-oom (broker.redis_oom): at maxmemory a MULTI queueing an HSET is refused, the status
#: went stale and ``check`` blamed the leader instead of the memory. Bounded: a fixed set of
#: fields, overwritten in place every interval.
#: KEYS: the epoch key. Run with allow-oom (``_next_epoch``).
INCR_LUA = "return redis.call('INCR', KEYS[1])"
STATUS_LUA = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
#: the control channel feeds the core at most once per tick (a flood folds into one feed)
CONTROL_TICK = 0.01
#: the first retry after the market list could not be read (doubling, up to markets_refresh)
MARKETS_RETRY = 5.0
#: an early re-read of the market list (a lease names a code it lacks) comes no sooner
MARKETS_EARLY = 60.0
#: a wait for a wall-clock time looks at the clock again at least this often (seconds)
WALL_CLOCK_RECHECK = 5.0
#: the history's upkeep runs this often at most (seconds; more often for a short max age)
HISTORY_UPKEEP = 60.0
#: history streams trimmed and re-expired per pipeline
HISTORY_UPKEEP_BATCH = 1000


class LeaderPhase:
    """The I/O of one leader phase around ``core``; :meth:`run` until the lock is lost."""

    def __init__(
        self,
        settings: BrokerSettings,
        core: LeaderCore,
        counters: Counters,
        *,
        redis: aioredis.Redis,
        pub_redis: aioredis.Redis,
        lock: LeaderLock,
        ready: asyncio.Event,
    ) -> None:
        """The adapters of the phase (nothing connects before :meth:`run`).

        Args:
            settings: the broker's settings.
            core: this phase's rules (``took_lead`` already fed).
            counters: the broker's counters (the adapters bump them).
            redis: the command client; ``pub_redis`` the publisher's own.
            lock: the leader lock this phase holds.
            ready: set while connected upstream (cleared on a loss).
        """
        self.settings = settings
        self.core = core
        self.counters = counters
        self.stats = counters.broker
        self.keys = keys_for(settings.namespace, settings.redis_url)
        self.redis = redis
        self.lock = lock
        self.ready = ready
        self._wake_leases = asyncio.Event()
        self._wake_commands = asyncio.Event()
        self._wake_clock = asyncio.Event()
        self._wake_outbox = asyncio.Event()
        self._markets_now = asyncio.Event()
        self._wake_backfill = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._clock_at: float | None = None  # when the clock task wakes by itself
        self._errors_at_renewal = 0
        #: the lock's local deadline ran out with no publish error: (the last publish before,
        #: ``dropped_not_leader`` then); what is dropped meanwhile is announced (_may_publish)
        self._fenced: tuple[int, int] | None = None
        self._incr_epoch = AllowOomScript(redis, INCR_LUA, whole=True)
        self.publisher = Publisher(
            pub_redis,
            last_value_cache=settings.last_value_cache,
            history_caps=settings.history_caps(),
            max_pending=settings.max_pending_frames,
            stats=counters.publish,
            watch_wake=self._wake_clock,
            # on a cluster, losing a master that does not hold the lock fences nothing
            fence_slot=key_slot(self.keys.leader) if self.keys.hash_tag else None,
        )
        self.upstream = Upstream(
            settings, core.controller, self.publisher, self.keys, stats=counters.upstream
        )
        rest_url = settings.rest_base_url()
        rest = None
        if settings.backfill and rest_url is not None:
            rest = RestClient(rest_url, stats=counters.backfill)
        self.backfiller = Backfiller(
            redis,
            self.keys,
            rest,
            fmt=settings.upstream_format,
            stats=counters.backfill,
            may_write=self._may_write,
        )

    async def run(self) -> None:
        """Every task of the phase; returns (or raises) when one of them ends it."""
        await self._inherit_union()
        self._wake_commands.set()
        self._forward()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._hold_lock(), name="leader-lock")
            tg.create_task(self._watch_control(), name="control-channel")
            tg.create_task(self._read_leases(), name="leases")
            tg.create_task(self._handle_commands(), name="commands")
            tg.create_task(self.upstream.run(), name="upstream")
            tg.create_task(self._follow_upstream(), name="upstream-events")
            tg.create_task(self.publisher.run(self._may_publish), name="publisher")
            tg.create_task(self._run_clock(), name="clock")
            tg.create_task(self._write_outbox(), name="outbox")
            tg.create_task(self._write_status(), name="status")
            tg.create_task(self._run_backfill(), name="backfill")
            if self.publisher.history_caps:
                tg.create_task(self._keep_history(), name="history")
            markets_url = self.settings.market_list_url()
            if markets_url is not None:
                tg.create_task(self._refresh_markets(markets_url), name="markets")

    async def _inherit_union(self) -> None:
        """Feed the core the union the status names before this phase writes its own
        (``LeaderCore.inherit_union``: held after a takeover during a Redis failover).
        Advisory: an unreadable status holds nothing."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw, written = await self.redis.hmget(self.keys.status, ["desired", "updated_ms"])
            desired = SubscriptionSet.of(
                msgspec.json.decode(raw or b"{}", type=dict[str, list[str]])
            )
            written_ms = int(written or 0)
        except (RedisError, OSError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
            logger.debug("no union to inherit from the status (%s)", exc)
            return
        self.core.inherit_union(desired, written_ms, time.monotonic(), now_ms())

    def _forward(self) -> None:
        """Hand the core's outputs to whoever acts on them (called after every feed)."""
        core = self.core
        if core.take_controller_changed():
            self.upstream.changed.set()
        self.publisher.watch(core.awaited_streams)
        if core.has_output:
            self._wake_outbox.set()
        if core.take_market_refresh():
            self._markets_now.set()
        if core.take_backfill_queued():
            self._wake_backfill.set()
        wakeup = core.next_wakeup(time.monotonic())
        if wakeup is not None and (self._clock_at is None or wakeup < self._clock_at):
            self._wake_clock.set()

    def _may_write(self) -> bool:
        """The back-fill's check before each stream and XADD batch: the lock valid locally and
        no publish error since the last renewal (:meth:`_may_publish`'s conditions, without
        its fence bookkeeping, which stays the publisher's): a leader deposed mid-job (paused
        past its TTL) must not append what its successor back-fills too."""
        return self.lock.is_valid() and self.publisher.fence_errors == self._errors_at_renewal

    def _may_publish(self) -> bool:
        """Checked before every burst: the lock is valid locally, and Redis has not failed us
        since the last renewal. A failed publish may mean Redis restarted empty and lost the
        lock, so a standby may already lead: publish nothing until a renewal proves otherwise.

        What is held back is announced. After a publish error the publisher's loss counts it.
        Without one (the lock's local deadline ran out: a pause, a starved event loop) the
        frames dropped as ``not_leader`` meanwhile become one ``redis`` gap when publishing is
        allowed again; they were lost silently before (issue 12, item 12). If it never is, the
        successor's takeover gap covers them (it starts at our last frame).
        """
        published = self.counters.publish
        errors = self.publisher.fence_errors != self._errors_at_renewal
        if errors and self._fenced is not None:
            self._end_fence()  # the publisher's loss counts what is held back from here on
        if not self.lock.is_valid():
            if self._fenced is None and not errors:
                self._fenced = (published.last_publish_ms or now_ms(), published.dropped_not_leader)
            return False
        if errors:
            self._renew_now.set()
            return False
        if self._fenced is not None:
            self._end_fence()
        return True

    def _end_fence(self) -> None:
        """Announce the frames dropped as ``not_leader`` since the lock's local deadline ran out
        (the lock is confirmed again, or a publish error took the counting over)."""
        assert self._fenced is not None
        since_ms, dropped_before = self._fenced
        self._fenced = None
        frames = self.counters.publish.dropped_not_leader - dropped_before
        if frames > 0:
            self.core.publish_lost(since_ms, now_ms(), frames)
            self._forward()

    async def _hold_lock(self) -> None:
        """Renew every third of the TTL (at once after a Redis error); a lock that vanished
        (Redis restarted empty) is re-acquired if nobody else took it."""
        lock = self.lock
        interval = self.settings.leader_ttl / 3
        self._errors_at_renewal = self.publisher.fence_errors
        unconfirmed_since: float | None = None
        failed = False  # the last renewal failed: retry sooner (a failover may be under way)
        while True:
            wait = interval / 4 if failed or unconfirmed_since is not None else interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._renew_now.wait()
            self._renew_now.clear()
            errors_before = self.publisher.fence_errors
            try:
                async with asyncio.timeout(interval):
                    if await lock.renew():
                        self._errors_at_renewal = errors_before
                        unconfirmed_since = None
                        failed = False
                        continue
                    if await lock.holder() is None and await lock.try_acquire():
                        logger.warning("leader lock was gone (redis restarted?): re-acquired")
                        self._errors_at_renewal = errors_before
                        unconfirmed_since = None
                        continue
                    holder = await lock.holder()
                raise NotLeaderError(f"lock now held by {holder}")
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                # Every attempt counts: through a failover the lock key lives on with the TTL
                # of the last renewal, and a standby polling for it wins once it expired.
                failed = True
                if lock.is_valid():
                    logger.warning("leader lock renewal failed (%s); still valid locally", exc)
                    continue
                # Not provably leader: publishing has stopped (the publisher checks the lock).
                # Keep the upstream connection while Redis comes back, for one lock TTL at most;
                # if another broker takes the lock meanwhile, the next attempt steps down.
                now = time.monotonic()
                if unconfirmed_since is None:
                    unconfirmed_since = now
                if now - unconfirmed_since > self.settings.leader_ttl:
                    raise NotLeaderError(f"could not renew the leader lock: {exc}") from exc
                logger.warning("leader lock unconfirmed (%s); not publishing until it is", exc)

    # -- the control channel and the leases -----------------------------------------------------

    async def _watch_control(self) -> None:
        """Our own subscription to the control channel (``broker.control_channel``), read in
        bursts and fed to the core once per ``CONTROL_TICK`` at most: any consumer may publish
        there, and a flood must cost one feed (one wake-up of each task) a tick, not one a
        message. A lone message is fed at once; a reconnect is noticed, never silent."""
        core = self.core
        while True:
            channel: ControlSubscription | None = None
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    channel = await subscribe_control(self.redis, self.keys.control)
                    run_id = await self._redis_run_id()
                now = time.monotonic()
                if run_id is not None:  # another server than before: held union, a gap
                    core.redis_server_seen(run_id, now, now_ms())
                core.control_subscribed(now)  # messages may have been missed
                self._forward()
                self._wake_leases.set()
                self._wake_commands.set()
                fed_at = 0.0
                while True:
                    batch = await channel.take(not_before=fed_at + CONTROL_TICK)
                    fed_at = time.monotonic()
                    wake = core.control_messages(batch, fed_at)
                    if Wake.COMMANDS in wake:
                        self._wake_commands.set()
                    if Wake.LEASES in wake:
                        self._wake_leases.set()
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                core.control_lost(str(exc) or type(exc).__name__, time.monotonic())
                self._forward()
                await asyncio.sleep(0.5)
            finally:
                if channel is not None:
                    await channel.aclose()

    async def _redis_run_id(self) -> str | None:
        """The ``run_id`` of the Redis server the command client reaches (INFO server): it
        tells a failover or a restart from a broken connection. None when INFO is refused
        (an ACL without ``+info``) or says nothing of it (a fake)."""
        try:
            info = await server_info(self.redis, self.keys, "server")
        except ResponseError as exc:
            logger.debug("no INFO server (%s): a redis failover is not told apart", exc)
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None

    async def _read_leases(self) -> None:
        """Read the leases the core asks for, when it asks (``broker.core.reconcile``)."""
        core = self.core
        redis = self.redis
        store = LeaseStore(redis, self.settings.namespace)
        max_streams = self.settings.max_lease_streams
        while True:
            await _wait_until(self._wake_leases, core.next_lease_read)
            now = time.monotonic()
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    if core.watches_epoch_key and await redis.get(self.keys.epoch) is None:
                        await redis.set(self.keys.epoch, core.epoch, nx=True)
                        core.redis_emptied(now)
                    read = core.begin_lease_read(now)
                    if read.full:
                        listing = await store.list_all(
                            scan=read.scan, known=read.known, max_streams=max_streams
                        )
                        core.leases_listed(listing, now, now_ms())
                    else:
                        reads = await store.read_many(read.ids, max_streams=max_streams)
                        core.leases_read(reads, now, now_ms())
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                core.lease_read_failed(time.monotonic())
                logger.warning("lease reconcile failed: %s", exc)
            self._forward()

    # -- commands -------------------------------------------------------------------------------

    async def _handle_commands(self) -> None:
        """Pop commands in batches (at each ``request`` message, and every second); the core
        answers them, through the outbox."""
        core = self.core
        while True:
            self._wake_commands.clear()
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    raw: Any = await self.redis.lpop(self.keys.requests, COMMAND_BATCH)
                for item in raw or []:
                    data = item if isinstance(item, bytes) else str(item).encode()
                    query = core.command(data, time.monotonic())
                    if query is not None:
                        core.cached(query, await self._cached_values(query), time.monotonic())
                        self._forward()  # the fetch goes upstream before the next lookup
                self._forward()
                if raw and len(raw) == COMMAND_BATCH:
                    continue
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                logger.warning("command queue unavailable: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake_commands.wait()

    async def _cached_values(self, query: CacheQuery) -> list[Any]:
        """``HMGET`` of the last-value cache for a snapshot; nothing when Redis fails, or while
        the cache is stale (Redis refused its writes for memory: it lacks frames published
        since ``cache_stale_since_ms``), so the codes are fetched upstream."""
        stale_since = self.counters.publish.cache_stale_since_ms
        if stale_since:
            logger.debug("last-value cache stale since %d: snapshot fetched upstream", stale_since)
            return []
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                key = self.keys.last_values(query.type, query.level)
                values: list[Any] = await self.redis.hmget(key, list(query.codes))
                return values
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("last-value cache unavailable (%s): fetching upstream", exc)
            return []

    # -- upstream -------------------------------------------------------------------------------

    async def _follow_upstream(self) -> None:
        """Feed the connection's events to the core, in order."""
        core, upstream = self.core, self.upstream
        while True:
            event = await upstream.events.get()
            match event:
                case Connected(fresh=fresh, at_ms=at_ms, announced=announced):
                    if core.upstream_connected(time.monotonic(), at_ms, fresh=fresh):
                        core.epoch_assigned(await self._next_epoch())
                    self._forward()
                    await self._flush_outbox()  # the gap and connected events, before data
                    announced.set()
                    self.ready.set()
                case Lost(loss=loss, at_ms=at_ms, last_frame_ms=last_frame_ms, refusal=refusal):
                    self.ready.clear()
                    core.upstream_lost(loss, at_ms, last_frame_ms, refusal, time.monotonic())
                case Verified(verdict=verdict):
                    core.upstream_verified(verdict, time.monotonic(), now_ms())
                case Confirmed(request_ids=request_ids):
                    core.resubscribes_confirmed(request_ids)
            self._forward()

    async def _refresh_markets(self, url: str) -> None:
        """Read Upbit's market list now and every ``markets_refresh``: sooner after a failure
        (until one read succeeds, every well-formed code is trusted), and sooner when a lease
        names a code the list lacks (a new listing?), at most every ``MARKETS_EARLY`` s. The
        list is advisory: nothing that goes wrong here may end the leader phase."""
        failures = 0
        while True:
            read_at = time.monotonic()
            try:
                codes = await fetch_market_codes(url)
            except Exception as exc:  # advisory: MarketListError is the usual one
                failures += 1
                self.stats.market_list_errors += 1
                wait = min(self.settings.markets_refresh, MARKETS_RETRY * 2 ** min(failures, 6))
                log = logger.warning if failures == 1 else logger.debug
                log("market list unavailable (%s); retry in %.0fs", describe(exc), wait)
            else:
                failures = 0
                self.core.markets_listed(codes, time.monotonic(), now_ms())
                self._forward()
                wait = self.settings.markets_refresh
            self._markets_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._markets_now.wait()
            # Woken early (an unknown code): not sooner than MARKETS_EARLY after the last read.
            await asyncio.sleep(max(0.0, read_at + MARKETS_EARLY - time.monotonic()))

    async def _keep_history(self) -> None:
        """Every ``HISTORY_UPKEEP`` s (a quarter of ``history_max_age`` at most): trim each
        history stream of the union to ``history_max_age`` and push its key's expiry to that
        age plus one round. XADD's ``MAXLEN ~`` caps entries; this caps time, so a quiet
        code does not keep days of trades, and the history of a stream no lease wants any
        more expires once everything in it would be trimmed anyway (XTRIM and PEXPIRE are
        allowed at maxmemory: the upkeep frees memory there too). Advisory: an error is
        counted and the next round tries again."""
        max_age_ms = round(self.settings.history_max_age * 1000)
        every = min(HISTORY_UPKEEP, self.settings.history_max_age / 4)
        caps = self.publisher.history_caps
        while True:
            keys = [
                self.keys.history(key.type, key.code, key.level)
                for key in sorted(self.core.controller.routable)
                if history_cap(caps, key.type) > 0
            ]
            min_id = f"{max(now_ms() - max_age_ms, 0)}-0"
            expire_ms = max_age_ms + round(every * 1000) * 2
            try:
                for start in range(0, len(keys), HISTORY_UPKEEP_BATCH):
                    pipe = self.redis.pipeline(transaction=False)
                    for key in keys[start : start + HISTORY_UPKEEP_BATCH]:
                        pipe.execute_command("XTRIM", key, "MINID", "~", min_id)
                        pipe.pexpire(key, expire_ms)
                    async with asyncio.timeout(REDIS_TIMEOUT):
                        await pipe.execute(raise_on_error=False)
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                logger.debug("history upkeep failed (%s): retried in %.0fs", describe(exc), every)
            await asyncio.sleep(every)

    async def _run_backfill(self) -> None:
        """Run each back-fill job the core queues, once due (``broker.core.backfill``), and
        feed it the results: the follow-up events go out through the outbox. One job at a
        time; nothing a job meets ends the phase (``Backfiller.run`` only raises
        ``CancelledError``, and a bug in it costs that job, not the phase)."""
        core = self.core
        while True:
            job = core.take_backfill(now_ms())
            self._forward()  # a job with nothing to fetch was answered at once
            if job is None:
                self._wake_backfill.clear()
                await _wait_once_ms(self._wake_backfill, core.next_backfill_ms())
                continue
            try:
                results = await self.backfiller.run(job)
            except Exception as exc:  # CancelledError is no Exception: the phase ends
                logger.warning("back-fill job failed: %s", describe(exc))
                results = [StreamResult(fill.key, Outcome.FAILED) for fill in job.streams]
            core.backfill_done(job, results)
            self._forward()

    async def _next_epoch(self) -> int | None:
        """``INCR {ns}:epoch``: the epoch counts connections across leaders (None: no answer).
        Allowed at maxmemory (one integer key): a refused INCR would reuse an epoch, and two of
        them would make the epoch go back once Redis takes writes again."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return int(await self._incr_epoch(keys=[self.keys.epoch], args=[]))
        except (RedisError, OSError, TimeoutError):
            self.stats.redis_errors += 1
            return None

    # -- the core's timers, events, replies and status ------------------------------------------

    async def _run_clock(self) -> None:
        """Tick the core when a timer is due, and feed it the frames snapshots wait for and the
        publisher's closed losses (the publisher sets ``_wake_clock`` for both)."""
        core, publisher = self.core, self.publisher
        while True:
            self._wake_clock.clear()
            now = time.monotonic()
            frames = publisher.take_watched()
            if frames:
                core.published(frames, now)
            for loss in publisher.take_losses():  # once per loss, never per frame
                core.publish_lost(loss.since_ms, loss.until_ms, loss.frames)
            core.tick(now, now_ms())
            self._clock_at = core.next_wakeup(now)
            self._forward()
            timeout = None if self._clock_at is None else max(0.0, self._clock_at - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_clock.wait()

    async def _write_outbox(self) -> None:
        """Events and replies as the core produces them, one pipeline per batch: a thousand
        commands at once are answered in a few round trips on one connection."""
        while True:
            await self._wake_outbox.wait()
            self._wake_outbox.clear()
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        """Write what the core has produced so far (taken at once: two callers never write the
        same event twice)."""
        core = self.core
        events, replies = core.events_to_publish(), core.replies_to_send()
        for start in range(0, max(len(events), len(replies)), OUTBOX_BATCH):
            batch = events[start : start + OUTBOX_BATCH]
            ok = await self._write(batch, replies[start : start + OUTBOX_BATCH])
            core.events_sent(batch, ok=ok)

    async def _write(self, events: Sequence[OutEvent], replies: Sequence[OutReply]) -> bool:
        """PUBLISH the events, RPUSH (and PEXPIRE) the replies; False when Redis failed."""
        try:
            async with (
                asyncio.timeout(REDIS_TIMEOUT),
                self.redis.pipeline(transaction=False) as pipe,
            ):
                for event in events:
                    # (redis-py's cluster pipeline refuses pipe.publish(); the command itself
                    # is fine: a cluster forwards a PUBLISH to every node)
                    pipe.execute_command("PUBLISH", self.keys.events, event.data)
                for reply in replies:
                    key = self.keys.reply(reply.request_id)
                    pipe.rpush(key, reply.data)
                    pipe.pexpire(key, REPLY_TTL_MS)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning(
                "could not publish %d events and %d replies: %s", len(events), len(replies), exc
            )
            return False
        refused = [result for result in results if isinstance(result, Exception)]
        if refused:
            self.stats.redis_errors += 1
            logger.warning(
                "redis refused %d event and reply commands: %s", len(refused), refused[0]
            )
        return True

    async def _write_status(self) -> None:
        """The status every ``status_interval``. Each write first feeds the OOM watch
        (``broker.core.oom``: one WARNING when Redis starts refusing writes for memory, one
        when it takes them again) with the refusals counted so far and the ``INFO memory``
        read after the previous write; the status carries its figures."""
        core, counters = self.core, self.counters
        interval = self.settings.status_interval
        write = AllowOomScript(self.redis, STATUS_LUA, whole=True)
        memory = None  # read after each write, for the next one: the first write goes at once
        while True:
            refusals = counters.publish.oom_refusals + self.stats.oom_refusals
            line = counters.oom.observe(now_ms(), refusals, memory)
            if line is not None:
                logger.warning(line)
            fields = encode_status(core.status(time.monotonic(), now_ms()))
            # Kept after the leader dies: a successor reads when data stopped (gap event);
            # freshness is judged by updated_ms, not by the key's existence.
            args = [STATUS_TTL_MS, *itertools.chain.from_iterable(fields.items())]
            memory = None
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await write(keys=[self.keys.status], args=args)
                    memory = await read_memory(self.redis)
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                if is_oom(exc):  # a Redis without script flags (< 7) refuses it at maxmemory
                    self.stats.oom_refusals += 1
                logger.debug("status write failed: %s", exc)
            await asyncio.sleep(interval)


async def _wait_once_ms(wake: asyncio.Event, due_ms: int | None) -> None:
    """Wait until ``due_ms`` (wall clock ms; None: no time known), ``wake`` is set, or
    ``WALL_CLOCK_RECHECK`` passed, whichever comes first: the caller looks again (a wall clock
    set back must not hold it for as long as the clock jumped)."""
    wait = WALL_CLOCK_RECHECK if due_ms is None else (due_ms - now_ms()) / 1000
    if wait <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(min(wait, WALL_CLOCK_RECHECK)):
            await wake.wait()


async def _wait_until(wake: asyncio.Event, due: Callable[[], float]) -> None:
    """Return once ``due()`` (monotonic) has come; ``wake`` says it may have moved."""
    while True:
        wait = due() - time.monotonic()
        if wait <= 0:
            return
        wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await wake.wait()


__all__ = ["LeaderPhase"]
