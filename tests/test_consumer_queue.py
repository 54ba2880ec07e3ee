"""The drop-oldest queue between the pub/sub reader and the application (no Redis)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from broker.testing import wait_for
from consumers import FELL_BEHIND, BrokerClient, Gap, StreamMessage
from consumers.items import parse_event
from consumers.queue import DropOldestQueue, QueueClosed


def msg(n: int, channel: str = "upbit:ticker:KRW-BTC") -> StreamMessage:
    return StreamMessage(
        channel=channel,
        type="ticker",
        stream="ticker",
        code="KRW-BTC",
        level=0.0,
        raw=b'{"n":%d}' % n,
        received_ms=1000 + n,
    )


def gap(reason: str = "reconnect") -> Gap:
    return Gap(reason=reason, source="broker", since_ms=1, until_ms=2)


def drain(q: DropOldestQueue) -> list[object]:
    out: list[object] = []
    while (item := q.get_nowait()) is not None:
        out.append(item)
    return out


def test_fifo_under_the_limit() -> None:
    q = DropOldestQueue(3)
    items = [msg(1), gap(), msg(2), msg(3)]
    assert all(q.put(i) for i in items)
    assert drain(q) == items
    assert q.dropped == 0


def test_overflow_drops_oldest_and_puts_one_gap_in_front() -> None:
    q = DropOldestQueue(3)
    for n in range(10):
        q.put(msg(n))
    assert q.dropped == 7 and q.overflows == 1
    out = drain(q)
    head = out[0]
    assert isinstance(head, Gap)
    assert head.reason == FELL_BEHIND and head.source == "local" and head.dropped == 7
    assert (head.since_ms, head.until_ms) == (1000, 1006)
    assert head.channels == ("upbit:ticker:KRW-BTC",)
    assert [m.raw for m in out[1:] if isinstance(m, StreamMessage)] == [
        b'{"n":7}',
        b'{"n":8}',
        b'{"n":9}',
    ]
    # a new episode after draining gives a new gap
    for n in range(5):
        q.put(msg(n))
    assert q.overflows == 2


def test_gaps_are_never_discarded() -> None:
    q = DropOldestQueue(2)
    q.put(gap("reconnect"))
    for n in range(6):
        q.put(msg(n))
    out = drain(q)
    reasons = [i.reason for i in out if isinstance(i, Gap)]
    assert reasons == ["reconnect", FELL_BEHIND]
    assert len([i for i in out if isinstance(i, StreamMessage)]) == 2


async def test_get_waits_and_close_wakes() -> None:
    q = DropOldestQueue(2)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put(msg(1))
    got = await getter
    assert isinstance(got, StreamMessage) and got.raw == b'{"n":1}'
    waiting = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.close()
    with pytest.raises(QueueClosed):
        await waiting
    assert q.put(msg(2))  # ignored once closed
    with pytest.raises(ValueError):
        DropOldestQueue(0)


def test_parse_event() -> None:
    g = parse_event(b'{"event":"gap","epoch":3,"since_ms":5,"until_ms":9,"reason":"stall"}')
    assert g is not None and (g.epoch, g.since_ms, g.until_ms, g.reason) == (3, 5, 9, "stall")
    assert parse_event(b'{"event":"connected","epoch":3,"broker":"b","ts_ms":1}') is None
    with pytest.raises(ValueError):
        parse_event(b"[1,2]")
    assert json.loads(json.dumps(g.to_dict()))["reason"] == "stall"


async def test_client_queue_overflow_reports_fell_behind(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url, queue_size=5) as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        async with redis_client.pipeline(transaction=False) as pipe:
            for n in range(20):
                pipe.publish("upbit:ticker:KRW-BTC", b'{"n":%d}' % n)
            await pipe.execute()
        await wait_for(lambda: client.stats.messages == 20, message="reader read all 20")
        items = []
        while (item := await client.next_message(timeout=0.2)) is not None:
            items.append(item)
        gaps = [i for i in items if isinstance(i, Gap)]
        data = [i for i in items if isinstance(i, StreamMessage)]
        assert len(gaps) == 1 and gaps[0].reason == FELL_BEHIND
        assert items[0] is gaps[0]
        assert data[-1].raw == b'{"n":19}'
        assert client.stats.dropped == gaps[0].dropped == 20 - len(data)
        assert client.stats.fell_behind == 1


def test_consumers_import_only_their_allowed_layers() -> None:
    from tests.support.imports import modules_loaded_by

    loaded = modules_loaded_by(
        "import consumers, consumers.examples.ticker_board, consumers.examples.ohlcv_bars"
    )
    allowed = {
        "broker", "broker.upbit", "broker.leases", "broker.keys", "broker.errors",
        "broker.settings", "broker.redis_client", "broker.clock", "broker.contract",
        "broker.core", "broker.core.lease",
        "broker.core.history",  # the history caps (pure), read with the settings
        "broker.resp",  # the RESP wire layer (redis-py and the standard library only)
        "broker.redis_url",  # the Sentinel URL's parser (pure)
        "broker.event_gate",  # which events are the leader's (pure), shared with the gateway
        "broker.cluster_slots",  # Redis Cluster's slots and CLUSTER SLOTS replies (pure)
        "broker.coordination",  # the server clock of the node holding the leases (I/O)
    }  # fmt: skip
    bad = sorted(
        m
        for m in loaded
        if (m.startswith("broker.") or m == "broker")
        and m not in allowed
        and not m.startswith("broker.upbit.")
    )
    bad += sorted(m for m in loaded if m.split(".")[0] in ("simulator", "cli"))
    out = ",".join(bad)
    assert out == "", f"consumers imported modules outside their layer: {out}"
