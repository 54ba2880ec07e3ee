"""BrokerClient against a real redis-server: leases, delivery, gaps, heartbeats, restarts.

The broker is played by the test: it PUBLISHes frames to the channels, gap events to
``{ns}:events`` and answers commands itself, so these tests need no broker service.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.errors import ConfigError, InvalidCodeError, LeaseError, SnapshotError
from broker.testing import RedisServer, free_port, wait_for
from consumers import (
    CONSUMER_DISCONNECTED,
    BrokerClient,
    ClientClosedError,
    Gap,
    NoBrokerSnapshotError,
    PartialSnapshotError,
    RedisUnavailableError,
    StreamMessage,
)

NS = "upbit"


def ticker(code: str, price: float, ts: int = 1_700_000_000_000) -> bytes:
    return json.dumps(
        {
            "type": "ticker",
            "code": code,
            "trade_price": price,
            "signed_change_rate": 0.01,
            "acc_trade_volume_24h": 12.5,
            "timestamp": ts,
            "stream_type": "REALTIME",
        },
        separators=(",", ":"),
    ).encode()


async def lease_hash(redis: aioredis.Redis, client_id: str) -> dict[str, str]:
    raw = await redis.hgetall(f"{NS}:lease:{client_id}")  # type: ignore[misc]
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_subscribe_writes_lease_per_contract(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    control = redis_client.pubsub()
    await control.subscribe(f"{NS}:control")
    async with BrokerClient(redis_url=redis_url, client_id="app-1", lease_ttl=5) as client:
        await client.subscribe("ticker", ["KRW-BTC", "KRW-ETH"])
        await client.subscribe("orderbook", ["KRW-BTC.15"])
        await client.subscribe("orderbook", ["KRW-XRP"], level=10000)
        fields = await lease_hash(redis_client, "app-1")
        assert fields["v"] == "1"
        assert fields["client_id"] == "app-1"
        assert fields["host"] and int(fields["pid"]) == os.getpid()
        assert json.loads(fields["subs"]) == {
            "orderbook": ["KRW-BTC.15"],
            "orderbook@10000": ["KRW-XRP"],
            "ticker": ["KRW-BTC", "KRW-ETH"],
        }
        assert fields["ttl_ms"] == "5000"
        created, renewed, deadline = (
            int(fields[k]) for k in ("created_ms", "renewed_ms", "deadline_ms")
        )
        assert created <= renewed and deadline == renewed + 5000
        assert 0 < await redis_client.pttl(f"{NS}:lease:app-1") <= 5000
        assert await redis_client.zscore(f"{NS}:leases", "app-1") == deadline
        notes = []
        while (msg := await control.get_message(timeout=0.5)) is not None:
            if msg["type"] == "message":
                notes.append(msg["data"])
        assert b"lease app-1" in notes
        assert client.lease is not None and client.lease.deadline_ms == deadline
    await control.aclose()  # type: ignore[no-untyped-call]


async def test_unsubscribe_shrinks_and_close_releases(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = BrokerClient(redis_url=redis_url, client_id="app-2")
    await client.start()
    await client.subscribe("ticker", ["KRW-BTC", "KRW-ETH", "KRW-XRP"])
    await client.unsubscribe("ticker", ["KRW-XRP"])
    fields = await lease_hash(redis_client, "app-2")
    assert json.loads(fields["subs"]) == {"ticker": ["KRW-BTC", "KRW-ETH"]}
    # unsubscribing everything releases the lease; subscribing again writes it anew
    await client.unsubscribe("ticker", ["KRW-BTC", "KRW-ETH"])
    assert await redis_client.exists(f"{NS}:lease:app-2") == 0
    assert await redis_client.zscore(f"{NS}:leases", "app-2") is None
    await client.subscribe("trade", "KRW-BTC")
    assert json.loads((await lease_hash(redis_client, "app-2"))["subs"]) == {"trade": ["KRW-BTC"]}
    await client.close()
    assert await redis_client.exists(f"{NS}:lease:app-2") == 0
    assert await redis_client.zscore(f"{NS}:leases", "app-2") is None
    await client.close()  # twice is fine
    with pytest.raises(ClientClosedError):
        await client.subscribe("ticker", ["KRW-BTC"])


async def test_default_client_id_is_unique_and_valid(redis_url: str) -> None:
    a = BrokerClient(redis_url=redis_url)
    b = BrokerClient(redis_url=redis_url)
    assert a.client_id != b.client_id
    assert str(os.getpid()) in a.client_id


@pytest.mark.parametrize(
    ("type_", "codes", "kwargs", "error"),
    [
        ("ticker", ["krw-btc"], {}, InvalidCodeError),
        ("ticker", ["KRW-BTC", "KRW BTC"], {}, InvalidCodeError),
        ("ticker", ["KRW-BTC.15"], {}, InvalidCodeError),
        ("orderbook", ["KRW-BTC.x"], {}, InvalidCodeError),
        ("orderbook", ["*"], {}, InvalidCodeError),
        ("tickers", ["KRW-BTC"], {}, ValueError),
        ("myOrder", ["KRW-BTC"], {}, ValueError),
        ("ticker", [], {}, ValueError),
        ("ticker", ["KRW-BTC"], {"level": 100}, ValueError),
        ("orderbook", ["KRW-BTC"], {"level": -1}, ValueError),
    ],
)
async def test_bad_requests_fail_before_anything_is_written(
    redis_url: str,
    redis_client: aioredis.Redis,
    type_: str,
    codes: list[str],
    kwargs: dict[str, Any],
    error: type[Exception],
) -> None:
    async with BrokerClient(redis_url=redis_url, client_id="bad") as client:
        with pytest.raises(error) as info:
            await client.subscribe(type_, codes, **kwargs)
        assert str(info.value)
        assert await redis_client.exists(f"{NS}:lease:bad") == 0
        assert client.subscriptions.depths == {}


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="redis url"):
        BrokerClient(redis_url="http://user:secret@host")
    with pytest.raises(ConfigError) as info:
        BrokerClient(redis_url="http://user:secret@host")
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError):
        BrokerClient(client_id="no spaces")
    with pytest.raises(ConfigError):
        BrokerClient(namespace="a:b")
    with pytest.raises(ConfigError):
        BrokerClient(lease_ttl=0)


async def test_unreachable_redis_is_one_clear_error() -> None:
    client = BrokerClient(
        redis_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0", connect_timeout=0.5
    )
    with pytest.raises(RedisUnavailableError) as info:
        await client.start()
    assert "cannot reach redis" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_frames_reach_callback_and_messages(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    seen_sync: list[StreamMessage] = []
    seen_async: list[StreamMessage] = []

    async def on_trade(item: StreamMessage) -> None:
        await asyncio.sleep(0)
        seen_async.append(item)

    async with BrokerClient(redis_url=redis_url) as client:
        await client.subscribe("ticker", ["KRW-BTC"], seen_sync.append)
        await client.subscribe("trade", ["KRW-ETH"], on_trade)
        await client.subscribe("ticker", ["KRW-ETH"])
        await client.subscribe("orderbook", ["KRW-XRP.5"], level=1000)
        frames = [ticker("KRW-BTC", 1), ticker("KRW-BTC", 2)]
        for f in frames:
            await redis_client.publish(f"{NS}:ticker:KRW-BTC", f)
        await redis_client.publish(f"{NS}:trade:KRW-ETH", b'{"type":"trade","code":"KRW-ETH"}')
        await redis_client.publish(f"{NS}:ticker:KRW-ETH", ticker("KRW-ETH", 3))
        await redis_client.publish(f"{NS}:orderbook@1000:KRW-XRP", b'{"type":"orderbook"}')
        await redis_client.publish(f"{NS}:ticker:KRW-XRP", ticker("KRW-XRP", 9))  # not ours

        await wait_for(lambda: len(seen_sync) == 2, message="ticker callback")
        assert [m.raw for m in seen_sync] == frames
        assert seen_sync[0].channel == f"{NS}:ticker:KRW-BTC"
        assert (seen_sync[0].type, seen_sync[0].code, seen_sync[0].stream) == (
            "ticker",
            "KRW-BTC",
            "ticker",
        )
        assert seen_sync[0].json()["trade_price"] == 1
        await wait_for(lambda: len(seen_async) == 1, message="async trade callback")

        first = await client.next_message(timeout=5)
        second = await client.next_message(timeout=5)
        assert isinstance(first, StreamMessage) and isinstance(second, StreamMessage)
        assert first.raw == ticker("KRW-ETH", 3)
        assert (second.type, second.stream, second.code, second.level) == (
            "orderbook",
            "orderbook@1000",
            "KRW-XRP",
            1000.0,
        )
        assert await client.next_message(timeout=0.2) is None
        assert client.stats.messages == 5

        # after unsubscribe returns nothing more of that stream is delivered
        await client.unsubscribe("ticker", ["KRW-BTC"])
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", ticker("KRW-BTC", 4))
        await redis_client.publish(f"{NS}:ticker:KRW-ETH", ticker("KRW-ETH", 5))
        item = await client.next_message(timeout=5)
        assert isinstance(item, StreamMessage) and item.code == "KRW-ETH"
        assert len(seen_sync) == 2


async def test_messages_iterator_ends_on_close(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = BrokerClient(redis_url=redis_url)
    await client.start()
    await client.subscribe("ticker", ["KRW-BTC"])
    got: list[Any] = []

    async def consume() -> None:
        async for item in client.messages():
            got.append(item)

    task = asyncio.create_task(consume())
    await redis_client.publish(f"{NS}:ticker:KRW-BTC", ticker("KRW-BTC", 1))
    await wait_for(lambda: len(got) == 1, message="one message")
    await client.close()
    async with asyncio.timeout(5):
        await task
    assert len(got) == 1


async def test_broker_gap_events_reach_the_application(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    gaps: list[Gap] = []
    async with BrokerClient(redis_url=redis_url, on_gap=gaps.append) as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        event = {
            "event": "gap",
            "epoch": 7,
            "since_ms": 1000,
            "until_ms": 2500,
            "reason": "reconnect",
            "broker": "b-1",
        }
        # events are accepted only from the leader the status names (design.md)
        await redis_client.hset(f"{NS}:status", mapping={"leader": "b-1"})
        await redis_client.publish(f"{NS}:events", json.dumps(event))
        await redis_client.publish(f"{NS}:events", json.dumps({"event": "leader", "broker": "x"}))
        await redis_client.publish(f"{NS}:events", b"not json")
        item = await client.next_message(timeout=5)
        assert isinstance(item, Gap)
        assert (item.reason, item.source, item.epoch, item.since_ms, item.until_ms) == (
            "reconnect",
            "broker",
            7,
            1000,
            2500,
        )
        assert item.broker == "b-1" and item.kind == "gap"
        await wait_for(lambda: len(gaps) == 1, message="on_gap")
        assert gaps[0] == item
        assert client.stats.gaps == 1


async def test_heartbeat_renews_the_lease(redis_url: str, redis_client: aioredis.Redis) -> None:
    async with BrokerClient(redis_url=redis_url, client_id="hb", lease_ttl=0.6) as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        first = await lease_hash(redis_client, "hb")

        async def advanced() -> bool:
            now = await lease_hash(redis_client, "hb")
            return bool(now) and int(now["deadline_ms"]) > int(first["deadline_ms"]) + 300

        await wait_for(advanced, timeout=3, message="deadline to advance")
        now = await lease_hash(redis_client, "hb")
        assert now["created_ms"] == first["created_ms"]
        # several TTLs later the lease is still there
        await wait_for(advanced, timeout=3)
        assert await redis_client.exists("upbit:lease:hb") == 1


async def test_redis_restart_reasserts_lease_and_reports_gap(redis_server: RedisServer) -> None:
    gaps: list[Gap] = []
    async with BrokerClient(
        redis_url=redis_server.url, client_id="rs", lease_ttl=1.5, on_gap=gaps.append
    ) as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        redis_server.restart()  # SIGKILL + start: comes back empty
        check = aioredis.Redis.from_url(redis_server.url)
        try:
            # within one heartbeat (TTL/3 = 0.5 s) plus the reconnect backoff
            await wait_for(
                lambda: check.exists("upbit:lease:rs"), timeout=2.0, message="lease back"
            )
            await wait_for(lambda: gaps, timeout=5, message="local gap")
            gap = gaps[0]
            assert gap.source == "local" and gap.reason == CONSUMER_DISCONNECTED
            assert gap.since_ms <= gap.until_ms
            assert client.stats.reconnects == 1

            # delivery resumes on the new connection (subscribed before the gap was reported)
            await check.publish("upbit:ticker:KRW-BTC", ticker("KRW-BTC", 42))
            item = await client.next_message(timeout=5)
            while isinstance(item, Gap):
                item = await client.next_message(timeout=5)
            assert isinstance(item, StreamMessage) and item.json()["trade_price"] == 42
        finally:
            await check.aclose()


async def test_subscribe_while_redis_is_down_raises_lease_error(
    redis_server: RedisServer,
) -> None:
    async with BrokerClient(
        redis_url=redis_server.url, client_id="down", connect_timeout=0.5
    ) as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        redis_server.kill()
        try:
            with pytest.raises(LeaseError):
                await client.subscribe("ticker", ["KRW-ETH"])
            # rolled back: still only what was written
            assert client.subscriptions.by_type() == {"ticker": ["KRW-BTC"]}
        finally:
            redis_server.start()


async def answer_one_command(redis: aioredis.Redis, reply: dict[str, Any]) -> dict[str, Any]:
    """Play the leader once: pop a command and push ``reply`` (with the command's id)."""
    popped = await redis.blpop([f"{NS}:requests"], timeout=5)  # type: ignore[misc]
    assert popped is not None
    command = json.loads(popped[1])
    body = {"id": command["id"], **reply}
    await redis.rpush(f"{NS}:reply:{command['id']}", json.dumps(body))  # type: ignore[misc]
    return dict(command)


async def test_snapshot_via_the_command_protocol(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    btc = json.loads(ticker("KRW-BTC", 100))
    async with BrokerClient(redis_url=redis_url) as client:
        leader = asyncio.create_task(
            answer_one_command(
                redis_client,
                {"ok": True, "frames": {"KRW-BTC": btc}, "missing": [], "source": {}},
            )
        )
        frames = await client.snapshot_frames("ticker", ["KRW-BTC"], timeout=3)
        command = await leader
        assert command["op"] == "snapshot" and command["type"] == "ticker"
        assert command["codes"] == ["KRW-BTC"] and command["level"] == 0
        assert 0 < command["timeout_ms"] <= 3000
        assert json.loads(frames["KRW-BTC"]) == btc

        # a code with no data: SnapshotError naming it, carrying what did arrive
        leader = asyncio.create_task(
            answer_one_command(
                redis_client,
                {"ok": True, "frames": {"KRW-BTC": btc}, "missing": ["KRW-NOPE"]},
            )
        )
        with pytest.raises(PartialSnapshotError) as info:
            await client.snapshot_frames("ticker", ["KRW-BTC", "KRW-NOPE"], timeout=3)
        await leader
        assert info.value.missing == ("KRW-NOPE",)
        assert "KRW-NOPE" in str(info.value)
        assert set(info.value.frames) == {"KRW-BTC"}

        leader = asyncio.create_task(
            answer_one_command(redis_client, {"ok": False, "error": "not today"})
        )
        with pytest.raises(Exception, match="not today"):
            await client.snapshot_frames("trade", ["KRW-BTC"], timeout=3)
        await leader


async def test_snapshot_with_no_broker_says_so(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url) as client:
        with pytest.raises(SnapshotError) as info:
            await client.snapshot_frames("ticker", ["KRW-BTC", "KRW-ETH"], timeout=0.5)
        assert isinstance(info.value, NoBrokerSnapshotError)
        assert "no broker answered" in str(info.value)
        assert info.value.missing == ("KRW-BTC", "KRW-ETH")
        # the unanswered request was taken back
        assert await redis_client.llen(f"{NS}:requests") == 0  # type: ignore[misc]
        with pytest.raises(InvalidCodeError):
            await client.snapshot_frames("ticker", ["btc"], timeout=0.5)


def test_sync_client_round_trip(redis_server: RedisServer) -> None:
    import redis as sync_redis

    from consumers import SyncBrokerClient

    publisher = sync_redis.Redis.from_url(redis_server.url)
    try:
        with SyncBrokerClient(redis_url=redis_server.url, client_id="sync-1") as client:
            client.subscribe("ticker", ["KRW-BTC"])
            assert publisher.exists("upbit:lease:sync-1") == 1
            publisher.publish("upbit:ticker:KRW-BTC", ticker("KRW-BTC", 5))
            item = client.get_message(timeout=5)
            assert isinstance(item, StreamMessage) and item.json()["trade_price"] == 5
            assert client.get_message(timeout=0.1) is None
            with pytest.raises(InvalidCodeError):
                client.subscribe("ticker", ["btc"])
            client.unsubscribe("ticker", "KRW-BTC")
            assert publisher.exists("upbit:lease:sync-1") == 0
            client.subscribe("trade", "KRW-ETH")
        assert publisher.exists("upbit:lease:sync-1") == 0
        with pytest.raises(ClientClosedError):
            client.subscribe("ticker", ["KRW-BTC"])
    finally:
        publisher.close()
