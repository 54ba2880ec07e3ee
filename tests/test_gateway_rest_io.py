"""The gateway's REST side over real sockets: a real redis-server, the real simulator (as
Upbit's REST API, and as the source of frames through a real broker process), and the
gateway's ``process_request`` under a websockets server of the test's own, as the gateway's
server runs it.

What the simulator receives is read by wrapping its HTTP entry point (``simulator.http.handle``)
with a recorder: every plain HTTP request that reaches it, with its path and arrival time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

import gateway.http
import simulator.http
from broker.keys import Keys
from broker.leases import LeaseStore
from broker.testing import broker_process, read_status, scaled, wait_for
from gateway.config import GatewaySettings
from gateway.http import RestGateway
from gateway.rest import PRIVATE_REFUSED, TOO_MANY
from simulator import Simulator
from tests.support.sim import running_simulator

NS = "t"  # the namespace of brokers started by broker.testing
GATEWAY_ID = "gw1"


@dataclass(eq=False)
class Gw:
    """What the gateway's server hands ``gateway.http.process_request``."""

    settings: GatewaySettings
    redis: aioredis.Redis
    keys: Keys = field(default_factory=lambda: Keys(NS))
    leases: LeaseStore = field(init=False)

    def __post_init__(self) -> None:
        self.leases = LeaseStore(self.redis, NS)


@dataclass
class Served:
    url: str
    rest: RestGateway


@asynccontextmanager
async def rest_gateway(redis_url: str, sim: Simulator, **settings: Any) -> AsyncIterator[Served]:
    """``gateway.http.process_request`` behind a websockets server on a free port."""
    config = GatewaySettings(
        redis_url=redis_url,
        namespace=NS,
        gateway_id=GATEWAY_ID,
        port=0,
        upstream_rest_url=sim.http_url,
        **settings,
    )
    redis = aioredis.Redis.from_url(redis_url)
    gw = Gw(config, redis)

    async def process(connection: ServerConnection, request: Request) -> Response | None:
        return await gateway.http.process_request(gw, connection, request)

    async def handler(ws: ServerConnection) -> None:
        await ws.close()

    try:
        # open_timeout bounds process_request too: a forwarded request may wait for the
        # shared budget longer than websockets' default 10 s
        async with serve(
            handler, "127.0.0.1", 0, process_request=process, open_timeout=60
        ) as server:
            port = server.sockets[0].getsockname()[1]
            yield Served(f"http://127.0.0.1:{port}", gateway.http.rest_gateway(gw))
    finally:
        await gateway.http.aclose(gw)
        await redis.aclose()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


async def get(
    base: str, target: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    """One HTTP/1.1 request over a fresh connection: status, headers (lower-case names) and
    the body (decoded JSON)."""
    host, port = base.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    async with asyncio.timeout(scaled(30)):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    names = dict(line.split(": ", 1) for line in lines[1:])
    return Reply(status, {k.lower(): v for k, v in names.items()}, json.loads(body))


@dataclass
class Arrivals:
    """Every plain HTTP request that reached the simulator: (path, loop time)."""

    seen: list[tuple[str, float]] = field(default_factory=list)

    def paths(self, prefix: str = "/v1/") -> list[str]:
        return [p for p, _ in self.seen if p.startswith(prefix)]

    def most_in_one_second(self, prefix: str) -> int:
        times = sorted(t for p, t in self.seen if p.startswith(prefix))
        return max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)


@pytest.fixture
def arrivals(monkeypatch: pytest.MonkeyPatch) -> Iterator[Arrivals]:
    record = Arrivals()
    handle = simulator.http.handle

    def recording(sim: Simulator, target: str, ip: str = "?") -> Response:
        record.seen.append((target, asyncio.get_running_loop().time()))
        return handle(sim, target, ip)

    monkeypatch.setattr(simulator.http, "handle", recording)
    yield record


