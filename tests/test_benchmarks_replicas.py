"""The replica fan-out benchmark's pure part: verdicts, the master/replicas comparison and its
table, on a synthetic record (the benchmark itself runs with ``python -m benchmarks --only
replicas``; ``--quick --only replicas`` is its smoke run)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import report
from benchmarks.__main__ import SECTIONS
from benchmarks.bench_replicas import compare, limited_by, per_core


def _run(
    mode: str, n: int, deliveries: float, redis: dict[str, float], **extra: Any
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "mode": mode,
        "consumers": n,
        "target_fps": 5000.0,
        "offered_fps": 5000.0,
        "deliveries_per_s": deliveries,
        "expected_deliveries_per_s": 5000.0 * n,
        "keeps_up": deliveries >= 0.97 * 5000.0 * n,
        "loss": 0,
        "broker_cpu_us_per_frame": 10.0,
        "broker_cpu_cores": 0.05,
        "redis_cores": redis,
        "redis_us_per_delivery": 1.5,
        "deliveries_per_redis_core": 380_000,
        "consumer_cores": 0.5,
        "machine_cpu_cores_busy_all_processes": 1.0,
        "other_load_cores": 0.01,
        "clock": "schedstat",
    }
    run.update(extra)
    run["limited_by"] = limited_by(run, 2)
    return run


def _record() -> dict[str, Any]:
    three = {"redis-master": 0.0, "redis-replica1": 0.0, "redis-replica2": 0.0}
    runs = [
        _run("master", 4, 20_000.0, {**three, "redis-master": 0.20}),
        _run("replicas", 4, 20_000.0, {**three, "redis-master": 0.03, "redis-replica1": 0.1}),
        _run("master", 32, 100_000.0, {**three, "redis-master": 0.95}),
        _run(
            "replicas",
            32,
            150_000.0,
            {**three, "redis-master": 0.05, "redis-replica1": 0.5, "redis-replica2": 0.5},
            machine_cpu_cores_busy_all_processes=1.95,
        ),
    ]
    return {
        "mode": "full",
        "started": "2026-12-05T05:45:00+0000",
        "machine": {
            "cpu_model": "test cpu",
            "cpus": 2,
            "memory_bytes": 2**30,
            "git": "abc1234",
            "versions": {"python": "3.11"},
        },
        "replicas": {
            "target_fps": 5000.0,
            "codes": 200,
            "types": ["ticker", "trade", "orderbook"],
            "replicas": 2,
            "duration_s": 5.0,
            "runs": runs,
            "compare": compare(runs),
        },
    }


def test_replicas_is_a_section_of_the_benchmarks() -> None:
    assert "replicas" in SECTIONS


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        ({}, "-"),
        ({"keeps_up": False, "redis_cores": {"redis-master": 0.93}}, "redis-master (one thread)"),
        ({"loss": 3, "broker_cpu_cores": 0.99}, "broker"),
        (
            {"keeps_up": False, "machine_cpu_cores_busy_all_processes": 1.9},
            "machine (2 cores busy)",
        ),
        ({"keeps_up": False}, "consumers"),
    ],
)
def test_limited_by_names_what_held_a_run_back(changes: dict[str, Any], verdict: str) -> None:
    run = _run("master", 4, 20_000.0, {"redis-master": 0.2})
    run.update(changes)
    assert limited_by(run, 2) == verdict


def test_compare_pairs_the_two_ways_of_each_consumer_count() -> None:
    record = _record()
    pairs = record["replicas"]["compare"]
    assert [c["consumers"] for c in pairs] == [4, 32]
    big = pairs[1]
    assert big["deliveries_per_s"] == [100_000.0, 150_000.0]
    assert big["deliveries_ratio"] == 1.5
    assert big["busiest_redis_cores"] == [0.95, 0.5]
    assert big["all_redis_cores"] == [0.95, 1.05]
    assert big["broker_cpu_us_per_frame"] == [10.0, 10.0]
    # A count run only one way has nothing to compare with.
    assert compare(record["replicas"]["runs"][:1]) == []


def test_deliveries_per_core_is_the_lowest_of_the_serving_servers() -> None:
    served = {"redis-replica1": 80_000.0, "redis-replica2": 60_000.0}
    cores = {"redis-master": 0.08, "redis-replica1": 0.1, "redis-replica2": 0.2}
    assert per_core(served, cores) == 300_000
    assert per_core(served, {"redis-replica1": 0.0}) is None


def test_the_table_prints_every_run_and_the_comparison() -> None:
    record = _record()
    text = report.table(record)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("11. Fan-out from replicas"))
    rows = lines[start + 2 : start + 6]
    assert [row.split()[:2] for row in rows] == [
        ["4", "master"],
        ["4", "replicas"],
        ["32", "master"],
        ["32", "replicas"],
    ]
    assert rows[2].endswith("redis-master (one thread)")
    assert rows[3].endswith("machine (2 cores busy)")
    assert "0.950" in rows[2] and "150000" in rows[3] and "380k" in rows[3]
    assert any("100000 -> 150000 (1.50x)" in line for line in lines[start + 6 :])
