"""The REST client (broker/rest.py) and the back-fill runner (broker/backfill.py) against a
scripted HTTP server on a free port and a real redis-server: pages asked and parsed, the
process's rate honoured (``Remaining-Req``, 429, 418), every failure typed, and the history
appended to in order, with ``origin rest``, capped; whatever goes wrong, a job ends with a
result instead of an exception."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from broker.backfill import HISTORY_PAGE, MAX_REST_FAILURES, XADD_BATCH, Backfiller
from broker.core.backfill import (
    SCAN_MARGIN_MS,
    BackfillJob,
    GapFill,
    Outcome,
    StreamFill,
    TradeRequest,
    Window,
)
from broker.core.stats import BackfillStats
from broker.errors import RestError, RestRateLimitError
from broker.keys import Keys
from broker.rest import (
    MAX_ATTEMPTS,
    MAX_BYTES,
    RestClient,
    RestLimiter,
    candle_path,
    parse_remaining_req,
)
from broker.testing import free_port, wait_for
from broker.upbit.messages import Trade, decode_message
from broker.upbit.rest_frames import RestCandle, RestTrade, build_candle_frame, build_trade_frame
from broker.upbit.types import StreamKey
from tests.test_backfill import MINUTE, T0, FakeCandles, FakeTicks, candle, gap, tape

pytestmark = pytest.mark.timeout(60)

Answer = tuple[int, dict[str, str], bytes]
Handler = Callable[[str, dict[str, list[str]]], Answer | None]
TRADE = StreamKey("trade", "KRW-BTC")
CANDLE = StreamKey("candle.1m", "KRW-BTC")
KEYS = Keys("t")


class ScriptedRest:
    """An HTTP/1.1 server answering each GET with ``handler(path, query)``: ``(status,
    headers, body)``, or None to hold the request unanswered (a hung server)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> ScriptedRest:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closing.set()  # held requests end
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            line = await reader.readline()
            while (await reader.readline()).strip():
                pass  # headers
            target = line.split()[1].decode()
            parts = urlsplit(target)
            query = parse_qs(parts.query)
            self.requests.append((parts.path, query))
            answer = self.handler(parts.path, query)
            if answer is None:
                await self._closing.wait()  # never answer
                return
            status, headers, body = answer
            head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
        finally:
            self._open.discard(writer)
            writer.close()


def ok(body: Any, sec: int = 9, group: str = "trade") -> Answer:
    return 200, {"Remaining-Req": f"group={group}; min=600; sec={sec}"}, json.dumps(body).encode()


def trade_json(t: RestTrade) -> dict[str, Any]:
    return {f: getattr(t, f) for f in t.__struct_fields__}


def ticks_handler(ticks: FakeTicks) -> Handler:
    """``/v1/trades/ticks`` over a tape (see tests/test_backfill.FakeTicks)."""

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        assert path == "/v1/trades/ticks"
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        days_ago = int(query.get("days_ago", ["0"])[0])
        count = int(query["count"][0])
        page = ticks.page(TradeRequest(cursor, days_ago), count)
        return ok([trade_json(t) for t in page])

    return handle


def fast_client(url: str, **kw: Any) -> RestClient:
    limiter = RestLimiter(per_second=50, backoff_initial=0.01, backoff_max=0.05)
    return RestClient(
        url, limiter=limiter, timeout=kw.pop("timeout", 2.0), retry_initial=0.01, **kw
    )


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[ScriptedRest]:
    async with ScriptedRest(handler) as server:
        yield server


# -- the REST client ---------------------------------------------------------------------------


