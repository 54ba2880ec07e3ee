"""BrokerClient(durable=True) against a real redis-server: streams read from their history.

The broker is played by the test: it appends frames to ``{ns}:hist:{stream}:{code}`` exactly
as the broker does (``XADD key MAXLEN ~ N * f <frame>``, plus ``origin rest`` for backfilled
entries), so these tests need no broker service; the last one runs against the real broker
and simulator once the broker writes history.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from broker.errors import ConfigError
from broker.keys import Keys
from broker.testing import RedisServer, scaled, wait_for
from consumers import (
    CONSUMER_DISCONNECTED,
    FELL_BEHIND,
    TRIMMED,
    BrokerClient,
    Gap,
    Item,
    StreamMessage,
    SyncBrokerClient,
)
from consumers.history_reader import parse_offset

NS = "upbit"
KEYS = Keys(NS)
BIG_CAP = 1_000_000


def frame(code: str, n: int, type_: str = "trade") -> bytes:
    return json.dumps(
        {"type": type_, "code": code, "sequential_id": n, "timestamp": 1_700_000_000_000 + n},
        separators=(",", ":"),
    ).encode()


def hist(code: str, type_: str = "trade") -> str:
    return KEYS.history(type_, code)


async def append(
    r: aioredis.Redis,
    key: str,
    frames: Sequence[bytes],
    cap: int = BIG_CAP,
    *,
    rest: bool = False,
) -> list[str]:
    """XADD each frame as the broker does; their entry ids."""
    async with r.pipeline(transaction=False) as pipe:
        for data in frames:
            extra = ("origin", "rest") if rest else ()
            pipe.execute_command("XADD", key, "MAXLEN", "~", cap, "*", "f", data, *extra)
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def take(client: BrokerClient, n: int, timeout: float = 10) -> list[Item]:
    """Items from ``messages()`` until ``n`` data messages came (gaps included)."""
    out: list[Item] = []
    data = 0
    async with asyncio.timeout(scaled(timeout)):
        async for item in client.messages():
            out.append(item)
            if isinstance(item, StreamMessage):
                data += 1
                if data == n:
                    break
    return out


def data(items: Sequence[Item]) -> list[StreamMessage]:
    return [i for i in items if isinstance(i, StreamMessage)]


async def connection_id(r: aioredis.Redis, name: str) -> int | None:
    for client in await r.client_list():
        if client.get("name") == name:
            return int(client["id"])
    return None


@pytest.fixture
def small_nodes_redis() -> Iterator[RedisServer]:
    """Streams trimmed in nodes of 10 entries, so ``MAXLEN ~ 50`` keeps 50 to 60 of them."""
    with RedisServer(("--stream-node-max-entries", "10")) as server:
        yield server


@pytest.fixture
async def small_nodes_client(small_nodes_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(small_nodes_redis.url)
    try:
        yield r
    finally:
        await r.aclose()


# -- delivery ----------------------------------------------------------------------------------


async def test_durable_streams_come_from_history_with_offsets_and_backfill_marks(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url, client_id="dur-1", durable=True) as client:
        await client.subscribe("trade", ["KRW-BTC"])
        # the lease is written as for pub/sub; the data channel is not SUBSCRIBEd
        assert await redis_client.exists(f"{NS}:lease:dur-1") == 1
        numsub = await redis_client.pubsub_numsub(KEYS.channel("trade", "KRW-BTC"))
        assert numsub == [(KEYS.channel("trade", "KRW-BTC").encode(), 0)]

        live = await append(redis_client, hist("KRW-BTC"), [frame("KRW-BTC", n) for n in range(5)])
        filled = await append(redis_client, hist("KRW-BTC"), [frame("KRW-BTC", 5)], rest=True)
        got = data(await take(client, 6))
        assert [m.offset for m in got] == live + filled
        assert [m.raw for m in got] == [frame("KRW-BTC", n) for n in range(6)]
        assert [m.backfilled for m in got] == [False] * 5 + [True]
        assert got[0].channel == KEYS.channel("trade", "KRW-BTC")
        assert (got[0].type, got[0].stream, got[0].code) == ("trade", "trade", "KRW-BTC")
        assert got[0].json()["sequential_id"] == 0
        assert client.stats.messages == 6 and client.stats.gaps == 0


async def test_where_a_durable_stream_starts(redis_url: str, redis_client: aioredis.Redis) -> None:
    key = hist("KRW-BTC")
    before = await append(redis_client, key, [frame("KRW-BTC", n) for n in range(5)])
    async with (
        BrokerClient(redis_url=redis_url, durable=True) as now,
        BrokerClient(redis_url=redis_url, durable=True) as oldest,
        BrokerClient(redis_url=redis_url, durable=True) as after,
        BrokerClient(redis_url=redis_url, durable=True) as since,
    ):
        await now.subscribe("trade", "KRW-BTC")  # start="$": only what comes next
        await oldest.subscribe("trade", "KRW-BTC", start="0")
        await after.subscribe("trade", "KRW-BTC", start=before[1])  # resume after an offset
        await since.subscribe("trade", "KRW-BTC", start=before[3].split("-")[0])  # a time
        later = await append(redis_client, key, [frame("KRW-BTC", n) for n in range(5, 7)])
        everything = before + later
        assert [m.offset for m in data(await take(now, 2))] == later
        assert [m.offset for m in data(await take(oldest, 7))] == everything
        assert [m.offset for m in data(await take(after, 5))] == everything[2:]
        ms = before[3].split("-")[0]
        from_ms = [i for i in everything if int(i.split("-")[0]) >= int(ms)]
        assert [m.offset for m in data(await take(since, len(from_ms)))] == from_ms


async def test_a_stream_not_written_yet_is_read_from_its_first_entry(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url, durable=True) as client:
        await client.subscribe("orderbook", ["KRW-BTC"], level=10000)
        key = KEYS.history("orderbook", "KRW-BTC", 10000)
        assert key == f"{NS}:hist:orderbook@10000:KRW-BTC"
        ids = await append(redis_client, key, [frame("KRW-BTC", n, "orderbook") for n in range(3)])
        got = data(await take(client, 3))
        assert [m.offset for m in got] == ids
        assert {m.stream for m in got} == {"orderbook@10000"}


async def test_arguments_are_checked(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="read_count"):
        BrokerClient(redis_url=redis_url, read_count=0)
    async with BrokerClient(redis_url=redis_url) as client:
        with pytest.raises(ValueError, match="durable"):
            await client.subscribe("trade", "KRW-BTC", start="0")  # a pub/sub stream has none
        with pytest.raises(ValueError, match="entry id"):
            await client.subscribe("trade", "KRW-BTC", durable=True, start="yesterday")
        with pytest.raises(ValueError, match="trade"):
            await client.subscribe("trade", "KRW-BTC", latest_only=True)
        await client.subscribe("ticker", "KRW-BTC", durable=True)
        with pytest.raises(ValueError, match="unsubscribe it first"):
            await client.subscribe("ticker", ["KRW-ETH", "KRW-BTC"])
        assert [k.code for k in client.subscriptions.depths] == ["KRW-BTC"]  # nothing added
        await client.unsubscribe("ticker", "KRW-BTC")
        await client.subscribe("ticker", "KRW-BTC")  # now over pub/sub


# -- resume ------------------------------------------------------------------------------------


async def test_resumes_after_its_connections_are_killed_ten_times_with_nothing_missing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    codes = ["KRW-BTC", "KRW-ETH"]
    written: dict[str, list[str]] = {c: [] for c in codes}
    received: list[StreamMessage] = []
    gaps: list[Gap] = []
    stop = asyncio.Event()

    async def produce() -> None:
        n = 0
        while not stop.is_set():
            for code in codes:
                frames = [frame(code, n + i) for i in range(5)]
                written[code] += await append(redis_client, hist(code), frames)
            n += 5
            await asyncio.sleep(0.005)  # the load's pace, not a synchronisation

    async with BrokerClient(redis_url=redis_url, client_id="dur-kill", durable=True) as client:
        await client.subscribe("trade", codes)

        async def consume() -> None:
            async for item in client.messages():
                if isinstance(item, StreamMessage):
                    received.append(item)
                else:
                    assert isinstance(item, Gap)
                    gaps.append(item)

        async with asyncio.TaskGroup() as tasks:
            producer = tasks.create_task(produce())
            consumer = tasks.create_task(consume())
            for kill in range(10):
                seen = len(received)
                await wait_for(lambda s=seen: len(received) > s + 20, 10, message="more frames")
                conn = await wait_for(
                    lambda: connection_id(redis_client, "dur-kill:hist"), 10, message="reader"
                )
                assert await redis_client.client_kill_filter(_id=conn) == 1
                if kill % 3 == 0:  # the events connection too: only events can be missed
                    sub = await wait_for(
                        lambda: connection_id(redis_client, "dur-kill:sub"), 10, message="sub"
                    )
                    assert await redis_client.client_kill_filter(_id=sub) == 1
                await wait_for(
                    lambda k=kill: client.stats.history_reconnects == k + 1, 10, message="noticed"
                )
            stop.set()
            await producer
            total = sum(len(ids) for ids in written.values())
            await wait_for(lambda: len(received) == total, 20, message="every frame")
            consumer.cancel()

    for code in codes:
        mine = [m for m in received if m.code == code]
        assert [m.offset for m in mine] == written[code]  # nothing missing, in order, once
        assert [json.loads(m.raw)["sequential_id"] for m in mine] == list(range(len(mine)))
    assert client.stats.history_reconnects == 10
    # the events connection's losses name only the events channel: no frame was lost
    assert gaps, "the killed events connection is reported"
    # (a CLIENT KILL looks like Redis dropping a slow subscriber: fell-behind)
    assert all(g.reason in (CONSUMER_DISCONNECTED, FELL_BEHIND) for g in gaps)
    assert all(g.channels == (KEYS.events,) for g in gaps), gaps


async def test_a_redis_restart_is_reported_then_reading_goes_on(
    redis_server: RedisServer, redis_url: str
) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        gaps: list[Gap] = []
        async with BrokerClient(
            redis_url=redis_url, client_id="dur-rs", durable=True, on_gap=gaps.append
        ) as client:
            await client.subscribe("trade", "KRW-BTC")
            first = await append(r, hist("KRW-BTC"), [frame("KRW-BTC", 0)])
            assert [m.offset for m in data(await take(client, 1))] == first
            await asyncio.to_thread(redis_server.restart)  # back empty: unread history is gone
            restart = await wait_for(
                lambda: [g for g in gaps if g.channels == (KEYS.channel("trade", "KRW-BTC"),)],
                15,
                message="the restart reported for the durable stream",
            )
            assert restart[0].reason == CONSUMER_DISCONNECTED and restart[0].source == "local"
            await r.aclose()
            r = aioredis.Redis.from_url(redis_url)
            # the lease is back (renewed at once after the reconnect) and reading goes on
            await wait_for(lambda: r.exists(f"{NS}:lease:dur-rs"), 10, message="lease back")
            later = await append(r, hist("KRW-BTC"), [frame("KRW-BTC", 1)])
            got = [m for m in data(await take(client, 1))]
            assert [m.offset for m in got] == later
    finally:
        await r.aclose()


# -- the retained window -------------------------------------------------------------------------


def assert_one_precise_gap(items: Sequence[Item], ids: list[str], key: str) -> Gap:
    """Exactly one ``trimmed`` gap; before it a prefix of ``ids``, after it a suffix; the gap
    runs from the last offset before it to the first one after it."""
    gaps = [i for i in items if isinstance(i, Gap)]
    assert len(gaps) == 1, gaps
    (gap,) = gaps
    where = list(items).index(gap)
    before = [m.offset for m in data(items[:where])]
    after = [m.offset for m in data(items[where + 1 :])]
    assert before == ids[: len(before)] and before
    assert after == ids[len(ids) - len(after) :] and after
    assert gap.reason == TRIMMED and gap.source == "local"
    assert gap.channels == (KEYS.channel("trade", "KRW-BTC"),)
    assert gap.from_offset == before[-1] and gap.to_offset == after[0]
    assert (gap.since_ms, gap.until_ms) == (
        parse_offset(before[-1])[0],
        parse_offset(after[0])[0],
    )
    assert key in gap.detail
    lost = ids[len(before) : len(ids) - len(after)]
    assert lost, "the gap stands for entries that were trimmed"
    assert gap.dropped == len(lost)  # counted exactly
    return gap


async def test_pushed_off_the_window_while_waiting_for_room_one_precise_gap(
    small_nodes_redis: RedisServer, small_nodes_client: aioredis.Redis
) -> None:
    r = small_nodes_client
    key = hist("KRW-BTC")
    async with BrokerClient(
        redis_url=small_nodes_redis.url, durable=True, queue_size=20, read_count=10
    ) as client:
        await client.subscribe("trade", "KRW-BTC")
        ids = await append(r, key, [frame("KRW-BTC", n) for n in range(30)], cap=50)
        # nobody reads: the reader fills the queue and waits; Redis keeps the rest
        history = client._history
        assert history is not None
        await wait_for(lambda: history.waiting_for_room, 10, message="the reader waits")
        held = client._queue.held
        assert 10 < held <= 20 and client.stats.dropped == 0
        ids += await append(r, key, [frame("KRW-BTC", n) for n in range(30, 400)], cap=50)
        assert client._queue.held == held  # it did not read on
        oldest = (await r.xrange(key, count=1))[0][0].decode()
        retained = ids[ids.index(oldest) :]
        items = await take(client, held + len(retained))
        gap = assert_one_precise_gap(items, ids, key)
        assert gap.to_offset == oldest and gap.from_offset == ids[held - 1]
        # and it goes on: the next entry is delivered, no other gap
        more = await append(r, key, [frame("KRW-BTC", 400)], cap=50)
        assert [m.offset for m in await take(client, 1)] == more


async def stalled_past_the_cap(
    url: str, r: aioredis.Redis, **client_options: Any
) -> tuple[list[Item], list[str], str]:
    """A durable client on KRW-BTC's trades whose first item's callback blocks its loop (and so
    its reader) while a thread appends 370 entries past a cap of 50; then it reads on. What it
    took, the ids appended (the first before the burst), and the stream's key."""
    key = hist("KRW-BTC")
    blocked = threading.Event()
    burst_done = threading.Event()
    ids: list[str] = []

    def stall_once(item: StreamMessage) -> None:
        if not blocked.is_set():
            blocked.set()
            burst_done.wait(scaled(10))  # blocks the client's loop (and so its reader)

    def burst() -> None:
        sync = redis.Redis.from_url(url)
        try:
            blocked.wait(scaled(10))
            pipe = sync.pipeline(transaction=False)
            for n in range(1, 371):
                pipe.execute_command("XADD", key, "MAXLEN", "~", 50, "*", "f", frame("KRW-BTC", n))
            ids.extend(i.decode() for i in pipe.execute())
        finally:
            sync.close()
            burst_done.set()

    async with BrokerClient(redis_url=url, durable=True, **client_options) as client:
        await client.subscribe("trade", "KRW-BTC", stall_once)
        await client.subscribe("trade", "KRW-BTC")  # and to messages()
        thread = threading.Thread(target=burst)
        thread.start()
        try:
            ids[:0] = await append(r, key, [frame("KRW-BTC", 0)], cap=50)
            first = await take(client, 1)
            await asyncio.to_thread(burst_done.wait, scaled(10))
        finally:
            await asyncio.to_thread(thread.join)
        oldest = (await r.xrange(key, count=1))[0][0].decode()
        rest = await take(client, len(ids) - ids.index(oldest) + 1)
    return first + rest, ids, key


