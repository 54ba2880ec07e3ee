"""The whole-market benchmark runs with its machine-floor row: ``python -m benchmarks --quick
--only wholemarket`` exits 0, writes the broker's, the bare client's and the floor's figures and
prints them; and the ``floor`` benchmark consumer publishes every frame it routes.

A benchmark, not a test of speed: nothing here checks a timing or a rate (those are the
benchmark's to report, docs/performance.md), only that every part ran with real processes
(simulator, redis-server, broker, consumers) and left figures of the expected shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from benchmarks import bench_ceilings
from benchmarks import harness as h
from broker.testing import RedisServer, wait_for

ROOT = Path(__file__).resolve().parents[1]


async def test_the_floor_consumer_publishes_every_frame_it_routes(
    redis_server: RedisServer,
) -> None:
    """``benchmarks.consumer floor``: each frame read from the simulator is PUBLISHed once, on
    ``floor:{type}:{code}``, byte for byte; the process runs on uvloop and counts them."""
    markets, codes = h.universe_codes(6, 7)
    subscriber = aioredis.Redis(port=redis_server.port)
    pubsub = subscriber.pubsub()
    await pubsub.psubscribe("floor:*")
    got: list[tuple[bytes, bytes]] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "pmessage":
                got.append((msg["channel"], msg["data"]))

    listener = asyncio.create_task(listen())
    try:
        async with h.simulator(rate=50, markets=markets, seed=7) as sim:
            request = bench_ceilings.load_request(codes)
            with h.consumers(1, "floor", url=sim.url, request=request, port=redis_server.port) as (
                floor,
            ):
                await wait_for(lambda: len(got) >= 30, 20, message="frames published")
                await sim.get("/_sim/stall?seconds=600")  # no more frames: the counts settle
                counted = await wait_for(
                    lambda: (n := floor.count()) == len(got) and n, 10, message="every frame"
                )
                result = floor.finish()
    finally:
        listener.cancel()
        await pubsub.aclose()
        await subscriber.aclose()
    assert result["frames"] == counted == len(got)
    assert result["loop"] == "uvloop" and "error" not in result
    types = set()
    for channel, data in got:
        body = json.loads(data)
        assert channel == f"floor:{body['type']}:{body['code']}".encode(), (channel, body)
        assert body["code"] in codes
        types.add(body["type"])
    assert types <= set(h.LOAD_TYPES) and len(types) >= 2


@pytest.mark.timeout(300)
def test_quick_wholemarket_benchmark_has_the_floor_row(tmp_path: Path) -> None:
    out = tmp_path / "wholemarket.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks", "--quick", "--only", "wholemarket"),
            *("--output", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["errors"] == {}
    [run] = record["wholemarket"]["runs"]
    assert run["target_fps"] == 800.0 and run["offered_fps"] > 0
    broker, bare, floor = run["broker"], run["bare_client"], run["floor"]
    assert broker["cpu_us_per_frame"] > 0 and bare["cpu_us_per_frame"] > 0
    assert "error" not in floor, floor
    assert floor["loop"] == "uvloop"
    assert floor["frames_per_s"] > 0 and floor["cpu_us_per_frame"] > 0
    assert floor["cpu_pct_core"] > 0 and floor["other_load_cores"] is not None
    assert floor["redis_cpu_pct_core"] is not None
    assert run["broker_beyond_floor_us_per_frame"] == round(
        broker["cpu_us_per_frame"] - floor["cpu_us_per_frame"], 2
    )
    summary = record["summary"]["whole_market"]
    assert summary["floor_pct_core_at_real_rate"] == floor["cpu_pct_core"]

    text = proc.stdout
    assert "floor %core" in text
    row = next(line for line in text.splitlines() if re.match(r"\s+0\.8k\s+\d+\s+\d+\s", line))
    assert f"{floor['cpu_pct_core']:.2f}" in row and f"{floor['cpu_us_per_frame']:.1f}" in row
    assert f"this machine's floor: {floor['cpu_pct_core']:g}%" in text
    assert "whole market, broker beyond this machine's floor, us/frame: 0.8k " in text