async def test_trades_and_candles_are_asked_with_upbits_parameters() -> None:
    trades = tape(T0, 3)
    candles = [candle(T0 - T0 % MINUTE, T0)]

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        if path == "/v1/trades/ticks":
            return ok([trade_json(t) for t in reversed(trades)])
        return ok([{f: getattr(c, f) for f in c.__struct_fields__} for c in candles], 5, "candle")

    async with serving(handle) as server:
        client = fast_client(server.url)
        got = await client.trades("KRW-BTC", count=500, cursor=123, days_ago=2)
        assert [t.sequential_id for t in got] == [t.sequential_id for t in reversed(trades)]
        assert (await client.candles("candle.1m", "KRW-BTC", to_ms=T0, count=200)) == candles
    (path, query), (cpath, cquery) = server.requests
    assert path == "/v1/trades/ticks"
    assert query == {"market": ["KRW-BTC"], "count": ["500"], "cursor": ["123"], "days_ago": ["2"]}
    assert cpath == "/v1/candles/minutes/1"
    assert cquery["to"] == ["2023-11-14T22:13:20Z"] and cquery["count"] == ["200"]
    assert client.stats.requests == 2 and client.stats.request_errors == 0


def test_candle_paths_and_remaining_req() -> None:
    assert candle_path("candle.1s") == "/v1/candles/seconds"
    assert candle_path("candle.240m") == "/v1/candles/minutes/240"
    for bad in ("trade", "candle.7m"):
        with pytest.raises(ValueError):
            candle_path(bad)
    assert parse_remaining_req("group=trade; min=1799; sec=29") == ("trade", 29)
    assert parse_remaining_req("group=candle;sec=0") == ("candle", 0)
    assert parse_remaining_req("sec=x") == (None, None)
    assert parse_remaining_req(None) == (None, None)


async def test_remaining_sec_zero_holds_the_group_until_the_next_second() -> None:
    async with serving(lambda p, q: ok([], sec=0)) as server:
        client = fast_client(server.url)
        await client.trades("KRW-BTC")
        assert client.limiter.delay("trade") > 0.5
        assert client.limiter.delay("candle") == 0  # per group


async def test_429_forever_ends_in_a_rate_limit_error_after_the_retries() -> None:
    refused = (429, {"Remaining-Req": "group=trade; min=600; sec=0"}, b'{"error":{}}')
    async with serving(lambda p, q: refused) as server:
        client = fast_client(server.url)
        with pytest.raises(RestRateLimitError):
            await client.trades("KRW-BTC")
        assert len(server.requests) == MAX_ATTEMPTS
        assert client.stats.rate_limited == MAX_ATTEMPTS


async def test_a_418_blocks_the_group_for_its_retry_after() -> None:
    teapot = (418, {"Retry-After": "30"}, b"")
    async with serving(lambda p, q: teapot) as server:
        client = fast_client(server.url)
        loop_deadline = client.limiter.clock() + 5
        with pytest.raises(RestRateLimitError):
            await client.trades("KRW-BTC", deadline=loop_deadline)
        assert len(server.requests) == 1  # no point asking again within the deadline
        assert client.limiter.delay("trade") > 25


async def test_a_5xx_is_retried_and_a_4xx_is_not() -> None:
    answers = iter([(503, {}, b"busy"), ok([])])
    async with serving(lambda p, q: next(answers)) as server:
        assert await fast_client(server.url).trades("KRW-BTC") == []
        assert len(server.requests) == 2
    async with serving(lambda p, q: (404, {}, b'{"error":{"name":404}}')) as server:
        with pytest.raises(RestError) as info:
            await fast_client(server.url).trades("KRW-NOPE")
        assert info.value.status == 404 and len(server.requests) == 1


@pytest.mark.parametrize(
    "body", [b"<html>proxy error</html>", b'{"error":{"name":400}}', b'[{"market":1}]']
)
async def test_garbage_is_a_rest_error(body: bytes) -> None:
    async with serving(lambda p, q: (200, {}, body)) as server:
        client = fast_client(server.url)
        with pytest.raises(RestError):
            await client.trades("KRW-BTC")
        assert client.stats.request_errors == 1


async def test_a_server_that_never_answers_and_one_that_is_not_there() -> None:
    async with serving(lambda p, q: None) as server:
        client = fast_client(server.url, timeout=0.2)
        with pytest.raises(RestError):
            await client.trades("KRW-BTC")
        assert client.stats.request_errors == MAX_ATTEMPTS
    client = fast_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RestError):
        await client.trades("KRW-BTC")


