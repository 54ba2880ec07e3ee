"""Frames lost around a broker's stop and pause, announced (issue 12, item 12). Real processes:
a redis-server, the simulator (its send log), ``upbit-broker run``, and a consumer process
recording every frame and gap; plus the rule itself on the pure leader core.

SIGTERM restarts, several in a row, with the same and with a new ``--broker-id``. What was
lost: a broker SIGTERMed soon after its first publish (a restart right after a restart, a
crash-looping replica) had not yet written a status naming a frame of its own, so the status
said ``last_frame_ms`` 0 and its successor announced no takeover gap at all. The frames the
stopped broker never published (in flight as it stopped) were lost silently, and so was
everything Upbit sent while no broker listened. The status now keeps the last frame the leader
inherited until it publishes one of its own (``GapTracker.last_frame_ms``). Two checks, one per
way a loss hides: the audit (every frame the simulator sent for the consumer's streams was
received or sent inside a gap it was told of) and the announcements (every new connection after
data flowed came with a gap, from no later than the consumer's last frame, to the connection).
The second is deterministic: the simulator sends nothing while no broker is connected, so its
send log alone cannot show a gap nobody announced.

A leader paused (SIGSTOP) past its lock's local deadline but not long enough for a takeover:
the frames that waited in its socket were dropped as ``not_leader`` until the renewal and never
announced (thousands in a second at 1,000 events/s). ``LeaderPhase._may_publish`` now announces
them as a ``redis`` gap once publishing is allowed again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.leader import LeaderCore
from broker.core.stats import Counters
from broker.settings import BrokerSettings
from broker.testing import (
    ConsumerProcess,
    RedisServer,
    broker_process,
    consumer_process,
    read_status,
    wait_for,
)
from tests.support.broker_env import EventTap
from tests.support.processes import (
    DataSendLog,
    audit_consumer,
    delivered_past,
    gap_windows,
    record_data_sends,
    stopped_counts,
    unannounced_connections,
)
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(180)

CODES = ["KRW-BTC", "KRW-XRP", "KRW-ETH", "KRW-SOL", "KRW-DOGE", "KRW-USDT", "KRW-ADA", "KRW-SUI"]
#: busy enough (~700 frames/s) that a SIGTERM often catches frames on their way to the broker
SUBS = {"trade": CODES, "ticker": CODES}


def _streams() -> set[tuple[str, str]]:
    return {(t, c) for t, codes in SUBS.items() for c in codes}


#: one status write a second: a broker stopped right after its first publish has surely not
#: written a status naming it yet (with the old code its successor then announced nothing)
STATUS_INTERVAL = 1.0
#: SHORT: SIGTERM as soon as the consumer got the broker's first frame; LONG: once the
#: broker's status names a frame of its own and frames flowed for a while
SHORT, LONG = "short", "long"
#: (broker id, how long it runs): restarts with the same id and with a new one, after long and
#: short runs, and two short runs in a row
ROUNDS = [
    ("rs-a", LONG),
    ("rs-a", SHORT),
    ("rs-a", LONG),
    ("rs-b", SHORT),
    ("rs-c", LONG),
    ("rs-c", SHORT),
    ("rs-d", SHORT),
    ("rs-d", LONG),
]
#: frames the consumer receives from a LONG broker before it is stopped
LONG_FRAMES = 300


def now_ms() -> int:
    return time.time_ns() // 1_000_000


T0_MS = 1_700_000_000_000


def _took_lead(token: str, previous_token: str, previous_last_frame_ms: int) -> LeaderCore:
    core = LeaderCore(BrokerSettings(broker_id="b"), Counters(), token=token)
    core.took_lead(T0_MS, previous_token, previous_last_frame_ms)
    return core


def _gaps_at_connection(core: LeaderCore, at_ms: int, epoch: int) -> list[dict[str, Any]]:
    assert core.upstream_connected(0.0, at_ms, fresh=False)
    core.epoch_assigned(epoch)
    events = [json.loads(out.data) for out in core.events_to_publish()]
    return [e for e in events if e["event"] == "gap" and "state" not in e]


def test_a_leader_that_published_nothing_hands_on_the_last_frame_it_inherited() -> None:
    # A published until T0 - 2 s; B took over, connected (announcing A's gap) and was stopped
    # before it published: its status must still say when data stopped, or C announces nothing.
    b = _took_lead("tb", "ta", T0_MS - 2_000)
    assert b.status(0.0, T0_MS).last_frame_ms == T0_MS - 2_000  # was 0
    assert [g["since_ms"] for g in _gaps_at_connection(b, T0_MS + 100, 2)] == [T0_MS - 2_000]
    handed_on = b.status(1.0, T0_MS + 200).last_frame_ms
    c = _took_lead("tc", "tb", handed_on)
    gaps = _gaps_at_connection(c, T0_MS + 900, 3)
    assert [(g["reason"], g["since_ms"], g["until_ms"]) for g in gaps] == [
        ("takeover", T0_MS - 2_000, T0_MS + 900)
    ]
    # Once the leader publishes, its own last frame is what it hands on.
    c.counters.publish.last_publish_ms = T0_MS + 1_000
    assert c.status(2.0, T0_MS + 1_100).last_frame_ms == T0_MS + 1_000
    # A namespace that never published anything still says 0 (and announces nothing).
    fresh = _took_lead("td", "", 0)
    assert fresh.status(0.0, T0_MS).last_frame_ms == 0
    assert _gaps_at_connection(fresh, T0_MS + 100, 1) == []
    # The same process leading again after a lapse: its own last frame counts.
    again = _took_lead("tc", "tc", T0_MS + 1_000)
    assert again.status(3.0, T0_MS + 1_600).last_frame_ms == T0_MS + 1_000


async def _run_round(
    round_: int,
    broker_id: str,
    kind: str,
    *,
    url: str,
    sim: Any,
    tap: EventTap,
    consumer: ConsumerProcess,
    log: DataSendLog,
    redis: aioredis.Redis,
    directory: Path,
    last: bool,
) -> tuple[str, int]:
    """One broker process, from its start to its SIGTERM (on leaving); its log, and the end of
    the audit window when it is the ``last`` (0 otherwise)."""
    epoch_before = max((e["epoch"] for e in tap.of("connected")), default=0)
    end_ms = 0
    async with broker_process(
        url, sim.url, broker_id, directory, status_interval=STATUS_INTERVAL
    ) as broker:

        def connected() -> list[dict[str, Any]]:
            return [e for e in tap.of("connected") if e["epoch"] > epoch_before]

        event = (await wait_for(connected, 20, message=f"round {round_}: {broker_id} up"))[0]
        ts = int(event["ts_ms"])

        def frames_since() -> int:
            return sum(1 for m in consumer.messages() if m["t"] > ts)

        await wait_for(frames_since, 10, interval=0.01, message=f"round {round_}: frames")
        if kind == LONG:

            async def status_names_its_frame() -> bool:
                status = await read_status(redis)
                return int(status.get("last_frame_ms") or 0) > ts

            await wait_for(status_names_its_frame, 10, message=f"round {round_}: its status")
            await wait_for(lambda: frames_since() >= LONG_FRAMES, 10, message="frames flow")
        if last:  # the audit ends while the last broker still runs
            end_ms = now_ms() - 500
            await delivered_past(log, consumer, _streams(), end_ms)
    return broker.output(), end_ms


@pytest.mark.slow
async def test_sigterm_restarts_lose_nothing_silently(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    url = redis_server.url
    streams = _streams()
    outputs: list[tuple[str, str, str]] = []  # (broker id, kind, its log)
    async with (
        running_simulator(seed=81, rate=2000) as sim,
        EventTap(redis_client) as tap,
        consumer_process(url, "restart-c", SUBS, tmp_path, lease_ttl=5.0) as consumer,
    ):
        log = record_data_sends(sim)
        end_ms = 0
        for i, (broker_id, kind) in enumerate(ROUNDS):
            directory = tmp_path / f"{i}-{broker_id}"
            directory.mkdir()
            output, end_ms = await _run_round(
                i,
                broker_id,
                kind,
                url=url,
                sim=sim,
                tap=tap,
                consumer=consumer,
                log=log,
                redis=redis_client,
                directory=directory,
                last=i == len(ROUNDS) - 1,
            )
            outputs.append((broker_id, kind, output))
        connections = tap.of("connected")
        announced = tap.of("gap")
        unannounced = unannounced_connections(consumer, connections)
        windows = gap_windows(consumer)
        audit = audit_consumer(
            log, consumer, streams, windows, start_ms=consumer.ready_ms(), end_ms=end_ms
        )
        consumer_gaps = consumer.gaps()
    same_id = sum(1 for a, b in itertools.pairwise(ROUNDS) if a[0] == b[0])
    print(
        f"\n[figures] SIGTERM restarts: restarts={len(ROUNDS) - 1} (same id {same_id}, new id "
        f"{len(ROUNDS) - 1 - same_id}), connections={len(connections)}, "
        f"gap_events={len(announced)} (reasons {sorted({g['reason'] for g in announced})}), "
        f"gaps_received_by_consumer={len(consumer_gaps)}, "
        f"connections_without_a_gap={[e['epoch'] for e in unannounced]}"
    )
    print(
        f"[audit] {audit.line()}, frames_expected={audit.expected}, "
        f"frames_lost={audit.lost_in_gaps + audit.lost_silently}, "
        f"inside_gaps={audit.lost_in_gaps}"
    )
    for broker_id, kind, output in outputs:
        print(f"[broker {broker_id} {kind}] {stopped_counts(output)}")
    assert not unannounced, (unannounced, consumer_gaps)
    assert audit.lost_silently == 0, (audit.line(), audit.examples, consumer_gaps)
    assert audit.duplicates == 0 and audit.foreign == 0, audit.line()
    assert len(connections) == len(ROUNDS), connections  # one connection per broker
    for broker_id, kind, output in outputs:
        assert stopped_counts(output) is not None, (broker_id, kind, output[-2000:])


#: SIGSTOP this long: past the lock's local deadline whenever the last renewal was (it is
#: renewed every TTL/3 = 0.5 s and trusted for 0.9 TTL = 1.35 s), short of a standby's takeover
PAUSE = 1.4
PAUSES = 3


def _frames_after(consumer: ConsumerProcess, t_ms: int) -> Callable[[], bool]:
    return lambda: any(m["t"] > t_ms for m in consumer.messages())


@pytest.mark.slow
async def test_a_paused_leader_announces_the_frames_it_held_back(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    url = redis_server.url
    streams = _streams()
    async with (
        running_simulator(seed=82, rate=1000) as sim,
        EventTap(redis_client) as tap,
        consumer_process(url, "paused-c", SUBS, tmp_path, lease_ttl=10.0) as consumer,
        broker_process(url, sim.url, "paused", tmp_path) as broker,
    ):
        log = record_data_sends(sim)
        await wait_for(lambda: len(consumer.messages()) > 100, 20, message="frames flow")
        for _ in range(PAUSES):
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(PAUSE)  # the pause itself, not a wait for a condition
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await wait_for(_frames_after(consumer, now_ms() + 200), 10, message="frames again")
        end_ms = now_ms() - 500
        await delivered_past(log, consumer, streams, end_ms)
        status = await read_status(redis_client)
        windows = gap_windows(consumer)
        audit = audit_consumer(
            log, consumer, streams, windows, start_ms=consumer.ready_ms(), end_ms=end_ms
        )
        redis_gaps = [g for g in tap.of("gap") if g["reason"] == "redis"]
        received = [g for g in consumer.gaps() if g["reason"] == "redis"]
        assert broker.alive
    dropped = json.loads(status["frames_dropped_by_reason"])
    print(
        f"\n[figures] leader paused {PAUSES} x {PAUSE} s (lock ttl 1.5 s, no standby): "
        f"dropped_by_reason={dropped}, redis_gap_events={len(redis_gaps)}, "
        f"received_by_consumer={len(received)}, "
        f"gap_spans_ms={[g['until_ms'] - g['since_ms'] for g in redis_gaps]}"
    )
    print(
        f"[audit] {audit.line()}, frames_expected={audit.expected}, "
        f"frames_lost={audit.lost_in_gaps + audit.lost_silently}, inside_gaps={audit.lost_in_gaps}"
    )
    assert dropped["not_leader"] > 0, status  # the pauses did fence frames off
    assert audit.lost_silently == 0, (audit.line(), audit.examples, consumer.gaps())
    assert audit.duplicates == 0 and audit.foreign == 0, audit.line()
    assert received, consumer.gaps()
