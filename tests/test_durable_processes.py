"""Durable consumers against real processes (issue 13, "Done when"): a consumer that reads the
history (``BrokerClient(durable=True)``) misses nothing that is still retained.

The broker and the consumers are subprocesses; the simulator runs in the test's event loop and
logs every data frame it sends (:func:`tests.support.processes.record_data_sends`), so each
consumer is audited frame by frame against the simulator: lost, in a gap or silently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, consumer_process, wait_for
from broker.testing.consumer import ConsumerProcess
from simulator.sends import frame_key
from tests.support.processes import (
    DataSendLog,
    audit_consumer,
    gap_windows,
    record_data_sends,
    sim_upstream,
    union_of,
)
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(180)

CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA"]
SUBS = {"trade": CODES, "ticker": CODES, "orderbook": CODES}
#: generous caps: the pauses below must stay inside the window
HISTORY = "trade=20000,ticker=5000,orderbook=5000"
DURABLE = {"client": {"durable": True}}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def streams_of(subs: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(t, c) for t, codes in subs.items() for c in codes}


def received_keys(consumer: ConsumerProcess) -> int:
    return len(consumer.messages())


def durable_view(log: DataSendLog) -> DataSendLog:
    """What a durable consumer is owed: every data frame but trade SNAPSHOTs, which repeat the
    stream's last trade and are not appended to the history (``SnapshotTwin``)."""
    view = DataSendLog()
    view.records = [r for r in log.records if not (r[2] == "trade" and r[4] == "SNAPSHOT")]
    return view


async def caught_up(log: DataSendLog, consumer: ConsumerProcess, until_ms: int) -> bool:
    """Every frame sent for its streams up to ``until_ms`` has reached ``consumer``."""
    audit = audit_consumer(
        durable_view(log),
        consumer,
        streams_of(SUBS),
        [],
        start_ms=consumer.ready_ms() + 1_000,
        end_ms=until_ms,
    )
    return audit.expected > 0 and audit.lost_silently == 0


