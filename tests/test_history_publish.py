"""The history (issue 13): every frame also goes to a capped Redis Stream, in the same write as
its PUBLISH, against a real redis-server, on both of the publisher's roads.

A refused history entry (Redis at maxmemory) is a frame a durable consumer never sees: it is
announced once, as a ``redis`` loss, when Redis takes the history again.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from broker.core.history import history_cap, parse_history_caps
from broker.errors import ConfigError
from broker.keys import HISTORY_FRAME_FIELD, Keys
from broker.publisher import Publisher, Target, make_target
from broker.testing import RedisServer
from broker.upbit.types import StreamKey
from tests.test_redis_oom import fill, free, maxmemory_args

KEYS = Keys("h")
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


def test_history_caps_parse_and_refuse() -> None:
    assert parse_history_caps("trade=10, candle=0 ,ticker=2") == {"trade": 10, "ticker": 2}
    assert parse_history_caps(" OFF ") == {} and parse_history_caps("") == {}
    assert history_cap({"candle": 7}, "candle.240m") == 7
    assert history_cap({"candle": 7}, "orderbook") == 0
    for bad in ("trade=-1", "trade=nan", "trade=1e3", "trade=1,trade=2", "depth=5", "trade",
                "trade=99999999999", "trade=١٢"):  # fmt: skip
        with pytest.raises(ConfigError, match="history"):
            parse_history_caps(bad)
