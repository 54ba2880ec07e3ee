"""Prometheus metrics as a user gets them: ``upbit-broker run --metrics-port`` as a process,
against redis-server and the simulator, ``/metrics`` scraped over HTTP.

The names must be exactly those README.md documents (what alert rules are written
against), and the counters must move while frames flow.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from broker.contract import decode_status
from broker.testing import free_port, scaled, wait_for, write_lease
from tests.support.sim import running_simulator

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "README.md"
NS = "t"


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "upbit-broker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


@contextmanager
def broker_process(
    redis_url: str, upstream_url: str, broker_id: str, metrics_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``upbit-broker run --metrics-port P`` with settings fast enough for a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env.update(
        {
            "UPBIT_BROKER_REDIS_URL": redis_url,
            "UPBIT_BROKER_UPSTREAM_URL": upstream_url,
            "UPBIT_BROKER_NAMESPACE": NS,
            "UPBIT_BROKER_BROKER_ID": broker_id,
            "UPBIT_BROKER_LEADER_TTL": "1.5",
            "UPBIT_BROKER_STATUS_INTERVAL": "0.2",
            "UPBIT_BROKER_COALESCE_DELAY": "0.02",
            "UPBIT_BROKER_BACKOFF_INITIAL": "0.2",
        }
    )
    proc = subprocess.Popen(
        [*entry_point(), "run", "--metrics-port", str(metrics_port), "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scrape:
    """One ``/metrics`` answer: family names and types, and every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def exposed_names(self) -> set[str]:
        """Names as PromQL sees them: counters with ``_total``."""
        return {n + "_total" if t == "counter" else n for n, t in self.types.items()}


