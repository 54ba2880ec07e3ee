"""Recovery: how long consumers go without data after a fault (benchmark 4).

A subscriber process records every data frame and every event on ``{ns}:events`` (with the
first data frame after each). Faults:

* ``drop``: ``/_sim/drop`` cuts the broker's connection (no close frame, as a network fault).
  Recovery = first data frame after the broker's ``connected`` event minus the drop time;
  it includes the reconnect backoff (``backoff_initial`` with jitter) on purpose.
* ``leader_kill``: SIGKILL of the leader with a standby running. Takeover = first data frame
  published by the standby minus the kill time; bounded by the leader lock's TTL
  (``leader_ttl``), which the run records.

The simulator offers 1,000 frames/s over 200 codes throughout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_throughput import broker_status, wait_subscribed
from broker.redis_client import redis_client
from broker.testing import wait_for


def _first_data_after(events: list[list[Any]], kind: str, after_ns: int, **match: Any) -> Any:
    for recv_ns, body, first_data in events:
        if recv_ns < after_ns or body.get("event") != kind:
            continue
        if all(body.get(k) == v for k, v in match.items()):
            return recv_ns, body, first_data
    return None


async def run(server: Any, quick: bool) -> dict[str, Any]:
    seed = 3
    markets, codes = h.universe_codes(200, seed)
    fpe = h.frames_per_event(markets, seed)
    streams = h.load_streams(codes)
    events_channel = f"{h.NAMESPACE}:events"
    drops = 1 if quick else 5
    leader_ttl = 1.5 if quick else 5.0  # 5.0 is the default
    client = redis_client(server.url)
    await client.flushall()
    out: dict[str, Any] = {}
    try:
        async with h.simulator(rate=1000 / fpe, markets=markets, seed=seed) as sim:
            with h.consumers(
                1,
                "hiredis",
                port=server.port,
                channels=h.channels_of(streams),
                events=events_channel,
            ) as cons:
                await h.write_lease(client, "bench-recovery", streams)
                # -- drop ------------------------------------------------------------------
                drop_times = []
                # Backoff resets after 1 s of healthy flow (default 30 s): every drop is then a
                # first drop (0.25-0.5 s backoff), not a storm of five drops in ten seconds.
                async with h.broker(
                    server.url, sim.url, broker_id="bench-a", backoff_reset_after=1.0
                ):
                    await wait_subscribed(sim, streams, 30)
                    await asyncio.sleep(0.5 if quick else 1.0)
                    for _ in range(drops):
                        drop_times.append(time.time_ns())
                        await sim.get("/_sim/drop")
                        await asyncio.sleep(0.2)
                        await wait_subscribed(sim, streams, 30)
                        await asyncio.sleep(0.8 if quick else 1.5)
                # -- leader kill -----------------------------------------------------------
                await client.delete(f"{h.NAMESPACE}:leader")
                settings = {"leader_ttl": leader_ttl}
                async with h.broker(
                    server.url, sim.url, broker_id="bench-leader", **settings
                ) as lead:

                    async def leading(name: str) -> bool:
                        st = await broker_status(client)
                        return st.get("leader") == name and st.get("connected") == "1"

                    await wait_for(lambda: leading("bench-leader"), 30, 0.05, message="the leader")
                    async with h.broker(server.url, sim.url, broker_id="bench-standby", **settings):
                        # the standby is up and polling the lock
                        await asyncio.sleep(1.0 if quick else 1.5)
                        killed = time.time_ns()
                        lead.kill()
                        await wait_for(
                            lambda: leading("bench-standby"),
                            30,
                            0.05,
                            message="the standby to lead",
                        )
                        await wait_subscribed(sim, streams, 30)
                        await asyncio.sleep(0.5)
                        result = cons[0].finish()
    finally:
        await client.aclose()
    events = result["events"]
    recoveries = []
    for t in drop_times:
        found = _first_data_after(events, "connected", t, broker="bench-a")
        if found and found[2]:
            recoveries.append((found[2] - t) / 1e6)
    gaps = [e[1] for e in events if e[1].get("event") == "gap" and e[1].get("reason")]
    out["drop"] = {
        "drops": drops,
        "recovered": len(recoveries),
        "ms_each": [round(r, 1) for r in recoveries],
        "p50_ms": round(h.percentile(recoveries, 50), 1),
        "max_ms": round(max(recoveries), 1) if recoveries else None,
        "backoff_initial_s": 0.5,
        "backoff_reset_after_s": 1.0,
        "gap_events": sum(1 for g in gaps if g.get("reason") == "reconnect"),
    }
    found = _first_data_after(events, "connected", killed, broker="bench-standby")
    takeover_ms = (found[2] - killed) / 1e6 if found and found[2] else None
    out["leader_kill"] = {
        "leader_ttl_s": leader_ttl,
        "takeover_ms": round(takeover_ms, 1) if takeover_ms else None,
        "gap_event": any(g.get("reason") == "takeover" for g in gaps),
    }
    return out
