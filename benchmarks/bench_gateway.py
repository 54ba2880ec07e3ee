"""The Upbit-compatible gateway (issue 14): what relaying costs, and the latency it adds.

Every run is real processes on free ports: the simulator, one broker, one gateway
(``upbit-broker gateway``), and gateway clients in :mod:`benchmarks.consumer`'s ``wsraw`` mode
(raw sockets, many clients per process, so the clients are not the bottleneck). The load is a
lease written first on ticker, trade and orderbook of 200 codes, so the upstream set never
changes while clients come and go. Three measurements:

* **fan-out**: N clients, each subscribed (Upbit's protocol, DEFAULT format) to all 600
  streams, at an offered rate; the gateway process's CPU time over the window divided by the
  client-frames its clients received (``us_per_client_frame``), and its inverse per core;
* **latency**: simulator send -> client receive for the same bytes (the simulator records a
  64-bit key of every frame it sends; the gateway passes DEFAULT frames on unchanged), at 1k
  frames/s, on three paths: the gateway's client and the broker path (a plain Redis
  subscriber on the same channels) in the same window, then the direct baseline (the same
  raw client on the simulator, without broker or gateway);
* **many clients**: 1,000 clients on one gateway process, each subscribed to the three streams
  of 2 codes (10 clients per stream: bots watching a market or two), the gateway's RSS before
  and after, its CPU, and the latency of every frame every client received, beside the broker
  path's (a Redis subscriber) in the same window.

The clients' processes are started after the gateway and read as fast as frames come; their
CPU is reported (``client_cpu_cores``) so a run where they, or other load on the machine,
took the cores the gateway needed shows as such (``saturated``, ``other_load_cores``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_latency import _match, _no_connections, _window
from benchmarks.bench_throughput import wait_subscribed
from broker.redis_client import redis_client
from broker.testing import BrokerProcess, ManagedProcess, SimulatorProcess, wait_for
from broker.testing.processes import CLI, spawn

#: the issue's goals: client-frames a second per core of the gateway process, and the p99 the
#: gateway may add at 1k frames/s over the broker path
GOAL_CLIENT_FRAMES_PER_CORE = 50_000
GOAL_ADDED_P99_US = 1000.0
#: most client processes a run starts (the machine has few cores; clients share them)
CLIENT_PROCS = 4
#: codes in the load, and codes each client of the many-clients run subscribes to
CODES = 200
CODES_PER_CLIENT = 2
#: latency runs at most, while other load on the machine disturbs their windows (a shared
#: machine): latency is what such load spoils first
LATENCY_ATTEMPTS = 3


class GatewayProcess(ManagedProcess):
    url: str = ""


@asynccontextmanager
async def gateway(redis_url: str, gateway_id: str = "bench-gw") -> AsyncIterator[GatewayProcess]:
    """``upbit-broker gateway --port 0`` in namespace ``bench``, serving once this yields."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env.update(
        PYTHONUNBUFFERED="1",
        UPBIT_BROKER_REDIS_URL=redis_url,
        UPBIT_BROKER_NAMESPACE=h.NAMESPACE,
        UPBIT_GATEWAY_LOG_LEVEL="warning",
    )
    with tempfile.TemporaryDirectory(prefix="upbit-bench-gw-") as tmp:
        log = Path(tmp) / "gateway.log"
        command = [*CLI, "gateway", "--port", "0", "--gateway-id", gateway_id]
        proc = GatewayProcess(spawn(command, log, env, cwd=h.ROOT), "gateway", log)

        def serving() -> str:
            if not proc.alive:
                raise RuntimeError(f"the gateway exited: {proc.output()[-2000:]}")
            for line in proc.output().splitlines():
                if line.startswith("serving "):
                    return line.split()[1]
            return ""

        try:
            proc.url = await wait_for(serving, 30, 0.05, message="the gateway serving")
            yield proc
        finally:
            await proc.stop()