@pytest.mark.slow
async def test_a_paused_and_a_cut_durable_consumer_miss_nothing(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGSTOP for 2 s (under its lease TTL) at ~2k frames/s, then its Redis connection killed
    10 times: 0 frames missing, none twice, and no gap (nothing was lost upstream)."""
    url = redis_server.url
    async with running_simulator(seed=5, rate=1800, markets=8) as sim:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "d-1", tmp_path, history=HISTORY) as broker,
            consumer_process(url, "dur", SUBS, tmp_path, lease_ttl=5.0, **DURABLE) as durable,
        ):
            await wait_for(
                lambda: sim_upstream(sim) == union_of(SUBS), 20, message="union upstream"
            )
            start_ms = durable.ready_ms() + 1_000
            await wait_for(lambda: received_keys(durable) > 500, 20, message="frames flow")

            # -- paused for 2 s -------------------------------------------------------------
            pid = int(next(r["pid"] for r in durable.records() if r["k"] == "ready"))
            os.kill(pid, signal.SIGSTOP)
            paused_at = now_ms()
            await asyncio.sleep(2.0)  # the scenario itself: frames pile up in the history
            os.kill(pid, signal.SIGCONT)
            resumed_at = now_ms()
            await wait_for(
                lambda: caught_up(log, durable, resumed_at), 20, message="caught up after pause"
            )
            streams = streams_of(SUBS)
            rate = sum(
                1
                for t, _, type_, code, _ in log.records
                if paused_at <= t // 1_000_000 < resumed_at and (type_, code) in streams
            ) / ((resumed_at - paused_at) / 1000)

            # -- its Redis connections killed 10 times --------------------------------------
            kills = 0
            for _ in range(10):
                before = received_keys(durable)
                for c in await redis_client.client_list():
                    if c.get("name", "").startswith("dur:"):  # its every connection
                        await redis_client.execute_command("CLIENT", "KILL", "ID", c["id"])
                        kills += 1
                await wait_for(
                    lambda b=before: received_keys(durable) > b + 50,
                    20,
                    message="frames flow again after a kill",
                )

            def sent_since_start() -> int:  # the window holds enough to judge, however fast
                return sum(
                    1
                    for t, _, type_, code, _ in durable_view(log).records
                    if t // 1_000_000 >= start_ms and (type_, code) in streams
                )

            await wait_for(lambda: sent_since_start() > 4_000, 20, message="4,000 frames sent")
            end_ms = now_ms()
            await wait_for(lambda: caught_up(log, durable, end_ms), 20, message="caught up")
            audit = audit_consumer(
                durable_view(log), durable, streams_of(SUBS), gap_windows(durable),
                start_ms=start_ms, end_ms=end_ms,
            )  # fmt: skip
            print(
                f"\n[figures] durable: sent ~{rate:.0f} frames/s, paused "
                f"{resumed_at - paused_at} ms, {kills} connections killed; {audit.line()}"
            )
            assert audit.expected > 4_000 and rate > 1_000, audit.line()
            assert audit.lost_silently == 0 and audit.lost_in_gaps == 0, audit.examples
            assert audit.duplicates == 0 and audit.foreign == 0, audit.line()
            assert kills >= 10
            offsets = [r["off"] for r in durable.messages()]
            assert len(offsets) == len(durable.messages()), "every item carries its offset"
            by_channel: dict[str, list[tuple[int, int]]] = {}
            for r in durable.messages():
                ms, _, seq = r["off"].partition("-")
                by_channel.setdefault(r["ch"], []).append((int(ms), int(seq)))
            for channel, ids in by_channel.items():
                assert ids == sorted(set(ids)), f"{channel}: offsets not increasing"
            assert broker.alive


def sent_by_stream(log: DataSendLog) -> dict[tuple[str, str], list[int]]:
    """The frame keys the simulator sent, per stream, in order."""
    out: dict[tuple[str, str], list[int]] = {}
    for _, key, type_, code, _ in log.records:
        out.setdefault((type_, code), []).append(key)
    return out


def received_by_stream(consumer: ConsumerProcess) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in consumer.messages():
        _, type_, code = record["ch"].split(":")
        out.setdefault((type_, code), []).append(record)
    return out


SLOW_SUBS = {"trade": CODES[:3], "ticker": CODES[:3]}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_durable_consumer_ten_times_too_slow_is_never_cut_off_and_misses_nothing(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """30 s at a tenth of its streams' pace: Redis never drops it (the backlog waits in the
    history, not in an output buffer), no gap, and what it read is exactly the first frames of
    each stream, in order."""
    url = redis_server.url
    async with running_simulator(seed=7, rate=300, markets=6) as sim:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "d-2", tmp_path, history=HISTORY),
            consumer_process(url, "probe", SLOW_SUBS, tmp_path),  # holds the union meanwhile
        ):
            await wait_for(
                lambda: sim_upstream(sim) == union_of(SLOW_SUBS), 20, message="union upstream"
            )
            await wait_for(lambda: len(log) > 500, 20, message="frames flow")
            sent_streams = streams_of(SLOW_SUBS)
            cutoff = time.time_ns() - 2_000_000_000
            recent = [r for r in log.records if r[0] >= cutoff and (r[2], r[3]) in sent_streams]
            rate = len(recent) / 2.0
            async with consumer_process(
                url, "slow", SLOW_SUBS, tmp_path, lease_ttl=5.0,
                read_delay=round(10 / max(rate, 1.0), 4),
                client={"durable": True, "queue_size": 100},  # the backlog stays in Redis,
            ) as slow:  # fmt: skip
                started = time.monotonic()
                await asyncio.sleep(30.0)  # the scenario: 30 s of falling behind
                stats = slow.last_stats()
                got = received_by_stream(slow)
                sent = sent_by_stream(durable_view(log))
                behind = sum(len(sent[s]) for s in sent_streams) - sum(map(len, got.values()))
                print(
                    f"\n[figures] slow durable: streams ~{rate:.0f} frames/s, reader 10x "
                    f"slower for {time.monotonic() - started:.0f} s: read "
                    f"{sum(map(len, got.values()))}, behind by {behind}, stats {stats}"
                )
                assert slow.gaps() == [], slow.gaps()
                assert stats.get("reconnects") == 0 and stats.get("history_reconnects") == 0
                assert stats.get("fell_behind") == 0 and stats.get("dropped") == 0
                assert behind > 1_000  # it really fell behind
                for stream, records in got.items():
                    keys = [frame_key(r["raw"].encode()) for r in records]
                    first = sent[stream].index(keys[0])
                    assert keys == sent[stream][first : first + len(keys)], stream


@pytest.mark.slow
async def test_a_durable_consumer_pushed_off_the_window_gets_the_exact_gap(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Caps of 100 entries and a reader far too slow: each stream's history moves past its
    last offset; a ``trimmed`` gap names exactly the entries it lost (``dropped``, between
    ``from_offset`` and ``to_offset``), and delivery goes on after it."""
    url = redis_server.url
    subs = {"ticker": CODES[:2]}
    async with running_simulator(seed=9, rate=400, markets=6) as sim:
        log = record_data_sends(sim)
        async with (
            broker_process(url, sim.url, "d-3", tmp_path, history="ticker=100"),
            consumer_process(
                url,
                "lag",
                subs,
                tmp_path,
                lease_ttl=5.0,
                read_delay=0.05,
                client={"durable": True, "queue_size": 20},  # the backlog stays in Redis
            ) as lag,
        ):
            await wait_for(lambda: sim_upstream(sim) == union_of(subs), 20, message="upstream")
            gaps = await wait_for(
                lambda: [g for g in lag.gaps() if g["reason"] == "trimmed"],
                60,
                message="a trimmed gap",
            )
            gap = gaps[0]
            [channel] = gap["channels"]
            _, type_, code = channel.split(":")
            before = len(lag.messages(channel))
            await wait_for(
                lambda: len(lag.messages(channel)) > before + 5, 20, message="delivery goes on"
            )
            records = lag.messages(channel)
            offsets = [r["off"] for r in records]
            last = records[offsets.index(gap["from_offset"])]
            nxt = records[offsets.index(gap["to_offset"])]
            assert offsets.index(gap["to_offset"]) == offsets.index(gap["from_offset"]) + 1
            sent = sent_by_stream(log)[(type_, code)]
            between = sent.index(frame_key(nxt["raw"].encode())) - sent.index(
                frame_key(last["raw"].encode())
            )
            print(f"\n[figures] trimmed gap: {gap}, {between - 1} frames sent in between")
            assert gap["dropped"] == between - 1 > 0, (gap, between)
            assert gap["since_ms"] <= gap["until_ms"]
