"""Fan-out from replicas (issue 15): PUBLISH on a master reaches subscribers on its replicas.

One master ``redis-server`` and two replicas of it (``--replicaof``, free ports) for the whole
section. Each run is a fresh simulator and one broker publishing to the master, and N consumer
processes (``benchmarks.consumer hiredis``, every one subscribed to all 600 channels of the
load) subscribed either

* ``master``: all N to the master, or
* ``replicas``: spread over the two replicas (N/2 each), the master serving only the broker
  and the replication stream.

Reported, over a steady window after a warm-up: deliveries a second summed over the consumers,
loss (as in the throughput benchmark: the feed is frozen at the end, everything in flight
drains, and every frame the simulator sent must have reached every consumer), the broker's CPU
per frame (the same whichever way the consumers subscribe: the broker writes each frame once,
to the master, and replication copies it onward), and each ``redis-server``'s CPU in cores,
which shows where one Redis's single thread would saturate. CPU from schedstat (ns) where the
kernel has it.

Benchmark layer (not shipped). :func:`compare`, :func:`limited_by` and :func:`per_core` are
pure (dicts in, dicts out), so the table and record code is testable without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_throughput import broker_status, wait_settled, wait_subscribed
from broker.redis_client import redis_client
from broker.testing import RedisServer, wait_for

#: offered frames a second (ticker, trade and orderbook of 200 codes): low enough that the
#: simulator and the broker leave most of the 2 cores to Redis and the consumers
TARGET_FPS = 5000.0
#: consumer processes per run (full; --quick: a smoke run of both ways)
CONSUMERS_FULL = (4, 16, 32)
CONSUMERS_QUICK = (2,)
MODES = ("master", "replicas")
REPLICAS = 2
#: Every server may buffer this much for a subscriber that falls behind for a moment (a
#: consumer process descheduled on a saturated machine): a run measures throughput, and a
#: disconnected consumer would end it (Redis's default: 32mb 8mb 60).
SERVER_ARGS = ("--client-output-buffer-limit", "pubsub 256mb 64mb 60")
#: cores at which one redis-server's single thread counts as saturated
REDIS_THREAD_SATURATED = 0.9


# -- pure: verdicts and comparisons ---------------------------------------------------------


def limited_by(run: dict[str, Any], cpus: int) -> str:
    """What held a run back: ``"-"`` when every consumer kept up, else the first that fits of
    one ``redis-server`` thread busy, the broker busy, the whole machine busy, or the
    consumers (their share of the cores)."""
    if run["keeps_up"] and not run["loss"]:
        return "-"
    redis = run["redis_cores"]
    busiest = max(redis, key=redis.get) if redis else None
    if busiest is not None and redis[busiest] >= REDIS_THREAD_SATURATED:
        return f"{busiest} (one thread)"
    if run["broker_cpu_cores"] >= 0.95:
        return "broker"
    if run["machine_cpu_cores_busy_all_processes"] >= 0.9 * cpus:
        return f"machine ({cpus} cores busy)"
    return "consumers"


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per consumer count, the ``replicas`` run against the ``master`` run of the same N:
    deliveries, the broker's CPU per frame, the busiest Redis's cores and all Redis's together."""
    by_key = {(r["consumers"], r["mode"]): r for r in runs}
    out = []
    for n in sorted({r["consumers"] for r in runs}):
        master, spread = by_key.get((n, "master")), by_key.get((n, "replicas"))
        if master is None or spread is None:
            continue

        def busiest(r: dict[str, Any]) -> float:
            return float(max(r["redis_cores"].values(), default=0.0))

        def total(r: dict[str, Any]) -> float:
            return float(sum(r["redis_cores"].values()))

        out.append(
            {
                "consumers": n,
                "deliveries_per_s": [master["deliveries_per_s"], spread["deliveries_per_s"]],
                "deliveries_ratio": _ratio(spread["deliveries_per_s"], master["deliveries_per_s"]),
                "broker_cpu_us_per_frame": [
                    master["broker_cpu_us_per_frame"],
                    spread["broker_cpu_us_per_frame"],
                ],
                "busiest_redis_cores": [round(busiest(master), 3), round(busiest(spread), 3)],
                "all_redis_cores": [round(total(master), 3), round(total(spread), 3)],
            }
        )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- processes ------------------------------------------------------------------------------


@asynccontextmanager
async def replica_set(replicas: int = REPLICAS) -> AsyncIterator[list[RedisServer]]:
    """A master and ``replicas`` replicas of it, each a ``redis-server`` on a free port, once
    every replica's link to the master is up (``[master, replica1, ...]``)."""
    async with contextlib.AsyncExitStack() as stack:
        master = await stack.enter_async_context(RedisServer(SERVER_ARGS))
        servers = [master]
        for _ in range(replicas):
            args = (*SERVER_ARGS, "--replicaof", "127.0.0.1", str(master.port))
            servers.append(await stack.enter_async_context(RedisServer(args)))
        for replica in servers[1:]:
            await wait_for(
                functools.partial(_link_up, replica.url),
                30,
                0.05,
                message="a replica's master link",
            )
        yield servers


