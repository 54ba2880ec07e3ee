"""Resubscribe: from a lease write to the simulator holding the new full set (benchmark 3).

Idle: one lease change at a time (a code added), spaced so the rate budget never defers a
send; the time is from the end of the lease write to the first ``/_sim/state`` poll (every
5 ms) that shows the new code on the broker's connection. Under churn: ``changes_per_s``
lease writes a second (``clients`` leases, each re-drawn at random) while the simulator's
request counter is sampled every 100 ms; afterwards the set upstream must equal the union of
the final leases exactly. Upbit allows 5 messages a second and 100 a minute per connection
(the broker budgets 4 and 90; LIST_SUBSCRIPTIONS and keepalive PINGs count too).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from benchmarks import harness as h
from broker.redis_client import redis_client
from broker.testing import SimulatorProcess, wait_for


async def _subscriptions(sim: SimulatorProcess) -> tuple[dict[str, set[str]], int]:
    conn = await sim.connection()
    if conn is None:
        return {}, 0
    return {t: set(c) for t, c in conn["subscriptions"].items()}, int(conn["requests"])


def _union(leases: dict[str, dict[str, list[str]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for streams in leases.values():
        for t, codes in streams.items():
            out.setdefault(t, set()).update(codes)
    return {t: c for t, c in out.items() if c}


async def run(server: Any, quick: bool) -> dict[str, Any]:
    seed = 5
    markets, codes = h.universe_codes(200, seed)
    client = redis_client(server.url)
    await client.flushall()
    probes = 3 if quick else 10
    spacing = 0.6 if quick else 1.5
    churn_s = 2.0 if quick else 65.0
    changes_per_s = 100
    clients = 20
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    try:
        async with h.simulator(rate=200, markets=markets, seed=seed) as sim:
            base = {"ticker": codes[:50]}
            leases: dict[str, dict[str, list[str]]] = {"bench-base": base}
            await h.write_lease(client, "bench-base", base)
            async with h.broker(server.url, sim.url) as brk:
                await wait_for(
                    lambda: _has(sim, "ticker", codes[49]),
                    30,
                    0.05,
                    message="the broker to subscribe",
                )
                await asyncio.sleep(0.5 if quick else 1.0)
                # -- idle: one change at a time --------------------------------------------
                times = []
                for i in range(probes):
                    code = codes[50 + i]
                    probe = {"ticker": [code]}
                    await h.write_lease(client, f"bench-probe{i}", probe)
                    written = time.monotonic()
                    await wait_for(
                        lambda c=code: _has(sim, "ticker", c),
                        10,
                        0.005,
                        message="the new code upstream",
                    )
                    times.append((time.monotonic() - written) * 1000)
                    leases[f"bench-probe{i}"] = probe
                    await asyncio.sleep(spacing)
                out["idle"] = {
                    "changes": probes,
                    "ms_each": [round(t, 1) for t in times],
                    "p50_ms": round(h.percentile(times, 50), 1),
                    "max_ms": round(max(times), 1),
                    "coalesce_delay_ms": 50,
                }
                # -- churn -----------------------------------------------------------------
                s0 = await sim.state()
                samples: list[tuple[float, int]] = []
                stop = asyncio.Event()

                async def sample() -> None:
                    while not stop.is_set():
                        _, requests = await _subscriptions(sim)
                        samples.append((time.monotonic(), requests))
                        await asyncio.sleep(0.1)

                sampler = asyncio.create_task(sample())
                writes = 0
                started = time.monotonic()
                cpu0 = brk.cpu_seconds()
                while time.monotonic() - started < churn_s:
                    cid = f"bench-churn{rng.randrange(clients)}"
                    streams = {"ticker": rng.sample(codes, 10), "trade": rng.sample(codes, 5)}
                    await h.write_lease(client, cid, streams)
                    leases[cid] = streams
                    writes += 1
                    next_at = started + writes / changes_per_s
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                churn_elapsed = time.monotonic() - started
                churn_cpu = brk.cpu_seconds() - cpu0
                last_write = time.monotonic()
                want = _union(leases)

                async def exact() -> bool:
                    have, _ = await _subscriptions(sim)
                    return have == want

                try:
                    await wait_for(exact, 120, 0.02, message="the final set upstream")
                    converged_ms: float | None = (time.monotonic() - last_write) * 1000
                except TimeoutError:
                    converged_ms = None
                await asyncio.sleep(0.3 if quick else 1.0)
                stop.set()
                await sampler
                s1 = await sim.state()
                have, _ = await _subscriptions(sim)
    finally:
        await client.aclose()
    per_s, per_min = _peaks(samples)
    refused = s1["totals"]["rate_limited_messages"] - s0["totals"]["rate_limited_messages"]
    requests = samples[-1][1] - samples[0][1] if samples else 0
    out["churn"] = {
        "lease_writes": writes,
        "seconds": round(churn_elapsed, 2),
        "writes_per_s": round(writes / churn_elapsed, 1),
        "upstream_requests": requests,
        "max_requests_in_1s": per_s,
        "max_requests_in_60s": per_min,
        "window_covers_60s": samples[-1][0] - samples[0][0] >= 60 if samples else False,
        "upbit_limits": {"per_s": 5, "per_min": 100},
        "rate_limited_by_sim": refused,
        "within_limits": refused == 0 and per_s <= 5 and per_min <= 100,
        "sim_errors": s1["totals"]["errors"] - s0["totals"]["errors"],
        "converged_ms_after_last_write": round(converged_ms, 1) if converged_ms else None,
        "final_set_exact": have == want,
        "final_streams": sum(len(c) for c in want.values()),
        "broker_cpu_cores": round(churn_cpu / churn_elapsed, 3),
    }
    return out


async def _has(sim: SimulatorProcess, type_: str, code: str) -> bool:
    have, _ = await _subscriptions(sim)
    return code in have.get(type_, set())


def _peaks(samples: list[tuple[float, int]]) -> tuple[int, int]:
    """Most requests between two samples at most 1 s (60 s) apart. Sampled every ~100 ms, so
    a count can miss what fell just outside; the simulator's own limiter (which refuses and
    counts every message over 5/s or 100/min) is the exact check."""
    best1 = best60 = 0
    j1 = j60 = 0
    for t, n in samples:
        while samples[j1][0] < t - 1.0:
            j1 += 1
        while samples[j60][0] < t - 60.0:
            j60 += 1
        best1 = max(best1, n - samples[j1][1])
        best60 = max(best60, n - samples[j60][1])
    return best1, best60