@contextmanager
def raw_clients(
    url: str, requests: list[list[str]], record: bool
) -> Iterator[list[h.ConsumerProc]]:
    """One ``wsraw`` process per item of ``requests``, its clients sending those requests
    (one each); every client is connected and has sent its request once this yields."""
    tmp = tempfile.mkdtemp(prefix="upbit-bench-gwclients-")
    procs: list[h.ConsumerProc] = []
    try:
        for i, lines in enumerate(requests):
            request_file = os.path.join(tmp, f"requests{i}")
            with open(request_file, "w") as f:
                f.write("\n".join(lines) + "\n")
            out = os.path.join(tmp, f"out{i}.json")
            args = ["--url", url, "--request-file", request_file, "--clients", str(len(lines))]
            procs.append(h.start_consumer("wsraw", out, args, record=record))
        for proc in procs:
            proc.wait_ready(60)
        yield procs
    finally:
        for proc in procs:
            proc.terminate(5.0)
        shutil.rmtree(tmp, ignore_errors=True)


def upbit_request(streams: dict[str, list[str]], ticket: str) -> str:
    """Upbit's subscribe request for ``streams``, DEFAULT format (what a bot sends)."""
    body: list[dict[str, Any]] = [{"ticket": ticket}]
    body += [{"type": t, "codes": codes} for t, codes in streams.items()]
    body.append({"format": "DEFAULT"})
    return json.dumps(body, separators=(",", ":"))


def spread(lines: list[str], procs: int) -> list[list[str]]:
    """``lines`` dealt over at most ``procs`` client processes."""
    n = max(1, min(procs, len(lines)))
    return [lines[i::n] for i in range(n)]


def _latency(sends: list[list[int]], recv: list[list[int]]) -> dict[str, Any]:
    """Send -> receive of every (client, frame) pair: a frame reaches many clients."""
    sent: dict[int, int] = {}
    dup: set[int] = set()
    for t, key in sends:
        if key in sent:
            dup.add(key)
        sent[key] = t
    lat = sorted((t - sent[k]) / 1000 for t, k in recv if k in sent and k not in dup)
    if not lat:
        return {"frames": 0}
    return {
        "frames": len(lat),
        "p50_us": round(h.percentile(lat, 50), 1),
        "p99_us": round(h.percentile(lat, 99), 1),
        "p999_us": round(h.percentile(lat, 99.9), 1),
        "max_us": round(lat[-1], 1),
    }


def _per_frame(
    sends: list[list[int]], recv: list[list[int]], base: list[list[int]]
) -> dict[str, Any]:
    """What the gateway adds to each frame: its client's receive time minus the broker path's
    (a Redis subscriber's) for the same frame, over the window's frames. Unlike the difference
    of two percentiles, a stall both paths share (upstream, the broker) cancels out."""
    window = {k for _, k in sends}
    seen: dict[int, int] = {}
    for t, k in base:
        if k in window:
            seen.setdefault(k, t)
    added = sorted((t - seen[k]) / 1000 for t, k in recv if k in seen)
    if not added:
        return {"frames": 0}
    return {
        "frames": len(added),
        "p50_us": round(h.percentile(added, 50), 1),
        "p99_us": round(h.percentile(added, 99), 1),
        "p999_us": round(h.percentile(added, 99.9), 1),
        "max_us": round(added[-1], 1),
    }


def _cores(window: h.CpuWindow, cpu: dict[str, float], name: str) -> float:
    """CPU seconds of ``name`` over the window: schedstat (ns) when the kernel has it."""
    precise = window.precise.get(name)
    return precise if precise is not None else cpu[name]


async def _all_receiving(procs: list[h.ConsumerProc], within: float = 60.0) -> None:
    async def receiving() -> bool:
        return all(c.count() > 0 for c in procs)

    await wait_for(receiving, within, 0.1, message="every gateway client receiving")