async def _link_up(url: str) -> bool:
    client = redis_client(url)
    try:
        info: dict[str, Any] = await client.info("replication")
    finally:
        await client.aclose()
    return info.get("master_link_status") == "up"


@contextmanager
def _spread_consumers(
    n: int, ports: list[int], channels: list[str]
) -> Iterator[list[h.ConsumerProc]]:
    """``n`` hiredis consumers, as evenly as they go over ``ports`` (the first ports take the
    remainder)."""
    with contextlib.ExitStack() as stack:
        procs: list[h.ConsumerProc] = []
        for i, port in enumerate(ports):
            share = _count_on(n, len(ports), i)
            if share:
                procs += stack.enter_context(
                    h.consumers(share, "hiredis", port=port, channels=channels)
                )
        yield procs


# -- one run --------------------------------------------------------------------------------


async def run_fanout(
    servers: list[RedisServer],
    *,
    mode: str,
    n_consumers: int,
    duration: float,
    warmup: float,
    target_fps: float = TARGET_FPS,
    codes_total: int = 200,
    seed: int = 7,
    status_wait: bool = True,
) -> dict[str, Any]:
    """One run: a fresh simulator and broker on the master, ``n_consumers`` subscribed the
    ``mode`` way; returns its figures."""
    master, replicas = servers[0], servers[1:]
    markets, codes = h.universe_codes(codes_total, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    ports = [master.port] if mode == "master" else [r.port for r in replicas]
    names = ["redis-master", *(f"redis-replica{i + 1}" for i in range(len(replicas)))]
    client = redis_client(master.url)
    await client.flushall()  # replicated: the replicas start empty too
    try:
        async with h.simulator(rate=target_fps / fpe, markets=markets, seed=seed) as sim:
            with _spread_consumers(n_consumers, ports, h.channels_of(streams)) as cons:
                await h.write_lease(client, "bench-replicas", streams)
                async with h.broker(master.url, sim.url) as brk:
                    await wait_subscribed(sim, streams, 30)
                    await asyncio.sleep(warmup)
                    pids = {
                        "broker": brk.pid,
                        "simulator": sim.pid,
                        **{name: s.pid for name, s in zip(names, servers, strict=True)},
                        **{f"consumer{i}": c.pid for i, c in enumerate(cons)},
                    }
                    await h.quiet_moment(pids.values())
                    s0 = await sim.state()
                    c0 = [c.count() for c in cons]
                    wakes0 = [_wakeups(c.pid) for c in cons]
                    window = h.CpuWindow.begin(pids)
                    await asyncio.sleep(duration)
                    elapsed, stat_cpu = window.end()
                    wakes1 = [_wakeups(c.pid) for c in cons]
                    c1 = [c.count() for c in cons]
                    s1 = await sim.state()
                    # Freeze the feed, let everything in flight arrive, then count loss.
                    await sim.get("/_sim/stall?seconds=600")
                    await wait_settled(lambda: [c.count() for c in cons])
                    if status_wait:
                        await asyncio.sleep(1.2)  # one more status write (every second)
                    status = await broker_status(client)
                    final = await sim.state()
                    results = [c.finish() for c in cons]
                    broker_alive = brk.alive
            links = [await _link_up(r.url) for r in replicas]
    finally:
        await client.aclose()

    precise = window.precise
    # schedstat (ns) where the kernel has it, else /proc/PID/stat (10-ms ticks)
    cpu: dict[str, float] = {}
    for n in pids:
        ns = precise.get(n)
        cpu[n] = ns if ns is not None else stat_cpu[n]
    sim_data = final["totals"]["frames_sent"] - int(status.get("list_requests", 0))
    sent_window = s1["totals"]["frames_sent"] - s0["totals"]["frames_sent"]
    skipped = s1["totals"]["events_skipped"] - s0["totals"]["events_skipped"]
    each = [(b - a) / elapsed for a, b in zip(c0, c1, strict=True)]
    received = [r["frames"] for r in results]
    losses = [sim_data - n for n in received]
    deliveries = sum(each)
    wakeups = sum(b - a for a, b in zip(wakes0, wakes1, strict=True))
    offered = sent_window / elapsed
    consumer_cores = sum(v for k, v in cpu.items() if k.startswith("consumer")) / elapsed
    redis_cores = {n: round(cpu[n] / elapsed, 3) for n in names}
    serving = names[:1] if mode == "master" else names[1:]
    shares = [_count_on(n_consumers, len(ports), i) for i in range(len(ports))]
    starts = [sum(shares[:i]) for i in range(len(shares))]
    served = {
        name: sum(each[start : start + share])
        for name, start, share in zip(serving, starts, shares, strict=True)
    }
    run: dict[str, Any] = {
        "mode": mode,
        "consumers": n_consumers,
        "consumers_per_server": dict(zip(serving, shares, strict=True)),
        "target_fps": target_fps,
        "window_s": round(elapsed, 3),
        "offered_fps": round(offered, 1),
        "deliveries_per_s": round(deliveries, 1),
        "expected_deliveries_per_s": round(offered * n_consumers, 1),
        "delivered_fps_min": round(min(each), 1) if each else 0.0,
        "keeps_up": bool(each) and min(each) >= 0.97 * offered,
        "sim_frames_data": sim_data,
        "received_each": received,
        "loss": max(losses) if losses else 0,
        "loss_total": sum(losses),
        "consumer_errors": [r["error"] for r in results if r.get("error")],
        "broker_frames_published": int(status.get("frames_published", 0)),
        "broker_cpu_us_per_frame": round(cpu["broker"] / sent_window * 1e6, 2)
        if sent_window
        else None,
        "broker_cpu_cores": round(cpu["broker"] / elapsed, 3),
        "redis_cores": redis_cores,
        "deliveries_per_s_by_server": {n: round(v, 1) for n, v in served.items()},
        # What one redis-server thread would deliver on a whole core at the cost it had here
        # (its deliveries over its cores; the lowest of the servers the consumers were on)
        "deliveries_per_redis_core": per_core(served, redis_cores),
        # Redis's work for each delivery, all servers together (replication included)
        "redis_us_per_delivery": round(sum(cpu[n] for n in names) / (deliveries * elapsed) * 1e6, 3)
        if deliveries
        else None,
        "consumer_cores": round(consumer_cores, 3),
        "consumer_us_per_frame": round(consumer_cores / deliveries * 1e6, 2)
        if deliveries
        else None,
        # frames a consumer got per wake-up: the bigger the writes Redis makes to a subscriber,
        # the fewer wake-ups and the less each frame costs it
        "consumer_frames_per_wakeup": round(deliveries * elapsed / wakeups, 2) if wakeups else None,
        "simulator_cpu_cores": round(cpu["simulator"] / elapsed, 3),
        "machine_cpu_cores_busy_all_processes": round(window.machine_cores, 3),
        "other_load_cores": h.others_in(window, elapsed, stat_cpu),
        "clock": "schedstat" if precise.get("broker") is not None else "stat",
        "sim_events_skipped": skipped,
        "sim_overflow_drops": final["totals"]["overflow_drops"],
        "replica_links_up_at_end": links,
        "broker_alive": broker_alive,
    }
    run["limited_by"] = limited_by(run, os.cpu_count() or 1)
    return run


def _wakeups(pid: int) -> int:
    """How often ``pid`` blocked and was woken (``voluntary_ctxt_switches`` of
    ``/proc/PID/status``; 0 if unreadable). A hiredis consumer blocks only in ``select()``, and
    reads once a wake-up (a socket ``recv`` is not counted in ``/proc/PID/io``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def per_core(served: dict[str, float], cores: dict[str, float]) -> float | None:
    """The lowest of ``served[name] / cores[name]`` (None without CPU figures)."""
    rates = [v / cores[n] for n, v in served.items() if cores.get(n)]
    return round(min(rates)) if rates else None


def _count_on(n: int, servers: int, i: int) -> int:
    """How many of ``n`` consumers :func:`_spread_consumers` puts on server ``i``."""
    return n // servers + (1 if i < n % servers else 0)


async def run(server: Any, quick: bool) -> dict[str, Any]:
    """Every (consumers, mode) run of the plan; ``server`` (the run's shared Redis) is unused:
    this section brings its own master and replicas."""
    del server
    duration, warmup = (1.5, 0.7) if quick else (5.0, 1.5)
    plan = CONSUMERS_QUICK if quick else CONSUMERS_FULL
    runs = []
    started = time.monotonic()
    async with replica_set() as servers:
        for n in plan:
            for mode in MODES:
                print(f"  replicas: {n} consumers on the {mode} ...", flush=True)
                runs.append(
                    await run_fanout(
                        servers,
                        mode=mode,
                        n_consumers=n,
                        duration=duration,
                        warmup=warmup,
                        status_wait=not quick,
                    )
                )
    return {
        "target_fps": TARGET_FPS,
        "codes": 200,
        "types": list(h.LOAD_TYPES),
        "replicas": REPLICAS,
        "server_args": list(SERVER_ARGS),
        "duration_s": duration,
        "warmup_s": warmup,
        "runs": runs,
        "compare": compare(runs),
        "seconds": round(time.monotonic() - started, 1),
    }
