"""Lease churn: 50 consumers adding and removing codes at random for 30 s.

Two subprocesses run 25 asyncio tasks each; every task has its own Redis connection and
LeaseStore and adds or drops one (type, code) of its lease every 0.2-1.2 s, holding at most two
streams so the union keeps changing instead of saturating. The broker (a subprocess) must keep
its upstream requests inside Upbit's 5/s and 100/min per connection: the simulator refuses
nothing, and the exact time of every message it received (recorded by wrapping the simulator's
session) never has more than 5 in a second or 100 in a minute. Once the churn stops, the
upstream set must equal the union of the leases in Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.leases import LeaseStore
from broker.testing import RedisServer, broker_process, wait_for
from broker.testing import read_status as redis_status
from broker.upbit.types import union
from simulator.session import Session
from tests.support.processes import churn_process, sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(180)

DURATION = 30.0
TASKS_PER_PROCESS = 25
PROCESSES = 2


def max_in_window(times: list[float], window: float) -> int:
    """Most timestamps within any half-open window of ``window`` seconds."""
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.slow
async def test_fifty_consumers_churning_for_thirty_seconds(
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = redis_server.url
    received: list[tuple[int, float, str]] = []
    original = Session.receive

    def recording(self: Session, data: str | bytes, now: float) -> Any:
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        kind = "ping" if text.strip() == "PING" else "list" if "LIST_SUB" in text else "sub"
        received.append((id(self), now, kind))
        return original(self, data, now)

    monkeypatch.setattr(Session, "receive", recording)
    async with running_simulator(seed=71, rate=50) as sim:
        codes = sim.codes  # 42 codes x 3 types; each consumer holds at most 2 streams
        async with broker_process(url, sim.url, "churn-b", tmp_path):
            await wait_for(lambda: sim.state()["connections"], 20, message="broker connected")
            started = time.monotonic()
            procs = [
                churn_process(
                    url,
                    first=i * TASKS_PER_PROCESS,
                    tasks=TASKS_PER_PROCESS,
                    codes=codes,
                    duration=DURATION,
                    seed=71 + i,
                    types=["ticker", "trade", "orderbook"],
                )
                for i in range(PROCESSES)
            ]
            outputs = [await asyncio.to_thread(p.communicate, timeout=DURATION + 30) for p in procs]
            for p, (_, err) in zip(procs, outputs, strict=True):
                assert p.returncode == 0, err
            counts = [json.loads(out) for out, _ in outputs]
            churn_s = time.monotonic() - started
            stopped = time.monotonic()
            listing = await LeaseStore(redis_client, "t").list_all()
            wanted = union(*(lease.subscriptions for lease in listing.leases)).by_type()
            expected = {t: set(c) for t, c in wanted.items()}
            await wait_for(
                lambda: sim_upstream(sim) == expected,
                75,
                interval=0.05,
                message="upstream == union of the leases",
            )
            converged_s = time.monotonic() - stopped

            async def status_caught_up() -> dict[str, Any] | None:
                # the status hash is rewritten every status interval: wait for the next one
                st = await redis_status(redis_client)
                return st if json.loads(st.get("desired", "{}")) == wanted else None

            status = await wait_for(status_caught_up, 10, message="status shows the union")
            totals = sim.state()["totals"]
    per_conn: dict[int, list[float]] = {}
    for conn, t, _ in received:
        per_conn.setdefault(conn, []).append(t)
    worst_second = max(max_in_window(ts, 1.0) for ts in per_conn.values())
    worst_minute = max(max_in_window(ts, 60.0) for ts in per_conn.values())
    kinds = {k: sum(1 for *_, kind in received if kind == k) for k in ("sub", "list", "ping")}
    writes = sum(c["writes"] for c in counts)
    releases = sum(c["releases"] for c in counts)
    print(
        f"\n[figures] lease churn: consumers={PROCESSES * TASKS_PER_PROCESS} over "
        f"{churn_s:.1f}s, lease_writes={writes}, releases={releases}, "
        f"upstream_messages={len(received)} {kinds}, connections={len(per_conn)}, "
        f"max_per_second={worst_second}, max_per_minute={worst_minute}, "
        f"refused_messages={totals['rate_limited_messages']}, "
        f"converged_after_churn_s={converged_s:.1f}, final_streams="
        f"{sum(len(c) for c in expected.values())} from {len(listing.leases)} leases, "
        f"deferred_sends={status.get('deferred_sends')}"
    )
    assert writes + releases > 1000
    assert totals["rate_limited_messages"] == 0
    assert totals["rate_limited_connects"] == 0
    assert worst_second <= 5 and worst_minute <= 100
    assert len(per_conn) == 1  # the churn never cost a reconnect
    assert json.loads(status["desired"]) == wanted
