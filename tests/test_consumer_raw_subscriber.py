"""The consumer's pub/sub connection on both roads: raw RESP (``consumers.raw_link``) and
redis-py's connection (the fallback), against a real redis-server.

Each behaviour runs on both roads (``road`` fixture): the raw road is what a plain URL gets;
``consumers.subscriber.RAW_ROAD = False`` forces the fallback, which a client gets when the
raw road cannot express its URL (or hiredis is missing). Either way a break is noticed,
classified, resubscribed and reported as a gap, and frames flow again.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, wait_for
from consumers import CONSUMER_DISCONNECTED, FELL_BEHIND, BrokerClient, Gap, StreamMessage
from consumers import subscriber as subscriber_module
from consumers.raw_link import raw_address

NS = "upbit"
CHANNEL = f"{NS}:ticker:KRW-BTC"


def frame(n: int, ts: int = 1_700_000_000_000) -> bytes:
    return json.dumps({"type": "ticker", "code": "KRW-BTC", "n": n, "timestamp": ts}).encode()


@pytest.fixture(params=["raw", "redis-py"])
def road(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(subscriber_module, "RAW_ROAD", request.param == "raw")
    yield request.param


def data_of(items: list[object]) -> list[int]:
    return [json.loads(i.raw)["n"] for i in items if isinstance(i, StreamMessage)]


async def drain(client: BrokerClient, until: int) -> list[object]:
    """Items of ``messages()`` until the data frame numbered ``until`` (5 s at most each)."""
    items: list[object] = []
    while (item := await client.next_message(timeout=5)) is not None:
        items.append(item)
        if isinstance(item, StreamMessage) and json.loads(item.raw)["n"] == until:
            return items
    raise AssertionError(f"frame {until} never came; got {len(items)} items")


async def test_a_plain_url_takes_the_raw_road_and_bursts_arrive_whole(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_server.url, client_id="raw") as client:
        assert client._subscriber is not None and client._subscriber.raw
        await client.subscribe("ticker", ["KRW-BTC"])
        names = [c.get("name") for c in await redis_client.client_list()]
        assert "raw:sub" in names  # CLIENT SETNAME, as on redis-py's road
        # one pipeline of 2,000 frames reaches the socket in a few large chunks
        async with redis_client.pipeline(transaction=False) as pipe:
            for n in range(2000):
                pipe.publish(CHANNEL, frame(n))
            await pipe.execute()
        items = await drain(client, 1999)
        assert data_of(items) == list(range(2000))
        assert client.stats.messages == 2000 and client.stats.gaps == 0


async def test_a_restarted_redis_gives_a_disconnected_gap_and_a_resubscription(
    road: str, redis_server: RedisServer
) -> None:
    async with BrokerClient(redis_url=redis_server.url, client_id="rs", lease_ttl=1.5) as client:
        assert client._subscriber is not None and client._subscriber.raw == (road == "raw")
        await client.subscribe("ticker", ["KRW-BTC"])
        before = aioredis.Redis.from_url(redis_server.url)
        try:
            await before.publish(CHANNEL, frame(0, ts=1_700_000_000_000))
        finally:
            await before.aclose()
        assert data_of(await drain(client, 0)) == [0]
        redis_server.restart()  # SIGKILL + start: the connection dies, the data too
        publisher = aioredis.Redis.from_url(redis_server.url)
        try:
            await wait_for(lambda: publisher.exists(f"{NS}:lease:rs"), message="lease back")
            # the gap is reported once every channel is subscribed again; delivery resumes
            await wait_for(lambda: client.stats.gaps == 1, message="gap reported")
            await publisher.publish(CHANNEL, frame(1))
            items = await drain(client, 1)
        finally:
            await publisher.aclose()
        gaps = [i for i in items if isinstance(i, Gap)]
        assert [(g.reason, g.source) for g in gaps] == [(CONSUMER_DISCONNECTED, "local")]
        # the gap starts no later than the last frame received before the break was stamped
        assert gaps[0].since_ms <= 1_700_000_000_000 <= gaps[0].until_ms
        assert data_of(items) == [1] and items.index(gaps[0]) < len(items) - 1
        assert client.stats.reconnects == 1


async def test_a_connection_redis_closed_is_a_fell_behind_gap_and_resubscribed(
    road: str, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_server.url, client_id="kill") as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        await redis_client.publish(CHANNEL, frame(0))
        assert data_of(await drain(client, 0)) == [0]
        # the same server closing the connection is what its output-buffer limit does
        assert await redis_client.client_kill_filter(_type="pubsub") == 1
        await wait_for(lambda: client.stats.gaps == 1, message="gap reported (resubscribed)")
        await redis_client.publish(CHANNEL, frame(1))
        items = await drain(client, 1)
        gaps = [i for i in items if isinstance(i, Gap)]
        assert [(g.reason, g.source) for g in gaps] == [(FELL_BEHIND, "local")]
        assert data_of(items) == [1]
        assert client.stats.fell_behind == 1


async def test_an_idle_connection_is_pinged_and_a_silent_redis_is_reported(
    road: str, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(
        redis_url=redis_server.url, client_id="ping", ping_interval=0.2, connect_timeout=0.5
    ) as client:
        await client.subscribe("ticker", ["KRW-BTC"])

        async def pinged_for_a_while() -> bool:
            # Redis' view of our pub/sub connection: it PINGs while idle, and lives on
            subs = [c for c in await redis_client.client_list() if c.get("name") == "ping:sub"]
            return len(subs) == 1 and subs[0]["cmd"] == "ping" and int(subs[0]["age"]) >= 2

        # ten intervals without a frame: PINGed, answered, never taken for dead
        await wait_for(pinged_for_a_while, timeout=5, message="idle and PINGed")
        assert client.stats.reconnects == 0 and client.stats.gaps == 0
        os.kill(redis_server.pid, signal.SIGSTOP)  # the socket stays open; nothing answers
        try:
            await wait_for(lambda: client.stats.reconnects == 1, timeout=5, message="PING")
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        await wait_for(lambda: client.stats.gaps == 1, timeout=10, message="gap reported")
        await redis_client.publish(CHANNEL, frame(1))
        items = await drain(client, 1)
        gaps = [i for i in items if isinstance(i, Gap)]
        # our own PING timeout, not the server closing on us: a disconnection
        assert [g.reason for g in gaps] == [CONSUMER_DISCONNECTED]


def test_urls_the_raw_road_cannot_honour_fall_back() -> None:
    plain = raw_address("redis://:pw@127.0.0.1:6390/3")
    assert plain is not None and (plain.port, plain.password, plain.db) == (6390, "pw", 3)
    unix = raw_address("unix:///tmp/redis.sock?db=2")
    assert unix is not None and (unix.path, unix.db) == ("/tmp/redis.sock", 2)
    tls = raw_address("rediss://127.0.0.1:6390/0?ssl_cert_reqs=none")
    assert tls is not None and tls.tls is not None
    assert raw_address("redis://user@127.0.0.1:6390/0") is None  # redis-py's own AUTH
    assert raw_address("redis://127.0.0.1:notaport/0") is None
