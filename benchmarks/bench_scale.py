"""Scale: 1,000 leases over 800 codes (benchmark 5).

1,000 leases (each 1-3 types of 5-40 codes; together every code of an 800-code universe) are
written at once to a running broker. Reported: how long until the simulator holds the exact
union (lease writes -> lease listing -> union -> request -> upstream), the same for one more
lease afterwards, the broker's memory before and after, and, in this process, what the pure
steps cost at this size: listing and parsing the leases from Redis, the union, the request.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import redis.asyncio as aioredis

from benchmarks import harness as h
from broker.core.control import SubscriptionController
from broker.leases import LeaseStore
from broker.redis_client import redis_client
from broker.testing import wait_for
from broker.upbit.types import union


def make_leases(codes: list[str], n: int, seed: int) -> dict[str, dict[str, list[str]]]:
    rng = random.Random(seed)
    leases: dict[str, dict[str, list[str]]] = {}
    for i in range(n):
        types = rng.sample(list(h.LOAD_TYPES), rng.randint(1, 3))
        picked = rng.sample(codes, rng.randint(5, 40))
        if i < len(codes):  # together the leases cover every code
            picked.append(codes[i])
        leases[f"bench-scale{i:04d}"] = {t: sorted(set(picked)) for t in types}
    return leases


async def _heartbeats(
    client: aioredis.Redis, brk: Any, items: list[tuple[str, Any]], seconds: float
) -> dict[str, Any]:
    """Every lease renewed once per TTL/3 of a 10-s lease (what 1,000 live consumers do, each
    renewal a control message): the broker's CPU while nothing changes but the deadlines."""
    per_second = len(items) / (10.0 / 3)
    cpu0, t0 = brk.cpu_seconds(), time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * per_second) - sent
        batch = [items[(sent + i) % len(items)] for i in range(max(0, due))]
        await asyncio.gather(*(h.write_lease(client, c, s) for c, s in batch))
        sent += len(batch)
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    return {
        "renewals_per_s": round(sent / elapsed, 1),
        "broker_cpu_cores": round((brk.cpu_seconds() - cpu0) / elapsed, 3),
    }


def _union(leases: dict[str, dict[str, list[str]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for streams in leases.values():
        for t, codes in streams.items():
            out.setdefault(t, set()).update(codes)
    return out


async def run(server: Any, quick: bool) -> dict[str, Any]:
    seed = 9
    n_leases, n_codes = 1000, 800
    markets, codes = h.universe_codes(n_codes, seed)
    leases = make_leases(codes, n_leases, seed)
    want = _union(leases)
    client = redis_client(server.url)
    await client.flushall()
    out: dict[str, Any] = {"leases": n_leases, "codes": len(codes)}
    try:
        async with h.simulator(rate=200, markets=markets, seed=seed) as sim:
            async with h.broker(server.url, sim.url) as brk:
                await wait_for(
                    lambda: _status_leader(client), 30, 0.05, message="the broker to lead"
                )
                await asyncio.sleep(0.5)
                before = brk.memory()
                cpu0 = brk.cpu_seconds()
                started = time.monotonic()
                items = list(leases.items())
                for i in range(0, len(items), 50):  # 50 in flight: as many clients at once
                    await asyncio.gather(
                        *(h.write_lease(client, c, s) for c, s in items[i : i + 50])
                    )
                written = time.monotonic()

                async def holds(target: dict[str, set[str]]) -> bool:
                    conn = await sim.connection()
                    if conn is None:
                        return False
                    have = {t: set(c) for t, c in conn["subscriptions"].items()}
                    return have == target

                await wait_for(lambda: holds(want), 60, 0.01, message="the union upstream")
                done = time.monotonic()
                await asyncio.sleep(2.0)  # frames of 2,400 streams flow; reconciles run
                after = brk.memory()
                cpu1 = brk.cpu_seconds()
                # One more lease at this scale: a new type for one code.
                extra = {"candle.1m": [codes[0]]}
                await h.write_lease(client, "bench-scale-extra", extra)
                t0 = time.monotonic()
                want2 = {**want, "candle.1m": {codes[0]}}
                await wait_for(lambda: holds(want2), 30, 0.01, message="the extra lease upstream")
                one_more_ms = (time.monotonic() - t0) * 1000
                heartbeats = await _heartbeats(client, brk, items, 2.0 if quick else 6.0)
            # The pure steps, in this process, at the same size.
            store = LeaseStore(client, h.NAMESPACE)
            t = time.perf_counter()
            listing = await store.list_all()
            list_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            wanted = union(*(lease.subscriptions for lease in listing.leases))
            union_ms = (time.perf_counter() - t) * 1000
            controller = SubscriptionController()
            controller.connection_opened(0.0)
            controller.set_desired(wanted, 0.0)
            t = time.perf_counter()
            messages = controller.data_to_send(1.0)
            request_ms = (time.perf_counter() - t) * 1000
    finally:
        await client.aclose()
    out.update(
        {
            "streams": sum(len(c) for c in want.values()),
            "write_all_leases_ms": round((written - started) * 1000, 1),
            "union_upstream_ms_after_last_write": round((done - written) * 1000, 1),
            "one_more_lease_ms": round(one_more_ms, 1),
            "broker_rss_before_bytes": before["rss"],
            "broker_rss_after_bytes": after["rss"],
            "broker_peak_rss_bytes": after["peak_rss"],
            "broker_cpu_s_to_settle": round(cpu1 - cpu0, 3),
            "heartbeats": heartbeats,
            "pure": {
                "list_and_parse_leases_ms": round(list_ms, 1),
                "union_ms": round(union_ms, 2),
                "build_request_ms": round(request_ms, 2),
                "request_bytes": sum(len(m) for m in messages if not _is_ping(m)),
            },
        }
    )
    return out


def _is_ping(message: bytes | str) -> bool:
    return message in ("PING", b"PING")


async def _status_leader(client: aioredis.Redis) -> bool:
    raw: Any = await client.hget(f"{h.NAMESPACE}:status", "leader")
    return bool(raw)
