"""The leader's rules, fed and drained like a sans-I/O protocol (pure: no asyncio, redis or
websockets, and no clock of its own: every input carries ``now``).

(A little over 500 lines on purpose: this is the one surface where the leader's inputs meet;
each rule's own state already lives in its piece below, and splitting the feed/drain methods
further would scatter one protocol over several files.)

The service's leader phase runs small I/O tasks around one :class:`LeaderCore`; each feeds it
what it read and writes what it asks for. The core owns the subscription controller
(``control``), the lease reconciler (``reconcile``), the snapshot desk (``snapshots``), the
lease feedback (``lease_feedback``), the gap tracker (``gaps``) and the quiet streams
(``quiet``), all in ``broker.core``:

    feed   took_lead(now_ms, previous_token, previous_last_frame_ms) / phase_ended()
           inherit_union(desired, written_ms, now, now_ms)
           control_messages(batch, now) -> {Wake} / control_message(data, now) -> Wake
           control_subscribed(now) / control_lost(why, now)
           redis_server_seen(run_id, now, now_ms)
           redis_emptied(now) / begin_lease_read(now) -> LeaseRead
           leases_listed(listing, now, now_ms) / leases_read(reads, now, now_ms)
           lease_read_failed(now)
           upstream_connected(now, at_ms, fresh=) -> bool / epoch_assigned(epoch)
           upstream_lost(loss, at_ms, last_frame_ms) / resubscribes_confirmed(ids)
           command(raw, now) -> CacheQuery | None / cached(query, values, now)
           published(frames, now) / publish_lost(since_ms, until_ms, frames)
           tick(now) / events_sent(events, ok=)
           take_backfill(now_ms) -> BackfillJob | None / backfill_done(job, results)
    drain  take_controller_changed()   the one "desired or controller changed" signal
           take_backfill_queued()      a gap queued a back-fill (its due time may be sooner)
           events_to_publish() / replies_to_send() / status(now, now_ms)
    ask    desired, epoch, connected, awaited_streams, watches_epoch_key, in_grace(now),
           quiet_codes(now), next_wakeup(now), next_lease_read(), next_backfill_ms()

The rules, each table-tested in ``tests/test_leader_core.py`` (the pieces it owns say theirs):

- Union grace: when Redis lost its data (the epoch key vanished), the control channel broke, or
  another Redis server answers than before (its ``run_id``: a Sentinel failover to a replica, or
  a restart), leases may be missing until their holders re-assert them (within a heartbeat):
  the union held before stays wanted, on top of what the leases ask, for one lease TTL, and no
  expiry is announced meanwhile. Holding again during a grace extends it and keeps both sets.
- Takeover: the union the status names when a phase begins (the predecessor's, or this
  process's before a lapse) is held for one lease TTL if it is at most one lease TTL old: a
  leader that takes over during a Redis failover may find fewer leases than were served.
- Another Redis server (a failover: replication is asynchronous, so the new master may lack
  the old one's last writes, history entries included) also announces a ``redis`` gap, from
  ``REPLICATION_SLACK_MS`` before the old server was lost to the moment the new one was seen.
- Connections: each gets a new epoch and a ``connected`` event, after the gap event it owes
  (``broker.core.gaps``); the planned switch to a fresh connection keeps the epoch, says nothing.
- Commands: a snapshot goes to the snapshot desk (refused at once while
  ``MAX_SNAPSHOT_WAITERS`` are in progress: a flood never piles up unbounded); a resubscribe
  is answered once verified (the reply carries the epoch and the upstream set); any other op
  is refused with a reason; an unreadable command (no id to answer) is dropped and counted.
- Redis losses: frames the publisher could not get confirmed (its connection broke) are
  announced once per loss as a ``redis`` gap, when publishing is confirmed again.
- Back-fill: every gap announced queues the back-fill of the trade and candle streams leased
  then (``broker.core.backfill``: gaps queued together merge per stream); once the job ran,
  each gap gets its follow-up, the gap event again with ``state``, ``restored`` and counts
  (none while the back-fill is off).
- Leases: what to read when and the union (the reconciler), what each holder is told (the
  feedback), the status counts. Quiet streams: ``broker.core.quiet``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from broker.contract import (
    CommandError,
    ConnectedEvent,
    DroppedFrames,
    ErrorReply,
    Event,
    GapEvent,
    LeaderEvent,
    LeaseEvent,
    Reply,
    ResubscribeCommand,
    ResubscribeReply,
    Status,
    decode_command,
    encode_event,
    encode_reply,
)
from broker.core.admission import UNKNOWN_MARKET, UNLISTED, Admitted, Refusal, UnionAdmission
from broker.core.backfill import BackfillDesk, BackfillJob, StreamResult, job_since_ms
from broker.core.control import MAX_RESENDS, SubscriptionController, Verdict
from broker.core.control_messages import ControlBatch
from broker.core.gaps import GapReason, GapTracker, Loss
from broker.core.lease_feedback import LeaseFeedback, log_changes
from broker.core.quiet import QuietStreams
from broker.core.reconcile import LeaseRead, LeaseReconciler, LeaseSnapshot
from broker.core.snapshots import SNAPSHOT_DEPTH, CacheQuery, SnapshotDesk
from broker.core.stats import Counters
from broker.settings import BrokerSettings, redact_url
from broker.upbit.types import EMPTY, StreamKey, SubscriptionSet, union

if TYPE_CHECKING:
    from broker.core.lease import LeaseListing, LeaseReads

_json = msgspec.json.Encoder()

#: snapshot requests in progress at most (waiting for the cache or upstream); past it a
#: snapshot command is refused at once, so a flood of them never holds unbounded frames
MAX_SNAPSHOT_WAITERS = 1_000
#: a market list with fewer than this share of the last one's codes is not believed
MIN_MARKETS_KEPT = 0.5
#: entries the status lists at most in ``refused`` and ``unknown_codes`` (counts have them all)
STATUS_LIST_MAX = 100
#: a gap for another Redis server starts this long before the old one was lost: what it
#: confirmed in its last moments may not have reached the replica that replaced it
#: (replication is asynchronous; its lag is normally a few ms)
REPLICATION_SLACK_MS = 1_000


class Wake(enum.Enum):
    """Which task a control message is for."""

    LEASES = "leases"
    COMMANDS = "commands"


_WAKE_NONE: frozenset[Wake] = frozenset()
_WAKE_LEASES = frozenset({Wake.LEASES})
_WAKE_COMMANDS = frozenset({Wake.COMMANDS})
_WAKE_BOTH = frozenset(Wake)


@dataclass(frozen=True, slots=True)
class OutEvent:
    """An event to PUBLISH on ``{ns}:events``: the Struct, and its bytes."""

    event: Event
    data: bytes


@dataclass(frozen=True, slots=True)
class OutReply:
    """A reply to RPUSH to ``{ns}:reply:{request_id}`` (then PEXPIRE it)."""

    request_id: str
    data: bytes


class LeaderCore:
    """The rules of one leader phase. Times: ``now`` monotonic seconds, ``*_ms`` wall clock."""

    def __init__(
        self,
        settings: BrokerSettings,
        counters: Counters | None = None,
        *,
        epoch: int = 0,
        token: str = "",
        logger: logging.Logger | None = None,
    ) -> None:
        """A core that leads nothing yet (:meth:`took_lead` starts the phase).

        Args:
            settings: the broker's settings.
            counters: the broker's counters (they outlive the phase).
            epoch: the last epoch this broker knew (0: none yet).
            token: this process's leader-lock token (the status carries it: a successor tells
                a restart of the same ``broker_id`` from itself by it, see :meth:`took_lead`).
            logger: where the rules log (the service passes its own: operators know its name).
        """
        s = self.settings = settings
        self.broker_id = s.broker_id
        self.token = token
        self.counters = Counters() if counters is None else counters
        self.stats = self.counters.broker
        self.log = logger if logger is not None else logging.getLogger(__name__)
        self.controller = SubscriptionController(
            fmt=s.upstream_format,
            per_second=s.rate_per_second,
            per_minute=s.rate_per_minute,
            coalesce_delay=s.coalesce_delay,
            verify=s.verify_subscriptions,
            ticket_prefix=s.broker_id,
            stats=self.counters.control,
            max_request_bytes=s.max_request_bytes,
        )
        self.admission = UnionAdmission(
            max_streams=s.max_union_streams, max_bytes=s.max_request_bytes
        )
        #: the leases as served (unknown codes rejected, refusals named) after the last admission
        self.served = LeaseSnapshot([], [], [])
        self.admission_result: Admitted | None = None
        self._unknown_reported: frozenset[str] = frozenset()
        self._unknown_checked: LeaseSnapshot | None = None
        self._admitted_key: tuple[object, ...] = ()
        self.leases = LeaseReconciler(
            interval=s.reconcile_interval, coalesce_delay=s.coalesce_delay
        )
        self.snapshots = SnapshotDesk(self.stats)
        self.feedback = LeaseFeedback()
        self.gaps = GapTracker(s.broker_id)
        self.backfill = BackfillDesk(
            s.history_caps(), enabled=s.backfill and s.rest_base_url() is not None
        )
        self._backfill_queued = False
        self.quiet = QuietStreams(s.quiet_after, check_every=s.status_interval)
        self.epoch = epoch
        #: the union of the leases (plus a held union during a grace): what upstream should hold
        self.desired: SubscriptionSet = EMPTY
        self.leading = False
        self.connected = False
        self._controller_changed = False
        self._events: list[OutEvent] = []
        self._replies: list[OutReply] = []
        self._grace_until: float | None = None
        self._grace_set: SubscriptionSet = EMPTY
        #: the Redis server seen last (INFO ``run_id``; None: none yet, or it has no INFO)
        self.redis_run_id: str | None = None
        #: when the control channel broke, first since the last :meth:`redis_server_seen`
        self._redis_lost_at: float | None = None
        self._connected_at_ms = 0
        #: snapshot requests taken and not answered yet (at most MAX_SNAPSHOT_WAITERS)
        self._snapshots_open = 0
        #: the earliest gap of the back-fill job running now (0: none runs)
        self._backfill_running_since_ms = 0

    # -- the phase ----------------------------------------------------------------------------

    def took_lead(
        self,
        now_ms: int,
        previous_token: str = "",
        previous_last_frame_ms: int = 0,
        previous_backfill_since_ms: int = 0,
    ) -> None:
        """This broker took the lock; the status hash was written by the process holding
        ``previous_token`` ("" from a broker older than tokens), whose last frame was
        ``previous_last_frame_ms`` (0: none). Frames of any other process, a restart of the
        same ``broker_id`` included, end in a takeover gap at our first connection; the
        ``broker_id`` is a label, never the fence.

        ``previous_backfill_since_ms`` (the status's ``backfill_since_ms``): the earliest gap
        that leader announced and had not back-filled yet (0: none). Its follow-up will never
        come, so the gap this phase announces starts there instead, and its back-fill covers
        the earlier one too."""
        self.leading = True
        # A status without a token (an older broker's) counts as another process's: a gap
        # announced in vain is harmless, a loss nobody announces is not.
        other = previous_token != self.token
        if not other:  # our own status: our own counters know our last frame better
            previous_last_frame_ms = max(
                previous_last_frame_ms, self.counters.publish.last_publish_ms
            )
        if previous_backfill_since_ms > 0:
            previous_last_frame_ms = min(
                previous_last_frame_ms or previous_backfill_since_ms, previous_backfill_since_ms
            )
        self.gaps.took_lead(now_ms, other, previous_last_frame_ms)
        self._event(LeaderEvent(broker=self.broker_id, ts_ms=now_ms))

    def inherit_union(
        self, desired: SubscriptionSet, written_ms: int, now: float, now_ms: int
    ) -> None:
        """The union the status named as this phase began (``desired``, written at
        ``written_ms``): the predecessor's, or this process's before a lapse.

        Held for one lease TTL when it is at most one lease TTL old: a leader that takes over
        during a Redis failover reads the new master, which may lack leases the old one had
        (asynchronous replication), or hold them expired (no master answered their holders'
        heartbeats), until their next heartbeats; without this its first subscription would
        drop their streams. An older status is not held: its leases have had a TTL to come
        back. Outside a failover the leases already ask for the same union: nothing changes.
        """
        if not desired or now_ms - written_ms > self.settings.lease_ttl * 1000:
            return
        self._grace_set = union(self._grace_set, desired) if self.in_grace(now) else desired
        self._grace_until = now + self.settings.lease_ttl
        self.log.info(
            "holding the union the status names (%d streams) for %.0fs",
            len(desired),
            self.settings.lease_ttl,
        )
        self._apply_union(now, None)

    def phase_ended(self) -> None:
        """The leader phase is over (the status now names no leader)."""
        self.leading = False
        self.connected = False

    # -- the control channel and the leases ---------------------------------------------------

    def control_messages(self, batch: ControlBatch, now: float) -> frozenset[Wake]:
        """One tick's messages on ``{ns}:control``, folded (``broker.core.control_messages``):
        ``request`` (commands wait), ``lease <id>`` or ``release <id>`` (read that lease),
        anything else (read every lease). Returns the tasks to wake, once for the batch; what
        a flood can cost the lease reads is bounded by the reconciler."""
        ignored = batch.ignored
        for raw in batch.ids:
            if not self.leases.named(raw.decode(errors="replace"), now):
                ignored += 1  # not a client id, or one unknown id too many
        if batch.read_all:
            self.leases.read_all_soon(now)
        self.stats.control_messages += batch.messages
        self.stats.control_ignored += ignored
        if batch.commands:
            return _WAKE_BOTH if batch.ids or batch.read_all else _WAKE_COMMANDS
        return _WAKE_LEASES if batch.ids or batch.read_all else _WAKE_NONE

    def control_message(self, data: bytes, now: float) -> Wake:
        """One message on ``{ns}:control`` (a batch of one: :meth:`control_messages`)."""
        batch = ControlBatch()
        batch.add(data)
        self.control_messages(batch, now)
        return Wake.COMMANDS if batch.commands else Wake.LEASES

    def control_subscribed(self, now: float) -> None:
        """(Re)subscribed to the control channel: messages may have been missed."""
        self.leases.read_all_soon(now)

    def control_lost(self, why: str, now: float) -> None:
        """The control channel broke: Redis may be restarting, perhaps empty, or failing over."""
        if self._redis_lost_at is None:
            self._redis_lost_at = now
        self._hold_union(f"control channel lost ({why})", now)

    def redis_server_seen(self, run_id: str, now: float, now_ms: int) -> None:
        """The Redis server the leader's connections reach now (its INFO ``run_id``), read at
        each (re)subscription of the control channel: every failover and restart breaks it.

        Another server than before (a failover promoted a replica, or Redis restarted) may lack
        leases written just before (replication is asynchronous): the union is held for one
        lease TTL from now, every lease is read at once, and, once data has flowed (an epoch),
        a ``redis`` gap is announced from ``REPLICATION_SLACK_MS`` before the old server was
        lost until now: frames it confirmed last may be missing on the new one (history
        entries, cache), and the back-fill restores the trades and candles of that window.
        """
        previous, self.redis_run_id = self.redis_run_id, run_id
        lost_at, self._redis_lost_at = self._redis_lost_at, None
        if previous is None or previous == run_id:
            return
        self._hold_union(
            f"another redis server answers (run_id {previous[:8]}.. -> {run_id[:8]}..: "
            "a failover or a restart)",
            now,
        )
        self.leases.read_all_now()
        if self.epoch <= 0:
            return  # no frame has flowed in this phase: nothing to miss
        lost_ms = now_ms - round((now - lost_at) * 1000) if lost_at is not None else now_ms
        gap = GapEvent(
            epoch=self.epoch,
            since_ms=lost_ms - REPLICATION_SLACK_MS,
            until_ms=now_ms,
            reason=GapReason.REDIS.value,
            broker=self.broker_id,
        )
        self.log.warning(
            "redis server changed: writes of its last moments may be missing: gap %d..%d announced",
            gap.since_ms,
            gap.until_ms,
        )
        self._event(gap)
        self._queue_backfill(gap)

    @property
    def watches_epoch_key(self) -> bool:
        """Check ``{ns}:epoch`` before each lease read: only its loss reveals an emptied Redis
        (it vanishes with the data, and exists once an epoch was assigned)."""
        return self.epoch > 0

    def redis_emptied(self, now: float) -> None:
        """The epoch key vanished: Redis lost its data (and every lease, until re-asserted).
        The service writes the epoch back (SET NX) so this is noticed once."""
        self._hold_union("redis lost its data", now)
        self.leases.read_all_now()

    def begin_lease_read(self, now: float) -> LeaseRead:
        """What the lease task reads now (it waits for :meth:`next_lease_read` first)."""
        return self.leases.begin(now)

    def leases_listed(self, listing: LeaseListing, now: float, now_ms: int) -> None:
        """A full listing (``LeaseStore.list_all``) for :meth:`begin_lease_read`."""
        read = self.leases.reading
        self.leases.listed(listing, now)
        self.stats.lease_listings += 1
        if listing.reindexed:  # someone removed them from the index: served all the same
            self.log.warning(
                "leases missing from the index, re-indexed: %s", ", ".join(listing.reindexed)
            )
        self._leases_changed(read, now, now_ms)

    def leases_read(self, reads: LeaseReads, now: float, now_ms: int) -> None:
        """Single leases (``LeaseStore.read_many``) for :meth:`begin_lease_read`."""
        read = self.leases.reading
        if read is not None:
            self.stats.lease_reads += len(read.ids) - len(reads.ignored)
        self.leases.read(reads, now)
        self._leases_changed(read, now, now_ms)

    def lease_read_failed(self, now: float) -> None:
        self.leases.failed(now)

    def next_lease_read(self) -> float:
        """When the lease task should next read (monotonic)."""
        return self.leases.due()

    # -- upstream -----------------------------------------------------------------------------

    def upstream_connected(self, now: float, at_ms: int, *, fresh: bool) -> bool:
        """A new upstream connection opened at ``at_ms``; True when it needs a new epoch
        (``INCR {ns}:epoch``, then :meth:`epoch_assigned`). ``fresh``: the planned switch
        because the set shrank to nothing, which keeps the epoch and announces nothing."""
        self.connected = True
        self.quiet.connected(self.desired, now)
        if fresh:
            self.log.info(
                "fresh upstream connection (the set shrank to nothing): epoch stays %d",
                self.epoch,
                extra={"event": "fresh_connection", "epoch": self.epoch},
            )
            return False
        self._connected_at_ms = at_ms
        return True

    def epoch_assigned(self, epoch: int | None) -> None:
        """The new connection's epoch (None: Redis did not answer; counted on locally).
        Queues the gap event (if data may be missing) and the ``connected`` event."""
        self.epoch = self.epoch + 1 if epoch is None else epoch
        until = self._connected_at_ms
        gap = self.gaps.connected(self.epoch, until)
        if gap is not None:
            assert gap.since_ms is not None
            span_ms = until - gap.since_ms
            self._event(gap)
            self._queue_backfill(gap)
            self.log.info(
                "gap event: epoch=%d reason=%s span_ms=%d",
                self.epoch,
                gap.reason,
                span_ms,
                extra={
                    "event": "gap",
                    "epoch": self.epoch,
                    "reason": gap.reason,
                    "span_ms": span_ms,
                },
            )
        self._event(ConnectedEvent(epoch=self.epoch, broker=self.broker_id, ts_ms=until))
        self.log.info(
            "upstream connected: epoch=%d url=%s",
            self.epoch,
            redact_url(self.settings.upstream_url),
            extra={"event": "connected", "epoch": self.epoch},
        )

    def upstream_lost(
        self,
        loss: Loss,
        at_ms: int,
        last_frame_ms: int,
        refusal: Refusal | None = None,
        now: float = 0.0,
    ) -> None:
        """The connection ended at ``at_ms`` (``last_frame_ms``: the wall clock of the last
        frame published, 0: none); the next connection announces the gap (``broker.core.gaps``).
        ``refusal``: Upbit ended it refusing the last subscribe request: the union is admitted
        again under what that taught (``broker.core.admission``), so the next connection does
        not send the same request."""
        self.connected = False
        self.gaps.lost(loss, at_ms, last_frame_ms)
        if refusal is None:
            return
        if refusal.too_big:
            self.admission.too_big(refusal.request_bytes)
            self.log.warning(
                "upstream refused a %d-byte subscribe request (%s): requests now capped at %d "
                "bytes; the newest leases past it are refused",
                refusal.request_bytes,
                refusal.why,
                self.admission.byte_cap,
            )
        else:
            suspects = self.admission.error_frame(refusal.why, now)
            self.log.warning(
                "upstream refused the subscribe request (%s): quarantined the leases it added: %s",
                refusal.why,
                ", ".join(suspects) or "none (the request held nothing new)",
            )
        self._leases_changed(None, now, at_ms)

    def upstream_verified(self, verdict: Verdict, now: float, now_ms: int) -> None:
        """LIST_SUBSCRIPTIONS settled the last request (``SubscriptionController.take_verdict``):
        what was admitted is safe; streams Upbit keeps leaving out are kept out of the union and
        reported to their holders, so verification converges."""
        self.admission.accepted(verdict.held, verdict.request_bytes)
        if verdict.unlisted:
            shown = sorted(f"{key.type}:{key.code}" for key in verdict.unlisted)
            self.log.warning(
                "upbit does not list %d streams after %d requests: kept out of the union: %s",
                len(shown),
                1 + MAX_RESENDS,
                ", ".join(shown[:20]),
            )
            self.admission.not_listed(verdict.unlisted)
        self._leases_changed(None, now, now_ms)

    def markets_listed(self, codes: Iterable[str], now: float, now_ms: int) -> bool:
        """Upbit's market list was read (``GET /v1/market/all``): codes not on it are kept out
        of the union and reported to their holders (streams it left out get another chance).

        Returns False for a list not believed: one that lost more than half of the last list's
        codes (a truncated answer, a proxy's page) would take most streams offline at once; the
        last list stays, and the next read decides.
        """
        fresh = frozenset(codes)
        known = self.admission.markets
        if known is not None and len(fresh) < len(known) * MIN_MARKETS_KEPT:
            self.stats.market_list_errors += 1
            self.log.warning(
                "market list not believed: %d codes, the last one had %d; keeping the last",
                len(fresh),
                len(known),
            )
            return False
        self._unknown_reported = frozenset()
        version = self.admission.version
        self.admission.markets_listed(fresh)
        if self.admission.version != version:
            self.log.info(
                "market list: %d codes",
                len(self.admission.markets or ()),
                extra={"event": "markets", "codes": len(self.admission.markets or ())},
            )
            self._leases_changed(None, now, now_ms)
        return True

    def take_market_refresh(self) -> bool:
        """True once when a lease names a well-formed code the market list lacks that was not
        seen before: perhaps a new listing, so the list is worth reading again early (the
        markets task rate-limits it)."""
        if self.served is self._unknown_checked:
            return False  # nothing admitted since the last look (this runs after every feed)
        self._unknown_checked = self.served
        unknown = frozenset(self._unknown_codes())
        fresh = unknown - self._unknown_reported
        self._unknown_reported |= unknown
        return bool(fresh) and self.admission.markets is not None

    def publish_lost(self, since_ms: int, until_ms: int, frames: int) -> None:
        """Publishing to Redis broke at ``since_ms`` (the publisher's word, once per loss) and
        was confirmed again at ``until_ms``; ``frames`` never reached Redis meanwhile: a
        ``redis`` gap announces them (``broker.core.gaps``)."""
        gap = self.gaps.redis_loss(self.epoch, since_ms, until_ms, frames)
        if gap is None:
            return
        self.log.warning(
            "%d frames never reached redis (publish connection lost, or held back while the "
            "lock was unconfirmed): gap %d..%d announced",
            frames,
            gap.since_ms,
            gap.until_ms,
        )
        self._event(gap)
        self._queue_backfill(gap)

    def resubscribes_confirmed(self, request_ids: Iterable[str]) -> None:
        """LIST_SUBSCRIPTIONS confirmed the full set these resubscribe commands asked for."""
        upstream = self.controller.held.by_type()
        for request_id in request_ids:
            self._reply(ResubscribeReply(id=request_id, epoch=self.epoch, upstream=upstream))

    # -- back-fill ----------------------------------------------------------------------------

    def backfill_since_ms(self) -> int:
        """The earliest gap announced and not back-filled yet, waiting or running (0: none):
        the status says it, so that a successor's gap starts there (:meth:`took_lead`)."""
        times = [self.backfill.waiting_since_ms(), self._backfill_running_since_ms]
        return min((t for t in times if t > 0), default=0)

    def next_backfill_ms(self) -> int | None:
        """When the next back-fill job is due (wall clock ms; None: no gap waits for one)."""
        return self.backfill.next_due_ms()

    def take_backfill(self, now_ms: int) -> BackfillJob | None:
        """The back-fill job of the gaps queued so far, once due. A job with nothing to fetch
        (the gaps covered no trade or candle stream with history) is answered here at once,
        and None returned."""
        job = self.backfill.take(now_ms)
        if job is None:
            return None
        self._backfill_running_since_ms = job_since_ms(job)
        self.counters.backfill.jobs += 1
        if job.streams:
            return job
        self.backfill_done(job, ())
        return None

    def backfill_done(self, job: BackfillJob, results: Sequence[StreamResult]) -> None:
        """``job`` ran (``results``: one per stream it fetched): each of its gaps gets its
        follow-up event."""
        stats = self.counters.backfill
        self._backfill_running_since_ms = 0
        for event in self.backfill.follow_ups(job, results):
            state, counts = event.state, event.backfill
            assert isinstance(state, str) and isinstance(counts, dict)
            if state == "filled":
                stats.filled += 1
            elif state == "partial":
                stats.partial += 1
            else:
                stats.lost += 1
            self._event(event)
            self.log.log(
                logging.INFO if state == "filled" else logging.WARNING,
                "gap follow-up: epoch=%s reason=%s state=%s appended=%d failed=%d",
                event.epoch,
                event.reason,
                state,
                counts["appended"],
                counts["failed"],
                extra={
                    "event": "gap_followup",
                    "epoch": event.epoch,
                    "reason": event.reason,
                    "state": state,
                    "appended": counts["appended"],
                },
            )

    def take_backfill_queued(self) -> bool:
        """True once after a gap queued a back-fill: the back-fill task looks at
        :meth:`next_backfill_ms` again."""
        queued, self._backfill_queued = self._backfill_queued, False
        return queued

    def _queue_backfill(self, gap: GapEvent) -> None:
        """``gap`` was announced: its trade and candle streams (those leased now) are back-filled
        once the new connection's frames flow. Nothing while the back-fill is off: such a
        gap gets no follow-up."""
        if not self.backfill.gap(gap, self.desired.keys()):
            return
        self.counters.backfill.gaps += 1
        self._backfill_queued = True

    # -- commands and snapshots ---------------------------------------------------------------

    def command(self, raw: bytes, now: float) -> CacheQuery | None:
        """One entry of ``{ns}:requests``. A snapshot of flowing streams returns the cache
        lookup to make (then :meth:`cached`); everything else is answered from here."""
        self.stats.commands += 1
        try:
            command = decode_command(raw)
        except CommandError as exc:
            self.stats.bad_commands += 1
            if exc.request_id is None:
                self.log.warning("dropped unreadable command: %s", exc)
            else:
                self._reply(ErrorReply(id=exc.request_id, error=str(exc)))
            return None
        if isinstance(command, ResubscribeCommand):
            self.stats.resubscribes_forced += 1
            self.log.info("resubscribe requested (%s)", command.id)
            self.controller.force_resubscribe(command.id, now)
            self._controller_changed = True
            return None
        if self._snapshots_open >= MAX_SNAPSHOT_WAITERS:
            self.stats.bad_commands += 1
            self._reply(
                ErrorReply(
                    id=command.id,
                    error=f"too many snapshot requests in progress ({MAX_SNAPSHOT_WAITERS}): "
                    "try again later",
                )
            )
            return None
        self._snapshots_open += 1
        query = self.snapshots.query(command, self.controller.upstream, now)
        if query.codes and self.settings.last_value_cache:
            return query
        self.cached(query, (), now)
        return None

    def cached(self, query: CacheQuery, values: Sequence[object], now: float) -> None:
        """The last-value cache's answer to ``query`` (``()`` when it could not be read):
        what it lacks is fetched upstream."""
        missing = self.snapshots.cached(query, values, now)
        if missing:
            fetch = SubscriptionSet(dict.fromkeys(missing, SNAPSHOT_DEPTH))
            self.controller.request_snapshot(fetch, now)
            self._controller_changed = True
        self._finish_snapshots(now)

    def published(self, frames: Iterable[tuple[StreamKey, bytes]], now: float) -> None:
        """Frames of :attr:`awaited_streams` were published (the publisher's watch)."""
        self.snapshots.published(frames)
        self._finish_snapshots(now)

    @property
    def awaited_streams(self) -> frozenset[StreamKey]:
        """Streams whose next published frame a snapshot request waits for."""
        return self.snapshots.awaited

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float, now_ms: int = 0) -> None:
        """Timers: a grace that ended, a quarantine that ended, snapshot requests past their
        deadline, quiet streams."""
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            self._grace_set = EMPTY
            self._apply_union(now, None)
        if self.admission.expire(now):
            self._leases_changed(None, now, now_ms)
        self._finish_snapshots(now)
        if self.connected:
            self._refresh_quiet(now)

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`tick` next has something to do (None: only on new input)."""
        timers = (
            self._grace_until,
            self.snapshots.next_deadline(),
            self.admission.next_expiry(now),
        )
        times = [t for t in timers if t is not None]
        if self.connected:
            times.append(self.quiet.next_check())
        return min(times, default=None)

    def in_grace(self, now: float) -> bool:
        """True while a held union is kept (see the module docstring)."""
        return self._grace_until is not None and now < self._grace_until

    def quiet_codes(self, now: float) -> list[str]:
        """``type:code`` of the streams upstream holds that published nothing for
        ``quiet_after`` (none while disconnected)."""
        if not self.connected:
            return []
        quiet = self.quiet.quiet(self.controller.upstream, self.counters.publish.last_seen, now)
        return sorted(f"{key.type}:{key.code}" for key in quiet)

    # -- drain --------------------------------------------------------------------------------

    def take_controller_changed(self) -> bool:
        """True once after the desired set or the controller's state changed: the upstream
        send loop must look at the controller again."""
        changed, self._controller_changed = self._controller_changed, False
        return changed

    @property
    def has_output(self) -> bool:
        """Events or replies wait to be written."""
        return bool(self._events or self._replies)

    def events_to_publish(self) -> list[OutEvent]:
        events, self._events = self._events, []
        return events

    def replies_to_send(self) -> list[OutReply]:
        replies, self._replies = self._replies, []
        return replies

    def events_sent(self, events: Sequence[OutEvent], *, ok: bool) -> None:
        """The outcome of publishing ``events``: lease events that were lost are announced
        again after the next lease read."""
        leases = sum(1 for out in events if isinstance(out.event, LeaseEvent))
        if ok:
            self.stats.lease_events += leases
        elif leases:
            self.feedback.reset()

    def status(self, now: float, now_ms: int) -> Status:
        """The status ``{ns}:status`` (design.md "Status"); ``encode_status`` makes the hash.

        ``frames_dropped`` is every frame received upstream that did not reach Redis, by one
        definition for the status and the metrics: its reasons are ``frames_dropped_by_reason``.
        """
        up, pub = self.counters.upstream, self.counters.publish
        ctl, b = self.counters.control, self.stats
        admitted = self.admission_result
        oom = self.counters.oom  # Redis at maxmemory (broker.core.oom)
        fill = self.counters.backfill
        memory = oom.memory
        return Status(
            leader=self.broker_id if self.leading else "",
            leader_token=self.token,
            connected=self.connected,
            epoch=self.epoch,
            reconnects=up.reconnects,
            resubscribes=ctl.subscribe_requests,
            list_requests=ctl.list_requests,
            verify_mismatches=ctl.verify_mismatches,
            deferred_sends=ctl.deferred,
            desired=self.desired.by_type(),
            upstream=self.controller.held.by_type(),
            last_error=up.last_error,
            frames_in=up.frames_in,
            frames_published=pub.published,
            frames_dropped_by_reason=DroppedFrames(
                unleased=up.dropped_unleased,
                malformed=up.malformed,
                overflow=pub.dropped_overflow,
                not_leader=pub.dropped_not_leader,
                redis=pub.dropped_redis,
            ),
            leases=b.leases,
            invalid_leases=b.invalid_leases,
            partial_leases=b.partial_leases,
            rejected_streams=b.rejected_streams,
            redis_errors=b.redis_errors + pub.redis_errors,
            last_frame_ms=self.gaps.last_frame_ms(pub.last_publish_ms),
            updated_ms=now_ms,
            status_interval_ms=round(self.settings.status_interval * 1000),
            upstream_url=redact_url(self.settings.upstream_url),
            quiet_codes=self.quiet_codes(now),
            upstream_unconfirmed=len(self.controller.upstream.keys() - self.controller.held.keys()),
            refused_leases=b.refused_leases,
            refused=dict(list(self.served.refused.items())[:STATUS_LIST_MAX]),
            unknown_codes=self._unknown_codes(),
            markets=len(self.admission.markets or ()),
            request_bytes=admitted.request_bytes if admitted is not None else 0,
            request_bytes_cap=self.admission.byte_cap,
            upstream_refusals=self.admission.refusals,
            control_messages=b.control_messages,
            control_ignored=b.control_ignored,
            redis_oom_since_ms=oom.since_ms,
            redis_oom_refusals=oom.refusals,
            redis_used_memory=memory.used if memory is not None else 0,
            redis_maxmemory=memory.maxmemory if memory is not None else 0,
            redis_maxmemory_policy=memory.policy if memory is not None else "",
            cache_stale_since_ms=pub.cache_stale_since_ms,
            history=self.settings.history,
            history_written=pub.history_written,
            history_refused=pub.history_refused,
            backfill_pending=self.backfill.pending,
            backfill_since_ms=self.backfill_since_ms(),
            backfill_appended=fill.appended,
            backfill_streams_failed=fill.streams_failed,
            backfill_requests=fill.requests,
            backfill_rate_limited=fill.rate_limited,
            gaps_filled=fill.filled,
            gaps_partial=fill.partial,
            gaps_lost=fill.lost,
        )

    def _unknown_codes(self) -> list[str]:
        """``type:code`` the served leases ask for that Upbit does not know (at most
        ``STATUS_LIST_MAX``)."""
        found: set[str] = set()
        for lease in self.served.leases:
            for entry in lease.rejected:
                if entry.reason in (UNKNOWN_MARKET, UNLISTED):
                    found.add(f"{entry.stream}:{entry.code}")
        return sorted(found)[:STATUS_LIST_MAX]

    # -- rules --------------------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        self._events.append(OutEvent(event, encode_event(event)))

    def _reply(self, reply: Reply) -> None:
        self._replies.append(OutReply(reply.id, encode_reply(reply)))

    def _hold_union(self, why: str, now: float) -> None:
        held = union(self._grace_set, self.desired) if self.in_grace(now) else self.desired
        self._grace_until = now + self.settings.lease_ttl
        self._grace_set = held
        self.log.warning(
            "%s: holding the union (%d streams) for %.0fs",
            why,
            len(self.desired),
            self.settings.lease_ttl,
        )

    def _leases_changed(self, read: LeaseRead | None, now: float, now_ms: int) -> None:
        self._apply_union(now, read.noticed_at if read is not None else None)
        view = self.leases.snapshot()
        admitted = self.admission_result
        refused = admitted.refused if admitted is not None else {}
        served = LeaseSnapshot(
            admitted.leases if admitted is not None else view.leases,
            view.invalid,
            view.expired,
            refused,
        )
        self.served = served
        named = read.ids if read is not None else frozenset()
        # Redis lost its data (or may have): leases vanish until their holders re-assert
        # them within a heartbeat; that is no expiry to announce.
        changes = self.feedback.update(served, named=named, quiet=self.in_grace(now))
        b = self.stats
        b.leases = len(view.leases)
        b.invalid_leases = len(view.invalid)
        b.refused_leases = len(refused)
        partial = [x for x in served.leases if x.rejected and x.client_id not in refused]
        b.partial_leases = len(partial)
        b.rejected_streams = sum(len(lease.rejected) for lease in partial)
        if changes:
            self.stats.lease_expiries += log_changes(changes, self.log)
            for change in changes:
                if change.has_holder:
                    self._event(change.event(self.broker_id, now_ms))

    def _apply_union(self, now: float, noticed_at: float | None) -> None:
        """Admit the leases (and a held union during a grace) under the union's bounds."""
        base = self._grace_set if self.in_grace(now) else EMPTY
        leases_union = self.leases.union
        key = self._admitted_key
        if not (
            key and key[0] is leases_union and key[1] is base and key[2] == self.admission.version
        ):
            # Only when something changed: a heartbeat re-read of the same lease costs nothing.
            self.admission_result = self.admission.admit(self.leases.snapshot().leases, now, base)
            self._admitted_key = (leases_union, base, self.admission.version)
        self.controller.max_request_bytes = self.admission.byte_cap
        assert self.admission_result is not None
        wanted = self.admission_result.union
        if wanted == self.desired:
            return
        self.stats.union_recomputes += 1
        self.log.info(
            "union changed: %d streams from %d leases",
            len(wanted),
            len(self.leases.leases),
            extra={"event": "union", "streams": len(wanted), "leases": len(self.leases.leases)},
        )
        self.desired = wanted
        self.quiet.wanted(wanted, now)
        self.controller.set_desired(wanted, now, noticed_at)
        self._controller_changed = True

    def _finish_snapshots(self, now: float) -> None:
        replies, delivered = self.snapshots.finish(now)
        self._snapshots_open -= len(replies)
        for reply in replies:
            self._reply(reply)
        if delivered:
            self.controller.snapshot_streams_done(delivered)

    def _refresh_quiet(self, now: float) -> None:
        streams = self.quiet.refresh(self.controller.upstream, self.counters.publish.last_seen, now)
        if streams is None:
            return
        self.stats.quiet_refreshes += 1
        self.log.info(
            "quiet streams, asking for fresh snapshots: %s",
            ", ".join(f"{key.type}:{key.code}" for key in list(streams)[:10]),
        )
        self.controller.request_snapshot(streams, now)
        self._controller_changed = True


__all__ = [
    "MAX_SNAPSHOT_WAITERS",
    "REPLICATION_SLACK_MS",
    "LeaderCore",
    "OutEvent",
    "OutReply",
    "Wake",
]
