"""The broker service: leadership, leases -> union -> upstream, commands, status and events.

Phases (uvicorn-style lifecycle): ``serve()`` loops between STANDBY (try the leader lock) and
LEADER. As leader it runs, in one TaskGroup: the lock renewal, the lease watcher (control
channel + reconcile at the earliest lease deadline + periodic sweep), the command handler
(snapshots, resubscribe), the upstream connection, the publisher and the status writer. Losing
the lock (or failing to renew it before the local deadline) ends the TaskGroup at once: the
publisher checks the lock's local deadline before every burst, so a deposed leader never
publishes.

Everything here is I/O glue: the decisions live in ``broker.control`` (what to send upstream),
``broker.leases`` (what a lease is) and ``broker.upbit`` (the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.control import ControllerStats, SubscriptionController
from broker.errors import BrokerError, ConfigError, NotLeaderError, UpbitErrorFrame
from broker.keys import Keys, parse_stream_name
from broker.leader import LeaderLock
from broker.lease_feedback import EXPIRED, INVALID, PARTIAL, LeaseChange, LeaseFeedback
from broker.leases import Lease, LeaseListing, LeaseReads, LeaseStore
from broker.publisher import Publisher, PublishStats, Target
from broker.redis_client import redis_client
from broker.settings import BrokerSettings, redact_url
from broker.upbit.codes import is_valid_code
from broker.upbit.types import EMPTY, StreamKey, SubscriptionSet, union
from broker.upstream import Upstream, UpstreamStats

logger = logging.getLogger(__name__)

#: how long the first PING may take before `run` gives up with one line
FIRST_CONTACT_TIMEOUT = 10.0
#: every Redis call of the service is bounded by this (the clients have no socket timeout)
REDIS_TIMEOUT = 5.0
#: most codes one snapshot request may name
MAX_SNAPSHOT_CODES = 100
#: a snapshot request never waits longer than this for upstream
MAX_SNAPSHOT_TIMEOUT = 30.0
#: commands handled per wake-up (the rest on the next)
COMMAND_BATCH = 100
#: the status hash outlives its leader by this much (then it is garbage)
STATUS_TTL_MS = 24 * 3600 * 1000
#: replies live this long in Redis if nobody picks them up
REPLY_TTL_MS = 60_000

_json = msgspec.json.Encoder()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class BrokerStats:
    leases: int = 0
    invalid_leases: int = 0
    #: leases served only in part (some entries of ``subs`` rejected), and those entries
    partial_leases: int = 0
    rejected_streams: int = 0
    lease_expiries: int = 0
    #: ``lease`` events published to holders (invalid, partial, expired, ok again)
    lease_events: int = 0
    #: full reads of every lease (periodic, at a deadline, or when a change cannot be pinned)
    lease_listings: int = 0
    #: single leases read because a control message named them (heartbeats, changes)
    lease_reads: int = 0
    union_recomputes: int = 0
    commands: int = 0
    bad_commands: int = 0
    snapshots_from_cache: int = 0
    snapshots_from_upstream: int = 0
    snapshot_codes_missing: int = 0
    resubscribes_forced: int = 0
    leadership_changes: int = 0
    redis_errors: int = 0
    quiet_refreshes: int = 0


@dataclass(slots=True)
class _SnapshotWaiter:
    request_id: str
    requested: frozenset[StreamKey]
    frames: dict[str, bytes]
    sources: dict[str, str]
    waiting: set[StreamKey]
    deadline: float


def _merge_reads(
    cache: dict[str, Lease],
    invalid: dict[str, str],
    reads: LeaseReads,
    expired: set[str] | None = None,
) -> bool:
    """Fold :meth:`LeaseStore.read_many` results into the cached leases (and the invalid and
    expired ones); True when the union may have changed (a lease came, went, or asks for other
    streams: a renewal of the same ``subs`` text gives the very same set object, see
    ``parse_lease``'s memo)."""
    expired = set() if expired is None else expired
    changed = False
    for client_id in reads.gone:
        invalid.pop(client_id, None)
        expired.discard(client_id)
        changed |= cache.pop(client_id, None) is not None
    for client_id in reads.expired:
        invalid.pop(client_id, None)
        expired.add(client_id)
        changed |= cache.pop(client_id, None) is not None
    for client_id, reason in reads.invalid:
        invalid[client_id] = reason
        expired.discard(client_id)
        changed |= cache.pop(client_id, None) is not None
    for lease in reads.leases:
        invalid.pop(lease.client_id, None)
        expired.discard(lease.client_id)
        old = cache.get(lease.client_id)
        cache[lease.client_id] = lease
        changed |= old is None or old.subscriptions is not lease.subscriptions
    return changed


class Broker:
    """One broker process. ``await serve(stop)`` runs until ``stop`` is set."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.stats = BrokerStats()
        self.is_leader = False
        self.epoch = 0
        self.desired: SubscriptionSet = EMPTY
        self.ready = asyncio.Event()  # set once connected upstream as leader (tests, demo)
        self._redis: aioredis.Redis | None = None
        self._pub_redis: aioredis.Redis | None = None
        self._lock: LeaderLock | None = None
        self._leases_dirty = asyncio.Event()
        #: client ids named on the control channel since the last read (see _reconcile_leases)
        self._leases_touched: set[str] = set()
        #: the next reconcile must read every lease (a message could not be pinned, or missed)
        self._leases_full = True
        self._renew_now = asyncio.Event()
        self._controller_stats = ControllerStats()
        self._publish_stats = PublishStats()
        self._published_by_type: dict[str, int] = {}
        self._upstream_stats = UpstreamStats()
        self._errors_at_renewal = 0
        self._requests_dirty = asyncio.Event()
        self._grace_until = 0.0
        self._grace_set: SubscriptionSet = EMPTY
        #: the union of the valid leases alone (before any grace), kept between reconciles
        self._leases_union: SubscriptionSet | None = None
        self._waiters: list[_SnapshotWaiter] = []
        self._confirm_waiting: set[str] = set()
        self._last_frame_ms = 0
        self._disconnected_at_ms = 0
        self._gap_reason = ""
        self._takeover_since_ms = 0
        self._last_quiet_refresh = 0.0
        #: when each wanted stream was first asked for on this connection (quiet detection)
        self._wanted_since: dict[StreamKey, float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.controller: SubscriptionController | None = None
        self.upstream: Upstream | None = None
        self.publisher: Publisher | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """STANDBY <-> LEADER until ``stop`` is set."""
        s = self.settings
        # Retries ride out a Redis restart; every loop still handles the errors that remain.
        # Every call is bounded by an asyncio.timeout (broker.redis_client says why).
        name = f"broker:{s.broker_id}"
        self._redis = redis_client(
            s.redis_url, name=name, retries=3, health_check_interval=5, connect_timeout=None
        )
        # Publishing gets its own connection pool so pipelines never queue behind commands.
        self._pub_redis = redis_client(s.redis_url, name=f"{name}:pub", connect_timeout=None)
        self._lock = LeaderLock(self._redis, s.namespace, s.broker_id, int(s.leader_ttl * 1000))
        try:
            await self._first_contact()
            logger.info(
                "broker %s starting: redis=%s upstream=%s namespace=%s",
                s.broker_id,
                redact_url(s.redis_url),
                s.upstream_url,
                s.namespace,
            )
            stopper = asyncio.create_task(stop.wait())
            while not stop.is_set():
                acquired = await self._standby(stopper)
                if not acquired:
                    break
                lead = asyncio.create_task(self._lead())
                done, _ = await asyncio.wait({lead, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if lead not in done:
                    lead.cancel()
                try:
                    await lead
                except asyncio.CancelledError:
                    if not stop.is_set():
                        raise
                except Exception as exc:  # the leader phase ended: step down, then stand by
                    expected = _only(exc, (NotLeaderError, RedisError, OSError))
                    logger.warning("leader phase ended: %s", exc, exc_info=not expected)
                    if not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(1.0):
                                await asyncio.shield(stopper)
                await self._step_down()
            stopper.cancel()
        finally:
            await self._shutdown()

    async def _first_contact(self) -> None:
        """PING Redis once before anything else: a wrong URL, password or TLS option is a
        setup error to report in one line, not an outage to retry forever."""
        assert self._redis is not None
        url = redact_url(self.settings.redis_url)
        try:
            async with asyncio.timeout(FIRST_CONTACT_TIMEOUT):
                await self._redis.ping()
        except TimeoutError:
            raise ConfigError(
                f"redis at {url} did not answer within {FIRST_CONTACT_TIMEOUT:.0f}s"
            ) from None
        except (RedisError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot use redis at {url}: {redact_url(str(exc))}") from None

    async def _standby(self, stopper: asyncio.Task[Any]) -> bool:
        """Wait for the leader lock; False when asked to stop first."""
        assert self._lock is not None
        announced = False
        while not stopper.done():
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    if await self._lock.try_acquire():
                        return True
                    if not announced:
                        holder = await self._lock.holder()
                        logger.info("standby: leader is %s; waiting for the lock", holder)
                        announced = True
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                logger.warning("standby: redis unavailable (%s)", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.settings.leader_ttl / 3)):
                    await asyncio.shield(stopper)
        return False

    async def _step_down(self) -> None:
        """Leave the leader phase; hand the lock over at once so a standby need not wait for
        it to expire (release is compare-and-delete: harmless if someone else holds it)."""
        if self.is_leader:
            logger.info(
                "broker %s stepped down", self.settings.broker_id, extra={"event": "step_down"}
            )
        self.is_leader = False
        self.ready.clear()
        await self._release_lock()

    async def _release_lock(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self._lock.release()

    async def _shutdown(self) -> None:
        await self._release_lock()
        self.is_leader = False
        for client in (self._redis, self._pub_redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # -- leader phase ---------------------------------------------------------------------------

    async def _lead(self) -> None:
        s = self.settings
        assert self._redis is not None and self._pub_redis is not None and self._lock is not None
        self.is_leader = True
        self.stats.leadership_changes += 1
        logger.info(
            "broker %s is leader of namespace %s",
            s.broker_id,
            s.namespace,
            extra={"event": "leader", "broker": s.broker_id},
        )
        await self._read_previous_leader()
        await self._event({"event": "leader", "broker": s.broker_id, "ts_ms": now_ms()})
        self.controller = SubscriptionController(
            fmt=s.upstream_format,
            per_second=s.rate_per_second,
            per_minute=s.rate_per_minute,
            coalesce_delay=s.coalesce_delay,
            verify=s.verify_subscriptions,
            ticket_prefix=s.broker_id,
        )
        self.publisher = Publisher(
            self._pub_redis,
            last_value_cache=s.last_value_cache,
            max_pending=s.max_pending_frames,
            on_published=self._on_published,
        )
        self.upstream = Upstream(
            s,
            self.controller,
            self.publisher,
            self.keys,
            on_connected=self._on_upstream_connected,
            on_disconnected=self._on_upstream_disconnected,
            on_confirmations=self._on_confirmations,
            on_error_frame=self._on_error_frame,
        )
        # Counters outlive a leader phase, so metrics and status never go backwards.
        self.controller.stats = self._controller_stats
        self.publisher.stats = self._publish_stats
        self.publisher.published_by_type = self._published_by_type
        self.upstream.stats = self._upstream_stats
        self.desired = EMPTY
        self._leases_dirty.set()
        self._requests_dirty.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._hold_lock(), name="leader-lock")
            tg.create_task(self._watch_control(), name="control-channel")
            tg.create_task(self._reconcile_leases(), name="leases")
            tg.create_task(self._handle_commands(), name="commands")
            tg.create_task(self.publisher.run(self._may_publish), name="publisher")
            tg.create_task(self.upstream.run(), name="upstream")
            tg.create_task(self._write_status(), name="status")

    def _may_publish(self) -> bool:
        """Checked before every burst: the lock is valid locally, and Redis has not failed us
        since the last renewal. A failed publish may mean Redis restarted empty and lost the
        lock, so a standby may already lead: publish nothing until a renewal proves otherwise.
        """
        assert self._lock is not None and self.publisher is not None
        if not self._lock.is_valid():
            return False
        if self.publisher.stats.redis_errors != self._errors_at_renewal:
            self._renew_now.set()
            return False
        return True

    async def _hold_lock(self) -> None:
        """Renew every third of the TTL (at once after a Redis error); a lock that vanished
        (Redis restarted empty) is re-acquired if nobody else took it."""
        assert self._lock is not None and self.publisher is not None
        lock = self._lock
        publisher = self.publisher
        interval = self.settings.leader_ttl / 3
        self._errors_at_renewal = publisher.stats.redis_errors
        unconfirmed_since: float | None = None
        while True:
            wait = interval if unconfirmed_since is None else interval / 4
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._renew_now.wait()
            self._renew_now.clear()
            errors_before = publisher.stats.redis_errors
            try:
                async with asyncio.timeout(interval):
                    if await lock.renew():
                        self._errors_at_renewal = errors_before
                        unconfirmed_since = None
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

    async def _read_previous_leader(self) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                prev: dict[Any, Any] = await self._redis.hgetall(self.keys.status)
        except (RedisError, OSError, TimeoutError):
            return
        leader = _text(prev.get(b"leader", b""))
        last = int(prev.get(b"last_frame_ms", b"0") or 0)
        if leader and leader != self.settings.broker_id and last:
            self._takeover_since_ms = last

    # -- events from the upstream adapter -------------------------------------------------------

    async def _on_upstream_connected(self, fresh: bool = False) -> None:
        """A new upstream connection: a new epoch, a gap event if data may be missing, and a
        ``connected`` event. ``fresh``: the make-before-break switch opened because the set
        shrank to nothing; nothing was subscribed, so nothing was lost: same epoch, no event."""
        assert self._redis is not None
        if fresh:
            self._wanted_since = dict.fromkeys(self.desired, time.monotonic())
            logger.info(
                "fresh upstream connection (the set shrank to nothing): epoch stays %d",
                self.epoch,
                extra={"event": "fresh_connection", "epoch": self.epoch},
            )
            self.ready.set()
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                self.epoch = int(await self._redis.incr(self.keys.epoch))
        except (RedisError, OSError, TimeoutError):
            self.epoch += 1
        ts = now_ms()
        since = self._takeover_since_ms or (self._last_frame_ms if self._gap_reason else 0)
        if since:
            reason = "takeover" if self._takeover_since_ms else self._gap_reason
            await self._event(
                {
                    "event": "gap",
                    "epoch": self.epoch,
                    "since_ms": since,
                    "until_ms": ts,
                    "reason": reason,
                    "broker": self.settings.broker_id,
                }
            )
            logger.info(
                "gap event: epoch=%d reason=%s span_ms=%d",
                self.epoch,
                reason,
                ts - since,
                extra={
                    "event": "gap",
                    "epoch": self.epoch,
                    "reason": reason,
                    "span_ms": ts - since,
                },
            )
        self._takeover_since_ms = 0
        self._gap_reason = ""
        now = time.monotonic()
        self._wanted_since = dict.fromkeys(self.desired, now)
        await self._event(
            {
                "event": "connected",
                "epoch": self.epoch,
                "broker": self.settings.broker_id,
                "ts_ms": ts,
            }
        )
        logger.info(
            "upstream connected: epoch=%d url=%s",
            self.epoch,
            redact_url(self.settings.upstream_url),
            extra={"event": "connected", "epoch": self.epoch},
        )
        self.ready.set()

    def _on_upstream_disconnected(self, reason: str) -> None:
        self.ready.clear()
        if not reason:
            return
        self._disconnected_at_ms = now_ms()
        if self.publisher is not None and self.publisher.last_publish_ms:
            self._last_frame_ms = self.publisher.last_publish_ms
        else:
            self._last_frame_ms = self._disconnected_at_ms
        if "no frame" in reason:
            self._gap_reason = "stall"
        elif reason.startswith("upbit error"):
            self._gap_reason = "error"  # Upbit refused us (error frame) and closed the socket
        else:
            self._gap_reason = "reconnect"

    def _on_error_frame(self, error: UpbitErrorFrame) -> None:
        logger.error("upstream refused: %s", error)

    def _on_confirmations(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            upstream = self.controller.upstream.by_type() if self.controller else {}
            self._spawn(
                self._reply(rid, {"id": rid, "ok": True, "epoch": self.epoch, "upstream": upstream})
            )

    def _on_published(self, batch: list[tuple[Target, bytes]]) -> None:
        if not self._waiters:
            return
        for target, frame in batch:
            for waiter in self._waiters:
                if target.key in waiter.waiting:
                    waiter.waiting.discard(target.key)
                    waiter.frames[target.key.code] = frame
                    waiter.sources[target.key.code] = "upstream"
        self._finish_waiters(force=False)

    # -- leases ---------------------------------------------------------------------------------

    async def _watch_control(self) -> None:
        """Our own pub/sub loop on the control channel: a reconnect is noticed, never silent."""
        assert self._redis is not None
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.control)
                self._leases_full = True  # messages may have been missed while unsubscribed
                self._leases_dirty.set()
                self._requests_dirty.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    data = message.get("data", b"")
                    if not isinstance(data, bytes):
                        data = b""
                    if data.startswith(b"request"):
                        self._requests_dirty.set()
                        continue
                    # "lease <id>" / "release <id>": only that lease needs reading.
                    kind, _, client_id = data.partition(b" ")
                    if kind in (b"lease", b"release") and client_id:
                        self._leases_touched.add(client_id.decode(errors="replace"))
                    else:
                        self._leases_full = True
                    self._leases_dirty.set()
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                # Redis may have restarted empty: keep the current union for one lease TTL so
                # consumers can re-assert their leases before anything is unsubscribed.
                self._hold_union(f"control channel lost ({exc})")
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _reconcile_leases(self) -> None:
        """Recompute the union on every lease change, at the earliest deadline, and periodically.

        A control message names its lease ("lease <id>", "release <id>"), so a change, or a
        heartbeat, costs a read of that lease, not of all of them: with 1,000 consumers
        renewing every few seconds, re-reading every lease on every renewal kept half a core
        busy. Every lease is read (and expired ones swept) every ``reconcile_interval``, just
        after the earliest deadline, and whenever a message could not be pinned to a lease.
        """
        assert self._redis is not None
        store = LeaseStore(self._redis, self.settings.namespace)
        interval = self.settings.reconcile_interval
        sweeps = 0
        noticed_at: float | None = None  # when the lease change being read was first heard of
        cache: dict[str, Lease] = {}  # the valid leases, as of the last reads
        invalid: dict[str, str] = {}  # client id -> why its lease was skipped
        expired: set[str] = set()  # client ids whose lease expired (since the last listing)
        feedback = LeaseFeedback()  # what each holder was told about its lease
        max_streams = self.settings.max_lease_streams
        full_at = 0.0  # monotonic time the next full listing is due
        self._leases_touched = set()
        self._leases_full = True
        while True:
            # Cleared before reading, so a change that lands during the reads reads again.
            self._leases_dirty.clear()
            touched, self._leases_touched = self._leases_touched, set()
            now = time.monotonic()
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    emptied = await self._notice_emptied_redis()
                    if self._leases_full or emptied or now >= full_at or not touched:
                        self._leases_full = False
                        listing = await store.list(scan=sweeps % 5 == 0, max_streams=max_streams)
                        sweeps += 1
                        self.stats.lease_listings += 1
                        cache = {lease.client_id: lease for lease in listing.leases}
                        invalid = dict(listing.invalid)
                        expired = set(listing.expired)
                        changed = True
                        full_at = now + interval
                    else:
                        reads = await store.read_many(touched, max_streams=max_streams)
                        self.stats.lease_reads += len(touched) - len(reads.ignored)
                        if reads.ignored:
                            full_at = now  # a message we cannot pin: read them all, now
                        changed = _merge_reads(cache, invalid, reads, expired)
                        listing = LeaseListing(
                            leases=list(cache.values()),
                            invalid=sorted(invalid.items()),
                            expired=sorted(expired),
                            server_now_ms=reads.server_now_ms,
                        )
                # Redis lost its data (or may have): leases vanish until their holders
                # re-assert them within a heartbeat; that is no expiry to announce.
                quiet = emptied or self._in_grace()
                changes = feedback.update(listing, named=touched, quiet=quiet)
                self._apply_listing(listing, noticed_at, leases_changed=changed)
                if changes and not await self._announce_lease_changes(changes):
                    feedback.reset()  # announce again after the next read
                if cache:
                    # A full listing just after the earliest lease would expire (server clock).
                    earliest = min(lease.deadline_ms for lease in cache.values())
                    until = (earliest - listing.server_now_ms) / 1000 + 0.02
                    # Already due but still there: Redis expires keys a little late; retry
                    # at a calm pace rather than every 10 ms.
                    full_at = min(full_at, now + (max(0.01, until) if until > 0 else 0.1))
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                self._leases_full = True  # read everything once Redis answers again
                full_at = time.monotonic() + interval
                self._leases_touched |= touched
                logger.warning("lease reconcile failed: %s", exc)
            noticed_at = None
            wait = max(0.01, full_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._leases_dirty.wait()
                    noticed_at = time.monotonic()
                    # A burst of lease writes is read once: listing 1,000 leases costs ~0.1 s.
                    # This wait is the coalescing window (the controller does not add another).
                    await asyncio.sleep(self.settings.coalesce_delay)

    async def _notice_emptied_redis(self) -> bool:
        """A Redis that restarted empty has lost every lease until consumers re-assert them
        (within one heartbeat): hold the current union for one lease TTL instead of
        unsubscribing everyone. The epoch counter is the witness: it only vanishes with the data.
        True when that just happened (the caller re-reads every lease).
        """
        assert self._redis is not None
        if self.epoch == 0 or await self._redis.get(self.keys.epoch) is not None:
            return False
        await self._redis.set(self.keys.epoch, self.epoch, nx=True)
        self._hold_union("redis lost its data")
        return True

    def _hold_union(self, why: str) -> None:
        self._grace_until = time.monotonic() + self.settings.lease_ttl
        self._grace_set = union(self._grace_set, self.desired) if self._in_grace() else self.desired
        logger.warning(
            "%s: holding the union (%d streams) for %.0fs",
            why,
            len(self.desired),
            self.settings.lease_ttl,
        )

    def _in_grace(self) -> bool:
        return time.monotonic() < self._grace_until

    def _apply_listing(
        self, listing: LeaseListing, noticed_at: float | None = None, leases_changed: bool = True
    ) -> None:
        assert self.controller is not None and self.upstream is not None
        if leases_changed or self._leases_union is None:
            self._leases_union = union(*(lease.subscriptions for lease in listing.leases))
        wanted = self._leases_union
        if self._in_grace():
            wanted = union(wanted, self._grace_set)
        self.stats.invalid_leases = len(listing.invalid)
        self.stats.partial_leases = sum(1 for lease in listing.leases if lease.rejected)
        self.stats.rejected_streams = sum(len(lease.rejected) for lease in listing.leases)
        self.stats.leases = len(listing.leases)
        if wanted != self.desired:
            self.stats.union_recomputes += 1
            logger.info(
                "union changed: %d streams from %d leases",
                len(wanted),
                len(listing.leases),
                extra={"event": "union", "streams": len(wanted), "leases": len(listing.leases)},
            )
            self.desired = wanted
            now = time.monotonic()
            self._wanted_since = {k: self._wanted_since.get(k, now) for k in wanted}
            self.controller.set_desired(wanted, now, noticed_at)
            self.upstream.changed.set()

    async def _announce_lease_changes(self, changes: list[LeaseChange]) -> bool:
        """Log each change of a lease's state and tell its holder with a ``lease`` event
        (broker.lease_feedback); False when the events could not be published."""
        expired = [c.client_id for c in changes if c.state == EXPIRED]
        for change in changes:
            if change.state == INVALID:
                logger.warning("skipped invalid lease %s: %s", change.client_id, change.why)
            elif change.state == PARTIAL:
                logger.warning("lease %s served in part: %s", change.client_id, change.why)
            elif change.state != EXPIRED:
                logger.info("lease %s is fully served again", change.client_id)
        if expired:
            self.stats.lease_expiries += len(expired)
            logger.info(
                "leases expired: %s",
                ", ".join(expired),
                extra={"event": "lease_expired", "client_ids": expired},
            )
        assert self._redis is not None
        ts = now_ms()
        broker = self.settings.broker_id
        events = [_json.encode(c.event(broker, ts)) for c in changes if c.has_holder]
        if not events:
            return True
        try:
            async with (
                asyncio.timeout(REDIS_TIMEOUT),
                self._redis.pipeline(transaction=False) as pipe,
            ):
                for event in events:
                    pipe.publish(self.keys.events, event)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("could not publish %d lease events: %s", len(events), exc)
            return False
        self.stats.lease_events += len(events)
        return True

    # -- commands (snapshot, resubscribe) -------------------------------------------------------

    async def _handle_commands(self) -> None:
        assert self._redis is not None
        while True:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    raw: Any = await self._redis.lpop(self.keys.requests, COMMAND_BATCH)
                for item in raw or []:
                    async with asyncio.timeout(REDIS_TIMEOUT):
                        await self._command(item if isinstance(item, bytes) else str(item).encode())
                if raw and len(raw) == COMMAND_BATCH:
                    continue
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                logger.warning("command queue unavailable: %s", exc)
            self._finish_waiters(force=False)
            wait = 1.0
            if self._waiters:
                wait = max(0.0, min(w.deadline for w in self._waiters) - time.monotonic())
            self._requests_dirty.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, 1.0)):
                    await self._requests_dirty.wait()

    async def _command(self, raw: bytes) -> None:
        self.stats.commands += 1
        try:
            cmd = msgspec.json.decode(raw)
            if not isinstance(cmd, dict):
                raise ValueError("not an object")
            rid = str(cmd.get("id", ""))
            self.keys.reply(rid)  # an id that cannot name a reply key gets no answer
        except (msgspec.DecodeError, ValueError, RecursionError, BrokerError) as exc:
            # RecursionError: msgspec refuses absurdly nested JSON that way.
            self.stats.bad_commands += 1
            logger.warning("dropped unreadable command %r: %s", raw[:100], exc)
            return
        op = cmd.get("op")
        if op == "snapshot":
            await self._snapshot(rid, cmd)
        elif op == "resubscribe":
            self.stats.resubscribes_forced += 1
            assert self.controller is not None and self.upstream is not None
            logger.info("resubscribe requested (%s)", rid)
            self.controller.force_resubscribe(rid, time.monotonic())
            self.upstream.changed.set()
        else:
            self.stats.bad_commands += 1
            await self._reply(rid, {"id": rid, "ok": False, "error": f"unknown op {op!r}"})

    async def _snapshot(self, rid: str, cmd: dict[str, Any]) -> None:
        assert self._redis is not None and self.controller is not None
        try:
            stream = str(cmd.get("type", ""))
            type_, level = parse_stream_name(stream)
            level = float(cmd.get("level") or level)
            if not math.isfinite(level) or level < 0 or (level and type_ != "orderbook"):
                raise ValueError(f"invalid level {cmd.get('level')!r} for {stream!r}")
            codes = cmd.get("codes")
            if not isinstance(codes, list) or not codes:
                raise ValueError("codes must be a non-empty list")
            if len(codes) > MAX_SNAPSHOT_CODES:
                raise ValueError(f"at most {MAX_SNAPSHOT_CODES} codes per snapshot request")
            bad = [c for c in codes if not is_valid_code(c)]
            if bad:
                raise ValueError(f"invalid codes: {bad[:5]}")
            timeout = min(float(cmd.get("timeout_ms", 3000)) / 1000, MAX_SNAPSHOT_TIMEOUT)
        except Exception as exc:  # any malformed field is a refusal, never a crash
            self.stats.bad_commands += 1
            await self._reply(rid, {"id": rid, "ok": False, "error": str(exc)})
            return
        codes = sorted(set(codes))
        keys = {StreamKey(type_, c, level) for c in codes}
        frames: dict[str, bytes] = {}
        sources: dict[str, str] = {}
        # The cache is trusted only for streams flowing now: others may hold hours-old values.
        flowing = [k for k in keys if k in self.controller.upstream]
        if flowing and self.settings.last_value_cache:
            values: list[Any] = await self._redis.hmget(
                self.keys.last_values(type_, level), [k.code for k in flowing]
            )
            for key, value in zip(flowing, values, strict=True):
                if isinstance(value, bytes):
                    frames[key.code] = value
                    sources[key.code] = "cache"
        self.stats.snapshots_from_cache += len(frames)
        missing = {k for k in keys if k.code not in frames}
        waiter = _SnapshotWaiter(
            rid, frozenset(keys), frames, sources, missing, time.monotonic() + timeout
        )
        if missing:
            self.stats.snapshots_from_upstream += 1
            self.controller.request_snapshot(
                SubscriptionSet({k: 30 for k in missing}), time.monotonic()
            )
            assert self.upstream is not None
            self.upstream.changed.set()
        self._waiters.append(waiter)
        self._finish_waiters(force=False)

    def _finish_waiters(self, *, force: bool) -> None:
        now = time.monotonic()
        keep: list[_SnapshotWaiter] = []
        done_keys: set[StreamKey] = set()
        for w in self._waiters:
            if w.waiting and not force and now < w.deadline:
                keep.append(w)
                continue
            missing = sorted(k.code for k in w.waiting)
            self.stats.snapshot_codes_missing += len(missing)
            done_keys |= {k for k in w.requested if k.code in w.frames}
            reply = {
                "id": w.request_id,
                "ok": True,
                "frames": {code: msgspec.Raw(frame) for code, frame in w.frames.items()},
                "missing": missing,
                "source": w.sources,
            }
            self._spawn(self._reply(w.request_id, reply))
        self._waiters = keep
        if done_keys and self.controller is not None:
            self.controller.snapshot_streams_done(done_keys)

    async def _reply(self, request_id: str, body: dict[str, Any]) -> None:
        assert self._redis is not None
        key = self.keys.reply(request_id)
        try:
            async with (
                asyncio.timeout(REDIS_TIMEOUT),
                self._redis.pipeline(transaction=True) as pipe,
            ):
                pipe.rpush(key, _json.encode(body))
                pipe.pexpire(key, REPLY_TTL_MS)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("could not reply to %s: %s", request_id, exc)

    # -- status and events ----------------------------------------------------------------------

    async def _event(self, event: dict[str, Any]) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._redis.publish(self.keys.events, _json.encode(event))
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            logger.warning("could not publish event %s: %s", event.get("event"), exc)

    def status_fields(self) -> dict[str, str]:
        """The status hash as written to Redis (also used by metrics)."""
        c, u, p = self.controller, self.upstream, self.publisher
        up = u.stats if u else None
        return {
            "leader": self.settings.broker_id if self.is_leader else "",
            "connected": "1" if (u is not None and u.connected) else "0",
            "epoch": str(self.epoch),
            "reconnects": str(up.reconnects if up else 0),
            "resubscribes": str(c.stats.subscribe_requests if c else 0),
            "list_requests": str(c.stats.list_requests if c else 0),
            "verify_mismatches": str(c.stats.verify_mismatches if c else 0),
            "deferred_sends": str(c.stats.deferred if c else 0),
            "desired": _json.encode(self.desired.by_type()).decode(),
            "upstream": _json.encode(c.upstream.by_type() if c else {}).decode(),
            "last_error": u.last_error if u else "",
            "frames_in": str(up.frames_in if up else 0),
            "frames_published": str(p.stats.published if p else 0),
            "frames_dropped": str(
                (up.dropped_unleased if up else 0)
                + (p.stats.dropped_overflow + p.stats.dropped_redis if p else 0)
            ),
            "frames_malformed": str(up.malformed if up else 0),
            "leases": str(self.stats.leases),
            "invalid_leases": str(self.stats.invalid_leases),
            "partial_leases": str(self.stats.partial_leases),
            "rejected_streams": str(self.stats.rejected_streams),
            "last_frame_ms": str(p.last_publish_ms if p else 0),
            "updated_ms": str(now_ms()),
            "upstream_url": redact_url(self.settings.upstream_url),
            "quiet_codes": _json.encode(self.quiet_codes()).decode(),
            "redis_errors": str(self.stats.redis_errors + (p.stats.redis_errors if p else 0)),
        }

    def quiet_codes(self) -> list[str]:
        """Streams upstream holds that published nothing for ``quiet_after`` seconds."""
        if self.controller is None or self.publisher is None or self.upstream is None:
            return []
        if not self.upstream.connected:
            return []
        return sorted(f"{k.type}:{k.code}" for k in self._quiet_streams())

    def _quiet_streams(self) -> list[StreamKey]:
        assert self.controller is not None and self.publisher is not None
        now = time.monotonic()
        horizon = now - self.settings.quiet_after
        seen = self.publisher.last_seen
        since = self._wanted_since
        return [
            k
            for k in self.controller.upstream
            if max(seen.get(k, 0.0), since.get(k, now)) < horizon
        ]

    async def _write_status(self) -> None:
        assert self._redis is not None
        interval = self.settings.status_interval
        while True:
            try:
                async with (
                    asyncio.timeout(REDIS_TIMEOUT),
                    self._redis.pipeline(transaction=True) as pipe,
                ):
                    pipe.hset(self.keys.status, mapping=self.status_fields())  # type: ignore[arg-type]
                    # Kept after the leader dies: a successor reads when data stopped (gap event);
                    # freshness is judged by updated_ms, not by the key's existence.
                    pipe.pexpire(self.keys.status, STATUS_TTL_MS)
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                self.stats.redis_errors += 1
                logger.debug("status write failed: %s", exc)
            self._refresh_quiet_streams()
            await asyncio.sleep(interval)

    def _refresh_quiet_streams(self) -> None:
        """A stream silent for ``quiet_after`` while others flow gets one fresh SNAPSHOT request
        (a full-set resend with that stream not marked realtime-only): a muted or stuck code
        recovers without touching the connection. At most once per ``quiet_after``."""
        if self.controller is None or self.upstream is None or self.publisher is None:
            return
        now = time.monotonic()
        if now - self._last_quiet_refresh < self.settings.quiet_after:
            return
        if not self.upstream.connected:
            return
        quiet = self._quiet_streams()
        if not quiet or len(quiet) == len(self.controller.upstream):
            return  # nothing quiet, or everything quiet: that is the stall detector's business
        self._last_quiet_refresh = now
        depths = self.controller.upstream.depths
        streams = SubscriptionSet({k: depths[k] for k in quiet})
        self.stats.quiet_refreshes += 1
        logger.info(
            "quiet streams, asking for fresh snapshots: %s",
            ", ".join(f"{k.type}:{k.code}" for k in quiet[:10]),
        )
        self.controller.request_snapshot(streams, now)
        self.upstream.changed.set()

    # -- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _only(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``exc`` (or every leaf of an exception group) is one of ``kinds``."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


@asynccontextmanager
async def run_broker(settings: BrokerSettings) -> AsyncIterator[Broker]:
    """Start a broker in this event loop; stop it (releasing the lock) on exit."""
    broker = Broker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(broker.serve(stop), name=f"broker-{settings.broker_id}")
    try:
        yield broker
    finally:
        stop.set()
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning("broker did not stop within 10 s: cancelling it")
            task.cancel()
            # Wait a bounded time; never swallow a cancellation meant for our caller.
            await asyncio.wait({task}, timeout=5)


__all__ = ["Broker", "BrokerStats", "run_broker"]
