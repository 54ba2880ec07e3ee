"""The gateway benchmark runs: ``python -m benchmarks --quick --only gateway`` exits 0 and
writes a record of the expected shape.

A benchmark, not a test of speed: nothing here checks a timing or a rate (those are the
benchmark's to report, docs/performance.md), only that every part ran with real processes
(simulator, broker, ``upbit-broker gateway``, raw WebSocket clients) and left its figures, so
``python -m benchmarks --only gateway`` keeps working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_quick_gateway_benchmark_runs_and_writes_a_record(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "gateway", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10. Gateway" in proc.stdout and "Goals" in proc.stdout  # the table was printed
    record = json.loads(out.read_text())
    assert record["errors"] == {}
    gw = record["gateway"]

    [fanout] = gw["fanout"]
    assert fanout["clients"] == 10 and fanout["streams_per_client"] == 600
    assert fanout["client_frames_per_s"] > 0 and fanout["us_per_client_frame"] > 0
    assert fanout["gateway_rss_bytes"] > 0 and fanout["gateway_alive"]
    assert fanout["min_frames_per_client"] > 0  # every client received frames

    latency = gw["latency"]
    for path in ("direct", "broker", "gateway"):
        assert latency[path]["frames"] > 0, path
        assert {"p50_us", "p99_us", "p999_us", "max_us", "missing"} <= set(latency[path])
    assert "added_over_broker_p99_us" in latency and "added_over_direct_p99_us" in latency
    assert latency["added_per_frame"]["frames"] > 0  # the same frames on both paths

    many = gw["many"]
    assert many["clients"] == 100 and many["client_processes"] > 1
    # (not every one of them: a client of the many-clients run holds a few codes, and in a
    # quick run's 2 s the quiet ones may have sent nothing yet; 1 and 0 were seen under load)
    assert many["client_frames_per_s"] > 0 and many["min_frames_per_client"] >= 0
    assert many["latency"]["frames"] > 0 and many["broker_path_latency"]["frames"] > 0
    assert many["added_per_frame"]["frames"] > 0
    assert many["rss_per_client_bytes"] is not None and many["connect_all_s"] > 0

    summary = record["summary"]
    assert summary["gateway_client_frames_per_core"]["goal"] == 50_000
    assert summary["gateway_added_p99_us_at_1k"]["goal"] == 1000.0
