"""Every counter of one broker process (pure: plain dataclasses).

The broker owns one :class:`Counters` for its whole life and hands each part to the piece that
bumps it: the upstream adapter, the publisher, the subscription controller, the leader core and
the back-fill.
Each leader phase builds new adapters around the same counters, so the status and the metrics
never go backwards. The hot paths only add to plain integers here and readers only read them
(a metrics scrape changes nothing: the burst-size histogram is kept here as bucket counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.core.oom import OomWatch
from broker.upbit.types import StreamKey

#: upper bounds of the burst-size histogram's buckets (``publish_batch_size``; then +Inf)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def batch_bucket(size: int) -> int:
    """Index of the :data:`BATCH_BUCKETS` bound ``size`` falls under (``len``: above them all)."""
    return min(max(size - 1, 0).bit_length(), len(BATCH_BUCKETS))


@dataclass(slots=True)
class UpstreamStats:
    """Bumped by ``broker.upstream`` (the receive loop and the connection loop)."""

    frames_in: int = 0
    malformed: int = 0
    dropped_unleased: int = 0
    status_frames: int = 0
    error_frames: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    stalls: int = 0
    fresh_connection_switches: int = 0
    #: why the last connection (or connection attempt) ended ("": none yet), for the status
    last_error: str = ""


@dataclass(slots=True)
class PublishStats:
    """Bumped by ``broker.publisher`` once per burst."""

    published: int = 0
    batches: int = 0
    largest_batch: int = 0
    dropped_overflow: int = 0
    dropped_not_leader: int = 0
    #: frames Redis never confirmed: it could not be reached, or the connection broke (or
    #: timed out) with them unanswered (they may or may not have been published)
    dropped_redis: int = 0
    redis_errors: int = 0
    #: commands Redis answered with an error (their frames still count in ``published``)
    reply_errors: int = 0
    #: the part of ``reply_errors`` Redis refused for memory (maxmemory: ``broker.core.oom``)
    oom_refusals: int = 0
    #: history entries written (XADD beside the PUBLISH, ``{ns}:hist:...``), and those whose
    #: burst Redis answered with an error (at maxmemory: ``-OOM``); a refused history entry
    #: is a frame a durable consumer cannot read, so it is announced as a ``redis`` gap
    history_written: int = 0
    history_refused: int = 0
    #: wall clock (ms) of the first burst whose cache write Redis refused, while the
    #: last-value cache lacks frames published since (0: the cache has every frame)
    cache_stale_since_ms: int = 0
    #: bursts per size bucket (:func:`batch_bucket`; the last one: above every bound)
    batch_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    #: frames in all bursts (the histogram's sum)
    batch_frames: int = 0
    #: frames published per stream type
    published_by_type: dict[str, int] = field(default_factory=dict)
    #: monotonic time of the last publish of each stream (quiet-stream detection)
    last_seen: dict[StreamKey, float] = field(default_factory=dict)
    #: wall clock (ms) of the last publish (0: none yet)
    last_publish_ms: int = 0

    def record_batch(self, frames: int) -> None:
        """One burst of ``frames`` went out."""
        self.batch_counts[batch_bucket(frames)] += 1
        self.batch_frames += frames


@dataclass(slots=True)
class ControllerStats:
    """Bumped by :class:`broker.core.control.SubscriptionController`."""

    subscribe_requests: int = 0
    list_requests: int = 0
    pings: int = 0
    deferred: int = 0  # times a wanted send waited for the rate budget
    verify_mismatches: int = 0
    verified: int = 0
    #: sets LIST_SUBSCRIPTIONS kept not matching after MAX_RESENDS: reported, not resent
    verify_given_up: int = 0
    #: snapshot fetches that found no room in a request (answered by the desk's timeout)
    snapshot_fetches_dropped: int = 0


@dataclass(slots=True)
class BrokerStats:
    """Bumped by the leader core (leases, commands, snapshots) and the service (Redis errors,
    leadership)."""

    leases: int = 0
    invalid_leases: int = 0
    #: leases served only in part (some entries of ``subs`` rejected), and those entries
    partial_leases: int = 0
    rejected_streams: int = 0
    #: valid leases not served for now (``broker.core.admission``)
    refused_leases: int = 0
    #: reads of Upbit's market list that failed
    market_list_errors: int = 0
    lease_expiries: int = 0
    #: ``lease`` events published to holders (invalid, partial, expired, ok again)
    lease_events: int = 0
    #: full reads of every lease (periodic, at a deadline, or when a change cannot be pinned)
    lease_listings: int = 0
    #: single leases read because a control message named them (heartbeats, changes)
    lease_reads: int = 0
    #: messages read on ``{ns}:control`` (a flood shows here first)
    control_messages: int = 0
    #: control messages naming no lease and no command, or one id too many for a read:
    #: together they cost at most one full listing per gap (``broker.core.reconcile``)
    control_ignored: int = 0
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
    #: writes of the leader phase Redis refused for memory (the publisher counts its own)
    oom_refusals: int = 0


@dataclass(slots=True)
class BackfillStats:
    """Bumped by the back-fill of upstream gaps (``broker.core.backfill`` through the leader
    core; ``broker.backfill`` and ``broker.rest`` for what they fetch and append)."""

    #: gaps queued for a back-fill, and the jobs that ran (gaps queued together share one)
    gaps: int = 0
    jobs: int = 0
    #: trade and candle streams back-filled, and those not complete after it (a failed
    #: fetch, the page limit, the deadline)
    streams: int = 0
    streams_failed: int = 0
    #: entries appended to the history (``origin`` = ``rest``)
    appended: int = 0
    #: REST requests sent, those that failed (unreachable, timeout, an HTTP error, an answer
    #: that is not what was asked), and Upbit's refusals for the rate (429, 418)
    requests: int = 0
    request_errors: int = 0
    rate_limited: int = 0
    #: follow-up events by state
    filled: int = 0
    partial: int = 0
    lost: int = 0


@dataclass(slots=True)
class Counters:
    """One broker process's counters, by the piece that bumps them."""

    broker: BrokerStats = field(default_factory=BrokerStats)
    upstream: UpstreamStats = field(default_factory=UpstreamStats)
    publish: PublishStats = field(default_factory=PublishStats)
    control: ControllerStats = field(default_factory=ControllerStats)
    #: Redis at maxmemory: episodes, refusals, the last INFO memory reading
    oom: OomWatch = field(default_factory=OomWatch)
    #: the back-fill of upstream gaps over REST
    backfill: BackfillStats = field(default_factory=BackfillStats)


__all__ = [
    "BATCH_BUCKETS",
    "BackfillStats",
    "BrokerStats",
    "ControllerStats",
    "Counters",
    "PublishStats",
    "UpstreamStats",
    "batch_bucket",
]
