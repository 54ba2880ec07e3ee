"""Throughput, loss and broker cost at fixed offered loads (benchmark 1).

One run per (offered frames/s, consumers): a fresh simulator process offers the load over
``codes`` codes (ticker, trade and orderbook of each, so frame sizes are mixed as on Upbit),
one broker process publishes, N consumer processes count what they receive. The figures come
from a steady window after a warm-up; loss is counted over the whole run: the simulator is
frozen at the end (``/_sim/stall``), everything in flight drains, and every frame the simulator
sent the broker (minus its LIST_SUBSCRIPTIONS answers) must have reached every consumer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from benchmarks import bench_ceilings
from benchmarks import harness as h
from broker.redis_client import redis_client
from broker.testing import SimulatorProcess, wait_for

#: "max": an offered load of this many frames/s, more than the simulator can generate on a
#: 2-core machine, so it runs flat out (its ``events_skipped`` counts what it could not make).
#: Not higher: the simulator renders up to 10 ticks of events at once, and a burst past its
#: per-connection outbox limit (200,000 frames) would cut the connection.
MAX_FPS = 100_000.0


async def wait_subscribed(
    sim: SimulatorProcess, streams: dict[str, list[str]], within: float
) -> None:
    want = {t: set(c) for t, c in streams.items()}

    async def done() -> bool:
        conn = await sim.connection()
        if conn is None:
            return False
        have = {t: set(c) for t, c in conn["subscriptions"].items()}
        return have == want

    await wait_for(done, within, 0.05, message="the broker's subscription to reach the simulator")


async def wait_settled(read: Any, quiet: float = 0.6, within: float = 30.0) -> Any:
    """Poll ``read()`` until its value stops changing for ``quiet`` seconds."""
    last = await read() if asyncio.iscoroutinefunction(read) else read()
    since = time.monotonic()
    deadline = since + within
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = await read() if asyncio.iscoroutinefunction(read) else read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


async def broker_status(client: aioredis.Redis) -> dict[str, str]:
    raw: dict[Any, Any] = await client.hgetall(f"{h.NAMESPACE}:status")
    return {k.decode(): v.decode() for k, v in raw.items()}


async def run_load(
    server: Any,
    *,
    target_fps: float | None,
    n_consumers: int,
    duration: float,
    warmup: float,
    codes_total: int = 200,
    types: tuple[str, ...] = h.LOAD_TYPES,
    consumer_mode: str = "hiredis",
    seed: int = 7,
    broker_settings: dict[str, Any] | None = None,
    profile: Any = None,
    status_wait: bool = True,
) -> dict[str, Any]:
    """One load run; returns its figures. ``target_fps`` None means as fast as it goes."""
    markets, codes = h.universe_codes(codes_total, seed)
    fpe = h.frames_per_event(markets, seed, types)
    rate = (MAX_FPS if target_fps is None else target_fps) / fpe
    streams = h.load_streams(codes, types)
    client = redis_client(server.url)
    await client.flushall()
    settings = dict(broker_settings or {})
    try:
        async with h.simulator(rate=rate, markets=markets, seed=seed) as sim:
            with h.consumers(
                n_consumers, consumer_mode, port=server.port, channels=h.channels_of(streams)
            ) as cons:
                await h.write_lease(client, "bench-load", streams)
                async with h.broker(server.url, sim.url, **settings) as brk:
                    await wait_subscribed(sim, streams, 30)
                    await asyncio.sleep(warmup)
                    pids = {
                        "broker": brk.pid,
                        "simulator": sim.pid,
                        "redis": server.pid,
                        **{f"consumer{i}": c.pid for i, c in enumerate(cons)},
                    }
                    await h.quiet_moment(pids.values())
                    s0 = await sim.state()
                    c0 = [c.count() for c in cons]
                    window = h.CpuWindow.begin(pids)
                    prof = profile(brk.pid, duration) if profile else None
                    await asyncio.sleep(duration)
                    elapsed, cpu = window.end()
                    machine_cores = window.machine_cores
                    c1 = [c.count() for c in cons]
                    s1 = await sim.state()
                    mem = brk.memory()
                    if prof is not None:
                        await prof
                    # Freeze the feed, let everything in flight arrive, then count loss.
                    await sim.get("/_sim/stall?seconds=600")
                    await wait_settled(lambda: [c.count() for c in cons])
                    if status_wait:
                        await asyncio.sleep(1.2)  # one more status write (every second)
                    status = await broker_status(client)
                    final = await sim.state()
                    results = [c.finish() for c in cons]
                    broker_alive = brk.alive
    finally:
        await client.aclose()

    # Every connection the broker had (a saturated run may be cut off and reconnect): frames
    # sent on all of them, less the LIST_SUBSCRIPTIONS answers (no UP frames: see harness).
    list_replies = int(status.get("list_requests", 0))
    sim_data_frames = final["totals"]["frames_sent"] - list_replies
    sent_window = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    skipped = s1["totals"]["events_skipped"] - s0["totals"]["events_skipped"]
    delivered = [(b - a) / elapsed for a, b in zip(c0, c1, strict=True)]
    received = [r["frames"] for r in results]
    losses = [sim_data_frames - n for n in received]
    total_cpu = sum(cpu.values()) / elapsed
    offered = sent_window / elapsed
    broker_us = cpu["broker"] / sent_window * 1e6 if sent_window else float("nan")
    others = max(0.0, machine_cores - total_cpu)
    saturated = (
        bool(skipped)
        or machine_cores >= 1.8
        or cpu["broker"] / elapsed >= 0.95
        or final["totals"]["overflow_drops"] > 0
    )
    return {
        "target_fps": target_fps,
        "consumers": n_consumers,
        "consumer_mode": consumer_mode,
        "codes": codes_total,
        "types": list(types),
        "sim_rate_events": rate,
        "frames_per_event": round(fpe, 3),
        "window_s": round(elapsed, 3),
        "offered_fps": round(offered, 1),
        "delivered_fps": round(min(delivered), 1) if delivered else 0.0,
        "delivered_fps_each": [round(d, 1) for d in delivered],
        "sim_frames_data": sim_data_frames,
        "received_each": received,
        "loss_each": losses,
        "loss": max(losses) if losses else 0,
        "broker_frames_in": int(status.get("frames_in", 0)),
        "broker_frames_published": int(status.get("frames_published", 0)),
        "broker_frames_dropped": int(status.get("frames_dropped", 0)),
        "broker_cpu_us_per_frame": round(broker_us, 2),
        "broker_cpu_cores": round(cpu["broker"] / elapsed, 3),
        "broker_rss_bytes": mem["rss"],
        "broker_peak_rss_bytes": mem["peak_rss"],
        "cpu_cores": {k: round(v / elapsed, 3) for k, v in cpu.items()},
        "machine_cpu_cores_used": round(total_cpu, 3),
        "machine_cpu_cores_busy_all_processes": round(machine_cores, 3),
        "other_load_cores": round(others, 3),
        "sim_events_skipped": skipped,
        "sim_connections_opened": final["totals"]["connections_opened"],
        "sim_overflow_drops": final["totals"]["overflow_drops"],
        "broker_reconnects": int(status.get("reconnects", 0)),
        "saturated": saturated,
        "broker_alive": broker_alive,
    }


def plan(quick: bool) -> list[tuple[float | None, int, str]]:
    """(offered frames/s or None for max, consumers, consumer mode) of each run."""
    if quick:
        return [(1000, 1, "hiredis"), (5000, 1, "hiredis")]
    loads: list[float | None] = [1000, 5000, 20000, 50000, None]
    runs = [(load, n, "hiredis") for n in (1, 10) for load in loads]
    # The same with redis-py's PubSub.listen() as the subscriber (what applications use).
    return [*runs, (5000, 1, "redis-py"), (20000, 1, "redis-py")]


async def run_plan(
    server: Any,
    loads: list[tuple[float | None, int, str]],
    quick: bool,
    profile: Any = None,
    with_baseline: bool = True,
) -> dict[str, Any]:
    duration, warmup = (1.5, 0.7) if quick else (6.0, 1.5)
    runs = []
    baselines: dict[float, float | None] = {}
    for target, n, mode in loads:
        print(f"  throughput: {target or 'max'} frames/s, {n} {mode} consumer(s) ...", flush=True)
        run = await run_load(
            server,
            target_fps=target,
            n_consumers=n,
            consumer_mode=mode,
            duration=duration,
            warmup=warmup,
            profile=profile,
            status_wait=not quick,
        )
        if target is not None and with_baseline and target not in baselines:
            # Receiving alone, at the same rate, in the same run: what any websockets client
            # spends, so the broker's own cost (routing + publishing) is the difference.
            print(f"  throughput: bare websockets client at {target:g} frames/s ...", flush=True)
            bare = await bench_ceilings.websocket_receive(quick, target_fps=target)
            baselines[target] = bare.get("client_cpu_us_per_frame")
        bare_us = baselines.get(target) if target is not None else None
        run["bare_client_cpu_us_per_frame"] = bare_us
        run["broker_own_cpu_us_per_frame"] = (
            round(run["broker_cpu_us_per_frame"] - bare_us, 2) if bare_us is not None else None
        )
        runs.append(run)
    return {"runs": runs, "duration_s": duration, "warmup_s": warmup}


async def run(server: Any, quick: bool, profile: Any = None) -> dict[str, Any]:
    return await run_plan(server, plan(quick), quick, profile)
