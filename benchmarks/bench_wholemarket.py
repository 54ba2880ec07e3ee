"""Upbit's whole market on one connection (benchmark 9): what the broker and a consumer cost.

Upbit's whole market is ~860 codes; with every code leased for ticker, trade and orderbook one
socket carries ~800 frames/s. That load is mostly small bursts (the simulator ticks every 10
ms: ~8 frames a burst), where per-wake-up costs dominate, so it is measured as its own row at
the real rate and at ~4,000 frames/s, over a long window:

* **the broker**: one simulator process with ``universe_codes(862)`` (the real codes, then
  synthetic ``KRW-SIM####``), one lease on all 2,586 streams, the broker process's CPU time
  from schedstat (ns) over the window, per frame the simulator sent it;
* **a bare websockets client** on the same load (``bench_ceilings.websocket_receive``, its own
  simulator at the same rate): what receiving alone costs;
* **the machine's floor** on the same load (its own simulator again, measured the same way):
  ``benchmarks.consumer floor``, the least a broker built of the same parts does, on uvloop:
  the broker's upstream adapter, ``route_frame`` on every frame, one write a socket read of a
  PUBLISH per frame to the run's redis-server (no leases, no cache, no bookkeeping). On a
  small VM where a wake-up costs tens of µs, this alone may exceed a goal stated in % of a
  core; the broker's figure beyond it is its own overhead;
* **the consumer library** (``benchmarks.consumer library``: ``BrokerClient.messages()``) and a
  **bare redis-py asyncio pub/sub loop** (``redis-py-async``), both on the default asyncio loop,
  subscribed to the same channels, in the same broker run and the same window, each its own
  process's CPU time per frame it received; plus the hiredis subscriber (the leanest Python
  reader) for scale. They run side by side, so each sees exactly the same frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from benchmarks import bench_ceilings
from benchmarks import harness as h
from benchmarks.bench_throughput import broker_status, wait_settled, wait_subscribed
from broker.redis_client import redis_client

#: Upbit's market count when the issue was measured (KRW, BTC and USDT markets)
CODES = 862
#: ~Upbit's whole-market rate on one socket, and five times it
RATES = (800.0, 4000.0)
#: consumer processes of each run, in the same window: the library, the bare loop it is
#: compared with, and the leanest subscriber (which also proves nothing was lost)
CONSUMER_MODES = ("library", "redis-py-async", "hiredis")


def _per_frame(cpu_s: float | None, frames: int) -> float | None:
    return round(cpu_s / frames * 1e6, 2) if cpu_s is not None and frames else None


async def run_rate(
    server: Any, target_fps: float, duration: float, warmup: float, seed: int = 7
) -> dict[str, Any]:
    """One whole-market run at ``target_fps``: broker and consumers, then the bare client."""
    markets, codes = h.universe_codes(CODES, seed)
    fpe = h.frames_per_event(markets, seed)
    rate = target_fps / fpe
    streams = h.load_streams(codes)
    channels = h.channels_of(streams)
    client = redis_client(server.url)
    await client.flushall()
    try:
        async with h.simulator(rate=rate, markets=markets, seed=seed) as sim:
            with contextlib.ExitStack() as stack:
                cons = {
                    mode: stack.enter_context(
                        h.consumers(1, mode, port=server.port, channels=channels)
                    )[0]
                    for mode in CONSUMER_MODES
                }
                await h.write_lease(client, "bench-wholemarket", streams)
                async with h.broker(server.url, sim.url) as brk:
                    await wait_subscribed(sim, streams, 60)
                    await asyncio.sleep(warmup)
                    pids = {
                        "broker": brk.pid,
                        "simulator": sim.pid,
                        "redis": server.pid,
                        **{mode: c.pid for mode, c in cons.items()},
                    }
                    await h.quiet_moment(pids.values())
                    s0 = await sim.state()
                    c0 = {mode: c.count() for mode, c in cons.items()}
                    window = h.CpuWindow.begin(pids)
                    await asyncio.sleep(duration)
                    elapsed, cpu = window.end()
                    precise = window.precise
                    machine_cores = window.machine_cores
                    c1 = {mode: c.count() for mode, c in cons.items()}
                    s1 = await sim.state()
                    mem = brk.memory()
                    # Freeze the feed, let everything in flight arrive, then count loss.
                    await sim.get("/_sim/stall?seconds=600")
                    await wait_settled(lambda: [c.count() for c in cons.values()])
                    await asyncio.sleep(1.2)  # one more status write (every second)
                    status = await broker_status(client)
                    final = await sim.state()
                    results = {mode: c.finish() for mode, c in cons.items()}
    finally:
        await client.aclose()

    def used(name: str) -> float:
        """CPU seconds of one process in the window: schedstat, else /proc/PID/stat."""
        ns = precise.get(name)
        return ns if ns is not None else cpu[name]

    sim_data_frames = final["totals"]["frames_sent"] - int(status.get("list_requests", 0))
    sent_window = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    skipped = s1["totals"]["events_skipped"] - s0["totals"]["events_skipped"]
    broker_s = used("broker")
    consumers: dict[str, Any] = {}
    for mode, result in results.items():
        frames = c1[mode] - c0[mode]
        consumers[mode] = {
            "frames_in_window": frames,
            "delivered_fps": round(frames / elapsed, 1),
            "cpu_us_per_frame": _per_frame(used(mode), frames),
            "cpu_us_per_frame_stat": _per_frame(cpu[mode], frames),
            "cpu_cores": round(used(mode) / elapsed, 4),
            "received": result["frames"],
            "loss": sim_data_frames - result["frames"],
            **{
                k: result[k]
                for k in ("gaps", "lease_notices", "dropped", "library_from", "library_digest")
                if k in result
            },
        }
    lib = consumers["library"]["cpu_us_per_frame"]
    bare_py = consumers["redis-py-async"]["cpu_us_per_frame"]
    ours = sum(used(n) for n in pids) / elapsed
    run: dict[str, Any] = {
        "target_fps": target_fps,
        "codes": len(codes),
        "streams": len(channels),
        "sim_rate_events": round(rate, 2),
        "frames_per_event": round(fpe, 3),
        "window_s": round(elapsed, 3),
        "offered_fps": round(sent_window / elapsed, 1),
        "delivered_fps": consumers["hiredis"]["delivered_fps"],
        "loss": max(c["loss"] for c in consumers.values()),
        "broker": {
            "cpu_us_per_frame": _per_frame(broker_s, sent_window),
            "cpu_us_per_frame_stat": _per_frame(cpu["broker"], sent_window),
            "cpu_pct_core": round(100 * broker_s / elapsed, 2),
            "cpu_s": round(broker_s, 4),
            "cpu_s_stat": round(cpu["broker"], 3),
            "clock": "schedstat" if precise.get("broker") is not None else "stat",
            "rss_bytes": mem["rss"],
            "frames_in": int(status.get("frames_in", 0)),
            "frames_published": int(status.get("frames_published", 0)),
            "frames_dropped": int(status.get("frames_dropped", 0)),
        },
        "consumers": consumers,
        "library_vs_redis_py": round(lib / bare_py, 2) if lib and bare_py else None,
        "cpu_cores": {n: round(used(n) / elapsed, 4) for n in pids},
        "machine_cpu_cores_used": round(ours, 3),
        "other_load_cores": round(max(0.0, machine_cores - ours), 3),
        "sim_events_skipped": skipped,
        "saturated": bool(skipped) or machine_cores >= 1.8 or final["totals"]["overflow_drops"] > 0,
    }
    # Receiving alone, same load and rate, its own simulator: what any websockets client pays.
    print(f"  whole market: bare websockets client at {target_fps:g} frames/s ...", flush=True)
    bare = await bench_ceilings.websocket_receive(
        False, target_fps, codes_total=CODES, duration=duration, warmup=warmup
    )
    run["bare_client"] = _receiver_figures(bare)
    # The least any broker does with the same frames on this machine, its own simulator again.
    print(f"  whole market: the machine's floor at {target_fps:g} frames/s ...", flush=True)
    floor = await bench_ceilings.websocket_receive(
        False, target_fps, codes_total=CODES, duration=duration, warmup=warmup, floor_redis=server
    )
    run["floor"] = {
        **_receiver_figures(floor),
        "redis_cpu_pct_core": (
            round(100 * floor["redis_cpu_cores"], 2) if "redis_cpu_cores" in floor else None
        ),
        "loop": floor.get("client_loop"),
    }
    broker_us = run["broker"]["cpu_us_per_frame"]
    run["broker_own_us_per_frame"] = _minus(broker_us, run["bare_client"]["cpu_us_per_frame"])
    run["broker_beyond_floor_us_per_frame"] = _minus(broker_us, run["floor"]["cpu_us_per_frame"])
    return run


def _receiver_figures(got: dict[str, Any]) -> dict[str, Any]:
    """The bare client's (or the floor's) figures of ``bench_ceilings.websocket_receive``:
    schedstat's when the kernel has it."""
    us = got.get("client_cpu_us_per_frame_ns") or got.get("client_cpu_us_per_frame")
    cores = got.get("client_cpu_cores_ns") or got.get("client_cpu_cores")
    return {
        "cpu_us_per_frame": us,
        "cpu_pct_core": round(100 * cores, 2) if cores is not None else None,
        "frames_per_s": got.get("frames_per_s"),
        "other_load_cores": got.get("other_load_cores"),
        **({"error": got["error"]} if "error" in got else {}),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


async def run(server: Any, quick: bool) -> dict[str, Any]:
    # Long windows: at ~800 frames/s the broker uses a few % of a core, and the figure must
    # not hang on a handful of wake-ups (or, without schedstat, on 10-ms ticks).
    duration, warmup = (2.0, 1.0) if quick else (25.0, 3.0)
    rates = RATES[:1] if quick else RATES
    runs = []
    for rate in rates:
        print(f"  whole market: {CODES} codes, {rate:g} frames/s ...", flush=True)
        runs.append(await run_rate(server, rate, duration, warmup))
    return {
        "codes": CODES,
        "types": list(h.LOAD_TYPES),
        "duration_s": duration,
        "warmup_s": warmup,
        "consumer_loop": "asyncio (default event loop) for library and redis-py-async",
        "runs": runs,
    }