async def test_a_full_read_after_falling_off_is_judged_one_precise_gap(
    small_nodes_redis: RedisServer, small_nodes_client: aioredis.Redis
) -> None:
    """The reader is not told it stalled (a callback blocks its loop for a moment while the
    stream runs 370 entries past a cap of 50): the full COUNT it reads next gives it away."""
    items, ids, key = await stalled_past_the_cap(
        small_nodes_redis.url, small_nodes_client, read_count=10
    )
    got = [m.offset for m in data(items)]
    # the reader may have read the burst's first entry before the trimming: either way,
    # one gap, precise, then the rest
    assert_one_precise_gap(items, ids, key)
    assert got[-1] == ids[-1]


# -- back-pressure and conflation ------------------------------------------------------------


async def test_a_slow_reader_holds_back_the_reader_and_loses_nothing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    key = hist("KRW-BTC")
    async with BrokerClient(redis_url=redis_url, durable=True, queue_size=50) as client:
        await client.subscribe("trade", "KRW-BTC")
        ids = await append(redis_client, key, [frame("KRW-BTC", n) for n in range(1000)])
        await wait_for(lambda: client._queue.held == 50, 10, message="queue full")
        history = client._history
        assert history is not None
        reads = history.reads
        got: list[str] = []
        async with asyncio.timeout(scaled(20)):
            async for item in client.messages():
                assert isinstance(item, StreamMessage), item
                assert client._queue.held < 50 + 1  # never more than the queue holds
                got.append(item.offset or "")
                if len(got) == len(ids):
                    break
        assert got == ids
        assert client.stats.dropped == 0 and client.stats.gaps == 0
        # it read in batches of at least half the queue, not one entry at a time
        assert history.reads - reads <= 1000 // 25 + 2


