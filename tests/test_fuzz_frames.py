"""Bad upstream frames: dropped and counted, and the connection survives a frame alone bad.

The simulator cannot misbehave on purpose, so a scripted fake upstream
(:class:`~tests.support.processes.FakeUpstream`) answers the broker's subscribe like Upbit and
then sends a mix of good frames and every kind of bad one: truncated, not JSON, JSON of the
wrong shape, gigantic, too deeply nested, unknown types, codes that are no codes, unleased
codes, garbage LIST_SUBSCRIPTIONS answers. The broker (a subprocess) must count each in
``frames_malformed`` or ``frames_dropped``, publish every good frame unchanged to its channel
and nothing else anywhere, and never reconnect. An Upbit error frame is the one frame that
does end a connection (Upbit closes it anyway): the broker reconnects and carries on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, wait_for, write_lease
from broker.testing import read_status as redis_status
from tests.support.broker_env import EventTap
from tests.support.processes import FakeConnection, FakeUpstream, contract_key_re

pytestmark = pytest.mark.timeout(60)


def good(seq: int) -> bytes:
    return (
        b'{"type":"ticker","code":"KRW-BTC","trade_price":135061000.0,"seq":%d,'
        b'"timestamp":1730000000000,"stream_type":"REALTIME"}' % seq
    )


GOOD = good(0)
BIG = b'{"type":"ticker","code":"KRW-BTC","pad":"' + b"x" * (2 << 20) + b'"}'
DEEP = b"[" * 100_000 + b"]" * 100_000

# (frame, what the broker must do with it)
BAD: list[tuple[bytes | str, str]] = [
    (GOOD[:-10], "malformed"),  # truncated
    (GOOD[:1], "malformed"),
    (b"", "malformed"),
    (b"hello", "malformed"),
    (b"\x00\x01\x02\xff", "malformed"),
    (b'{"type":"ticker","code":"KRW-BTC","x":"\xff\xfe"}', "malformed"),  # not UTF-8
    (b"[]", "malformed"),
    (b"[1,2,3]", "malformed"),
    (b"123", "malformed"),
    (b'"ticker"', "malformed"),
    (b"null", "malformed"),
    (b"{}", "malformed"),
    (b'{"code":"KRW-BTC"}', "malformed"),  # no type
    (b'{"type":1,"code":"KRW-BTC"}', "malformed"),
    (b'{"type":"ticker","code":["KRW-BTC"]}', "malformed"),
    (b'{"type":"ticker","code":"KRW-BTC","level":"x"}', "malformed"),
    (b'{"ty":"ticker","type":"ticker","code":"KRW-BTC"}', "malformed"),  # ambiguous
    (b'{"type":"ticker","cd":"KRW-BTC"}', "malformed"),  # mixed spellings
    (b'[{"type":"ticker","code":"KRW-BTC"}]', "malformed"),  # a *_LIST frame
    (BIG, "malformed"),  # 2 MiB: over the router's 1 MiB limit
    (DEEP, "malformed"),
    (b'{"method":"LIST_SUBSCRIPTIONS","result":"garbage"}', "malformed"),
    (b'{"method":"LIST_SUBSCRIPTIONS","result":[1]}', "malformed"),
    (b'{"type":"weird","code":"KRW-BTC"}', "dropped"),  # unknown type
    (b'{"type":"myOrder","code":"KRW-BTC"}', "dropped"),
    (b'{"type":"ticker","code":"KRW-ETH"}', "dropped"),  # nobody leased it
    (b'{"type":"ticker","code":"KRW-*"}', "dropped"),  # no code at all
    (b'{"type":"ticker","code":"KRW-BTC\\n"}', "dropped"),
    (b'{"type":"ticker","code":"t:control"}', "dropped"),
    (b'{"type":"ticker","code":"KRW-BTC:x"}', "dropped"),
    (b'{"type":"orderbook","code":"KRW-BTC","level":-1}', "dropped"),
    (b'{"type":"ticker","code":"KRW-BTC","level":10000}', "dropped"),
    (b'{"status":"UP"}', "status"),
]


async def test_bad_frames_are_counted_and_the_connection_survives(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    good_sent: list[bytes] = []

    async def play(ws: Any, conn: FakeConnection) -> None:
        seq = 1
        for frame, _ in BAD:
            good_sent.append(good(seq))
            await ws.send(good(seq))
            seq += 1
            await ws.send(frame)
        # a good frame sent as a text frame is still a good frame
        good_sent.append(good(seq))
        await ws.send(good(seq).decode())
        seq += 1
        good_sent.append(good(seq))
        await ws.send(good(seq))

    received: list[bytes] = []
    channels: set[str] = set()
    tap = redis_client.pubsub()
    await tap.psubscribe("t:*")

    async def pump() -> None:
        while True:
            msg = await tap.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            channel = msg["channel"].decode("utf-8", "backslashreplace")
            channels.add(channel)
            if channel == "t:ticker:KRW-BTC":
                received.append(msg["data"])

    pumper = asyncio.create_task(pump())
    try:
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        async with (
            FakeUpstream(play) as fake,
            broker_process(url, fake.url, "frames-b", tmp_path) as broker,
        ):
            await wait_for(lambda: fake.played.is_set(), 20, message="script played")
            await wait_for(lambda: len(received) >= len(good_sent), 10, message="good frames")

            want_malformed = sum(1 for _, kind in BAD if kind == "malformed")
            want_dropped = sum(1 for _, kind in BAD if kind == "dropped")

            async def counted() -> dict[str, str] | None:
                st = await redis_status(redis_client)
                done = int(st.get("frames_in", 0)) >= len(BAD) + len(good_sent)
                return st if done else None

            status = await wait_for(counted, 5, message="status counters")
            await asyncio.sleep(0.5)
            status = await redis_status(redis_client)
            connections = len(fake.connections)
            assert broker.alive
    finally:
        pumper.cancel()
        await asyncio.gather(pumper, return_exceptions=True)
        await tap.aclose()  # type: ignore[no-untyped-call]
    print(
        f"\n[figures] bad upstream frames: injected={len(BAD)} "
        f"(malformed {want_malformed}, dropped {want_dropped}, status 1), "
        f"good={len(good_sent)}, frames_in={status['frames_in']}, "
        f"frames_malformed={status['frames_malformed']}, "
        f"frames_dropped={status['frames_dropped']}, "
        f"good_delivered={len(received)}, upstream_connections={connections}, "
        f"reconnects={status['reconnects']}, channels={sorted(channels)}"
    )
    assert received == good_sent  # unchanged, in order, nothing else on the channel
    assert int(status["frames_malformed"]) == want_malformed
    # frames_dropped counts every frame received that did not reach Redis: the unleased ones
    # and the malformed ones (one definition for the status and the metrics)
    assert json.loads(status["frames_dropped_by_reason"])["unleased"] == want_dropped
    assert int(status["frames_dropped"]) == want_dropped + want_malformed
    assert connections == 1 and status["reconnects"] == "0" and status["epoch"] == "1"
    assert all(contract_key_re("t").fullmatch(c) for c in channels), channels
    assert channels <= {"t:ticker:KRW-BTC", "t:events", "t:control"}


async def test_an_error_frame_ends_the_connection_and_the_broker_reconnects(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url

    async def play(ws: Any, conn: FakeConnection) -> None:
        await ws.send(good(1))
        if len(fake.connections) == 1:
            await ws.send(b'{"error":{"name":"INVALID_AUTH","message":"auth failed"}}')
            await asyncio.sleep(0.3)
            await ws.close(1000)
            return
        await ws.send(good(2))

    await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
    async with (
        EventTap(redis_client) as events,
        FakeUpstream(play) as fake,
        broker_process(url, fake.url, "errframe-b", tmp_path) as broker,
    ):
        await wait_for(lambda: len(fake.connections) >= 2, 15, message="reconnected")
        await wait_for(lambda: events.of("gap"), 5, message="gap event")

        async def recovered() -> dict[str, str] | None:
            st = await redis_status(redis_client)
            confirmed = json.loads(st.get("upstream", "{}")) == {"ticker": ["KRW-BTC"]}
            return (
                st if st.get("connected") == "1" and st.get("epoch") == "2" and confirmed else None
            )

        status = await wait_for(recovered, 10, message="connected on epoch 2, the set confirmed")
        gap = events.of("gap")[0]
        assert broker.alive
        log = broker.output()
    print(
        f"\n[figures] upbit error frame: injected=1, upstream_connections={len(fake.connections)}, "
        f"gap_epoch={gap['epoch']}, gap_reason={gap['reason']}, "
        f"last_error={status['last_error']!r}"
    )
    assert len(fake.connections) == 2
    assert gap["epoch"] == 2
    assert "INVALID_AUTH" in status["last_error"]
    assert "INVALID_AUTH" in log
    assert json.loads(status["upstream"]) == {"ticker": ["KRW-BTC"]}
