"""The Redis Cluster benchmark's pure part: the one-redis/cluster comparison and its table, on a
synthetic record (the benchmark runs with ``python -m benchmarks --only cluster``;
``--quick --only cluster`` is its smoke run), and the sharded benchmark consumer against a real
cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import harness as h
from benchmarks import report
from benchmarks.__main__ import SECTIONS
from benchmarks.bench_cluster import compare
from broker.cluster_slots import key_slot
from broker.testing import wait_for
from broker.testing.cluster import running_cluster


def _run(mode: str, n: int, deliveries: float, redis: dict[str, float]) -> dict[str, Any]:
    return {
        "mode": mode,
        "consumers": n,
        "offered_fps": 5000.0,
        "deliveries_per_s": deliveries,
        "expected_deliveries_per_s": 5000.0 * n,
        "loss": 0,
        "broker_cpu_us_per_frame": 10.0 if mode == "single" else 11.0,
        "redis_cores": redis,
        "redis_us_per_delivery": 1.5,
        "consumer_cores": 0.5,
        "machine_cpu_cores_busy_all_processes": 1.0,
        "other_load_cores": 0.01,
        "clock": "schedstat",
        "limited_by": "-",
    }


def test_cluster_is_a_section_and_its_table_compares_the_two_ways() -> None:
    assert "cluster" in SECTIONS
    runs = [
        _run("single", 32, 100_000.0, {"redis": 0.95}),
        _run("cluster", 32, 150_000.0, {"redis-1": 0.4, "redis-2": 0.35, "redis-3": 0.3}),
        _run("single", 4, 20_000.0, {"redis": 0.2}),
    ]
    pairs = compare(runs)
    assert [p["consumers"] for p in pairs] == [32]  # 4 ran one way only
    assert pairs[0]["deliveries_per_s"] == [100_000.0, 150_000.0]
    assert pairs[0]["busiest_redis_cores"] == [0.95, 0.4]
    assert pairs[0]["all_redis_cores"] == [0.95, 1.05]
    assert pairs[0]["broker_cpu_us_per_frame"] == [10.0, 11.0]
    record = {
        "mode": "full",
        "started": "2026-12-05T08:00:00+0000",
        "machine": {
            "cpu_model": "test",
            "cpus": 2,
            "memory_bytes": 2**30,
            "git": "x",
            "versions": {"python": "3.11"},
        },
        "cluster": {
            "target_fps": 5000.0,
            "codes": 200,
            "types": ["ticker", "trade", "orderbook"],
            "masters": 3,
            "duration_s": 5.0,
            "runs": runs,
            "compare": pairs,
        },
    }
    text = report.table(record)
    assert "12. Redis Cluster, sharded pub/sub" in text
    assert "0.400/0.350/0.300" in text and "100000 -> 150000" in text


@pytest.mark.slow
async def test_the_sharded_consumer_hears_every_master(tmp_path: Path) -> None:
    """``benchmarks.consumer hiredis-sharded``: SSUBSCRIBE on each channel's master, frames
    SPUBLISHed on all three counted."""
    import redis.asyncio as aioredis

    async with running_cluster(tmp_path) as cluster:
        channels = [f"bench:ticker:KRW-C{i}" for i in range(30)]
        owners = {c: await cluster.owner(key_slot(c)) for c in channels}
        assert len(set(owners.values())) == 3
        lines = [f"{owners[c]} {c}" for c in channels]
        with h.consumers(1, "hiredis-sharded", channels=lines) as (consumer,):
            for channel, port in owners.items():
                client = aioredis.Redis(port=port)
                try:
                    await client.execute_command("SPUBLISH", channel, b'{"x":1}')
                finally:
                    await client.aclose()
            await wait_for(lambda: consumer.count() == len(channels), 10, message="all frames")
            assert consumer.finish()["frames"] == len(channels)