def shape(value: Any) -> Any:
    """Field names (in order) and JSON types of an answer, not its values."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


@asynccontextmanager
async def broker_and_sim(redis_url: str, tmp_path: Path, **sim: Any) -> AsyncIterator[Simulator]:
    """The simulator and a broker process leading on it, connected."""
    async with (
        running_simulator(rate=300, seed=3, **sim) as simulator_,
        broker_process(redis_url, simulator_.url, "b1", tmp_path),
    ):
        redis = aioredis.Redis.from_url(redis_url)
        try:
            await wait_for(
                lambda: _connected(redis), 20, interval=0.1, message="the broker connected"
            )
        finally:
            await redis.aclose()
        yield simulator_


async def _connected(redis: aioredis.Redis) -> bool:
    return (await read_status(redis, NS)).get("connected") == "1"


# -- answered from the broker's cache --------------------------------------------------------------


async def test_ticker_and_orderbook_are_served_from_the_cache(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path, arrivals: Arrivals
) -> None:
    async with (
        broker_and_sim(redis_url, tmp_path) as sim,
        rest_gateway(redis_url, sim) as gw,
    ):
        # Nothing holds KRW-XRP yet: the cache has no frame of it.
        assert not await redis_client.hexists(f"{NS}:last:ticker", "KRW-XRP")
        first = await get(gw.url, "/v1/ticker?markets=KRW-XRP,KRW-BTC")
        assert first.status == 200, first.body
        assert first.headers["remaining-req"] == "group=ticker; min=600; sec=9"
        assert first.headers["content-type"].startswith("application/json")
        assert [x["market"] for x in first.body] == ["KRW-XRP", "KRW-BTC"]
        assert gw.rest.stats.first_frames == 1 and gw.rest.stats.from_cache == 0

        # The gateway's one REST lease holds them, and the broker serves it upstream.
        lease = await redis_client.hgetall(f"{NS}:lease:{GATEWAY_ID}.rest")
        assert json.loads(lease[b"subs"]) == {"ticker": ["KRW-BTC", "KRW-XRP"]}
        assert await redis_client.hexists(f"{NS}:last:ticker", "KRW-XRP")

        async def upstream_holds_xrp() -> bool:
            conns = sim.state()["connections"]
            return bool(conns) and "KRW-XRP" in conns[0]["subscriptions"].get("ticker", [])

        await wait_for(upstream_holds_xrp, 10, message="ticker KRW-XRP upstream")

        # Same names, order and types as the simulator's own REST ticker.
        direct = await get(sim.http_url, "/v1/ticker?markets=KRW-XRP,KRW-BTC")
        assert shape(first.body) == shape(direct.body)

        # Polling again is served from the cache, and the cache keeps moving: the lease keeps
        # the stream flowing (the trade time advances), with no REST request upstream.
        before = len(arrivals.paths("/v1/ticker"))

        async def newer_trade() -> bool:
            reply = await get(gw.url, "/v1/ticker?markets=KRW-XRP")
            assert reply.status == 200
            return bool(reply.body[0]["trade_timestamp"] > first.body[0]["trade_timestamp"])

        await wait_for(newer_trade, 20, interval=0.1, message="a newer KRW-XRP ticker")
        assert gw.rest.stats.first_frames == 1
        assert gw.rest.stats.from_cache >= 1
        assert len(arrivals.paths("/v1/ticker")) == before  # no poll reached Upbit

        # The orderbook: leased at depth 30, answered with `count` units.
        book = await get(gw.url, "/v1/orderbook?markets=KRW-ETH&count=5")
        assert book.status == 200, book.body
        assert book.headers["remaining-req"] == "group=orderbook; min=600; sec=9"
        assert len(book.body[0]["orderbook_units"]) == 5
        again = await get(gw.url, "/v1/orderbook?markets=KRW-ETH")
        assert again.status == 200 and len(again.body[0]["orderbook_units"]) == 30
        lease = await redis_client.hgetall(f"{NS}:lease:{GATEWAY_ID}.rest")
        assert json.loads(lease[b"subs"]) == {
            "orderbook": ["KRW-ETH"],
            "ticker": ["KRW-BTC", "KRW-XRP"],
        }
        assert not arrivals.paths("/v1/orderbook")
        # Many clients asking at once for a code not held yet cost the broker one command.
        before = gw.rest.stats.snapshot_commands
        many = await asyncio.gather(*(get(gw.url, "/v1/ticker?markets=KRW-SOL") for _ in range(10)))
        assert [r.status for r in many] == [200] * 10
        assert gw.rest.stats.snapshot_commands == before + 1

        # ticker/all: every code of a quote currency, in the market list's order.
        by_quote = await get(gw.url, "/v1/ticker/all?quote_currencies=BTC")
        assert by_quote.status == 200
        assert not arrivals.paths("/v1/ticker/all")

        direct_book = await get(sim.http_url, "/v1/orderbook?markets=KRW-ETH&count=5")
        assert shape(book.body) == shape(direct_book.body)
        direct_all = await get(sim.http_url, "/v1/ticker/all?quote_currencies=BTC")
        assert [x["market"] for x in by_quote.body] == [x["market"] for x in direct_all.body]
        assert shape(by_quote.body) == shape(direct_all.body)

    # Closing the gateway released its REST lease.
    assert not await redis_client.exists(f"{NS}:lease:{GATEWAY_ID}.rest")


async def test_the_rest_lease_follows_what_is_polled(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Codes stay leased ``rest_lease_seconds`` after their last poll: the lease shrinks when
    one goes idle, and lapses when nobody polls (no broker needed: the lease is written
    before the cache is read)."""
    key = f"{NS}:lease:{GATEWAY_ID}.rest"

    async def subs() -> dict[str, list[str]]:
        raw = await redis_client.hget(key, "subs")
        return json.loads(raw) if raw else {}

    async with (
        running_simulator(seed=3) as sim,
        rest_gateway(redis_url, sim, rest_lease_seconds=1.0) as gw,
    ):
        assert (await get(gw.url, "/v1/ticker?markets=KRW-ETH,KRW-BTC")).status == 200
        assert (await get(gw.url, "/v1/orderbook?markets=KRW-ETH")).status == 200
        assert await subs() == {"orderbook": ["KRW-ETH"], "ticker": ["KRW-BTC", "KRW-ETH"]}
        assert 1000 < int(await redis_client.hget(key, "ttl_ms")) <= 1500

        async def only_btc_left() -> bool:
            assert (await get(gw.url, "/v1/ticker?markets=KRW-BTC")).status == 200
            return await subs() == {"ticker": ["KRW-BTC"]}

        await wait_for(only_btc_left, 10, interval=0.1, message="the idle codes dropped")
        await wait_for(
            lambda: _gone(redis_client, key), 10, message="the lease lapsed without polls"
        )


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/ticker?markets=KRW-NOPE",
        "/v1/ticker?markets=KRW-BTC,KRW-NOPE",
        "/v1/ticker?markets=krw-btc",
        "/v1/ticker",
        "/v1/ticker?markets=",
        "/v1/orderbook?markets=KRW-NOPE",
        "/v1/orderbook?markets=KRW-BTC&count=31",
        "/v1/orderbook",
        "/v1/ticker/all",
    ],
)
async def test_unknown_codes_and_bad_parameters_get_upbits_answers(
    redis_url: str, target: str
) -> None:
    """The gateway's 404 and 400 are the simulator's, status and body (no broker needed:
    they are decided before the cache)."""
    async with running_simulator(seed=3) as sim, rest_gateway(redis_url, sim) as gw:
        ours = await get(gw.url, target)
        theirs = await get(sim.http_url, target)
        assert (ours.status, ours.body) == (theirs.status, theirs.body)
        assert ours.status in (400, 404)
        assert ours.headers["remaining-req"].startswith("group=")


