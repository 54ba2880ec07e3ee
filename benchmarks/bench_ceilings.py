"""Ceilings measured in the same run (benchmark 6): what the broker cannot beat here.

* Redis's own PUBLISH rate: ``redis-benchmark`` (one client, pipelines of 64, payloads of the
  mean frame size) when installed, otherwise packed raw RESP pipelines from this process.
* The raw websocket receive rate: a bare websockets client (``benchmarks.consumer ws``) on
  the simulator offering as much as it can; on a 2-core machine the simulator is usually the
  limit, so this is "what any Python client could receive from this simulator here".
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from typing import Any

from benchmarks import harness as h
from broker import resp

#: Offered to the bare client: more than the simulator makes here (~40k frames/s flat out),
#: with bursts small enough that a client that falls behind for a moment is not cut off.
CEILING_FPS = 45_000.0


def redis_publish(server: Any, payload_bytes: int, quick: bool) -> dict[str, Any]:
    n = 100_000 if quick else 400_000
    payload = "x" * payload_bytes
    binary = shutil.which("redis-benchmark")
    if binary is not None:
        proc = subprocess.run(
            [
                binary,
                *("-h", "127.0.0.1", "-p", str(server.port)),
                *("-c", "1", "-P", "64", "-n", str(n), "--csv"),
                *("PUBLISH", "bench:ceiling", payload),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for line in proc.stdout.splitlines():
            cells = [c.strip('"') for c in line.split(",")]
            if len(cells) > 1 and cells[0].upper().startswith("PUBLISH"):
                return {
                    "tool": "redis-benchmark -c 1 -P 64",
                    "payload_bytes": payload_bytes,
                    "publish_per_s": float(cells[1]),
                }
    return asyncio.run(_raw_publish(server, payload_bytes, n))


async def _raw_publish(server: Any, payload_bytes: int, n: int) -> dict[str, Any]:
    conn = await resp.RespConnection.connect(resp.RespAddress.from_url(server.url))
    try:
        batch = 1000
        buffer = resp.encode_command(b"PUBLISH", b"bench:ceiling", b"x" * payload_bytes) * batch
        start = time.perf_counter()
        for _ in range(n // batch):
            await conn.count_errors(buffer, batch)
        elapsed = time.perf_counter() - start
    finally:
        await conn.aclose()
    return {
        "tool": "raw RESP pipelines of 1000 (redis-benchmark not installed)",
        "payload_bytes": payload_bytes,
        "publish_per_s": round(n // batch * batch / elapsed, 1),
    }


def load_request(codes: list[str]) -> str:
    """The subscribe request of a client taking the load types of ``codes`` directly."""
    return json.dumps(
        [
            {"ticket": "bench-ceiling"},
            *({"type": t, "codes": codes} for t in h.LOAD_TYPES),
            {"format": "DEFAULT"},
        ]
    )


async def websocket_receive(
    quick: bool,
    target_fps: float | None = None,
    *,
    codes_total: int = 200,
    duration: float | None = None,
    warmup: float = 1.0,
    floor_redis: Any = None,
) -> dict[str, Any]:
    """A bare websockets client subscribed to the throughput benchmark's 600 streams (or the
    three types of ``codes_total`` codes), directly on the simulator: flat out (the ceiling),
    or at ``target_fps`` (the baseline the broker's CPU per frame is compared with at that
    rate: receiving alone costs this much).

    With ``floor_redis`` (a redis-server of the harness) the client is the ``floor`` consumer
    instead: the broker's upstream adapter on uvloop, every frame routed, one write a read of
    a PUBLISH per frame to that server, whose CPU is then measured too (not counted as other
    load)."""
    seed = 7
    markets, codes = h.universe_codes(codes_total, seed)
    request = load_request(codes)
    duration = duration or (2.0 if quick else 6.0)
    rate = (target_fps or CEILING_FPS) / h.frames_per_event(markets, seed)
    async with h.simulator(rate=rate, markets=markets, seed=seed) as sim:
        watched = {"simulator": sim.pid}
        if floor_redis is not None:
            watched["redis"] = floor_redis.pid
        # Wait for a calm machine before the client subscribes: the market only starts then,
        # and a client that falls far behind is cut off by the simulator (as by Upbit).
        others = await h.quiet_moment(watched.values())
        try:
            mode, port = ("ws", 0) if floor_redis is None else ("floor", floor_redis.port)
            with h.consumers(1, mode, url=sim.url, request=request, port=port) as cons:
                await asyncio.sleep(warmup)
                c0 = cons[0].count()
                s0 = await sim.state()
                window = h.CpuWindow.begin({"client": cons[0].pid, **watched})
                await asyncio.sleep(duration)
                elapsed, cpu = window.end()
                busy = window.machine_cores
                precise = window.precise.get("client")
                c1 = cons[0].count()
                s1 = await sim.state()
                result = cons[0].finish()
        except (OSError, RuntimeError, TimeoutError) as exc:
            state = await sim.state()
            return {
                "frames_per_s": None,
                "error": f"the bare client did not finish: {exc!r}",
                "sim_overflow_drops": state["totals"]["overflow_drops"],
                "other_load_cores_before": others,
            }
    frames = c1 - c0
    extra: dict[str, Any] = {}
    if floor_redis is not None:
        extra = {
            "client": "floor",
            "client_loop": result.get("loop"),
            "redis_cpu_cores": round(cpu["redis"] / elapsed, 4),
            **({"error": f"the floor client: {result['error']}"} if result.get("error") else {}),
        }
    return {
        **extra,
        "frames_per_s": round(frames / elapsed, 1),
        "sim_sent_per_s": round(
            (s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]) / elapsed, 1
        ),
        "client_cpu_us_per_frame": round(cpu["client"] / frames * 1e6, 2) if frames else None,
        "client_cpu_cores": round(cpu["client"] / elapsed, 3),
        # the same from schedstat (ns; None without it): what low-rate figures should use
        "client_cpu_us_per_frame_ns": (
            round(precise / frames * 1e6, 2) if frames and precise is not None else None
        ),
        "client_cpu_cores_ns": round(precise / elapsed, 4) if precise is not None else None,
        "codes": codes_total,
        "window_s": round(elapsed, 3),
        "simulator_cpu_cores": round(cpu["simulator"] / elapsed, 3),
        "machine_cpu_cores_busy_all_processes": round(busy, 3),
        "other_load_cores": h.others_in(window, elapsed, cpu),
        "limited_by": (
            "simulator"
            if cpu["simulator"] / elapsed > 0.9
            else "machine (all cores busy)"
            if busy >= 1.8
            else "client"
        ),
    }


async def run(server: Any, quick: bool, mean_frame_bytes: int) -> dict[str, Any]:
    print("  ceilings: redis PUBLISH ...", flush=True)
    publish = await asyncio.to_thread(redis_publish, server, mean_frame_bytes, quick)
    print("  ceilings: bare websocket client ...", flush=True)
    ws = await websocket_receive(quick)
    return {"redis_publish": publish, "websocket_receive": ws}