async def test_latest_only_durable_state_keeps_the_newest(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    key = hist("KRW-BTC", "ticker")
    frames = [frame("KRW-BTC", n, "ticker") for n in range(300)]
    old = await append(redis_client, key, frames[:200])
    async with BrokerClient(redis_url=redis_url, durable=True, read_count=10) as client:
        # from the oldest entry: a full read makes the reader jump to the newest
        await client.subscribe("ticker", "KRW-BTC", start="0", latest_only=True)
        history = client._history
        assert history is not None
        cursor = history.cursors[key]
        await wait_for(lambda: cursor.last == parse_offset(old[-1]), 10, message="caught up")
        assert history.reads < 200 // 10
        (item,) = await take(client, 1)
        assert isinstance(item, StreamMessage) and item.offset == old[-1]
        # nobody reads: the queue keeps only the newest, no gap
        new = await append(redis_client, key, frames[200:])
        await wait_for(lambda: cursor.last == parse_offset(new[-1]), 10, message="read on")
        assert len(client._queue) == 1
        (item,) = await take(client, 1)
        assert isinstance(item, StreamMessage) and item.offset == new[-1]
        assert item.raw == frames[-1]
        assert client.stats.gaps == 0 and client.stats.conflated > 0


async def test_latest_only_over_pubsub_conflates_too(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url) as client:
        await client.subscribe("ticker", ["KRW-BTC", "KRW-ETH"], latest_only=True)
        for n in range(50):
            for code in ("KRW-BTC", "KRW-ETH"):
                await redis_client.publish(KEYS.channel("ticker", code), frame(code, n, "ticker"))
        await wait_for(lambda: client.stats.messages == 100, 10, message="all received")
        got = data(await take(client, 2))
        assert {m.code: m.raw for m in got} == {
            "KRW-BTC": frame("KRW-BTC", 49, "ticker"),
            "KRW-ETH": frame("KRW-ETH", 49, "ticker"),
        }
        assert client.stats.conflated == 98 and client.stats.dropped == 0
        assert all(m.offset is None for m in got)


# -- the two roads together, and the sync wrapper ------------------------------------------------


async def test_durable_and_pubsub_subscriptions_side_by_side(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    gaps: list[Gap] = []
    async with BrokerClient(redis_url=redis_url, client_id="mixed", on_gap=gaps.append) as client:
        await client.subscribe("trade", "KRW-BTC", durable=True)
        await client.subscribe("ticker", "KRW-ETH")
        ids = await append(redis_client, hist("KRW-BTC"), [frame("KRW-BTC", 0)])
        await redis_client.publish(KEYS.channel("ticker", "KRW-ETH"), frame("KRW-ETH", 0))
        got = {m.code: m for m in data(await take(client, 2))}
        assert got["KRW-BTC"].offset == ids[0] and got["KRW-ETH"].offset is None
        sub = await connection_id(redis_client, "mixed:sub")
        assert sub is not None and await redis_client.client_kill_filter(_id=sub) == 1
        await wait_for(lambda: gaps, 10, message="the pub/sub loss reported")
        # it names what pub/sub carried, not the durable stream
        assert gaps[0].channels == (KEYS.channel("ticker", "KRW-ETH"), KEYS.events)


def test_the_sync_wrapper_subscribes_durably(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    try:
        with SyncBrokerClient(redis_url=redis_url, durable=True) as client:
            client.subscribe("trade", "KRW-BTC")
            client.subscribe("ticker", "KRW-BTC", latest_only=True, start="0")
            entry = r.execute_command(
                "XADD", hist("KRW-BTC"), "MAXLEN", "~", 100, "*", "f", frame("KRW-BTC", 0)
            )
            item = client.get_message(timeout=scaled(10))
            assert isinstance(item, StreamMessage) and item.offset == entry.decode()
    finally:
        r.close()


# -- end to end, once the broker writes history ---------------------------------------------------


async def test_end_to_end_with_the_broker_nothing_missing_across_kills(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    from simulator import Simulator
    from tests.support.broker_env import fast_settings, started_broker

    keys = Keys("t")
    key = keys.history("trade", "KRW-BTC")
    async with (
        Simulator(port=0, seed=3, rate=400, up_interval=1.0) as sim,
        started_broker(fast_settings(redis_url, sim.url)),
        BrokerClient(redis_url=redis_url, namespace="t", client_id="e2e", durable=True) as client,
    ):
        await client.subscribe("trade", "KRW-BTC")
        await client.subscribe("ticker", "KRW-BTC", durable=False)  # flows either way

        async def history_or_frames() -> bool:
            return bool(await redis_client.exists(key)) or client.stats.messages > 50

        await wait_for(history_or_frames, 15, message="frames")
        if not await redis_client.exists(key):
            pytest.skip("the broker does not write history yet (broker/publisher.py)")
        received: list[StreamMessage] = []

        async def consume() -> None:
            async for item in client.messages():
                if isinstance(item, StreamMessage) and item.type == "trade":
                    received.append(item)

        task = asyncio.create_task(consume())
        try:
            for _ in range(3):
                seen = len(received)
                await wait_for(lambda s=seen: len(received) > s + 10, 15, message="trades")
                conn = await connection_id(redis_client, "e2e:hist")
                assert conn is not None
                await redis_client.client_kill_filter(_id=conn)
            await wait_for(lambda: len(received) > seen + 20, 15, message="trades after")
        finally:
            task.cancel()
        offsets = [m.offset or "" for m in received]
        entries = await redis_client.xrange(key, min=offsets[0], max=offsets[-1])
        assert offsets == [e[0].decode() for e in entries]
        assert [m.raw for m in received] == [e[1][b"f"] for e in entries]


# -- streams deleted and recreated -----------------------------------------------------------


@pytest.fixture
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each durable stream checked (XINFO) every ~0.3 s instead of every ~30 s."""
    monkeypatch.setattr("consumers.history_reader.CHECK_INTERVAL_S", 0.3, raising=False)


async def test_a_stream_deleted_and_recreated_while_behind_is_a_gap_then_the_new_one(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    r = redis_client
    key = hist("KRW-BTC")
    async with BrokerClient(
        redis_url=redis_url, durable=True, queue_size=20, read_count=10
    ) as client:
        await client.subscribe("trade", "KRW-BTC")
        old = await append(r, key, [frame("KRW-BTC", n) for n in range(30)])
        history = client._history
        assert history is not None
        await wait_for(lambda: history.waiting_for_room, 10, message="the reader waits")
        held = client._queue.held
        # DEL (or FLUSHALL, an eviction): the 10 entries it had not read go with the stream;
        # the new stream's counters start again (entries-added 3 < the 20 it counted)
        await r.delete(key)
        new = await append(r, key, [frame("KRW-BTC", n) for n in range(100, 103)])
        items = await take(client, held + len(new))
    gaps = [i for i in items if isinstance(i, Gap)]
    assert len(gaps) == 1, gaps
    (gap,) = gaps
    where = items.index(gap)
    assert [m.offset for m in data(items[:where])] == old[:held]
    assert [m.offset for m in data(items[where + 1 :])] == new
    assert gap.reason == TRIMMED and gap.channels == (KEYS.channel("trade", "KRW-BTC"),)
    assert (gap.from_offset, gap.to_offset) == (old[held - 1], new[0])
    assert gap.dropped == 0 and "recreated" in gap.detail  # how many: unknown


async def test_a_stream_deleted_while_the_reader_keeps_up_is_told_by_the_periodic_check(
    redis_url: str, redis_client: aioredis.Redis, quick_checks: None
) -> None:
    """Between two reads it may have lost entries nobody can count: one gap; the new stream's
    entries come once whether the check saw the stream gone or already recreated."""
    r = redis_client
    key = hist("KRW-BTC")
    gaps: list[Gap] = []
    async with BrokerClient(redis_url=redis_url, durable=True, on_gap=gaps.append) as client:
        await client.subscribe("trade", "KRW-BTC")
        old = await append(r, key, [frame("KRW-BTC", n) for n in range(5)])
        assert [m.offset for m in data(await take(client, 5))] == old
        await r.delete(key)
        new = await append(r, key, [frame("KRW-BTC", n) for n in range(100, 102)])
        got = data(await take(client, 2))
        await wait_for(lambda: gaps, 10, message="the deletion told")
        history = client._history
        assert history is not None
        checks = history.checks
        await wait_for(lambda: history.checks > checks + 2, 10, message="checked again")
    assert [m.offset for m in got] == new  # once, in order
    assert len(gaps) == 1, gaps
    assert gaps[0].reason == TRIMMED and gaps[0].dropped == 0
    assert "deleted" in gaps[0].detail


async def test_a_stream_recreated_with_ids_below_the_last_offset_is_read_from_its_start(
    redis_url: str, redis_client: aioredis.Redis, quick_checks: None
) -> None:
    r = redis_client
    key = hist("KRW-BTC")
    gaps: list[Gap] = []
    async with BrokerClient(redis_url=redis_url, durable=True, on_gap=gaps.append) as client:
        await client.subscribe("trade", "KRW-BTC")
        old = await append(r, key, [frame("KRW-BTC", 0)])
        assert [m.offset for m in data(await take(client, 1))] == old
        # a new stream whose clock is behind: XREAD after the old offset skips its entries
        await r.delete(key)
        low = [await r.xadd(key, {"f": frame("KRW-BTC", n)}, id=f"5-{n}") for n in (1, 2)]
        got = data(await take(client, 2))
    assert [m.offset for m in got] == [i.decode() for i in low]
    assert [g.reason for g in gaps] == [TRIMMED] and gaps[0].from_offset == old[0]


# -- latest only and back-filled entries --------------------------------------------------------


async def test_latest_only_never_goes_back_to_a_back_filled_entry(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The back-fill appends old candles after the live ones appended meanwhile: the newest
    entry is no state to keep, in a short batch or at the jump after a full one."""
    r = redis_client
    key = hist("KRW-BTC", "candle.1m")
    live = await append(r, key, [frame("KRW-BTC", n, "candle.1m") for n in range(100)])
    filled = await append(r, key, [frame("KRW-BTC", n, "candle.1m") for n in range(3)], rest=True)
    async with BrokerClient(redis_url=redis_url, durable=True, read_count=10) as client:
        # from the oldest: full batches, then the jump to the newest entry (a back-filled one)
        await client.subscribe("candle.1m", "KRW-BTC", start="0", latest_only=True)
        history = client._history
        assert history is not None
        cursor = history.cursors[key]
        await wait_for(lambda: cursor.last == parse_offset(filled[-1]), 10, message="read all")
        (item,) = await take(client, 1)
        assert isinstance(item, StreamMessage)
        assert (item.offset, item.backfilled) == (live[-1], False)
        # a short batch: live, then back-filled (older) entries
        more = await append(r, key, [frame("KRW-BTC", 100, "candle.1m")])
        late = await append(r, key, [frame("KRW-BTC", 50, "candle.1m")], rest=True)
        await wait_for(lambda: cursor.last == parse_offset(late[-1]), 10, message="read on")
        (item,) = await take(client, 1)
        assert isinstance(item, StreamMessage)
        assert (item.offset, item.backfilled) == (more[0], False)
        assert len(client._queue) == 0 and client.stats.gaps == 0


# -- the reader's own connection and failures --------------------------------------------------


async def test_a_resp3_url_still_reads_durable_streams(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=f"{redis_url}?protocol=3", durable=True) as client:
        await client.subscribe("trade", "KRW-BTC")
        ids = await append(redis_client, hist("KRW-BTC"), [frame("KRW-BTC", n) for n in range(3)])
        assert [m.offset for m in data(await take(client, 3))] == ids
        assert client.stats.gaps == 0


async def test_an_unexpected_reader_failure_is_a_gap_and_the_reader_goes_on(
    redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumers.history_reader import HistoryReader

    deliver = HistoryReader._deliver
    failed: list[bool] = []

    def fail_once(self: HistoryReader, *args: object) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug in the reader")
        deliver(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(HistoryReader, "_deliver", fail_once)
    async with BrokerClient(redis_url=redis_url, durable=True) as client:
        await client.subscribe("trade", "KRW-BTC")
        ids = await append(redis_client, hist("KRW-BTC"), [frame("KRW-BTC", n) for n in range(3)])
        items = await take(client, 3)
    gaps = [i for i in items if isinstance(i, Gap)]
    assert len(gaps) == 1 and gaps[0].reason == CONSUMER_DISCONNECTED
    assert "a bug in the reader" in gaps[0].detail
    assert gaps[0].channels == (KEYS.channel("trade", "KRW-BTC"),)
    assert [m.offset for m in data(items)] == ids  # retried from the offset delivered


# -- where a cursor goes on: restarts and offsets above the stream --------------------------------


async def test_after_a_restart_entries_with_ids_below_the_last_offset_are_read(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The new server's clock may be behind the old one's: its ids below ``last`` are read
    (from the new stream's start), not skipped."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        gaps: list[Gap] = []
        async with BrokerClient(redis_url=redis_url, durable=True, on_gap=gaps.append) as client:
            await client.subscribe("trade", "KRW-BTC")
            first = await append(r, hist("KRW-BTC"), [frame("KRW-BTC", 0)])
            assert [m.offset for m in data(await take(client, 1))] == first
            await asyncio.to_thread(redis_server.restart)
            await wait_for(lambda: gaps, 15, message="the restart reported")
            await r.aclose()
            r = aioredis.Redis.from_url(redis_url)
            low = [
                await r.xadd(hist("KRW-BTC"), {"f": frame("KRW-BTC", n)}, id=f"7-{n}")
                for n in (1, 2)
            ]
            got = data(await take(client, 2))
        assert [m.offset for m in got] == [i.decode() for i in low]
        assert not [g for g in gaps if g.reason == TRIMMED]  # the restart's gap tells it all
    finally:
        await r.aclose()


async def test_a_start_above_the_newest_entry_starts_at_the_newest(
    redis_url: str, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    r = redis_client
    key = hist("KRW-BTC")
    await append(r, key, [frame("KRW-BTC", n) for n in range(2)])
    ahead = "99999999999999-0"  # an offset of a stream deleted since, or of another server
    async with BrokerClient(redis_url=redis_url, durable=True) as client:
        await client.subscribe("trade", "KRW-BTC", start=ahead)
        await client.subscribe("trade", "KRW-ETH", start=ahead)  # no stream at all
        new = await append(r, key, [frame("KRW-BTC", 2)])
        eth = await append(r, hist("KRW-ETH"), [frame("KRW-ETH", 0)])
        got = data(await take(client, 2))
    assert {m.code: m.offset for m in got} == {"KRW-BTC": new[0], "KRW-ETH": eth[0]}
    assert caplog.text.count("above its newest entry") == 2  # said, not silent


# -- COUNT and the broker's caps ----------------------------------------------------------------


async def broker_caps(r: aioredis.Redis, spec: str) -> None:
    """What the client reads of the broker's status: its history caps."""
    await r.hset(KEYS.status, "history", spec)


async def test_read_count_is_lowered_to_the_smallest_cap_the_broker_keeps(
    small_nodes_redis: RedisServer, small_nodes_client: aioredis.Redis
) -> None:
    """With COUNT (100) above the cap (50) a stream trimmed past returns fewer than COUNT and
    looks whole; the caps in the broker's status lower COUNT, and the loss is seen."""
    await broker_caps(small_nodes_client, "trade=50,candle=1000,ticker=100,orderbook=100")
    items, ids, key = await stalled_past_the_cap(small_nodes_redis.url, small_nodes_client)
    assert_one_precise_gap(items, ids, key)


async def test_a_durable_subscription_without_history_is_refused(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url, durable=True) as client:
        await client.subscribe("ticker", "KRW-BTC")  # no status: nothing known, accepted
        await broker_caps(redis_client, "trade=100,candle=50")
        with pytest.raises(ValueError, match="no history of ticker"):
            await client.subscribe("ticker", "KRW-ETH")
        with pytest.raises(ValueError, match="no history of orderbook"):
            await client.subscribe("orderbook", "KRW-ETH", durable=True)
        await client.subscribe("candle.1m", "KRW-ETH")
        await client.subscribe("ticker", "KRW-ETH", durable=False)  # pub/sub needs none
        history = client._history
        assert history is not None
        assert history.count_limit() == 50  # the candle's cap (the ticker's: not known)
        await broker_caps(redis_client, "off")
        with pytest.raises(ValueError, match="no history of trade"):
            await client.subscribe("trade", "KRW-BTC")
        assert [k.code for k in client.subscriptions.depths if k.type == "trade"] == []


# -- cost -----------------------------------------------------------------------------------------


async def xinfo_calls(r: aioredis.Redis) -> int:
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_xinfo|stream", {}).get("calls", 0))


async def test_catching_up_on_many_streams_sends_no_xinfo_per_read(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """40 streams 300 entries behind, read through a queue of 100: every read follows a wait
    for room. Each stream is checked once (its start is no entry), not once per read."""
    r = redis_client
    codes = [f"KRW-C{n:02d}" for n in range(40)]
    async with BrokerClient(redis_url=redis_url, durable=True, queue_size=100) as client:
        await client.subscribe("trade", codes)
        before = await xinfo_calls(r)
        written = {c: await append(r, hist(c), [frame(c, n) for n in range(300)]) for c in codes}
        items = await take(client, 40 * 300, timeout=60)
        history = client._history
        assert history is not None
        reads = history.reads
        calls = await xinfo_calls(r) - before
    assert not [i for i in items if isinstance(i, Gap)]
    for code in codes:
        assert [m.offset for m in data(items) if m.code == code] == written[code]
    assert reads > 100  # many reads, each after waiting for room
    assert calls <= 2 * len(codes), (calls, reads)