async def test_without_a_broker_the_cache_is_not_believed_and_upbit_answers(
    redis_url: str, arrivals: Arrivals
) -> None:
    async with running_simulator(seed=3) as sim, rest_gateway(redis_url, sim) as gw:
        reply = await get(gw.url, "/v1/ticker?markets=KRW-BTC")
        assert reply.status == 200 and reply.body[0]["market"] == "KRW-BTC"
        # Upbit's (the simulator's) own answer, with its own Remaining-Req
        assert arrivals.paths("/v1/ticker") == ["/v1/ticker?markets=KRW-BTC"]
        assert reply.headers["remaining-req"].startswith("group=ticker; min=600; sec=")
        assert gw.rest.stats.fallbacks == 1


# -- forwarded -------------------------------------------------------------------------------------


async def test_other_quotation_paths_are_forwarded_with_upbits_headers(
    redis_url: str, arrivals: Arrivals
) -> None:
    async with running_simulator(seed=3, rate=300) as sim, rest_gateway(redis_url, sim) as gw:
        # (No WebSocket client: the simulated market stands still, so answers repeat.)
        trades = await get(gw.url, "/v1/trades/ticks?market=KRW-BTC&count=3")
        assert trades.status == 200 and trades.body[0]["market"] == "KRW-BTC"
        # The upstream's Remaining-Req, as it sent it: 10 a second, one spent.
        assert trades.headers["remaining-req"] == "group=trade; min=600; sec=9"
        direct = await get(sim.http_url, "/v1/trades/ticks?market=KRW-BTC&count=3")
        assert trades.body == direct.body

        candles = await get(gw.url, "/v1/candles/minutes/1?market=KRW-BTC&count=2")
        assert candles.status == 200 and candles.body[0]["unit"] == 1
        assert candles.headers["remaining-req"] == "group=candle; min=600; sec=9"
        direct = await get(sim.http_url, "/v1/candles/minutes/1?market=KRW-BTC&count=2")
        assert candles.body == direct.body

        instruments = await get(gw.url, "/v1/orderbook/instruments?markets=KRW-BTC")
        direct = await get(sim.http_url, "/v1/orderbook/instruments?markets=KRW-BTC")
        assert (instruments.status, instruments.body) == (200, direct.body)

        # Upbit's refusals pass through unchanged too.
        bad = await get(gw.url, "/v1/candles/minutes/7?market=KRW-BTC")
        assert bad.status == 400 and bad.headers["remaining-req"].startswith("group=candle")
        assert arrivals.paths("/v1/candles/minutes/7") == ["/v1/candles/minutes/7?market=KRW-BTC"]

        # The market list: Upbit's, kept for minutes (one request upstream per flavour).
        for _ in range(3):
            plain = await get(gw.url, "/v1/market/all")
            detailed = await get(gw.url, "/v1/market/all?is_details=true")
        assert plain.body == (await get(sim.http_url, "/v1/market/all")).body
        assert detailed.body == (await get(sim.http_url, "/v1/market/all?is_details=true")).body
        assert "market_event" in detailed.body[0] and "market_event" not in plain.body[0]
        # pyupbit's spelling (get_tickers(is_details=True)): the same list, from the same read
        camel = await get(gw.url, "/v1/market/all?isDetails=true")
        assert (camel.status, camel.body) == (200, detailed.body)
        assert plain.headers["remaining-req"] == "group=market; min=600; sec=9"
        from_gateway = [p for p in arrivals.paths("/v1/market/all")]
        assert sorted(from_gateway) == sorted(
            [
                "/v1/market/all?is_details=false",
                "/v1/market/all?is_details=true",
                "/v1/market/all",  # the test's own two direct reads
                "/v1/market/all?is_details=true",
            ]
        )


