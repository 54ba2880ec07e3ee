"""The broker service: a phase runner (I/O).

``serve()`` moves between two phases (uvicorn-style: first contact, serve, stop):

STANDBY  try the leader lock every second (every third of its TTL when that is shorter).
LEADER   a new :class:`~broker.core.leader.LeaderCore` (the rules) and the small I/O tasks
         around it (:class:`broker.leader_phase.LeaderPhase`), until the lock is lost or the
         broker stops; then the lock is released at once, so a standby need not wait for it
         to expire.

The counters (:class:`broker.core.stats.Counters`) belong to the broker, not to a phase, so
status and metrics never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.clock import now_ms
from broker.contract import Status, encode_status
from broker.core.control import SubscriptionController
from broker.core.leader import LeaderCore
from broker.core.stats import BrokerStats, Counters
from broker.errors import ConfigError, NotLeaderError
from broker.keys import keys_for
from broker.leader import LeaderLock
from broker.leader_phase import REDIS_TIMEOUT, LeaderPhase
from broker.publisher import Publisher
from broker.redis_client import redis_client
from broker.redis_url import is_sentinel_url
from broker.settings import BrokerSettings, redact_url
from broker.upbit.types import SubscriptionSet
from broker.upstream import Upstream

logger = logging.getLogger(__name__)

#: how long the first PING may take before `run` gives up with one line
FIRST_CONTACT_TIMEOUT = 10.0


class Broker:
    """One broker process. ``await serve(stop)`` runs until ``stop`` is set.

    Read by the metrics, the demo and the tests: ``counters`` (``stats`` is its broker part),
    ``core`` (the rules of the current leader phase; an idle one before the first), and
    ``controller``, ``epoch``, ``desired`` from it; ``upstream`` and ``publisher`` (those of
    the last leader phase, None before the first); ``is_leader``; ``ready`` (set while
    connected upstream as leader).
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.keys = keys_for(settings.namespace, settings.redis_url)
        self.counters = Counters()
        self.stats: BrokerStats = self.counters.broker
        self.core = LeaderCore(settings, self.counters, logger=logger)
        self.is_leader = False
        self.ready = asyncio.Event()
        self.upstream: Upstream | None = None
        self.publisher: Publisher | None = None
        self._redis: aioredis.Redis | None = None
        self._pub_redis: aioredis.Redis | None = None
        self._lock: LeaderLock | None = None

    @property
    def controller(self) -> SubscriptionController:
        return self.core.controller

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def desired(self) -> SubscriptionSet:
        return self.core.desired

    def status(self) -> Status:
        """The status as the leader writes it (typed: metrics and the demo read it)."""
        return self.core.status(time.monotonic(), now_ms())

    def status_fields(self) -> dict[str, str]:
        """The status hash exactly as the leader writes it to ``{ns}:status``."""
        return encode_status(self.status())

    def quiet_codes(self) -> list[str]:
        """Streams upstream holds that published nothing for ``quiet_after`` seconds."""
        return self.core.quiet_codes(time.monotonic())

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
        started = counted = False
        try:
            if not await self._first_contact(stop):
                return  # stopped while waiting for the sentinels to name a master
            started = True
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
                if stop.is_set():  # the phase is over: its counts are final
                    self._log_final_counts()
                    counted = True
                await self._step_down()
            stopper.cancel()
        finally:
            await self._shutdown()
            if started and not counted:
                self._log_final_counts()

    async def _first_contact(self, stop: asyncio.Event) -> bool:
        """PING Redis once before anything else: a wrong URL, password or TLS option is a
        setup error to report in one line, not an outage to retry forever.

        Through Sentinel, no master to reach is not a setup error: a failover in progress
        (the sentinels name no master, or one that just died) lasts seconds, so it is logged
        and retried until a master answers or ``stop`` is set. A sentinel or master that
        refuses our credentials, or a bad option, is still a setup error.

        Returns:
            False when ``stop`` was set before a master answered.
        """
        assert self._redis is not None
        url = redact_url(self.settings.redis_url)
        sentinel = is_sentinel_url(self.settings.redis_url)
        delay, attempts = 0.1, 0
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(FIRST_CONTACT_TIMEOUT):
                    await self._redis.ping()
                if attempts > 1:
                    logger.info("redis at %s answers (after %d attempts)", url, attempts)
                return True
            except TimeoutError:
                if not sentinel:
                    raise ConfigError(
                        f"redis at {url} did not answer within {FIRST_CONTACT_TIMEOUT:.0f}s"
                    ) from None
                why = f"no answer within {FIRST_CONTACT_TIMEOUT:.0f}s"
            except AuthenticationError as exc:
                raise ConfigError(f"cannot use redis at {url}: {redact_url(str(exc))}") from None
            except RedisConnectionError as exc:  # MasterNotFoundError is one
                if not sentinel:
                    raise ConfigError(
                        f"cannot use redis at {url}: {redact_url(str(exc))}"
                    ) from None
                why = redact_url(str(exc))
            except (RedisError, OSError, ValueError) as exc:
                raise ConfigError(f"cannot use redis at {url}: {redact_url(str(exc))}") from None
            self.stats.redis_errors += 1
            if attempts == 1 or attempts % 10 == 0:
                logger.warning(
                    "no redis master through %s yet (%s; a failover in progress?); "
                    "retrying every %.1fs",
                    url,
                    why,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            if stop.is_set():
                return False
            delay = min(delay * 2, 2.0)

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
        self.core.phase_ended()
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

    def _log_final_counts(self) -> None:
        """One line as the broker stops (before "stepped down", the last word): its frame
        counts, so an operator, or a test, sees what a stopped broker received and dropped;
        the status hash no longer does (its successor rewrites it)."""
        status = self.status()
        dropped = status.frames_dropped_by_reason
        logger.info(
            "broker %s stopping: frames_in=%d frames_published=%d frames_dropped=%d "
            "frames_dropped_by_reason=%s",
            self.settings.broker_id,
            status.frames_in,
            status.frames_published,
            dropped.total(),
            msgspec.json.encode(dropped).decode(),
            extra={"event": "stopping"},
        )

    # -- the leader phase -----------------------------------------------------------------------

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
        previous = await self._previous_leader()
        core = self.core = LeaderCore(
            s, self.counters, epoch=self.core.epoch, token=self._lock.token, logger=logger
        )
        core.took_lead(now_ms(), previous.token, previous.last_frame_ms, previous.backfill_since_ms)
        # What the predecessor refused queues behind the rest (created_ms is the holder's word).
        core.admission.previously_refused(previous.refused)
        phase = LeaderPhase(
            s,
            core,
            self.counters,
            redis=self._redis,
            pub_redis=self._pub_redis,
            lock=self._lock,
            ready=self.ready,
        )
        self.upstream, self.publisher = phase.upstream, phase.publisher
        # Before the phase writes its own status: the previous leader's may say its cache froze.
        await phase.publisher.inherit_stale_mark(self.keys.status)
        try:
            await phase.run()
        finally:
            core.phase_ended()
            # Frames the publisher had not written when the phase ended (a stop, a lost lock)
            # never reach Redis: counted, so frames_dropped says what the phase lost. The gap
            # that covers them is the successor's takeover gap (from our last frame).
            self.counters.publish.dropped_not_leader += phase.publisher.pending

    async def _previous_leader(self) -> PreviousLeader:
        """What the status hash says of the process that wrote it last (``PreviousLeader``)."""
        assert self._redis is not None
        fields = ["leader_token", "last_frame_ms", "refused", "backfill_since_ms"]
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                token, last, refused, pending = await self._redis.hmget(self.keys.status, fields)
        except (RedisError, OSError, TimeoutError):
            return PreviousLeader()
        last_ms, pending_ms = _int_or_zero(last), _int_or_zero(pending)
        if isinstance(token, bytes):
            token = token.decode(errors="replace")
        try:
            refused_ids = tuple(msgspec.json.decode(refused or b"{}", type=dict[str, str]))
        except msgspec.DecodeError:
            refused_ids = ()
        return PreviousLeader(token or "", last_ms, refused_ids, pending_ms)


def _int_or_zero(raw: bytes | str | None) -> int:
    try:
        return max(int(raw or 0), 0)
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class PreviousLeader:
    """The status hash as the previous leader left it (all empty when unreadable).

    Attributes:
        token: its lock token ("" from a broker older than tokens): another process's token
            means a takeover gap (``LeaderCore.took_lead``).
        last_frame_ms: the wall clock of its last frame (0: none): the gap starts there.
        refused: the client ids it refused (``broker.core.admission``): they queue behind the
            others in the new leader's first admission.
        backfill_since_ms: the earliest gap it announced and had not back-filled yet (0: none).
    """

    token: str = ""
    last_frame_ms: int = 0
    refused: tuple[str, ...] = ()
    #: the earliest gap it announced and had not back-filled (0: none)
    backfill_since_ms: int = 0


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


__all__ = ["Broker", "run_broker"]
