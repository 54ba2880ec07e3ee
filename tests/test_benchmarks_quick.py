"""The benchmarks run: ``python -m benchmarks --quick`` exits 0 and writes its JSON record.

Benchmarks are not tests: nothing here checks a timing or a rate, only that every section ran
and left figures of the expected shape (so ``make bench`` keeps working). It is the one
benchmark run in the normal suite; the quick mode takes under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "machine",
    "settings",
    "hotpath",
    "throughput",
    "latency",
    "resubscribe",
    "recovery",
    "scale",
    "ceilings",
    "cryptofeed",
    "summary",
)


@pytest.mark.timeout(240)
def test_quick_benchmarks_run_and_write_a_record(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Goals" in proc.stdout  # the table was printed
    record = json.loads(out.read_text())
    assert record["mode"] == "quick"
    for section in SECTIONS:
        assert section in record, section
    assert record["machine"]["cpus"] >= 1
    assert {"python", "redis"} <= set(record["machine"]["versions"])

    runs = record["throughput"]["runs"]
    assert [(r["target_fps"], r["consumers"]) for r in runs] == [(1000, 1), (5000, 1)]
    for r in runs:
        assert r["delivered_fps"] > 0
        assert r["broker_cpu_us_per_frame"] > 0
        assert r["broker_rss_bytes"] > 0
        assert len(r["received_each"]) == 1
        # the same-rate baseline: a bare websockets client on the simulator
        assert r["bare_client_cpu_us_per_frame"] > 0
        assert r["broker_own_cpu_us_per_frame"] is not None

    latency = record["latency"]["runs"][0]
    assert "error" not in latency["floor"], latency["floor"]
    for path in ("broker", "direct", "floor"):
        assert latency[path]["frames"] > 0
        assert {"p50_us", "p99_us", "p999_us", "max_us"} <= set(latency[path])
        assert latency[path]["other_load_cores"] is not None
    # the floor path: the floor consumer on uvloop publishing on its own channels, timed by the
    # hiredis subscriber on them (no frames there would have failed the window)
    floor, direct = latency["floor"], latency["direct"]
    assert floor["loop"] == "uvloop" and "process_error" not in floor, floor
    assert latency["floor_added"] == {
        k: round(floor[k] - direct[k], 1) for k in ("p50_us", "p99_us", "p999_us")
    }
    goal = record["summary"]["added_p99_us_issue16"]["1k"]
    assert goal["goal"] == 500 and goal["floor_value"] == latency["floor_added"]["p99_us"]
    assert "added p99 < 0.5 ms at 1k frames/s (issue 16): " in proc.stdout
    assert "      1k floor " in proc.stdout

    resub = record["resubscribe"]
    assert resub["idle"]["changes"] == len(resub["idle"]["ms_each"])
    assert resub["churn"]["lease_writes"] > 0
    assert "final_set_exact" in resub["churn"]

    recovery = record["recovery"]
    assert recovery["drop"]["drops"] >= 1
    assert "takeover_ms" in recovery["leader_kill"]

    scale = record["scale"]
    assert scale["leases"] == 1000 and scale["codes"] == 800
    assert scale["broker_rss_after_bytes"] > 0
    assert scale["heartbeats"]["renewals_per_s"] > 0 and scale["heartbeats"]["broker_cpu_cores"] > 0

    ceilings = record["ceilings"]
    assert ceilings["redis_publish"]["publish_per_s"] > 0
    assert ceilings["websocket_receive"]["frames_per_s"] > 0

    hotpath = record["hotpath"]
    assert hotpath["hot_path_ns"] > 0

    cryptofeed = record["cryptofeed"]
    assert cryptofeed.get("skipped") or cryptofeed["runs"], cryptofeed
    for run in cryptofeed["runs"]:
        assert run["cryptofeed"]["cpu_us_per_frame"] is not None
        assert run["broker"]["handled_fps"] > 0