async def test_fifty_concurrent_forwarded_requests_stay_within_upbits_limit(
    redis_url: str, arrivals: Arrivals
) -> None:
    """Fifty clients at once, one upstream budget: Upbit (10 a second per IP and group in
    the simulator) never refuses one, and every client gets its answer."""
    async with (
        running_simulator(seed=3, rate=300) as sim,
        rest_gateway(redis_url, sim, rest_forward_wait=30.0) as gw,
    ):
        targets = [
            "/v1/trades/ticks?market=KRW-BTC&count=5" if i % 2 else
            "/v1/candles/minutes/1?market=KRW-ETH&count=3"
            for i in range(50)
        ]  # fmt: skip
        replies = await asyncio.gather(*(get(gw.url, t) for t in targets))
        assert [r.status for r in replies] == [200] * 50
        assert all("remaining-req" in r.headers for r in replies)
        assert sim.state()["totals"]["rate_limited_rest"] == 0
        assert arrivals.most_in_one_second("/v1/trades/") <= 10
        assert arrivals.most_in_one_second("/v1/candles/") <= 10
        assert len(arrivals.paths("/v1/trades/")) == 25
        assert gw.rest.forwarder.refused == 0


async def test_the_shared_budget_answers_429_when_it_has_no_room_in_time(
    redis_url: str, arrivals: Arrivals
) -> None:
    async with (
        running_simulator(seed=3) as sim,
        rest_gateway(redis_url, sim, rest_per_second=1, rest_forward_wait=0.0) as gw,
    ):
        target = "/v1/trades/ticks?market=KRW-BTC"
        replies = await asyncio.gather(get(gw.url, target), get(gw.url, target))
        assert sorted(r.status for r in replies) == [200, 429]
        refused = next(r for r in replies if r.status == 429)
        assert json.dumps(refused.body, separators=(",", ":")).encode() == TOO_MANY
        assert refused.headers["remaining-req"] == "group=trade; min=600; sec=0"
        assert len(arrivals.paths("/v1/trades/")) == 1  # the refused one never left


