"""Redis Cluster with sharded pub/sub (issue 15): one Redis against three masters.

Each run is a fresh simulator, one broker and N consumer processes subscribed to every channel
of the load (600: ticker, trade and orderbook of 200 codes), either

* ``single``: one ``redis-server``; the broker PUBLISHes, the consumers (``benchmarks.consumer
  hiredis``) SUBSCRIBE to all 600 channels on it; or
* ``cluster``: a three-master Redis Cluster (``broker.testing.cluster``); the broker routes each
  SPUBLISH to the master owning its channel's slot, each consumer (``hiredis-sharded``) holds
  one connection per master and SSUBSCRIBEs each channel on its master.

Reported, over a steady window after a warm-up, as in the replica benchmark
(``benchmarks.bench_replicas``, whose verdicts this reuses): deliveries a second over all
consumers, loss (every frame the simulator sent must reach every consumer), the broker's CPU
per frame (one connection per master instead of one: what sharding costs the publisher), and
each ``redis-server``'s CPU in cores: the single server's thread against the three that share
the same deliveries, which is what a cluster is for.

Benchmark layer (not shipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_replicas import SERVER_ARGS, limited_by
from benchmarks.bench_throughput import wait_settled, wait_subscribed
from broker.cluster_slots import key_slot
from broker.keys import Keys
from broker.redis_client import redis_client
from broker.testing import RedisServer
from broker.testing.cluster import ClusterSetup

#: offered frames a second (ticker, trade and orderbook of 200 codes), as the replica section
TARGET_FPS = 5000.0
CONSUMERS_FULL = (4, 16, 32)
CONSUMERS_QUICK = (2,)
MODES = ("single", "cluster")
MASTERS = 3


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per consumer count, ``cluster`` against ``single``: deliveries, the broker's CPU per
    frame, the busiest Redis's cores and all of them together (pure)."""
    by_key = {(r["consumers"], r["mode"]): r for r in runs}
    out = []
    for n in sorted({r["consumers"] for r in runs}):
        single, cluster = by_key.get((n, "single")), by_key.get((n, "cluster"))
        if single is None or cluster is None:
            continue
        out.append(
            {
                "consumers": n,
                "deliveries_per_s": [single["deliveries_per_s"], cluster["deliveries_per_s"]],
                "broker_cpu_us_per_frame": [
                    single["broker_cpu_us_per_frame"],
                    cluster["broker_cpu_us_per_frame"],
                ],
                "busiest_redis_cores": [
                    max(single["redis_cores"].values(), default=0.0),
                    max(cluster["redis_cores"].values(), default=0.0),
                ],
                "all_redis_cores": [
                    round(sum(single["redis_cores"].values()), 3),
                    round(sum(cluster["redis_cores"].values()), 3),
                ],
                "loss": [single["loss"], cluster["loss"]],
            }
        )
    return out


@contextlib.asynccontextmanager
async def _servers(mode: str) -> AsyncIterator[tuple[str, dict[str, Any], ClusterSetup | None]]:
    """(redis url, name -> server with ``.pid`` and ``.port``, the cluster or None)."""
    if mode == "single":
        async with RedisServer(SERVER_ARGS) as server:
            yield server.url, {"redis": server}, None
        return
    with tempfile.TemporaryDirectory(prefix="upbit-bench-cluster-") as tmp:
        setup = ClusterSetup(Path(tmp), masters=MASTERS, extra_args=SERVER_ARGS)
        try:
            await setup.start()
            nodes = {f"redis-{i + 1}": node for i, node in enumerate(setup.nodes)}
            yield setup.url(), nodes, setup
        finally:
            setup.stop()


