"""Latency the broker adds (benchmark 2).

The simulator records when it sends each frame (``record_sends``: time_ns and a 64-bit key of
the frame's bytes); a consumer process records when each frame reached it, by the same key (the
broker republishes frames byte for byte). Three paths, one after the other, each alone on the
same simulator with the same streams:

* ``broker``: simulator -> broker process -> Redis -> a subscriber process;
* ``direct``: the same consumer program as a bare websockets client on the simulator (no
  broker, no Redis): the baseline, which holds the simulator's and the client's own delays;
* ``floor``: simulator -> the ``floor`` benchmark consumer (the broker's upstream adapter on
  uvloop, every frame routed, one write a socket read of a PUBLISH per data frame; no leases,
  cache or bookkeeping) -> Redis -> the same subscriber program on the floor's channels: the
  least latency any broker built of these parts adds on this machine.

``added`` is the broker's percentile minus direct's, ``floor_added`` the floor's minus
direct's. Only frames sent inside the measured window are matched; keys sent twice (two
SNAPSHOTs of a quiet stream) are left out. Times are one machine's ``time.time_ns()``.
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
#: the floor path publishes on ``{FLOOR_PREFIX}:{type}:{code}``: apart from the broker's
#: namespace (``bench``), so that no lease of the broker's could publish into them
FLOOR_PREFIX = "bench-floor"


def direct_request(streams: dict[str, list[str]], ticket: str) -> str:
    """The request the broker sends for ``streams`` (every stream, DEFAULT format)."""
    return json.dumps(
        [
            {"ticket": ticket},
            *({"type": t, "codes": c} for t, c in streams.items()),
            {"format": "DEFAULT"},
        ]
    )


def floor_channels(streams: dict[str, list[str]], prefix: str = FLOOR_PREFIX) -> list[str]:
    """The channels the ``floor`` consumer publishes ``streams`` on (``--channel-prefix``)."""
    return [f"{prefix}:{t}:{c}" for t, codes in streams.items() for c in codes]


def _added(path: dict[str, Any], direct: dict[str, Any]) -> dict[str, float]:
    return {k: round(path[k] - direct[k], 1) for k in ("p50_us", "p99_us", "p999_us")}


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
            request = direct_request(streams, "bench-direct")
            await wait_for(
                lambda: _no_connections(sim), 10, 0.05, message="the broker's connection to close"
            )
            with h.consumers(1, "ws", url=sim.url, request=request, record=True) as direct:
                await asyncio.sleep(warmup)
                sends, others = await _window(sim, duration, [sim.pid, direct[0].pid])
                await asyncio.sleep(0.5)
                recv = direct[0].finish()["recv"]
            out["direct"] = {**_match(sends, recv), "other_load_cores": others}
            # The floor alone on the simulator too, as each path before it: a connection still
            # open would cost the simulator its own copy of every frame in the floor's window.
            await wait_for(
                lambda: _no_connections(sim),
                10,
                0.05,
                message="the direct client's connection to close",
            )
            out["floor"] = await _floor_window(server, sim, streams, duration, warmup)
    finally:
        await client.aclose()
    b, d = out["broker"], out["direct"]
    added = _added(b, d)
    out["added_p50_us"] = added["p50_us"]
    out["added_p99_us"] = added["p99_us"]
    out["added_p999_us"] = added["p999_us"]
    if "error" not in out["floor"]:
        out["floor_added"] = _added(out["floor"], d)
    return out


async def _floor_window(
    server: Any,
    sim: SimulatorProcess,
    streams: dict[str, list[str]],
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """The floor path's window: the hiredis subscriber on the floor's channels, then the
    ``floor`` consumer on the simulator publishing to ``server``. A failure is kept in the
    record (as ``error``) rather than losing the broker's and direct's figures with it."""
    request = direct_request(streams, "bench-floor")
    channels = floor_channels(streams)
    publisher = h.consumers(
        1, "floor", url=sim.url, request=request, port=server.port, channel_prefix=FLOOR_PREFIX
    )
    try:
        with (
            h.consumers(1, "hiredis", port=server.port, channels=channels, record=True) as cons,
            publisher as (floor,),
        ):
            await wait_for(cons[0].count, 10, 0.05, message="frames through the floor")
            await asyncio.sleep(warmup)
            pids = [sim.pid, floor.pid, server.pid, cons[0].pid]
            sends, others = await _window(sim, duration, pids)
            await asyncio.sleep(0.5)  # the last frames of the window arrive
            recv = cons[0].finish()["recv"]
            result = floor.finish()
    except (OSError, RuntimeError, TimeoutError) as exc:  # WaitTimeout is a TimeoutError
        return {"error": f"the floor path did not finish: {exc!r}"}
    return {
        **_match(sends, recv),
        "other_load_cores": others,
        "loop": result.get("loop"),
        **({"process_error": result["error"]} if result.get("error") else {}),
    }


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
