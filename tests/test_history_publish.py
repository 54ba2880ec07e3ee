"""The history (issue 13): every frame also goes to a capped Redis Stream, in the same write as
its PUBLISH, against a real redis-server, on both of the publisher's roads.

A refused history entry (Redis at maxmemory) is a frame a durable consumer never sees: it is
announced once, as a ``redis`` loss, when Redis takes the history again.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.clock import now_ms
from broker.core.history import history_cap, parse_history_caps
from broker.errors import ConfigError
from broker.keys import HISTORY_FRAME_FIELD, Keys
from broker.publisher import Publisher, Target, make_target
from broker.testing import RedisServer, broker_process, wait_for, write_lease
from broker.upbit.types import StreamKey
from tests.support.sim import running_simulator
from tests.test_redis_oom import fill, free, maxmemory_args

KEYS = Keys("h")
KEYS_T = Keys("t")  # the test brokers' namespace
CAPS = {"trade": 300, "ticker": 5, "candle": 50}


async def entries(client: aioredis.Redis, key: str) -> list[bytes]:
    return [fields[HISTORY_FRAME_FIELD.encode()] for _, fields in await client.xrange(key)]


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_every_frame_is_appended_beside_its_publish_and_capped(
    raw: bool, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    publisher = Publisher(client, raw_resp=raw, history_caps=CAPS)
    trade = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
    ticker = publisher.target(KEYS, StreamKey("ticker", "KRW-BTC"))
    book = publisher.target(KEYS, StreamKey("orderbook", "KRW-BTC"))  # no history for it
    candle = publisher.target(KEYS, StreamKey("candle.1m", "KRW-ETH"))
    pubsub = client.pubsub()
    await pubsub.subscribe(trade.channel)
    try:
        frames = [b'{"n":%d,"raw":"\\u0000\\r\\n*3"}' % i for i in range(1000)]
        for i, frame in enumerate(frames):
            publisher.enqueue(trade, frame)
            publisher.enqueue(ticker, b"t%d" % i)
            publisher.enqueue(book, b"b%d" % i)
            if i % 10 == 0:
                publisher.enqueue(candle, b"c%d" % i)
            if i % 97 == 0:
                await publisher.flush()  # several bursts
        await publisher.flush()
        stats = publisher.stats
        assert stats.published == 3100 and stats.history_written == 2100
        assert stats.reply_errors == 0 and stats.history_refused == 0

        # Exact bytes, in order; trimmed to at least the cap (MAXLEN ~ trims whole nodes).
        kept = await entries(client, KEYS.history("trade", "KRW-BTC"))
        assert 300 <= len(kept) < 1000
        assert kept == frames[-len(kept) :]
        ticks = await entries(client, KEYS.history("ticker", "KRW-BTC"))
        assert 5 <= len(ticks) <= 101 and ticks[-1] == b"t999"
        assert await entries(client, KEYS.history("candle.1m", "KRW-ETH")) == [
            b"c%d" % i for i in range(0, 1000, 10)
        ]
        assert not await client.exists(KEYS.history("orderbook", "KRW-BTC"))
        # The pub/sub payload is unchanged: the exact frame.
        first = None
        while first is None or first["type"] != "message":
            first = await pubsub.get_message(timeout=5)
        assert first["data"] == frames[0]
    finally:
        await pubsub.aclose()
        await publisher.aclose()
        await client.aclose()


async def test_no_history_writes_no_stream(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    publisher = Publisher(client, history_caps=parse_history_caps("off"))
    target = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
    assert target == target and not target.history_prefix and target.commands == 1
    try:
        publisher.enqueue(target, b"x")
        await publisher.flush()
        assert publisher.stats.published == 1 and publisher.stats.history_written == 0
        assert await client.keys("h:hist:*") == []
    finally:
        await publisher.aclose()
        await client.aclose()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_refused_history_is_one_announced_loss_once_redis_takes_it_again(raw: bool) -> None:
    async with RedisServer(maxmemory_args(4 * 1024 * 1024)) as redis:
        client = aioredis.Redis.from_url(redis.url)
        publisher = Publisher(client, raw_resp=raw, last_value_cache=False, history_caps=CAPS)
        trade = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
        unkept = make_target(KEYS, StreamKey("orderbook", "KRW-BTC"))  # no history

        async def burst(*frames: tuple[Target, bytes]) -> None:
            for target, frame in frames:
                publisher.enqueue(target, frame)
            await publisher.flush()

        stats = publisher.stats
        try:
            await burst((trade, b"a1"))
            whole_until = stats.last_publish_ms
            fillers = await fill(client, chunk=512 * 1024)
            await burst((trade, b"a2"), (trade, b"a3"))
            await burst((unkept, b"o1"))  # no history in it: it does not end the loss
            await burst((trade, b"a4"))
            assert stats.published == 5  # PUBLISH goes on at maxmemory
            assert stats.history_refused == 3 and stats.history_written == 1
            assert publisher.take_losses() == []  # open until Redis takes the history again
            # The last whole publish stays put: a successor's takeover gap starts there.
            assert stats.last_publish_ms == whole_until
            await free(client, fillers)
            await burst((trade, b"a5"))
            [loss] = publisher.take_losses()
            assert loss.frames == 3 and loss.since_ms <= whole_until <= loss.until_ms
            assert await entries(client, KEYS.history("trade", "KRW-BTC")) == [b"a1", b"a5"]
            await burst((trade, b"a6"))
            assert publisher.take_losses() == []
        finally:
            await publisher.aclose()
            await client.aclose()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_a_trade_snapshot_is_published_and_cached_but_not_appended_twice(
    raw: bool, redis_url: str
) -> None:
    """A trade SNAPSHOT repeats the last trade: it goes through the stream's twin, published
    and cached as the stream's own, never appended to the history."""
    client = aioredis.Redis.from_url(redis_url)
    publisher = Publisher(client, raw_resp=raw, history_caps=CAPS)
    trade = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
    twin = trade.snapshot_twin
    assert twin is not None and not twin.history_prefix
    assert twin == trade and trade == twin and hash(twin) == hash(trade)
    assert dict([(trade, b"a"), (twin, b"b")]) == {trade: b"b"}
    ticker = publisher.target(KEYS, StreamKey("ticker", "KRW-BTC"))
    assert ticker.snapshot_twin is None  # a ticker SNAPSHOT is fresh state: kept
    pubsub = client.pubsub()
    await pubsub.subscribe(trade.channel)
    try:
        for target, frame in ((trade, b"t1"), (twin, b"t1-again"), (trade, b"t2")):
            publisher.enqueue(target, frame)
        await publisher.flush()
        publisher.enqueue(twin, b"t2-again")
        await publisher.flush()
        assert await entries(client, KEYS.history("trade", "KRW-BTC")) == [b"t1", b"t2"]
        assert await client.hget(KEYS.last_values("trade"), "KRW-BTC") == b"t2-again"
        stats = publisher.stats
        assert stats.published == 4 and stats.history_written == 2
        assert stats.published_by_type == {"trade": 4}
        got: list[bytes] = []
        while len(got) < 4:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                got.append(message["data"])
        assert got == [b"t1", b"t1-again", b"t2", b"t2-again"]
    finally:
        await pubsub.aclose()
        await publisher.aclose()
        await client.aclose()