async def test_upbits_remaining_req_and_429s_are_honoured(
    redis_url: str, arrivals: Arrivals
) -> None:
    """An upstream that allows 2 a second while the gateway would send 8: sequential
    requests wait out ``sec=0`` and are never refused; a burst that gets 429s passes them to
    its clients unchanged, and the gateway backs off before the next try."""
    async with (
        running_simulator(seed=3, rest_rate=2) as sim,
        rest_gateway(redis_url, sim, rest_forward_wait=30.0) as gw,
    ):
        target = "/v1/trades/ticks?market=KRW-BTC"
        for _ in range(6):
            reply = await get(gw.url, target)
            assert reply.status == 200, reply.body
        assert sim.state()["totals"]["rate_limited_rest"] == 0

        days = "/v1/candles/days?market=KRW-BTC"
        burst = await asyncio.gather(*(get(gw.url, days) for _ in range(6)))
        refused = [r for r in burst if r.status == 429]
        assert refused, [r.status for r in burst]
        # the simulator's body, passed on unchanged
        assert all(json.dumps(r.body, separators=(",", ":")).encode() == TOO_MANY for r in refused)
        assert all(r.headers["remaining-req"] == "group=candle; min=600; sec=0" for r in refused)
        assert gw.rest.forwarder.refused == len(refused)
        assert gw.rest.forwarder.limiter.delay("candle") > 0  # backing off
        assert (await get(gw.url, days)).status == 200


# -- refused ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/v1/accounts", {}),
        ("GET", "/v1/orders/chance?market=KRW-BTC", {}),
        ("POST", "/v1/orders", {}),
        ("DELETE", "/v1/order?uuid=x", {}),
        ("GET", "/v1/withdraws/coin", {}),
        ("GET", "/v1/deposits", {}),
        ("GET", "/v1/api_keys", {}),
        ("GET", "/v1/status/wallet", {}),
        ("GET", "/v1/%61ccounts", {}),
        ("GET", "/v1/ticker?markets=KRW-BTC", {"Authorization": "Bearer x.y.z"}),
        ("GET", "/v1/trades/ticks?market=KRW-BTC", {"Authorization": "Bearer x.y.z"}),
    ],
)
async def test_private_paths_and_keys_are_refused_never_forwarded(
    redis_url: str, arrivals: Arrivals, method: str, target: str, headers: dict[str, str]
) -> None:
    async with running_simulator(seed=3) as sim, rest_gateway(redis_url, sim) as gw:
        reply = await get(gw.url, target, method=method, headers=headers)
        assert reply.status == 403
        assert json.dumps(reply.body, separators=(",", ":")).encode() == PRIVATE_REFUSED
        assert arrivals.seen == []
        assert gw.rest.stats.refused_private == 1


async def test_only_get_is_served(redis_url: str, arrivals: Arrivals) -> None:
    async with running_simulator(seed=3) as sim, rest_gateway(redis_url, sim) as gw:
        reply = await get(gw.url, "/v1/trades/ticks?market=KRW-BTC", method="POST")
        assert reply.status == 405 and reply.headers["allow"] == "GET"
        reply = await get(gw.url, "/v1/nope")
        assert reply.status == 404 and reply.body["error"]["name"] == 404
        assert arrivals.seen == []
