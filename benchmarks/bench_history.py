"""The history's cost (issue 13): broker CPU per frame with the history on and off, and the
Redis memory a retained frame takes.

* ``cpu``: the throughput run (``bench_throughput.run_load``: simulator -> broker -> Redis ->
  one hiredis subscriber, 200 codes, ticker + trade + orderbook) at 5k and 20k frames/s, once
  with ``UPBIT_BROKER_HISTORY=off`` and once with the default caps (every frame XADDed beside
  its PUBLISH). Goal: at most +30% broker CPU per frame.
* ``memory``: 10,000 frames of each type (the examples' frames, as Upbit sends them) XADDed
  with the broker's own command into one stream of a fresh Redis; ``MEMORY USAGE`` of the
  stream and ``used_memory`` before and after, per 10k retained frames.
* ``latency``: a durable consumer (``XREAD``) against a pub/sub one on the same broker, when
  the consumer program supports it (``benchmarks.consumer`` mode ``durable``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from benchmarks import bench_throughput
from benchmarks import harness as h
from benchmarks.bench_latency import _match, _window
from benchmarks.bench_throughput import wait_subscribed
from broker import resp
from broker.core.history import parse_history_caps
from broker.keys import Keys
from broker.redis_client import redis_client
from broker.settings import BrokerSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "upbit_examples"
#: goal: the history adds at most this much broker CPU per frame
GOAL_RATIO = 1.30
MEMORY_FRAMES = 10_000


def _example_frame(name: str) -> bytes:
    """One frame of the example file, compact JSON as Upbit sends it."""
    data: Any = json.loads((EXAMPLES / name).read_text())
    frame = data.get("frame", data) if isinstance(data, dict) else data
    if isinstance(frame, list):
        frame = frame[0]
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


async def memory(server: Any) -> dict[str, Any]:
    """Redis memory per 10k retained frames of each type (one stream per type)."""
    client = redis_client(server.url)
    caps = BrokerSettings().history_caps()
    out: dict[str, Any] = {}
    try:
        await client.flushall()
        for type_, name in (
            ("trade", "trade.default.json"),
            ("ticker", "ticker.default.json"),
            ("orderbook", "orderbook.default.json"),
        ):
            frame = _example_frame(name)
            key = Keys("bench").history(type_, "KRW-BTC").encode()
            before = (await client.info("memory"))["used_memory"]
            prefix = resp.xadd_prefix(key, MEMORY_FRAMES)
            command = prefix + b"$%d\r\n%b\r\n" % (len(frame), frame)
            pipe = client.pipeline(transaction=False)
            for _ in range(MEMORY_FRAMES):
                pipe.execute_command("XADD", key, "MAXLEN", "~", MEMORY_FRAMES, "*", "f", frame)
            await pipe.execute()
            after = (await client.info("memory"))["used_memory"]
            usage = await client.memory_usage(key, samples=0)
            out[type_] = {
                "frame_bytes": len(frame),
                "entries": await client.xlen(key),
                "memory_usage_bytes": usage,
                "used_memory_delta_bytes": after - before,
                "bytes_per_entry": round((usage or 0) / MEMORY_FRAMES, 1),
                "overhead_per_entry": round((usage or 0) / MEMORY_FRAMES - len(frame), 1),
                "default_cap": caps.get(type_, 0),
                "command_bytes": len(command),
            }
            await client.delete(key)
    finally:
        await client.aclose()
    return out


async def cpu(server: Any, quick: bool) -> dict[str, Any]:
    duration, warmup = (1.5, 0.7) if quick else (6.0, 1.5)
    loads = [5000] if quick else [5000, 20000]
    runs: list[dict[str, Any]] = []
    for load in loads:
        pair: dict[str, Any] = {"target_fps": load}
        for label, spec in (("off", "off"), ("on", BrokerSettings().history)):
            parse_history_caps(spec)
            print(f"  history: {load} frames/s, history {label} ...", flush=True)
            run = await bench_throughput.run_load(
                server,
                target_fps=load,
                n_consumers=1,
                duration=duration,
                warmup=warmup,
                broker_settings={"history": spec},
                status_wait=not quick,
            )
            pair[label] = {
                k: run[k]
                for k in (
                    "offered_fps",
                    "delivered_fps",
                    "loss",
                    "broker_cpu_us_per_frame",
                    "broker_cpu_cores",
                    "cpu_cores",
                    "other_load_cores",
                    "saturated",
                )
            }
        off, on = pair["off"]["broker_cpu_us_per_frame"], pair["on"]["broker_cpu_us_per_frame"]
        pair["ratio"] = round(on / off, 3) if off else None
        pair["met"] = pair["ratio"] is not None and pair["ratio"] <= GOAL_RATIO
        runs.append(pair)
    return {"runs": runs, "goal_ratio": GOAL_RATIO, "duration_s": duration}


async def latency(server: Any, quick: bool, target_fps: float = 1000) -> dict[str, Any]:
    """Simulator send -> consumer receive, for the consumer library on pub/sub and the same
    library durable (``XREAD`` of the history), side by side on one broker, in one window."""
    duration, warmup = (1.0, 0.6) if quick else (8.0, 1.5)
    seed = 11
    markets, codes = h.universe_codes(200, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    client = redis_client(server.url)
    await client.flushall()
    out: dict[str, Any] = {"target_fps": target_fps}
    try:
        async with h.simulator(
            rate=target_fps / fpe, markets=markets, seed=seed, record_sends=True
        ) as sim:
            channels = h.channels_of(streams)
            with (
                h.consumers(1, "library", port=server.port, channels=channels, record=True) as ps,
                h.consumers(
                    1, "library-durable", port=server.port, channels=channels, record=True
                ) as ds,
            ):
                async with h.broker(server.url, sim.url) as brk:
                    await wait_subscribed(sim, streams, 30)
                    await asyncio.sleep(warmup)
                    pids = [sim.pid, brk.pid, server.pid, ps[0].pid, ds[0].pid]
                    sends, others = await _window(sim, duration, pids)
                    await asyncio.sleep(1.0)  # the last frames of the window arrive
                    out["pubsub"] = {**_match(sends, ps[0].finish()["recv"])}
                    out["durable"] = {**_match(sends, ds[0].finish()["recv"])}
                    out["other_load_cores"] = others
    finally:
        await client.aclose()
    for path in ("pubsub", "durable"):
        out[path].pop("cdf_us", None)
    return out


async def run(server: Any, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"memory": await memory(server)}
    out["cpu"] = await cpu(server, quick)
    print("  history: latency, pub/sub vs durable consumer ...", flush=True)
    out["latency"] = await latency(server, quick)
    return out
