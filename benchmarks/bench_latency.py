"""Latency the broker adds (benchmark 2).

The simulator records when it sends each frame (``record_sends``: time_ns and a 64-bit key of
the frame's bytes); a consumer process records when each frame reached it, by the same key (the
broker republishes frames byte for byte). Two paths, in the same run and on the same simulator:

* ``broker``: simulator -> broker process -> Redis -> a subscriber process;
* ``direct``: the same consumer program as a bare websockets client on the simulator (no
  broker, no Redis): the baseline, which holds the simulator's and the client's own delays.

Only frames sent inside the measured window are matched; keys sent twice (two SNAPSHOTs of a
quiet stream) are left out. Times are one machine's ``time.time_ns()``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_throughput import wait_subscribed
from broker.redis_client import redis_client
from broker.testing import SimulatorProcess, wait_for

#: percentiles kept in the record as the latency distribution (``--plot`` draws the CDF)
CDF_PERCENTILES = (*range(0, 90, 5), *range(90, 100), 99.5, 99.9, 99.99, 100)


def _match(sends: list[list[int]], recv: list[list[int]]) -> dict[str, Any]:
    sent: dict[int, int] = {}
    dup: set[int] = set()
    for t, key in sends:
        if key in sent:
            dup.add(key)
        sent[key] = t
    got: dict[int, int] = {}
    for t, key in recv:
        got.setdefault(key, t)
    lat = [(got[k] - t) / 1000 for k, t in sent.items() if k not in dup and k in got]
    missing = sum(1 for k in sent if k not in dup and k not in got)
    return {
        "frames": len(lat),
        "missing": missing,
        "p50_us": round(h.percentile(lat, 50), 1),
        "p99_us": round(h.percentile(lat, 99), 1),
        "p999_us": round(h.percentile(lat, 99.9), 1),
        "max_us": round(max(lat), 1) if lat else float("nan"),
        "mean_us": round(sum(lat) / len(lat), 1) if lat else float("nan"),
        # [percentile, us] pairs: the distribution, small enough for the record
        "cdf_us": ([[p, round(h.percentile(lat, p), 1)] for p in CDF_PERCENTILES] if lat else []),
    }


async def _window(
    sim: SimulatorProcess, duration: float, pids: list[int]
) -> tuple[list[list[int]], float]:
    """The send log of one window, and the cores other processes used meanwhile."""
    await h.quiet_moment(pids)
    await sim.get("/_sim/sends?clear=1")
    window = h.CpuWindow.begin({str(p): p for p in pids})
    await asyncio.sleep(duration)
    sends: list[list[int]] = await sim.get("/_sim/sends?clear=1")
    elapsed, cpu = window.end()
    return sends, h.others_in(window, elapsed, cpu)


async def run_rate(
    server: Any, target_fps: float, duration: float, warmup: float, seed: int = 11
) -> dict[str, Any]:
    markets, codes = h.universe_codes(200, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    client = redis_client(server.url)
    await client.flushall()
    out: dict[str, Any] = {"target_fps": target_fps, "codes": len(codes)}
    try:
        async with h.simulator(
            rate=target_fps / fpe, markets=markets, seed=seed, record_sends=True
        ) as sim:
            with h.consumers(
                1, "hiredis", port=server.port, channels=h.channels_of(streams), record=True
            ) as cons:
                await h.write_lease(client, "bench-latency", streams)
                async with h.broker(server.url, sim.url) as brk:
                    await wait_subscribed(sim, streams, 30)
                    await asyncio.sleep(warmup)
                    pids = [sim.pid, brk.pid, server.pid, cons[0].pid]
                    sends, others = await _window(sim, duration, pids)
                    await asyncio.sleep(0.5)  # the last frames of the window arrive
                    recv = cons[0].finish()["recv"]
            out["broker"] = {**_match(sends, recv), "other_load_cores": others}
            out["offered_fps"] = round(len(sends) / duration, 1)
            # The broker is gone (its connection closed): the same consumer, straight to the
            # simulator, with the request the broker sent (every stream, DEFAULT format).
            request = json.dumps(
                [
                    {"ticket": "bench-direct"},
                    *({"type": t, "codes": c} for t, c in streams.items()),
                    {"format": "DEFAULT"},
                ]
            )
            await wait_for(
                lambda: _no_connections(sim), 10, 0.05, message="the broker's connection to close"
            )
            with h.consumers(1, "ws", url=sim.url, request=request, record=True) as direct:
                await asyncio.sleep(warmup)
                sends, others = await _window(sim, duration, [sim.pid, direct[0].pid])
                await asyncio.sleep(0.5)
                recv = direct[0].finish()["recv"]
            out["direct"] = {**_match(sends, recv), "other_load_cores": others}
    finally:
        await client.aclose()
    b, d = out["broker"], out["direct"]
    out["added_p50_us"] = round(b["p50_us"] - d["p50_us"], 1)
    out["added_p99_us"] = round(b["p99_us"] - d["p99_us"], 1)
    out["added_p999_us"] = round(b["p999_us"] - d["p999_us"], 1)
    return out


async def _no_connections(sim: SimulatorProcess) -> bool:
    return not (await sim.state())["connections"]


async def run(server: Any, quick: bool) -> dict[str, Any]:
    duration, warmup = (1.0, 0.6) if quick else (8.0, 1.5)
    rates = [1000] if quick else [1000, 10000]
    runs = []
    for rate in rates:
        print(f"  latency: {rate} frames/s ...", flush=True)
        runs.append(await run_rate(server, rate, duration, warmup))
    return {"runs": runs, "duration_s": duration}