@contextlib.asynccontextmanager
async def dripping() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server that sends its head, then a byte of body every 20 ms for ever (every
    read of a client returns well within any socket timeout): its URL, and ``open`` and
    ``closed`` as connections come and as clients close them."""
    events: list[str] = []
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events.append("open")
        writers.add(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.02)  # the server's pace, not a synchronisation

        task = asyncio.create_task(drip())
        try:
            await reader.read()  # b"" once the client closed its end
            events.append("closed")
        finally:
            task.cancel()
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", events
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        await server.wait_closed()


async def test_a_server_that_drips_its_answer_holds_no_thread_past_the_deadline() -> None:
    """A socket timeout bounds each read, not the request: the request's own deadline ends
    its thread, which closes the connection."""
    async with dripping() as (url, events):
        client = fast_client(url, timeout=0.3)
        with pytest.raises(RestError):
            await client.trades("KRW-BTC")
        assert events.count("open") == MAX_ATTEMPTS
        await wait_for(
            lambda: events.count("closed") == MAX_ATTEMPTS, 5, message=f"closed: {events}"
        )


async def test_a_hung_request_leaves_the_loops_default_executor_free() -> None:
    """The loop resolves Upbit's and Redis's hosts in its default executor: a REST request
    that hangs must not hold a thread of it."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1) as default:
        loop.set_default_executor(default)
        async with serving(lambda p, q: None) as server:  # never answers
            client = fast_client(server.url, timeout=30)
            request = asyncio.create_task(client.trades("KRW-BTC"))
            await wait_for(lambda: server.requests, 5, message="the request")
            async with asyncio.timeout(5):  # a reconnect's name lookup goes through at once
                assert await loop.getaddrinfo("127.0.0.1", 6379)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request


@pytest.mark.parametrize(
    "location",
    ["/v1/trades/ticks?market=KRW-BTC&count=500&moved=1", "ftp://127.0.0.1/trades"],
    ids=["same-server", "ftp"],
)
async def test_a_redirect_is_not_followed(location: str) -> None:
    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        if "moved" in query:
            return ok([])
        return 302, {"Location": location}, b""

    async with serving(handle) as server:
        client = fast_client(server.url)
        with pytest.raises(RestError, match="redirect") as info:
            await client.trades("KRW-BTC")
    assert info.value.status == 302 and len(server.requests) == 1  # not retried either


async def test_an_answer_too_large_is_a_rest_error() -> None:
    big = b"[" + b" " * (MAX_BYTES + 10) + b"]"
    async with serving(lambda p, q: (200, {}, big)) as server:
        with pytest.raises(RestError, match="larger than"):
            await fast_client(server.url).trades("KRW-BTC")


async def test_an_answer_with_another_markets_entries_is_refused() -> None:
    eth = msgspec.structs.replace(tape(T0, 1)[0], market="KRW-ETH")
    other = msgspec.structs.replace(candle(T0 - T0 % MINUTE, T0), market="KRW-ETH")
    mixed = [trade_json(t) for t in [*tape(T0, 2), eth]]

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        if path == "/v1/trades/ticks":
            return ok(mixed)
        return ok([{f: getattr(other, f) for f in RestCandle.__struct_fields__}], 5, "candle")

    async with serving(handle) as server:
        client = fast_client(server.url)
        with pytest.raises(RestError, match="another market"):
            await client.trades("KRW-BTC")
        with pytest.raises(RestError, match="another market"):
            await client.candles("candle.1m", "KRW-BTC", to_ms=T0)
    assert client.stats.request_errors == 2 and len(server.requests) == 2  # not retried


# -- the runner --------------------------------------------------------------------------------


async def seed(redis: aioredis.Redis, key: str, frames: list[bytes], origin: bool = False) -> None:
    for frame in frames:
        fields: dict[str, bytes | str] = {"f": frame}
        if origin:
            fields["origin"] = "rest"
        await redis.xadd(key, fields)  # type: ignore[arg-type]


async def history(redis: aioredis.Redis, key: str) -> list[tuple[Trade, bool]]:
    out = []
    for _, fields in await redis.xrange(key):
        message = decode_message(fields[b"f"])
        assert isinstance(message, Trade)
        out.append((message, fields.get(b"origin") == b"rest"))
    return out


