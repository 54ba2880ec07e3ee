"""Side by side with cryptofeed on the same feed (benchmark 8).

Both consume the same simulator feed (same seed, codes, offered rate and 10-ms burst shape),
one after the other on the same machine: cryptofeed's Upbit feed as it ships (trades and
orderbooks, SIMPLE format, its ``TradeRedis``/``BookRedis`` backends: one ``ZADD NX`` per
frame into a sorted set per symbol), and the broker with a lease on the same streams in the
same format (one PUBLISH per frame plus the last-value cache, one subscriber process). Per
system: CPU per frame it received, frames it handled per second (cryptofeed: ``ZADD`` calls;
broker: frames a subscriber received), and memory. ``benchmarks/cryptofeed_runner.py`` says
what the harness had to change to run cryptofeed at all.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from benchmarks import harness as h
from benchmarks.bench_throughput import run_load
from broker.redis_client import redis_client
from broker.testing import ManagedProcess, wait_for
from broker.testing.processes import spawn

TYPES = ("trade", "orderbook")


def available() -> str | None:
    """None when cryptofeed can run here, else why not."""
    try:
        import cryptofeed  # noqa: F401
    except ImportError as exc:
        return f"cryptofeed is not installed ({exc}); pip install '.[bench]'"
    return None


async def _zadd_calls(client: aioredis.Redis) -> int:
    info: dict[str, Any] = await client.info("commandstats")
    return int(info.get("cmdstat_zadd", {}).get("calls", 0))


async def run_cryptofeed(
    server: Any, target_fps: float, duration: float, warmup: float, seed: int = 7
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="upbit-bench-cryptofeed-") as tmp:
        err = Path(tmp) / "cryptofeed.err"
        return await _run_cryptofeed(server, target_fps, duration, warmup, seed, err)


async def _run_cryptofeed(
    server: Any, target_fps: float, duration: float, warmup: float, seed: int, err: Path
) -> dict[str, Any]:
    markets, codes = h.universe_codes(200, seed)
    fpe = h.frames_per_event(markets, seed, TYPES)
    client = redis_client(server.url)
    await client.flushall()
    await client.config_resetstat()
    fd, codes_file = tempfile.mkstemp(prefix="upbit-bench-codes-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(codes))
    try:
        async with h.simulator(rate=target_fps / fpe, markets=markets, seed=seed) as sim:
            command = [
                sys.executable,
                "-m",
                "benchmarks.cryptofeed_runner",
                *("--port", str(sim.port), "--redis-port", str(server.port)),
                *("--codes-file", codes_file),
            ]
            popen = spawn(command, err, os.environ, cwd=h.ROOT, stdout=False)
            proc = ManagedProcess(popen, "cryptofeed", err)
            try:

                async def subscribed() -> bool:
                    if not proc.alive:
                        raise RuntimeError(f"cryptofeed exited: {proc.output()[-2000:]}")
                    conn = await sim.connection()
                    return bool(conn and conn["subscriptions"])

                await wait_for(subscribed, 60, 0.1, message="cryptofeed to subscribe")
                await asyncio.sleep(warmup)
                await h.quiet_moment([proc.pid, sim.pid, server.pid])
                s0 = await sim.state()
                z0 = await _zadd_calls(client)
                window = h.CpuWindow.begin({"cryptofeed": proc.pid, "redis": server.pid})
                await asyncio.sleep(duration)
                elapsed, cpu = window.end()
                others = h.others_in(window, elapsed, cpu)
                z1 = await _zadd_calls(client)
                s1 = await sim.state()
                mem = proc.memory()
                conn = s1["connections"][0] if s1["connections"] else {"format": "?"}
            finally:
                proc.kill()
    finally:
        await client.aclose()
        os.unlink(codes_file)
    sent = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    handled = z1 - z0
    return {
        "system": "cryptofeed",
        "target_fps": target_fps,
        "format": conn.get("format"),
        "offered_fps": round(sent / elapsed, 1),
        "sim_backlog_frames": conn.get("queued", 0),
        "keeps_up": handled / elapsed >= 0.97 * target_fps,
        "handled_fps": round(handled / elapsed, 1),
        "cpu_us_per_frame": round(cpu["cryptofeed"] / sent * 1e6, 2) if sent else None,
        "cpu_cores": round(cpu["cryptofeed"] / elapsed, 3),
        "redis_cpu_cores": round(cpu["redis"] / elapsed, 3),
        "rss_bytes": mem["rss"],
        "peak_rss_bytes": mem["peak_rss"],
        "other_load_cores": others,
    }


async def run(server: Any, quick: bool) -> dict[str, Any]:
    why = available()
    if why is not None:
        return {"skipped": why, "runs": []}
    duration, warmup = (1.0, 0.7) if quick else (8.0, 2.0)
    rates = [1000] if quick else [1000, 5000, 20000]
    runs = []
    for rate in rates:
        print(f"  cryptofeed: {rate} frames/s ...", flush=True)
        try:
            cf = await run_cryptofeed(server, rate, duration, warmup)
        except (RuntimeError, TimeoutError) as exc:
            return {"skipped": f"cryptofeed could not be run: {exc}", "runs": runs}
        print(f"  broker (same feed): {rate} frames/s ...", flush=True)
        load = await run_load(
            server,
            target_fps=rate,
            n_consumers=1,
            duration=duration,
            warmup=warmup,
            types=TYPES,
            broker_settings={"upstream_format": "SIMPLE"},
            status_wait=not quick,
        )
        broker = {
            "system": "upbit-broker",
            "target_fps": rate,
            "format": "SIMPLE",
            "offered_fps": load["offered_fps"],
            "handled_fps": load["delivered_fps"],
            "cpu_us_per_frame": load["broker_cpu_us_per_frame"],
            "cpu_cores": load["broker_cpu_cores"],
            "redis_cpu_cores": load["cpu_cores"]["redis"],
            "rss_bytes": load["broker_rss_bytes"],
            "peak_rss_bytes": load["broker_peak_rss_bytes"],
            "loss": load["loss"],
            "keeps_up": load["delivered_fps"] >= 0.97 * rate,
        }
        runs.append({"target_fps": rate, "cryptofeed": cf, "broker": broker})
    return {"runs": runs, "duration_s": duration}