async def run_sharded(
    *,
    mode: str,
    n_consumers: int,
    duration: float,
    warmup: float,
    target_fps: float = TARGET_FPS,
    codes_total: int = 200,
    seed: int = 7,
) -> dict[str, Any]:
    """One run on a fresh Redis (or cluster), simulator and broker; returns its figures."""
    markets, codes = h.universe_codes(codes_total, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    async with _servers(mode) as (url, servers, cluster):
        keys = Keys(h.NAMESPACE, hash_tag=cluster is not None)
        channels = h.channels_of(streams)
        if cluster is None:
            consumer_mode, port, lines = "hiredis", next(iter(servers.values())).port, channels
        else:
            owners = {}
            for slot in {key_slot(c) for c in channels}:
                owners[slot] = await cluster.owner(slot)
            consumer_mode, port = "hiredis-sharded", 0
            lines = [f"{owners[key_slot(c)]} {c}" for c in channels]
        client = redis_client(url)
        try:
            async with h.simulator(rate=target_fps / fpe, markets=markets, seed=seed) as sim:
                with h.consumers(n_consumers, consumer_mode, port=port, channels=lines) as cons:
                    await h.write_lease(client, "bench-cluster", streams)
                    async with h.broker(url, sim.url) as brk:
                        await wait_subscribed(sim, streams, 30)
                        await asyncio.sleep(warmup)
                        pids = {
                            "broker": brk.pid,
                            "simulator": sim.pid,
                            **{name: s.pid for name, s in servers.items()},
                            **{f"consumer{i}": c.pid for i, c in enumerate(cons)},
                        }
                        await h.quiet_moment(pids.values())
                        s0 = await sim.state()
                        c0 = [c.count() for c in cons]
                        window = h.CpuWindow.begin(pids)
                        await asyncio.sleep(duration)
                        elapsed, stat_cpu = window.end()
                        c1 = [c.count() for c in cons]
                        s1 = await sim.state()
                        await sim.get("/_sim/stall?seconds=600")
                        await wait_settled(lambda: [c.count() for c in cons])
                        await asyncio.sleep(1.2)  # one more status write (every second)
                        raw: dict[Any, Any] = await client.hgetall(keys.status)
                        status = {k.decode(): v.decode() for k, v in raw.items()}
                        final = await sim.state()
                        results = [c.finish() for c in cons]
                        broker_alive = brk.alive
        finally:
            await client.aclose()
    precise = window.precise
    cpu = {n: (precise[n] if precise.get(n) is not None else stat_cpu[n]) for n in pids}
    sim_data = final["totals"]["frames_sent"] - int(status.get("list_requests", 0))
    sent_window = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    each = [(b - a) / elapsed for a, b in zip(c0, c1, strict=True)]
    losses = [sim_data - r["frames"] for r in results]
    deliveries = sum(each)
    offered = sent_window / elapsed
    redis_cores = {n: round(cpu[n] / elapsed, 3) for n in servers}
    consumer_cores = sum(v for k, v in cpu.items() if k.startswith("consumer")) / elapsed
    run: dict[str, Any] = {
        "mode": mode,
        "consumers": n_consumers,
        "masters": len(servers),
        "target_fps": target_fps,
        "window_s": round(elapsed, 3),
        "offered_fps": round(offered, 1),
        "deliveries_per_s": round(deliveries, 1),
        "expected_deliveries_per_s": round(offered * n_consumers, 1),
        "delivered_fps_min": round(min(each), 1) if each else 0.0,
        "keeps_up": bool(each) and min(each) >= 0.97 * offered,
        "sim_frames_data": sim_data,
        "loss": max(losses) if losses else 0,
        "loss_total": sum(losses),
        "consumer_errors": [r["error"] for r in results if r.get("error")],
        "broker_frames_published": int(status.get("frames_published", 0)),
        "broker_redis_errors": int(status.get("redis_errors", 0)),
        "broker_cpu_us_per_frame": round(cpu["broker"] / sent_window * 1e6, 2)
        if sent_window
        else None,
        "broker_cpu_cores": round(cpu["broker"] / elapsed, 3),
        "redis_cores": redis_cores,
        "redis_us_per_delivery": round(
            sum(cpu[n] for n in servers) / (deliveries * elapsed) * 1e6, 3
        )
        if deliveries
        else None,
        "consumer_cores": round(consumer_cores, 3),
        "simulator_cpu_cores": round(cpu["simulator"] / elapsed, 3),
        "machine_cpu_cores_busy_all_processes": round(window.machine_cores, 3),
        "other_load_cores": h.others_in(window, elapsed, stat_cpu),
        "clock": "schedstat" if precise.get("broker") is not None else "stat",
        "broker_alive": broker_alive,
    }
    run["limited_by"] = limited_by(run, os.cpu_count() or 1)
    return run


async def run(server: Any, quick: bool) -> dict[str, Any]:
    """Every (consumers, mode) run of the plan; ``server`` (the run's shared Redis) is unused:
    each run brings its own Redis or cluster."""
    del server
    duration, warmup = (1.5, 0.7) if quick else (5.0, 1.5)
    plan = CONSUMERS_QUICK if quick else CONSUMERS_FULL
    runs = []
    started = time.monotonic()
    for n in plan:
        for mode in MODES:
            print(f"  cluster: {n} consumers, {mode} ...", flush=True)
            runs.append(
                await run_sharded(mode=mode, n_consumers=n, duration=duration, warmup=warmup)
            )
    return {
        "target_fps": TARGET_FPS,
        "codes": 200,
        "types": list(h.LOAD_TYPES),
        "masters": MASTERS,
        "server_args": list(SERVER_ARGS),
        "duration_s": duration,
        "warmup_s": warmup,
        "runs": runs,
        "compare": compare(runs),
        "seconds": round(time.monotonic() - started, 1),
    }