def job(*fills: StreamFill) -> BackfillJob:
    announced = gap(fills[0].window.since_ms, fills[0].window.until_ms)
    return BackfillJob((GapFill(announced, frozenset(f.key for f in fills), ()),), fills)


async def test_the_missed_trades_are_appended_in_order_with_their_origin(
    redis_client: aioredis.Redis,
) -> None:
    everything = tape(T0, 200)  # 20 s of trades
    since, until = T0 + 8_000, T0 + 12_000
    key = KEYS.history("trade", "KRW-BTC")
    live = [t for t in everything if t.timestamp <= since or t.timestamp >= until + 300]
    await seed(redis_client, key, [build_trade_frame(t) for t in live])
    stats = BackfillStats()
    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url, stats=stats), stats=stats)
        (result,) = await runner.run(job(StreamFill(TRADE, Window(since, until), 10_000)))
    gap_trades = [t for t in everything if since < t.timestamp < until + 300]
    assert result.outcome is Outcome.COMPLETE and result.appended == len(gap_trades)
    entries = await history(redis_client, key)
    appended = [m for m, rest in entries if rest]
    assert [m.sequential_id for m in appended] == [t.sequential_id for t in gap_trades]
    assert all(m.stream_type == "REALTIME" for m in appended)
    assert sorted(m.sequential_id for m, _ in entries) == [t.sequential_id for t in everything]
    assert stats.streams == 1 and stats.appended == len(gap_trades) and stats.requests == 1
    # a second run of the same gap finds nothing more to do
    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (again,) = await runner.run(job(StreamFill(TRADE, Window(since, until), 10_000)))
    assert again.outcome is Outcome.COMPLETE and again.appended == 0


async def test_appending_keeps_the_cap(redis_client: aioredis.Redis) -> None:
    everything = tape(T0, 500)
    key = KEYS.history("trade", "KRW-BTC")
    await seed(redis_client, key, [build_trade_frame(everything[0])])
    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (result,) = await runner.run(job(StreamFill(TRADE, Window(T0 + 1_000, T0 + 60_000), 50)))
    assert result.appended == 499
    # MAXLEN ~: whole macro nodes (100 entries by default) are trimmed
    assert 50 <= await redis_client.xlen(key) <= 150


@pytest.mark.parametrize(
    "answer",
    [
        lambda p, q: (200, {}, b"garbage"),
        lambda p, q: (429, {}, b""),
        lambda p, q: (500, {}, b""),
    ],
    ids=["garbage", "429-forever", "500-forever"],
)
async def test_a_stream_whose_fetch_fails_is_failed_and_nothing_is_raised(
    redis_client: aioredis.Redis, answer: Handler
) -> None:
    key = KEYS.history("trade", "KRW-BTC")
    await seed(redis_client, key, [build_trade_frame(tape(T0, 1)[0])])
    async with serving(answer) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (result,) = await runner.run(job(StreamFill(TRADE, Window(T0 + 5_000, T0 + 6_000), 100)))
    assert result.outcome is Outcome.FAILED and result.appended == 0
    assert await redis_client.xlen(key) == 1


async def test_a_redis_error_or_no_rest_fails_the_stream_not_the_job(
    redis_client: aioredis.Redis,
) -> None:
    broken = KEYS.history("trade", "KRW-ETH")
    await redis_client.set(broken, "not a stream")  # XREVRANGE: WRONGTYPE
    everything = tape(T0, 50)
    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        results = await runner.run(
            job(
                StreamFill(StreamKey("trade", "KRW-ETH"), Window(T0 + 1_000, T0 + 2_000), 100),
                StreamFill(TRADE, Window(T0 + 1_000, T0 + 2_000), 100),
            )
        )
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.COMPLETE]
    assert runner.stats.streams_failed == 1
    off = Backfiller(redis_client, KEYS, None)
    (result,) = await off.run(job(StreamFill(TRADE, Window(T0, T0 + 1), 100)))
    assert result.outcome is Outcome.FAILED