@asynccontextmanager
async def _load(
    server: Any, target_fps: float, *, record_sends: bool = False, seed: int = 17
) -> AsyncIterator[tuple[SimulatorProcess, dict[str, list[str]]]]:
    """A simulator offering ``target_fps`` over the load's streams, and the load's lease
    (written before any broker starts, so the upstream set never changes afterwards)."""
    markets, codes = h.universe_codes(CODES, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    client = redis_client(server.url)
    try:
        await client.flushall()
        async with h.simulator(
            rate=target_fps / fpe, markets=markets, seed=seed, record_sends=record_sends
        ) as sim:
            await h.write_lease(client, "bench-gateway-load", streams)
            yield sim, streams
    finally:
        await client.aclose()


@asynccontextmanager
async def _broker(
    server: Any, sim: SimulatorProcess, streams: dict[str, list[str]]
) -> AsyncIterator[BrokerProcess]:
    async with h.broker(server.url, sim.url) as brk:
        await wait_subscribed(sim, streams, 30)
        yield brk


async def run_clients(
    server: Any,
    *,
    target_fps: float,
    clients: int,
    duration: float,
    warmup: float,
    codes_per_client: int | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """``clients`` gateway clients at ``target_fps`` offered: the gateway's CPU per
    client-frame; with ``record``, the latency of every frame every client received."""
    async with (
        _load(server, target_fps, record_sends=record) as (sim, streams),
        _broker(server, sim, streams) as brk,
        gateway(server.url) as gw,
    ):
        rss_idle = gw.memory()["rss"]
        codes = streams["ticker"]
        lines = []
        for i in range(clients):
            if codes_per_client is None:
                mine = streams
            else:
                # codes spread over the list (the real, busier codes come first), so that
                # every client, and every client process, gets a like share of the load
                step = len(codes) // codes_per_client
                mine = h.load_streams(
                    codes[(i + j * step) % len(codes)] for j in range(codes_per_client)
                )
            lines.append(upbit_request(mine, f"bench-{i}"))
        started, gw_cpu0 = time.monotonic(), gw.cpu_seconds()
        with (
            raw_clients(gw.url, spread(lines, CLIENT_PROCS), record) as procs,
            # the broker path in the same window: a Redis subscriber on every channel
            h.consumers(
                1 if record else 0,
                "hiredis",
                port=server.port,
                channels=h.channels_of(streams),
                record=True,
            ) as sub,
        ):
            await _all_receiving(procs)
            connect_s = time.monotonic() - started
            connect_cpu = gw.cpu_seconds() - gw_cpu0
            await asyncio.sleep(warmup)
            pids = {
                "gateway": gw.pid,
                "broker": brk.pid,
                "simulator": sim.pid,
                "redis": server.pid,
                **{f"clients{i}": c.pid for i, c in enumerate(procs)},
                **({"subscriber": sub[0].pid} if sub else {}),
            }
            await h.quiet_moment(pids.values())
            if record:
                await sim.get("/_sim/sends?clear=1")
            s0 = await sim.state()
            c0 = [c.count() for c in procs]
            window = h.CpuWindow.begin(pids)
            await asyncio.sleep(duration)
            elapsed, cpu = window.end()
            c1 = [c.count() for c in procs]
            s1 = await sim.state()
            sends: list[list[int]] = await sim.get("/_sim/sends?clear=1") if record else []
            mem = gw.memory()
            await asyncio.sleep(0.5 if record else 0.0)  # the window's last frames arrive
            results = [c.finish() for c in procs]
            via_broker = [c.finish()["recv"] for c in sub]
            gateway_alive = gw.alive
    client_frames = sum(b - a for a, b in zip(c0, c1, strict=True))
    sent = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    skipped = s1["totals"]["events_skipped"] - s0["totals"]["events_skipped"]
    gw_cpu = _cores(window, cpu, "gateway")
    client_cpu = sum(_cores(window, cpu, n) for n in cpu if n.startswith("clients"))
    nan = float("nan")
    per_client = [n for r in results for n in r["per_client"]]
    closes: dict[str, int] = {}
    for r in results:
        for code, n in r["closes"].items():
            closes[code] = closes.get(code, 0) + n
    ours = sum(cpu.values()) / elapsed
    out: dict[str, Any] = {
        "target_fps": target_fps,
        "clients": clients,
        "client_processes": len(procs),
        "streams_per_client": 3 * (codes_per_client or len(codes)),
        "window_s": round(elapsed, 3),
        "offered_fps": round(sent / elapsed, 1),
        "client_frames_per_s": round(client_frames / elapsed, 1),
        "gateway_cpu_cores": round(gw_cpu / elapsed, 3),
        "us_per_client_frame": round(gw_cpu / client_frames * 1e6, 2) if client_frames else None,
        "client_frames_per_s_per_core": round(client_frames / gw_cpu) if gw_cpu else None,
        "us_per_upstream_frame": round(gw_cpu / sent * 1e6, 1) if sent else None,
        "gateway_rss_idle_bytes": rss_idle,
        "gateway_rss_bytes": mem["rss"],
        "gateway_peak_rss_bytes": mem["peak_rss"],
        "rss_per_client_bytes": round((mem["rss"] - rss_idle) / clients),
        # every client connected, subscribed and receiving: how long, and the gateway's CPU
        "connect_all_s": round(connect_s, 2),
        "gateway_cpu_connect_ms_per_client": round(connect_cpu / clients * 1e3, 2),
        "client_cpu_cores": round(client_cpu / elapsed, 3),
        "cpu_cores": {k: round(v / elapsed, 3) for k, v in cpu.items()},
        "clock": "schedstat" if window.precise.get("gateway") is not None else "stat",
        "machine_cpu_cores_busy_all_processes": round(window.machine_cores, 3),
        "other_load_cores": round(max(0.0, window.machine_cores - ours), 3),
        "min_frames_per_client": min(per_client) if per_client else 0,
        "closed_by_gateway": closes,
        "sim_events_skipped": skipped,
        "gateway_alive": gateway_alive,
        "saturated": bool(skipped) or window.machine_cores >= 1.8 or gw_cpu / elapsed >= 0.95,
    }
    if record:
        out["latency"] = _latency(sends, [p for r in results for p in r["recv"]])
        out["broker_path_latency"] = _latency(sends, via_broker[0])
        out["added_per_frame"] = _per_frame(
            sends, [p for r in results for p in r["recv"]], via_broker[0]
        )
        for p in ("p50", "p99", "p999"):
            added = out["latency"].get(f"{p}_us", nan) - out["broker_path_latency"].get(
                f"{p}_us", nan
            )
            out[f"added_over_broker_{p}_us"] = round(added, 1)
    return out


async def run_latency(
    server: Any, target_fps: float, duration: float, warmup: float
) -> dict[str, Any]:
    """Send -> receive at ``target_fps``: gateway client and broker path side by side, then
    the direct baseline on the same simulator."""
    out: dict[str, Any] = {"target_fps": target_fps, "codes": CODES}
    async with _load(server, target_fps, record_sends=True) as (sim, streams):
        request = upbit_request(streams, "bench-latency")
        channels = h.channels_of(streams)
        with h.consumers(1, "hiredis", port=server.port, channels=channels, record=True) as sub:
            async with _broker(server, sim, streams) as brk, gateway(server.url) as gw:
                with raw_clients(gw.url, [[request]], True) as gwc:
                    await _all_receiving(gwc)
                    await asyncio.sleep(warmup)
                    pids = [sim.pid, brk.pid, server.pid, gw.pid, sub[0].pid, gwc[0].pid]
                    sends, others = await _window(sim, duration, pids)
                    await asyncio.sleep(0.5)  # the last frames of the window arrive
                    via_gateway = gwc[0].finish()["recv"]
                    via_broker = sub[0].finish()["recv"]
        out["gateway"] = {**_match(sends, via_gateway), "other_load_cores": others}
        out["broker"] = {**_match(sends, via_broker), "other_load_cores": others}
        out["added_per_frame"] = _per_frame(sends, via_gateway, via_broker)
        out["offered_fps"] = round(len(sends) / duration, 1)
        # The broker is gone (its connection closed): the same client program straight on
        # the simulator, with the same request.
        await wait_for(
            lambda: _no_connections(sim), 10, 0.05, message="the broker's connection to close"
        )
        with raw_clients(sim.url, [[request]], True) as direct:
            await _all_receiving(direct)
            await asyncio.sleep(warmup)
            sends, others = await _window(sim, duration, [sim.pid, direct[0].pid])
            await asyncio.sleep(0.5)
            recv = direct[0].finish()["recv"]
        out["direct"] = {**_match(sends, recv), "other_load_cores": others}
    g, b, d = out["gateway"], out["broker"], out["direct"]
    for p in ("p50", "p99", "p999"):
        out[f"added_over_broker_{p}_us"] = round(g[f"{p}_us"] - b[f"{p}_us"], 1)
        out[f"added_over_direct_{p}_us"] = round(g[f"{p}_us"] - d[f"{p}_us"], 1)
        out[f"broker_over_direct_{p}_us"] = round(b[f"{p}_us"] - d[f"{p}_us"], 1)
    return out


def _disturbed(latency: dict[str, Any]) -> float:
    """The most other load (cores) any window of a latency run saw."""
    return max(latency[p].get("other_load_cores", 0.0) for p in ("gateway", "direct"))


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "duration": 1.5,
            "warmup": 0.7,
            "fanout": [(1000.0, 10)],
            "latency": 1000.0,
            "latency_duration": 1.0,
            "many": 100,
        }
    return {
        "duration": 6.0,
        "warmup": 1.5,
        "fanout": [(1000.0, 1), (1000.0, 10), (1000.0, 50), (5000.0, 10)],
        "latency": 1000.0,
        "latency_duration": 8.0,
        "many": 1000,
    }


async def run(server: Any, quick: bool) -> dict[str, Any]:
    p = plan(quick)
    fanout = []
    for target, n in p["fanout"]:
        print(f"  gateway: {target:g} frames/s, {n} client(s) on all streams ...", flush=True)
        fanout.append(
            await run_clients(
                server, target_fps=target, clients=n, duration=p["duration"], warmup=p["warmup"]
            )
        )
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 if quick else LATENCY_ATTEMPTS):
        print(f"  gateway: latency at {p['latency']:g} frames/s ({attempt + 1}) ...", flush=True)
        attempts.append(await run_latency(server, p["latency"], p["latency_duration"], p["warmup"]))
        if _disturbed(attempts[-1]) < h.QUIET["threshold"]:
            break
    # the least disturbed attempt is the figure; every attempt stays in the record
    latency = min(attempts, key=_disturbed)
    latency["attempts"] = [
        {
            "other_load_cores": _disturbed(a),
            **{
                k: v
                for k, v in a.items()
                if k.startswith(("added_over", "broker_over")) or k == "added_per_frame"
            },
        }
        for a in attempts
    ]
    print(f"  gateway: {p['many']} clients on one gateway ...", flush=True)
    many = await run_clients(
        server,
        target_fps=1000.0,
        clients=p["many"],
        codes_per_client=CODES_PER_CLIENT,
        duration=p["duration"],
        warmup=p["warmup"],
        record=True,
    )
    return {
        "fanout": fanout,
        "latency": latency,
        "many": many,
        "duration_s": p["duration"],
        "goal_client_frames_per_core": GOAL_CLIENT_FRAMES_PER_CORE,
        "goal_added_p99_us": GOAL_ADDED_P99_US,
    }