def fetch(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            body: bytes = r.read()
            return body.decode()
    except OSError:
        return None  # not listening yet


async def scrape_when(
    port: int, ready: Callable[[Scrape], bool], within: float, what: str
) -> Scrape:
    """Scrape until ``ready(scrape)`` holds (the broker is a separate process)."""

    async def attempt() -> Scrape | None:
        text = await asyncio.to_thread(fetch, port)
        if text is None:
            return None
        scrape = Scrape(text)
        return scrape if ready(scrape) else None

    return await wait_for(attempt, within, interval=0.05, message=what)


def documented_metrics() -> set[str]:
    """The metric names of README.md's metrics table (``| `upbit_broker_...` |``)."""
    names = re.findall(r"^\| `(upbit_broker_[a-z_]+)`", DOCS.read_text(), re.MULTILINE)
    assert names, "README.md lists no metrics"
    return set(names)


async def test_metrics_move_while_frames_flow(redis_client: aioredis.Redis, redis_url: str) -> None:
    leader_port, standby_port = free_port(), free_port()
    async with running_simulator(seed=11, rate=300) as sim:
        await write_lease(
            redis_client,
            "metrics-test",
            {"ticker": ["KRW-BTC", "KRW-ETH"], "trade": ["KRW-BTC"]},
            ttl_ms=120_000,
            namespace=NS,
        )
        with broker_process(redis_url, sim.url, "leader", leader_port):
            first = await scrape_when(
                leader_port,
                lambda m: (
                    m("upbit_broker_connected") == 1
                    and m("upbit_broker_frames_received_total", type="ticker") > 0
                    and m("upbit_broker_frames_received_total", type="trade") > 0
                ),
                20,
                "the leader connected and publishing",
            )
            with broker_process(redis_url, sim.url, "standby", standby_port):
                standby = await scrape_when(
                    standby_port, lambda m: True, 15, "the standby's metrics"
                )
                second = await scrape_when(
                    leader_port,
                    lambda m: (
                        m("upbit_broker_frames_published_total")
                        > first("upbit_broker_frames_published_total")
                        and m("upbit_broker_frames_received_total", type="ticker")
                        > first("upbit_broker_frames_received_total", type="ticker")
                        # LIST_SUBSCRIPTIONS confirms the subscription (verify is on by default)
                        and m("upbit_broker_upstream_requests_total", kind="list_subscriptions")
                        >= 1
                    ),
                    10,
                    "more frames published and the subscription verified",
                )

    # Exactly the documented names, on the leader and on the standby.
    assert first.exposed_names() == documented_metrics()
    assert standby.exposed_names() == documented_metrics()

    for m in (first, second):
        assert m("upbit_broker_leader") == 1
        assert m("upbit_broker_connected") == 1
        assert m("upbit_broker_epoch") >= 1
        assert m("upbit_broker_leases") == 1
        assert m("upbit_broker_invalid_leases") == 0
        assert m("upbit_broker_union_streams", type="ticker") == 2
        assert m("upbit_broker_union_streams", type="trade") == 1
        assert m("upbit_broker_upstream_requests_total", kind="subscribe") >= 1
        assert 0 <= m("upbit_broker_seconds_since_last_frame") < 5
        assert m("upbit_broker_reconnects_total", cause="closed") == 0
        assert m("upbit_broker_redis_errors_total") == 0
        for reason in ("unleased", "malformed", "overflow", "not_leader"):
            assert ("upbit_broker_frames_dropped_total", (("reason", reason),)) in m.samples
        # The histogram is well formed: +Inf holds every observation.
        count = m("upbit_broker_publish_batch_size_count")
        assert count > 0 and m("upbit_broker_publish_batch_size_bucket", le="+Inf") == count
    # Counters only go up, and they did.
    for name, labels in first.samples:
        if first.types.get(name.removesuffix("_total")) == "counter":
            assert second.samples[(name, labels)] >= first.samples[(name, labels)], name
    assert second("upbit_broker_frames_in_total") > first("upbit_broker_frames_in_total")
    assert second("upbit_broker_publish_batch_size_count") >= count

    # The standby waits: not leader, not connected, nothing published yet.
    assert standby("upbit_broker_leader") == 0
    assert standby("upbit_broker_connected") == 0
    assert standby("upbit_broker_seconds_since_last_frame") == -1
    assert standby("upbit_broker_frames_published_total") == 0


# -- the collector in-process: what it reads, no broker process ---------------------------------


def stub_broker(status_fields: dict[str, str], batch_sizes: list[int] | None = None) -> Any:
    """The parts of a Broker the collector reads: its status hash and its counters."""
    from types import SimpleNamespace

    from broker.core.stats import Counters

    counters = Counters()
    counters.publish.published_by_type["ticker"] = 7
    for size in batch_sizes or []:
        counters.publish.record_batch(size)
    status = decode_status(status_fields)
    return SimpleNamespace(status=lambda: status, counters=counters)


def collected(broker: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from broker.metrics import BrokerCollector

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in BrokerCollector(broker).collect():
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_and_status_share_one_definition_of_dropped_frames() -> None:
    from broker.contract import DroppedFrames, Status, encode_status

    dropped = DroppedFrames(unleased=5, malformed=2, overflow=1, not_leader=3, redis=4)
    status = Status(
        leader="b1",
        connected=True,
        epoch=6,
        frames_in=40,
        frames_published=25,
        frames_dropped_by_reason=dropped,
        verify_mismatches=1,
        deferred_sends=2,
        resubscribes=3,
        list_requests=3,
        desired={"ticker": ["KRW-BTC", "KRW-ETH"], "orderbook@10000": ["KRW-BTC.5"]},
        last_frame_ms=0,
    )
    m = collected(stub_broker(encode_status(status)))
    by_reason = {dict(k)["reason"]: v for k, v in m["upbit_broker_frames_dropped_total"].items()}
    assert by_reason == {
        "unleased": 5,
        "malformed": 2,
        "overflow": 1,
        "not_leader": 3,
        "redis": 4,
    }
    assert sum(by_reason.values()) == status.frames_dropped == 15
    assert m["upbit_broker_frames_in_total"][()] == 40
    assert m["upbit_broker_verify_mismatches_total"][()] == 1
    assert m["upbit_broker_upstream_deferred_total"][()] == 2
    assert m["upbit_broker_union_streams"] == {
        (("type", "orderbook"),): 1,
        (("type", "ticker"),): 2,
    }
    assert m["upbit_broker_leader"][()] == 1 and m["upbit_broker_epoch"][()] == 6
    assert m["upbit_broker_seconds_since_last_frame"][()] == -1


def test_the_batch_histogram_counts_every_batch_once() -> None:
    from broker.contract import Status, encode_status
    from broker.core.stats import BATCH_BUCKETS, batch_bucket
    from broker.metrics import BrokerCollector

    assert [batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 2048, 2049, 10**6)] == [
        0,
        0,
        1,
        2,
        2,
        3,
        len(BATCH_BUCKETS) - 1,
        len(BATCH_BUCKETS),
        len(BATCH_BUCKETS),
    ]
    sizes = [1, 3, 3, 5000]
    broker = stub_broker(encode_status(Status()), batch_sizes=sizes)
    collector = BrokerCollector(broker)

    def histogram() -> dict[str, float]:
        [family] = [f for f in collector.collect() if f.name.endswith("publish_batch_size")]
        return {s.labels.get("le", s.name): s.value for s in family.samples}

    first = histogram()
    assert first["1"] == 1 and first["4"] == 3 and first["2048"] == 3 and first["+Inf"] == 4
    assert first["upbit_broker_publish_batch_size_sum"] == 5007
    assert histogram() == first  # a second scrape counts nothing twice
