"""Prometheus metrics, read from the broker's status and counters at scrape time (I/O adapter).

Nothing here touches the hot path: the receive and publish loops only bump plain integers, and
this collector turns them into metric families when Prometheus scrapes. Everything the status
hash carries is read from it, decoded by the contract (``broker.contract.Status``), so a metric
and the status field of the same name cannot disagree (``frames_dropped``: every frame received
upstream that did not reach Redis, by reason); the rest (per-type and per-cause breakdowns,
snapshot sources, the batch histogram) comes from the broker's counters. Reading never changes
them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from broker.contract import DROP_REASONS, Status
from broker.core.stats import BATCH_BUCKETS
from broker.keys import parse_stream_name

if TYPE_CHECKING:
    from broker.service import Broker

PREFIX = "upbit_broker"


def batch_histogram(counts: Sequence[int], total: int) -> HistogramMetricFamily:
    """The ``publish_batch_size`` family from batch counts per bucket (:func:`batch_bucket`,
    the last one +Inf) and the sum of all batch sizes."""
    buckets = []
    running = 0
    for bound, n in zip(BATCH_BUCKETS, counts, strict=False):
        running += n
        buckets.append((str(bound), running))
    running += counts[len(BATCH_BUCKETS)]
    buckets.append(("+Inf", running))
    return HistogramMetricFamily(
        f"{PREFIX}_publish_batch_size",
        "Frames per publish pipeline",
        buckets=buckets,
        sum_value=total,
    )


def union_by_type(desired: dict[str, list[str]]) -> dict[str, int]:
    """Streams of a ``{stream: [codes]}`` union per data type (``orderbook@10000`` counts as
    ``orderbook``)."""
    counts: dict[str, int] = {}
    for stream, codes in desired.items():
        type_, _ = parse_stream_name(stream)
        counts[type_] = counts.get(type_, 0) + len(codes)
    return counts


class BrokerCollector:
    """Exposes one broker's counters and gauges."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def status(self) -> Status:
        """The broker's status, as the contract decodes the hash it writes."""
        return self.broker.status()

    def collect(self) -> Iterator[Any]:
        counters = self.broker.counters
        st = self.status()
        up, ctl, own = counters.upstream, counters.control, counters.broker

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        received = CounterMetricFamily(
            f"{PREFIX}_frames_received",
            "Data frames received upstream and routed, by type",
            labels=["type"],
        )
        for type_, n in sorted(counters.publish.published_by_type.items()):
            received.add_metric([type_], n)
        yield received
        yield counter(
            "frames_in", "Every frame read from upstream (data, status, errors)", st.frames_in
        )
        yield counter("frames_published", "Frames published to Redis channels", st.frames_published)
        dropped = CounterMetricFamily(
            f"{PREFIX}_frames_dropped",
            "Frames received upstream that did not reach Redis, by reason",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], getattr(st.frames_dropped_by_reason, reason))
        yield dropped
        yield batch_histogram(*self._batches())
        requests = CounterMetricFamily(
            f"{PREFIX}_upstream_requests", "Messages sent upstream, by kind", labels=["kind"]
        )
        requests.add_metric(["subscribe"], st.resubscribes)
        requests.add_metric(["list_subscriptions"], st.list_requests)
        requests.add_metric(["ping"], ctl.pings)
        yield requests
        yield counter(
            "upstream_deferred", "Sends that waited for the rate budget", st.deferred_sends
        )
        yield counter("resubscribes", "Full-set subscribe requests sent", st.resubscribes)
        yield counter(
            "verify_mismatches",
            "LIST_SUBSCRIPTIONS answers that did not match",
            st.verify_mismatches,
        )
        reconnects = CounterMetricFamily(
            f"{PREFIX}_reconnects", "Upstream reconnects, by cause", labels=["cause"]
        )
        reconnects.add_metric(["stall"], up.stalls)
        reconnects.add_metric(["error_frame"], up.error_frames)
        reconnects.add_metric(["connect_failed"], up.connect_failures)
        reconnects.add_metric(["closed"], max(0, st.reconnects - up.stalls - up.error_frames))
        yield reconnects
        yield counter(
            "fresh_connections",
            "Planned switches to a fresh upstream connection (the set shrank to nothing; no gap)",
            up.fresh_connection_switches,
        )
        yield gauge("leases", "Valid leases", st.leases)
        yield gauge("invalid_leases", "Leases skipped as invalid", st.invalid_leases)
        yield gauge("partial_leases", "Leases served in part", st.partial_leases)
        yield gauge(
            "rejected_streams", "Lease entries refused (unknown or bad)", st.rejected_streams
        )
        yield gauge(
            "refused_leases",
            "Valid leases not served for now (over the union's bounds, or quarantined)",
            st.refused_leases,
        )
        yield gauge(
            "unknown_codes",
            "type:code leases ask for that Upbit does not know",
            len(st.unknown_codes),
        )
        yield counter(
            "upstream_refusals",
            "Subscribe requests Upbit refused (close 1009, or an error frame)",
            st.upstream_refusals,
        )
        yield gauge(
            "request_bytes", "Size bound of the union's subscribe request", st.request_bytes
        )
        yield gauge(
            "request_bytes_cap", "Largest subscribe request the broker sends", st.request_bytes_cap
        )
        yield counter(
            "control_messages", "Messages read on the control channel", own.control_messages
        )
        yield counter(
            "control_ignored",
            "Control messages that named nothing readable (garbage, or past a tick's bound)",
            own.control_ignored,
        )
        yield counter("lease_events", "Lease events sent to holders", own.lease_events)
        union = GaugeMetricFamily(
            f"{PREFIX}_union_streams", "Streams in the desired union, by type", labels=["type"]
        )
        for type_, n in sorted(union_by_type(st.desired).items()):
            union.add_metric([type_], n)
        yield union
        last = st.last_frame_ms
        yield gauge(
            "seconds_since_last_frame",
            "Seconds since the last frame was published (-1: none yet)",
            (time.time() - last / 1000) if last else -1,
        )
        yield gauge("leader", "1 when this broker holds the leader lock", 1 if st.leader else 0)
        yield gauge("connected", "1 when connected upstream", 1 if st.connected else 0)
        yield gauge("epoch", "Upstream connection epoch", st.epoch)
        snaps = CounterMetricFamily(
            f"{PREFIX}_snapshot_requests", "Snapshot codes served, by source", labels=["source"]
        )
        snaps.add_metric(["cache"], own.snapshots_from_cache)
        snaps.add_metric(["upstream"], own.snapshots_from_upstream)
        yield snaps
        yield counter("redis_errors", "Redis errors", st.redis_errors)
        # Redis at maxmemory (broker.core.oom): the cause named, not only counted as errors
        yield gauge(
            "redis_oom",
            "1 while Redis refuses writes for memory (used memory over maxmemory)",
            1 if st.redis_oom_since_ms else 0,
        )
        yield counter(
            "redis_oom_refusals", "Writes Redis refused for memory", st.redis_oom_refusals
        )
        yield counter("history_written", "History entries written (XADD)", st.history_written)
        yield counter(
            "history_refused",
            "History entries Redis refused (announced as redis gaps)",
            st.history_refused,
        )
        yield gauge("backfill_pending", "Gaps waiting for their back-fill", st.backfill_pending)
        yield counter(
            "backfill_appended",
            "Entries the back-fill appended to the history over REST",
            st.backfill_appended,
        )
        yield counter(
            "backfill_streams_failed",
            "Streams a back-fill could not complete",
            st.backfill_streams_failed,
        )
        yield counter("backfill_requests", "REST requests of the back-fill", st.backfill_requests)
        yield counter(
            "backfill_rate_limited",
            "REST requests Upbit refused for the rate (429, 418)",
            st.backfill_rate_limited,
        )
        follow_ups = CounterMetricFamily(
            f"{PREFIX}_gap_follow_ups",
            "Gap follow-ups after the back-fill, by state",
            labels=["state"],
        )
        for state, n in (
            ("filled", st.gaps_filled),
            ("partial", st.gaps_partial),
            ("lost", st.gaps_lost),
        ):
            follow_ups.add_metric([state], n)
        yield follow_ups
        stale = st.cache_stale_since_ms
        yield gauge(
            "cache_stale_seconds",
            "Seconds the last-value cache has lacked published frames (0: current)",
            max(0.0, time.time() - stale / 1000) if stale else 0,
        )

    def _batches(self) -> tuple[Sequence[int], int]:
        """Publish batches per size bucket, and the sum of their sizes, since the start (the
        publisher keeps them as counts: a scrape only reads)."""
        publish = self.broker.counters.publish
        return publish.batch_counts, publish.batch_frames


def make_registry(broker: Broker) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    return registry


def start_metrics_server(broker: Broker, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``port`` in a background thread; returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=make_registry(broker))
    return server
