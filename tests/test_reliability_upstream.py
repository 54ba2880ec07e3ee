"""Upstream faults against real processes: cuts, stalls, a muted code, rate-limit refusals.

The broker and its consumers run as subprocesses (``upbit-broker run`` and BrokerClient
processes); the simulator runs in the test's event loop so the test can cut, stall and mute it
and log every data frame it sends (:class:`~tests.support.processes.DataSendLog`). Each
scenario prints its figures (``pytest -s``); docs/reliability.md quotes the last run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, consumer_process, wait_for
from broker.testing import read_status as redis_status
from tests.support.broker_env import EventTap
from tests.support.processes import (
    Audit,
    audit_consumer,
    delivered_past,
    gap_windows,
    record_data_sends,
    sim_upstream,
    union_of,
    upstream_of,
)
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(180)

SUBS_A = {"trade": ["KRW-BTC", "KRW-ETH"], "ticker": ["KRW-BTC"]}
SUBS_B = {"ticker": ["KRW-BTC", "KRW-XRP"], "orderbook": ["KRW-ETH"]}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def streams_of(subs: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(t, c) for t, codes in subs.items() for c in codes}


def connection_id(sim: Any) -> int | None:
    conns = sim.state()["connections"]
    return conns[0]["id"] if len(conns) == 1 else None


def print_figures(title: str, **figures: Any) -> None:
    parts = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[figures] {title}: {parts}")


def check_audits(audits: list[Audit]) -> None:
    for audit in audits:
        print(f"[audit] {audit.line()}")
    for audit in audits:
        assert audit.expected > 0, audit.line()
        assert audit.lost_silently == 0, (audit.line(), audit.examples)
        assert audit.duplicates == 0, audit.line()
        assert audit.foreign == 0, audit.line()


@pytest.mark.slow
async def test_twenty_upstream_cuts_in_a_row(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    union = union_of(SUBS_A, SUBS_B)
    async with running_simulator(seed=31, rate=300) as sim, EventTap(redis_client) as tap:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "cut-1", tmp_path) as broker,
            consumer_process(url, "ca", SUBS_A, tmp_path) as ca,
            consumer_process(url, "cb", SUBS_B, tmp_path) as cb,
        ):
            await wait_for(lambda: sim_upstream(sim) == union, 20, message="union upstream")
            await wait_for(lambda: tap.of("connected"), 5, message="connected event")
            start_ms = max(ca.ready_ms(), cb.ready_ms())
            recoveries: list[float] = []
            cuts = 20
            for i in range(cuts):
                before = connection_id(sim)
                epoch_before = tap.of("connected")[-1]["epoch"]
                t0 = time.monotonic()
                assert sim.drop() == 1

                def restored(before: int | None = before) -> bool:
                    state = sim.state()
                    conns = state["connections"]
                    return bool(conns) and conns[0]["id"] != before and upstream_of(state) == union

                await wait_for(restored, 10, message=f"union restored after cut {i + 1}")
                recoveries.append(time.monotonic() - t0)
                gaps = await wait_for(
                    lambda e=epoch_before: [g for g in tap.of("gap") if g["epoch"] > e],
                    5,
                    message=f"gap event after cut {i + 1}",
                )
                connected = [c for c in tap.of("connected") if c["epoch"] > epoch_before]
                assert len(gaps) == 1, gaps
                assert gaps[0]["epoch"] == connected[0]["epoch"] == epoch_before + 1
                assert gaps[0]["reason"] == "reconnect"
                assert gaps[0]["since_ms"] <= gaps[0]["until_ms"]
                assert gaps[0]["broker"] == "cut-1"
                # no lease lost: both hashes are there and the leader counts both
                assert await redis_client.exists("t:lease:ca", "t:lease:cb") == 2
                if i % 2 == 0:
                    await asyncio.sleep(0.8)  # a healthy spell (the backoff resets) ...
                # ... or cut again at once: the backoff grows, and must stay within the limits
            await asyncio.sleep(1.0)
            end_ms = now_ms() - 300
            for c, subs in ((ca, SUBS_A), (cb, SUBS_B)):
                await delivered_past(log, c, streams_of(subs), end_ms)
            status = await redis_status(redis_client)
            totals = sim.state()["totals"]
            assert broker.alive
            assert status["leases"] == "2" and status["invalid_leases"] == "0"
            assert int(status["reconnects"]) == cuts
            assert totals["rate_limited_connects"] == 0
            assert totals["rate_limited_messages"] == 0
            assert len(tap.of("gap")) == cuts
            for consumer in (ca, cb):
                told = [g for g in consumer.gaps() if g["source"] == "broker"]
                assert len(told) == cuts, (consumer.client_id, len(told))
                assert consumer.last_stats()["reconnects"] == 0
            audits = [
                audit_consumer(
                    log,
                    c,
                    streams_of(subs),
                    gap_windows(c, tap.events),
                    start_ms=start_ms,
                    end_ms=end_ms,
                )
                for c, subs in ((ca, SUBS_A), (cb, SUBS_B))
            ]
    print_figures(
        "upstream cut x20",
        cuts_injected=cuts,
        recovered=len(recoveries),
        gap_events=len(tap.of("gap")),
        leases_lost=0,
        recovery_median_s=f"{statistics.median(recoveries):.2f}",
        recovery_max_s=f"{max(recoveries):.2f}",
        refused_connects=totals["rate_limited_connects"],
        refused_messages=totals["rate_limited_messages"],
        connections_opened=totals["connections_opened"],
    )
    check_audits(audits)


@pytest.mark.slow
async def test_stall_is_detected_and_recovered(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    subs = {"trade": ["KRW-BTC", "KRW-ETH"]}
    async with running_simulator(seed=32, rate=300) as sim, EventTap(redis_client) as tap:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "stall-1", tmp_path, stall_timeout=1.0) as broker,
            consumer_process(url, "cs", subs, tmp_path) as cs,
        ):
            await wait_for(lambda: sim_upstream(sim) == subs_sets(subs), 20, message="upstream")
            epoch = (await wait_for(lambda: tap.of("connected"), 5))[-1]["epoch"]
            stalled_at = now_ms()
            sim.stall(3.0)
            gaps = await wait_for(lambda: tap.of("gap"), 10, message="gap after the stall")
            detected_ms = gaps[0]["until_ms"] - stalled_at
            assert gaps[0]["reason"] == "stall"
            assert gaps[0]["epoch"] > epoch
            # recovered: after the stall ends, the union is upstream and frames flow again
            await wait_for(lambda: not sim.stalled, 10)
            unstalled_ms = now_ms()
            await wait_for(lambda: sim_upstream(sim) == subs_sets(subs), 10, message="union")
            await wait_for(
                lambda: any(m["t"] > unstalled_ms for m in cs.messages()), 10, message="flow"
            )
            recovered_ms = next(m["t"] for m in cs.messages() if m["t"] > unstalled_ms)
            await asyncio.sleep(1.0)
            end_ms = now_ms() - 300
            await delivered_past(log, cs, streams_of(subs), end_ms)
            status = await redis_status(redis_client)
            assert status["connected"] == "1" and broker.alive
            audit = audit_consumer(
                log,
                cs,
                streams_of(subs),
                gap_windows(cs, tap.events),
                start_ms=cs.ready_ms(),
                end_ms=end_ms,
            )
    print_figures(
        "upstream stall 3 s (stall_timeout 1 s)",
        stalls_injected=1,
        detected_after_ms=detected_ms,
        gap_events=len(tap.of("gap")),
        reasons=sorted({g["reason"] for g in tap.of("gap")}),
        flowing_again_ms_after_stall_end=recovered_ms - unstalled_ms,
        reconnects=status["reconnects"],
    )
    check_audits([audit])


def subs_sets(subs: dict[str, list[str]]) -> dict[str, set[str]]:
    return {t: set(c) for t, c in subs.items()}


def max_gap_ms(times: list[int]) -> int:
    return max((b - a for a, b in itertools.pairwise(times)), default=0)


@pytest.mark.slow
async def test_a_muted_code_is_not_a_dead_connection(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    subs = {"trade": ["KRW-BTC", "KRW-ETH"]}
    async with (
        running_simulator(seed=33, rate=300) as sim,
        EventTap(redis_client) as tap,
        broker_process(
            url, sim.url, "mute-1", tmp_path, stall_timeout=2.0, quiet_after=1.0
        ) as broker,
        consumer_process(url, "cm", subs, tmp_path) as cm,
    ):
        await wait_for(lambda: sim_upstream(sim) == subs_sets(subs), 20, message="upstream")
        await wait_for(lambda: len({m["ch"] for m in cm.messages()}) == 2, 10, message="both")
        conn = connection_id(sim)
        muted_ms = now_ms()
        sim.mute(["KRW-ETH"], 5.0)  # longer than the stall timeout
        mute_acked_ms = now_ms()
        # The simulator unmutes at or after muted_ms + 5 s, so a frame received before that was
        # sent while muted (the test noticing "mute over" may lag the real end by a poll).
        muted_window = (mute_acked_ms + 500, muted_ms + 5000)

        async def quiet() -> bool:
            st = await redis_status(redis_client)
            return json.loads(st.get("quiet_codes") or "[]") == ["trade:KRW-ETH"]

        await wait_for(quiet, 5, message="ETH listed as quiet")
        noticed_ms = now_ms() - muted_ms
        await wait_for(lambda: not sim.state()["muted"], 10, message="mute over")
        unmuted_ms = now_ms()
        await wait_for(
            lambda: any(
                m["ch"] == "t:trade:KRW-ETH" and m["t"] > unmuted_ms for m in cm.messages()
            ),
            10,
            message="ETH flows again",
        )
        eth_back_ms = now_ms() - unmuted_ms
        await wait_for(lambda: _no_quiet(redis_client), 5, message="quiet list empty")
        status = await redis_status(redis_client)
        assert connection_id(sim) == conn  # the same connection all along
        assert status["reconnects"] == "0"
        assert tap.of("gap") == []
        btc = [m["t"] for m in cm.messages("t:trade:KRW-BTC") if m["t"] >= muted_ms]
        eth_during = [
            m for m in cm.messages("t:trade:KRW-ETH") if muted_window[0] < m["t"] < muted_window[1]
        ]
        assert broker.alive
    print_figures(
        "one code muted 5 s (stall_timeout 2 s, quiet_after 1 s)",
        quiet_listed_after_ms=noticed_ms,
        eth_frames_while_muted=len(eth_during),
        eth_flowing_ms_after_unmute=eth_back_ms,
        btc_frames_meanwhile=len(btc),
        btc_max_gap_ms=max_gap_ms(btc),
        reconnects=status["reconnects"],
        gap_events=0,
    )
    assert not eth_during
    assert max_gap_ms(btc) < 2000  # flowing throughout (reconnects == 0 is asserted above)


async def _no_quiet(redis: aioredis.Redis) -> bool:
    return (await redis_status(redis)).get("quiet_codes") == "[]"


@pytest.mark.slow
async def test_message_limit_refusal_backs_off_and_recovers(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    """A simulator that allows 3 messages a minute per connection: the broker's subscribe,
    PING and LIST fit, the next change is refused ("Too Many Requests", then close). The
    broker backs off, reconnects and sends the full, changed set on the new connection."""
    url = redis_server.url
    async with (
        running_simulator(seed=34, rate=200, message_rate=(5, 3)) as sim,
        EventTap(redis_client) as tap,
        broker_process(url, sim.url, "limit-1", tmp_path) as broker,
        consumer_process(url, "cl", {"trade": ["KRW-BTC"]}, tmp_path) as _cl,
    ):
        await wait_for(lambda: sim_upstream(sim) == {"trade": {"KRW-BTC"}}, 20)
        # let subscribe + PING + LIST go out on this connection: its budget is now spent
        await wait_for(lambda: sim.state()["connections"][0]["requests"] >= 3, 10)
        recoveries: list[float] = []
        changes = 0

        async def settled(expected: set[str], what: str) -> None:
            t0 = time.monotonic()
            await wait_for(
                lambda: (sim_upstream(sim) or {}).get("trade") == expected, 15, message=what
            )
            recoveries.append(time.monotonic() - t0)
            # the new connection's subscribe, PING and LIST: its budget is spent again
            await wait_for(lambda: sim.state()["connections"][0]["requests"] >= 3, 10)

        for i, code in enumerate(["KRW-ETH", "KRW-XRP", "KRW-SOL"]):
            async with consumer_process(url, f"extra-{i}", {"trade": [code]}, tmp_path):
                changes += 1
                await settled({"KRW-BTC", code}, f"{code} added after the refusal")
            changes += 1  # the extra consumer released its lease: the set shrinks
            await settled({"KRW-BTC"}, f"{code} removed after the refusal")
        refusals = sim.state()["totals"]["rate_limited_messages"]
        status = await redis_status(redis_client)
        totals = sim.state()["totals"]
        assert broker.alive
    gaps = tap.of("gap")
    print_figures(
        "message limit 3/min per connection",
        refusals_injected=refusals,
        recovered=len(recoveries),
        recovery_max_s=f"{max(recoveries):.2f}",
        gap_events=len(gaps),
        gap_reasons=sorted({g["reason"] for g in gaps}),
        refused_connects=totals["rate_limited_connects"],
        last_error=status["last_error"][:60],
    )
    assert refusals == changes  # each change was refused once, on a spent connection
    assert totals["rate_limited_connects"] == 0
    assert len(gaps) == refusals
    # design.md lists "error" as the reason of a gap an Upbit error frame caused
    assert {g["reason"] for g in gaps} == {"error"}, gaps


@pytest.mark.slow
async def test_connect_limit_refusal_backs_off_and_recovers(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    """A simulator that allows one upgrade a second: a cut right after a connect makes the
    broker's reconnect an HTTP 429. It must back off (exponentially) and get back in."""
    url = redis_server.url
    subs = {"trade": ["KRW-BTC"], "ticker": ["KRW-ETH"]}
    async with (
        running_simulator(seed=35, rate=200, connect_rate=1) as sim,
        broker_process(
            url, sim.url, "connect-1", tmp_path, backoff_initial=0.05, backoff_max=2.0
        ) as broker,
        consumer_process(url, "cc", subs, tmp_path) as _cc,
    ):
        await wait_for(lambda: sim_upstream(sim) == subs_sets(subs), 20)
        recoveries: list[float] = []
        for _ in range(3):
            await asyncio.sleep(1.1)  # the next connect is allowed ...
            before = connection_id(sim)
            sim.drop()  # ... and spent at once by the reconnect
            await wait_for(lambda b=before: connection_id(sim) not in (None, b), 10)
            before = connection_id(sim)
            t0 = time.monotonic()
            sim.drop()  # this reconnect comes within the second: 429
            await wait_for(
                lambda b=before: (
                    connection_id(sim) not in (None, b) and sim_upstream(sim) == subs_sets(subs)
                ),
                15,
                message="back in after 429s",
            )
            recoveries.append(time.monotonic() - t0)
        totals = sim.state()["totals"]

        async def connected() -> bool:
            return (await redis_status(redis_client)).get("connected") == "1"

        await wait_for(connected, 5, message="status says connected")
        assert broker.alive
    print_figures(
        "connect limit 1/s",
        cuts_injected=6,
        refused_connects=totals["rate_limited_connects"],
        recovered=len(recoveries),
        recovery_max_s=f"{max(recoveries):.2f}",
        refused_messages=totals["rate_limited_messages"],
    )
    assert totals["rate_limited_connects"] >= 3  # the 429 path was exercised
    # exponential backoff: a 1-s window is crossed within ~5 refused attempts per cut
    assert totals["rate_limited_connects"] <= 3 * 6
    assert totals["rate_limited_messages"] == 0