async def test_missed_candles_are_appended(redis_client: aioredis.Redis) -> None:
    base = T0 - T0 % MINUTE
    upbit = [candle(base + i * MINUTE, base + i * MINUTE + 59_000) for i in range(10)]
    since, until = base + 3 * MINUTE + 30_000, base + 6 * MINUTE + 10_000
    key = KEYS.history("candle.1m", "KRW-BTC")
    half = candle(base + 3 * MINUTE, base + 3 * MINUTE + 20_000)  # seen half-way
    live = [upbit[2], half, upbit[7]]
    await seed(redis_client, key, [build_candle_frame("candle.1m", c) for c in live])
    fake = FakeCandles(upbit)

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        assert path == "/v1/candles/minutes/1"
        to = int(datetime.fromisoformat(query["to"][0].replace("Z", "+00:00")).timestamp() * 1000)
        page = fake.page(to, int(query["count"][0]))
        return ok([{f: getattr(c, f) for f in RestCandle.__struct_fields__} for c in page])

    async with serving(handle) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (result,) = await runner.run(job(StreamFill(CANDLE, Window(since, until), 100)))
    assert result.outcome is Outcome.COMPLETE and result.appended == 4  # minutes 3, 4, 5, 6
    entries = await redis_client.xrange(key)
    appended = [json.loads(f[b"f"]) for _, f in entries if f.get(b"origin") == b"rest"]
    assert [c["candle_date_time_utc"][-8:] for c in appended] == [
        upbit[i].candle_date_time_utc[-8:] for i in (3, 4, 5, 6)
    ]
    assert all(c["type"] == "candle.1m" and c["stream_type"] == "REALTIME" for c in appended)


async def test_trades_of_another_market_are_not_appended(redis_client: aioredis.Redis) -> None:
    everything = tape(T0, 100)
    since, until = T0 + 4_000, T0 + 6_000
    key = KEYS.history("trade", "KRW-BTC")
    await seed(
        redis_client, key, [build_trade_frame(t) for t in everything if t.timestamp <= since]
    )
    ticks = FakeTicks(everything)
    stranger = msgspec.structs.replace(everything[50], market="KRW-ETH", sequential_id=7)

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        page = ticks.page(TradeRequest(None, 0), int(query["count"][0]))
        return ok([trade_json(t) for t in [*page, stranger]])

    async with serving(handle) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (result,) = await runner.run(job(StreamFill(TRADE, Window(since, until), 1_000)))
    assert result.outcome is Outcome.FAILED and result.appended == 0
    assert all(not rest for _, rest in await history(redis_client, key))
    assert runner.rest is not None and runner.rest.stats.request_errors == 1


async def test_a_deposed_leader_appends_no_more(redis_client: aioredis.Redis) -> None:
    """``may_write`` (the leader phase's lock check) is asked before every XADD batch: once
    it says no, the job ends, and what was not appended yet never is."""
    everything = tape(T0, 2 * XADD_BATCH + 100)
    key = KEYS.history("trade", "KRW-BTC")
    await seed(redis_client, key, [build_trade_frame(everything[0])])
    window = Window(T0 + 1_000, everything[-1].timestamp)
    fills = (
        StreamFill(TRADE, window, 10_000),
        StreamFill(StreamKey("trade", "KRW-ETH"), window, 100),
    )
    checks = 0

    def lock_lapses_after_the_first_batch() -> bool:
        nonlocal checks
        checks += 1
        return checks <= 2  # the stream's check, then the first batch's

    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(
            redis_client, KEYS, fast_client(server.url), may_write=lock_lapses_after_the_first_batch
        )
        results = await runner.run(job(*fills))
        assert [(r.outcome, r.appended) for r in results] == [
            (Outcome.INCOMPLETE, XADD_BATCH),
            (Outcome.FAILED, 0),  # not tried
        ]
        assert {q["market"][0] for _, q in server.requests} == {"KRW-BTC"}
        assert await redis_client.xlen(key) == 1 + XADD_BATCH
        assert runner.stats.appended == XADD_BATCH and runner.stats.streams_failed == 2
        # deposed before the job: nothing asked, nothing appended
        asked = len(server.requests)
        deposed = Backfiller(redis_client, KEYS, fast_client(server.url), may_write=lambda: False)
        results = await deposed.run(job(*fills))
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED]
    assert len(server.requests) == asked and await redis_client.xlen(key) == 1 + XADD_BATCH