def test_history_caps_parse_and_refuse() -> None:
    assert parse_history_caps("trade=10, candle=0 ,ticker=2") == {"trade": 10, "ticker": 2}
    assert parse_history_caps(" OFF ") == {} and parse_history_caps("") == {}
    assert history_cap({"candle": 7}, "candle.240m") == 7
    assert history_cap({"candle": 7}, "orderbook") == 0
    for bad in ("trade=-1", "trade=nan", "trade=1e3", "trade=1,trade=2", "depth=5", "trade",
                "trade=99999999999", "trade=١٢"):  # fmt: skip
        with pytest.raises(ConfigError, match="history"):
            parse_history_caps(bad)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_history_keeps_its_max_age_and_a_stream_that_left_the_union_expires(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """``history_max_age`` 10 s: the leader trims each history stream of the union to the
    last 10 s (every 2.5 s), and the history of a code no lease wants any more expires."""
    url = redis_server.url
    btc, eth = KEYS_T.history("ticker", "KRW-BTC"), KEYS_T.history("ticker", "KRW-ETH")
    async with (
        running_simulator(seed=3, rate=200, markets=4) as sim,
        broker_process(url, sim.url, "h-1", tmp_path, history_max_age=10, history="ticker=100000"),
    ):
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC", "KRW-ETH"]}, ttl_ms=60_000)

        async def oldest_age_ms(key: str) -> int:
            first = await redis_client.xrange(key, count=1)
            if not first:
                return 0
            return now_ms() - int(first[0][0].decode().partition("-")[0])

        # Without the upkeep the stream would hold everything since the start (its count cap
        # is far away); with it, once the stream is 20 s old, nothing is much older than 10 s
        # (MINID ~ trims whole nodes, every 2.5 s: a few seconds of slack).
        await wait_for(lambda: redis_client.exists(btc), 20, message="history written")
        started = time.monotonic()

        async def trimmed() -> bool:
            age = await oldest_age_ms(btc)
            return time.monotonic() - started > 20 and 0 < age < 16_000

        await wait_for(trimmed, 40, message="the history trimmed to its max age")
        assert 0 < await redis_client.pttl(btc) <= 15_000  # max age + two rounds
        # KRW-ETH leaves the union: its history is not refreshed any more, and expires.
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        await wait_for(lambda: _gone(redis_client, eth), 40, message="KRW-ETH's history expired")
        assert await redis_client.exists(btc)


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_a_broker_acl_without_xadd_is_named_and_its_history_loss_announced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upgrade that keeps an old broker ACL (no ``+xadd``): frames still flow, every
    burst's history is refused (a loss for durable consumers, kept open), and the log says
    why in Redis's own words."""
    rule = "pub on >pw resetkeys ~h:* resetchannels &h:* -@all +hello +auth +publish +hset"
    async with RedisServer(("--user", *rule.split(" "))) as redis:
        client = aioredis.Redis.from_url(redis.url.replace("redis://", "redis://pub:pw@"))
        publisher = Publisher(client, history_caps=CAPS)
        trade = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
        try:
            with caplog.at_level("ERROR", logger="broker.publisher"):
                for frame in (b"a", b"b"):
                    publisher.enqueue(trade, frame)
                    await publisher.flush()
            stats = publisher.stats
            assert stats.published == 2 and stats.history_refused == 2
            assert publisher.take_losses() == []  # open: announced once XADD is allowed
            assert any("NOPERM" in r.getMessage() for r in caplog.records), caplog.text
        finally:
            await publisher.aclose()
            await client.aclose()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_a_bursts_publishes_run_before_its_history_and_cache(
    raw: bool, redis_server: RedisServer
) -> None:
    # Redis reads a burst 16 KB at a time and sends subscribers what it published after each
    # piece: the PUBLISHes go first so that no frame waits for the others' XADDs (issue 16's
    # added latency). MONITOR lists the commands in the order Redis ran them.
    client = aioredis.Redis.from_url(redis_server.url)
    publisher = Publisher(client, raw_resp=raw, history_caps=CAPS)
    trade = publisher.target(KEYS, StreamKey("trade", "KRW-BTC"))
    ticker = publisher.target(KEYS, StreamKey("ticker", "KRW-ETH"))
    book = publisher.target(KEYS, StreamKey("orderbook", "KRW-BTC"))  # no history for it
    reader, writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
    try:
        writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        sent = []
        for i in range(40):
            target = (trade, ticker, book)[i % 3]
            frame = b'{"n":%d,"pad":"%s"}' % (i, b"x" * 900)  # ~37 KB with the XADDs
            publisher.enqueue(target, frame)
            sent.append((target.channel, frame))
        await publisher.flush()
        assert publisher.stats.batches == 1 and publisher.stats.history_written == 27
        ran: list[tuple[str, bytes]] = []
        while len(ran) < 40 + 27 + 3:
            line = await asyncio.wait_for(reader.readline(), 10)
            match = re.search(rb'\] "(\w+)" "([^"]*)"', line)
            if match and match[1] in (b"PUBLISH", b"XADD", b"HSET"):
                ran.append((match[1].decode(), match[2]))
    finally:
        writer.close()
        await publisher.aclose()
        await client.aclose()
    names = [name for name, _ in ran]
    assert names == ["PUBLISH"] * 40 + ["XADD"] * 27 + ["HSET"] * 3, names
    assert [key for _, key in ran[:40]] == [channel for channel, _ in sent]
