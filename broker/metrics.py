"""Prometheus metrics, read from the broker's counters at scrape time (I/O adapter).

Nothing here touches the hot path: the receive and publish loops only bump plain integers, and
this collector turns them into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from broker.service import Broker

PREFIX = "upbit_broker"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class BrokerCollector:
    """Exposes one broker's counters and gauges."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._hist_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self._hist_sum = 0

    def collect(self) -> Iterator[Any]:
        b = self.broker
        up = b.upstream.stats if b.upstream else None
        pub = b.publisher.stats if b.publisher else None
        ctl = b.controller.stats if b.controller else None

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        received = CounterMetricFamily(
            f"{PREFIX}_frames_received",
            "Data frames received upstream and routed, by type",
            labels=["type"],
        )
        if b.publisher is not None:
            for type_, n in sorted(b.publisher.published_by_type.items()):
                received.add_metric([type_], n)
        yield received
        yield counter(
            "frames_in",
            "Every frame read from upstream (data, status, errors)",
            up.frames_in if up else 0,
        )
        yield counter(
            "frames_published", "Frames published to Redis channels", pub.published if pub else 0
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_frames_dropped", "Frames dropped, by reason", labels=["reason"]
        )
        dropped.add_metric(["unleased"], up.dropped_unleased if up else 0)
        dropped.add_metric(["malformed"], up.malformed if up else 0)
        dropped.add_metric(["overflow"], pub.dropped_overflow if pub else 0)
        dropped.add_metric(["not_leader"], pub.dropped_not_leader if pub else 0)
        dropped.add_metric(["redis"], pub.dropped_redis if pub else 0)
        yield dropped
        yield self._batch_histogram()
        requests = CounterMetricFamily(
            f"{PREFIX}_upstream_requests", "Messages sent upstream, by kind", labels=["kind"]
        )
        requests.add_metric(["subscribe"], ctl.subscribe_requests if ctl else 0)
        requests.add_metric(["list_subscriptions"], ctl.list_requests if ctl else 0)
        requests.add_metric(["ping"], ctl.pings if ctl else 0)
        yield requests
        yield counter(
            "upstream_deferred", "Sends that waited for the rate budget", ctl.deferred if ctl else 0
        )
        yield counter(
            "resubscribes", "Full-set subscribe requests sent", ctl.subscribe_requests if ctl else 0
        )
        yield counter(
            "verify_mismatches",
            "LIST_SUBSCRIPTIONS answers that did not match",
            ctl.verify_mismatches if ctl else 0,
        )
        reconnects = CounterMetricFamily(
            f"{PREFIX}_reconnects", "Upstream reconnects, by cause", labels=["cause"]
        )
        if up is not None:
            reconnects.add_metric(["stall"], up.stalls)
            reconnects.add_metric(["error_frame"], up.error_frames)
            reconnects.add_metric(["connect_failed"], up.connect_failures)
            reconnects.add_metric(["closed"], max(0, up.reconnects - up.stalls - up.error_frames))
        yield reconnects
        yield counter(
            "fresh_connections",
            "Planned switches to a fresh upstream connection (the set shrank to nothing; no gap)",
            up.fresh_connection_switches if up else 0,
        )
        yield gauge("leases", "Valid leases", b.stats.leases)
        yield gauge("invalid_leases", "Leases skipped as invalid", b.stats.invalid_leases)
        yield gauge("partial_leases", "Leases served in part", b.stats.partial_leases)
        yield gauge(
            "rejected_streams", "Lease entries refused (unknown or bad)", b.stats.rejected_streams
        )
        yield counter("lease_events", "Lease events sent to holders", b.stats.lease_events)
        union = GaugeMetricFamily(
            f"{PREFIX}_union_streams", "Streams in the desired union, by type", labels=["type"]
        )
        counts: dict[str, int] = {}
        for key in b.desired:
            counts[key.type] = counts.get(key.type, 0) + 1
        for type_, n in sorted(counts.items()):
            union.add_metric([type_], n)
        yield union
        last = b.publisher.last_publish_ms if b.publisher else 0
        yield gauge(
            "seconds_since_last_frame",
            "Seconds since the last frame was published (-1: none yet)",
            (time.time() - last / 1000) if last else -1,
        )
        yield gauge("leader", "1 when this broker holds the leader lock", 1 if b.is_leader else 0)
        yield gauge(
            "connected",
            "1 when connected upstream",
            1 if (b.upstream and b.upstream.connected) else 0,
        )
        yield gauge("epoch", "Upstream connection epoch", b.epoch)
        snaps = CounterMetricFamily(
            f"{PREFIX}_snapshot_requests", "Snapshot codes served, by source", labels=["source"]
        )
        snaps.add_metric(["cache"], b.stats.snapshots_from_cache)
        snaps.add_metric(["upstream"], b.stats.snapshots_from_upstream)
        yield snaps
        yield counter(
            "redis_errors", "Redis errors", b.stats.redis_errors + (pub.redis_errors if pub else 0)
        )

    def _batch_histogram(self) -> HistogramMetricFamily:
        b = self.broker
        if b.publisher is not None:
            sizes = b.publisher.stats.batch_sizes
            b.publisher.stats.batch_sizes = []
            for n in sizes:
                self._hist_sum += n
                for i, bound in enumerate(BATCH_BUCKETS):
                    if n <= bound:
                        self._hist_counts[i] += 1
                        break
                else:
                    self._hist_counts[-1] += 1
        buckets = []
        running = 0
        for bound, n in zip(BATCH_BUCKETS, self._hist_counts, strict=False):
            running += n
            buckets.append((str(bound), running))
        running += self._hist_counts[-1]
        buckets.append(("+Inf", running))
        return HistogramMetricFamily(
            f"{PREFIX}_publish_batch_size",
            "Frames per publish pipeline",
            buckets=buckets,
            sum_value=self._hist_sum,
        )


def make_registry(broker: Broker) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    return registry


def start_metrics_server(broker: Broker, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``port`` in a background thread; returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=make_registry(broker))
    return server