async def test_a_failed_append_counts_what_redis_accepted(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    everything = tape(T0, XADD_BATCH + 100)
    key = KEYS.history("trade", "KRW-BTC")
    await seed(redis_client, key, [build_trade_frame(everything[0])])
    checks = 0

    def break_the_key_after_the_first_batch() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:  # before the second batch: XADD now fails (WRONGTYPE)
            with redis.Redis.from_url(redis_url) as sync:
                sync.rename(key, "moved")
                sync.set(key, "not a stream")
        return True

    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(
            redis_client,
            KEYS,
            fast_client(server.url),
            may_write=break_the_key_after_the_first_batch,
        )
        window = Window(T0 + 1_000, everything[-1].timestamp)
        (result,) = await runner.run(job(StreamFill(TRADE, window, 10_000)))
    assert (result.outcome, result.appended) == (Outcome.INCOMPLETE, XADD_BATCH)
    assert await redis_client.xlen("moved") == 1 + XADD_BATCH
    assert runner.stats.appended == XADD_BATCH


async def test_a_job_stops_after_streams_in_a_row_fail_over_rest(
    redis_client: aioredis.Redis,
) -> None:
    """With REST down, each stream would wait out its retries: after MAX_REST_FAILURES in a
    row, the job's other streams are reported failed untried (a success in between resets)."""
    codes = [f"KRW-C{i}" for i in range(MAX_REST_FAILURES + 3)]
    working = codes[1]

    def handle(path: str, query: dict[str, list[str]]) -> Answer:
        return ok([]) if query["market"][0] == working else (500, {}, b"")

    window = Window(T0, T0 + 1_000)
    async with serving(handle) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        results = await runner.run(
            job(*(StreamFill(StreamKey("trade", code), window, 100) for code in codes))
        )
    tried = codes[: MAX_REST_FAILURES + 2]  # one failure, the working one, then K failures
    assert [r.outcome for r in results] == [
        Outcome.COMPLETE if code == working else Outcome.FAILED for code in codes
    ]
    assert sorted({q["market"][0] for _, q in server.requests}) == tried
    assert runner.stats.streams == len(codes) and runner.stats.streams_failed == len(codes) - 1


async def test_the_history_is_read_no_further_back_than_the_gap(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an anchor (here every older entry is a back-filled one), the history is read
    back to the entries appended SCAN_MARGIN_MS before the gap, by entry ID, not to its end."""
    everything = tape(T0, 100)
    since, until = T0 + 4_000, T0 + 6_000
    key = KEYS.history("trade", "KRW-BTC")
    old = T0 - 10 * SCAN_MARGIN_MS
    pipe = redis_client.pipeline(transaction=False)
    for i in range(3 * HISTORY_PAGE):  # appended long before the gap (entry IDs then)
        frame = build_trade_frame(trade_at(old - 3 * HISTORY_PAGE + i, i + 1))
        pipe.xadd(key, {"f": frame, "origin": "rest"}, id=f"{old}-{i}")
    after = [t for t in everything if t.timestamp >= until + 500]
    for t in after:  # live, after the gap
        pipe.xadd(key, {"f": build_trade_frame(t)}, id=f"{t.timestamp + 50}-0")
    await pipe.execute()
    read = 0
    xrevrange = redis_client.xrevrange

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal read
        page = await xrevrange(*args, **kwargs)
        read += len(page)
        return page

    monkeypatch.setattr(redis_client, "xrevrange", counting)
    async with serving(ticks_handler(FakeTicks(everything))) as server:
        runner = Backfiller(redis_client, KEYS, fast_client(server.url))
        (result,) = await runner.run(job(StreamFill(TRADE, Window(since, until), 100_000)))
    assert read == len(after)  # none of the old entries
    gap_trades = [t for t in everything if since - 1_000 <= t.timestamp < until + 500]
    assert result.outcome is Outcome.COMPLETE and result.appended == len(gap_trades)


def trade_at(ts: int, sid: int) -> RestTrade:
    return msgspec.structs.replace(tape(ts, 1)[0], sequential_id=sid)
