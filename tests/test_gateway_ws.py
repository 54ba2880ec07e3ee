"""The gateway's WebSocket side end to end: plain websockets clients -> the gateway (in this
process) -> Redis (a real redis-server) -> a real broker process -> the simulator (in this
process, so its state is read directly)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from broker.leases import LeaseStore
from broker.testing import arun_cli, broker_process, read_status, scaled, wait_for
from broker.upbit import fields
from broker.upbit.types import SubscriptionSet, union
from gateway.config import GatewaySettings
from gateway.server import Gateway
from simulator import Simulator
from simulator.encode import DEFAULT_KEYS
from simulator.market import Market
from tests.support.processes import upstream_of
from tests.support.sim import (
    client,
    http_get,
    read_for,
    read_until,
    running_simulator,
    subscribe,
)

NS = "t"
GW = "gw1"

TICKER = {"type": "ticker", "codes": ["KRW-BTC"]}
TRADE = {"type": "trade", "codes": ["KRW-BTC"]}
ORDERBOOK = {"type": "orderbook", "codes": ["KRW-ETH.15"]}


@asynccontextmanager
async def stack(
    redis_url: str,
    tmp_path: Path,
    *,
    rate: float = 300,
    broker: dict[str, Any] | None = None,
    **gateway: Any,
) -> AsyncIterator[tuple[Simulator, Gateway]]:
    """The simulator, a broker process leading namespace ``t``, and a gateway in this process."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            running_simulator(rate=rate, seed=7, connect_rate=1000)
        )
        await stack.enter_async_context(
            broker_process(redis_url, sim.url, "b1", tmp_path, **(broker or {}))
        )
        redis = aioredis.Redis.from_url(redis_url)
        stack.push_async_callback(redis.aclose)

        async def leading() -> bool:
            return bool((await read_status(redis, NS)).get("leader"))

        await wait_for(leading, 20, message="a broker leading")
        settings = GatewaySettings(
            redis_url=redis_url, namespace=NS, port=0, gateway_id=GW, lease_ttl=2.0
        )
        gw = await stack.enter_async_context(Gateway(settings.with_(**gateway)))
        yield sim, gw


def objects_of(frame: Any, listed: bool) -> list[dict[str, Any]]:
    """The objects of one frame: a ``*_LIST`` frame is an array (of one object, here)."""
    if listed:
        assert isinstance(frame, list) and len(frame) == 1, frame
        return list(frame)
    assert isinstance(frame, dict), frame
    return [frame]


def spelled(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(type, code, stream_type) of an object in either spelling."""
    if "ty" in obj:
        return obj["ty"], obj["cd"], obj["st"]
    return obj["type"], obj["code"], obj["stream_type"]


def by_stream(frames: list[Any], listed: bool) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for frame in frames:
        for obj in objects_of(frame, listed):
            type_, code, _ = spelled(obj)
            out.setdefault((type_, code), []).append(obj)
    return out


def realtime_after_snapshot(streams: set[tuple[str, str]], listed: bool, n: int = 2) -> Any:
    """A read_until condition: every stream has its SNAPSHOT and ``n`` REALTIME frames."""

    def done(frames: list[Any]) -> bool:
        seen = by_stream(frames, listed)
        return all(
            sum(1 for o in seen.get(s, []) if spelled(o)[2] == "REALTIME") >= n for s in streams
        )

    return done


def expected_keys(type_: str, simple: bool) -> set[str]:
    names = set(DEFAULT_KEYS[type_])
    if not simple:
        return names
    table = fields.fields_for(type_)
    return {table[n] for n in names}


async def error_and_close(ws: ClientConnection) -> tuple[bytes, int | None]:
    """The error frame (raw bytes) a refused request gets, and the close code after it."""
    frame = await asyncio.wait_for(ws.recv(), scaled(5))
    assert isinstance(frame, bytes), "Upbit sends binary frames"
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(scaled(5)):
            await ws.recv()
    return frame, ws.close_code


async def test_every_format_gets_a_snapshot_then_realtime(redis_url: str, tmp_path: Path) -> None:
    """Four clients, one per format, on ticker + trade + orderbook: the names, the wrapping,
    the depth and binary frames are Upbit's; each stream starts with exactly one SNAPSHOT."""
    async with stack(redis_url, tmp_path) as (_, gw), AsyncExitStack() as clients:
        conns = {}
        for fmt in ("DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST"):
            ws = await clients.enter_async_context(client(gw.url))
            await subscribe(ws, TICKER, TRADE, ORDERBOOK, fmt=fmt)
            conns[fmt] = ws
        streams = {("ticker", "KRW-BTC"), ("trade", "KRW-BTC"), ("orderbook", "KRW-ETH")}
        for fmt, ws in conns.items():
            listed, simple = fmt.endswith("_LIST"), fmt.startswith("SIMPLE")
            frames = await read_until(ws, realtime_after_snapshot(streams, listed), within=20)
            for (type_, _), objs in by_stream(frames, listed).items():
                kinds = [spelled(o)[2] for o in objs]
                assert kinds[0] == "SNAPSHOT" and kinds.count("SNAPSHOT") == 1, (fmt, type_)
                for obj in objs:
                    assert set(obj) == expected_keys(type_, simple), (fmt, type_)
                    if type_ == "orderbook":
                        assert len(obj["obu" if simple else "orderbook_units"]) == 15
        # one variant per format and stream, whatever the number of clients
        assert gw.hub.variants <= gw.hub.frames_out


@pytest.mark.parametrize("spelling", ["snake", "camel"])
async def test_snapshot_flags_in_both_spellings(
    redis_url: str, tmp_path: Path, spelling: str
) -> None:
    snap, real = (
        ("is_only_snapshot", "is_only_realtime")
        if spelling == "snake"
        else ("isOnlySnapshot", "isOnlyRealtime")
    )
    async with (
        stack(redis_url, tmp_path) as (_, gw),
        client(gw.url) as once,
        client(gw.url) as live,
    ):
        # nobody streams KRW-XRP: its snapshot comes through the broker's command
        await subscribe(once, {"type": "ticker", "codes": ["KRW-XRP", "KRW-BTC"], snap: True})
        await subscribe(live, {"type": "trade", "codes": ["KRW-BTC"], real: True})
        frames = await read_until(once, lambda f: len(f) >= 2, within=15)
        assert sorted((f["code"], f["stream_type"]) for f in frames) == [
            ("KRW-BTC", "SNAPSHOT"),
            ("KRW-XRP", "SNAPSHOT"),
        ]
        trades = await read_until(live, lambda f: len(f) >= 5, within=15)
        assert {f["stream_type"] for f in trades} == {"REALTIME"}
        # a snapshot-only request is done: nothing more comes, and it holds no stream
        assert await read_for(once, 1.0) == []
        lease = await gw.leases.read(f"{GW}.1")
        assert lease is not None and not lease.subscriptions


async def test_list_subscriptions_ping_and_format_switch(redis_url: str, tmp_path: Path) -> None:
    async with (
        stack(redis_url, tmp_path, up_interval=0.5) as (_, gw),
        client(gw.url) as a,
        client(gw.url) as b,
    ):
        await subscribe(a, TICKER, {"type": "orderbook", "codes": ["KRW-ETH.5"], "level": 0})
        await subscribe(b, {"type": "trade", "codes": ["KRW-XRP", "krw-nope"]})
        await read_until(a, lambda f: len(f) >= 2, within=15)
        await a.send('[{"ticket":"list-a"},{"method":"LIST_SUBSCRIPTIONS"}]')
        await b.send('[{"ticket":"list-b"},{"method":"LIST_SUBSCRIPTIONS"},{"format":"SIMPLE"}]')
        answer_a = await read_until(a, lambda f: bool(f) and "method" in f[-1], within=5)
        assert answer_a[-1] == {
            "method": "LIST_SUBSCRIPTIONS",
            "result": [
                {"type": "ticker", "codes": ["KRW-BTC"]},
                {"type": "orderbook", "codes": ["KRW-ETH.5"], "level": 0},
            ],
            "ticket": "list-a",
        }
        answer_b = await read_until(b, lambda f: bool(f) and "mthd" in f[-1], within=5)
        assert answer_b[-1] == {
            "mthd": "LIST_SUBSCRIPTIONS",
            "rslt": [{"ty": "trade", "cds": ["KRW-XRP"]}],
            "tckt": "list-b",
        }
        # the LIST's format object switched b's running stream, without a new SNAPSHOT
        after = await read_until(b, lambda f: len(f) >= 2, within=15)
        assert all(f["ty"] == "trade" and f["st"] == "REALTIME" for f in after)
        await a.send("PING")
        ups = await read_until(a, lambda f: {"status": "UP"} in f, within=5)
        assert ups[-1] == {"status": "UP"}


BAD_REQUESTS = [
    "hello",
    "[]",
    '[{"type":"ticker","codes":["KRW-BTC"]}]',
    '[{"ticket":"t"},{"codes":["KRW-BTC"]}]',
    '[{"ticket":"t"},{"type":"ticker"}]',
    '[{"ticket":"t"},{"type":"nope","codes":["KRW-BTC"]}]',
    '[{"ticket":"t"},{"type":"myOrder","codes":["KRW-BTC"]}]',
    '[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]},{"format":"XML"}]',
]


async def test_a_bad_request_gets_the_simulators_error_frame_and_a_close(
    redis_url: str, tmp_path: Path
) -> None:
    async with stack(redis_url, tmp_path) as (sim, gw):
        for message in BAD_REQUESTS:
            async with client(gw.url) as ours, client(sim.url) as upbit:
                await ours.send(message)
                await upbit.send(message)
                assert await error_and_close(ours) == await error_and_close(upbit), message
        assert gw.stats["refused_requests"] == len(BAD_REQUESTS)
        # a refused client's lease is gone with it
        await gw.lease_batcher.flush()
        assert (await gw.leases.list_all()).leases == []


async def test_emulated_limits_refuse_as_upbit_does(redis_url: str, tmp_path: Path) -> None:
    async with (
        stack(redis_url, tmp_path, emulate_limits=True) as (sim, gw),
        client(gw.url) as ours,
        client(sim.url) as upbit,
    ):
        for _ in range(6):  # five a second are allowed
            await ours.send("PING")
            await upbit.send("PING")
        assert await error_and_close(ours) == await error_and_close(upbit)
        async with client(gw.url) as free:
            # without emulate_limits (another gateway), the same burst is fine
            assert free.protocol.state.name == "OPEN"
    async with stack(redis_url, tmp_path) as (_, gw), client(gw.url) as ws:
        for _ in range(20):
            await ws.send("PING")
        await ws.send('[{"ticket":"l"},{"method":"LIST_SUBSCRIPTIONS"}]')
        frames = await read_until(ws, lambda f: bool(f) and "method" in f[-1], within=5)
        assert frames[-1]["result"] == []


# (client index -> its request objects) for the twenty clients: overlapping sets, every type
CODES = ["KRW-BTC", "KRW-XRP", "KRW-ETH", "KRW-SOL", "KRW-DOGE", "KRW-ADA", "BTC-ETH"]


def request_of(i: int) -> list[dict[str, Any]]:
    a, b = CODES[i % len(CODES)], CODES[(i * 3 + 1) % len(CODES)]
    objects: list[dict[str, Any]] = [{"type": "ticker", "codes": [a, b]}]
    if i % 2:
        objects.append({"type": "trade", "codes": [b]})
    if i % 3 == 0:
        objects.append({"type": "orderbook", "codes": [f"{a}.{(1, 5, 15, 30)[i % 4]}"]})
    if i % 5 == 0:
        objects.append({"type": "candle.1s", "codes": [a]})
    return objects


async def test_twenty_clients_share_one_upstream_connection_holding_their_union(
    redis_url: str, tmp_path: Path
) -> None:
    """Twenty clients with different sets -> the simulator sees ONE connection holding exactly
    their union; one client changing its set leaves the others alone; a client that leaves
    is out of the union within the lease TTL + 1 s."""
    ttl = 2.0
    async with stack(redis_url, tmp_path, lease_ttl=ttl) as (sim, gw), AsyncExitStack() as ex:
        conns: list[ClientConnection] = []
        for i in range(20):
            ws = await ex.enter_async_context(client(gw.url))
            await subscribe(ws, *request_of(i), ticket=f"c{i}")
            conns.append(ws)

        def expected() -> dict[str, set[str]]:
            sets = [c.session.realtime_set() for c in gw.clients.values()]
            return {t: set(codes) for t, codes in union(SubscriptionSet(), *sets).by_type().items()}

        await wait_for(lambda: len(gw.clients) == 20, 10, message="twenty clients")
        await wait_for(lambda: upstream_of(sim.state()) == expected(), 15, message="the union")
        assert len(sim.state()["connections"]) == 1
        for ws in conns:  # everyone is served
            await read_until(ws, lambda f: len(f) >= 1, within=10)
        busy = conns[1]  # ticker KRW-XRP, KRW-DOGE + trade KRW-DOGE
        streams = {("ticker", "KRW-XRP"), ("ticker", "KRW-DOGE"), ("trade", "KRW-DOGE")}
        await read_until(busy, realtime_after_snapshot(streams, False, 1), within=15)

        # client 0 changes its set: the others keep their streams, with no new SNAPSHOT
        await subscribe(conns[0], {"type": "trade", "codes": ["KRW-SUI"]}, ticket="c0-2")

        def changed() -> bool:
            held = upstream_of(sim.state()) or {}
            return "KRW-SUI" in held.get("trade", ()) and held == expected()

        await wait_for(changed, 15, message="the new union")
        after = await read_until(busy, lambda f: len(f) >= 5, within=15)
        assert {f["stream_type"] for f in after} == {"REALTIME"}

        # a client leaves: the streams only it wanted leave the union within TTL + 1 s
        leaving = await ex.enter_async_context(client(gw.url))
        await subscribe(
            leaving,
            {"type": "ticker", "codes": ["KRW-LINK"]},
            {"type": "orderbook", "codes": ["KRW-AVAX.1"]},
        )
        await wait_for(
            lambda: "KRW-LINK" in (upstream_of(sim.state()) or {}).get("ticker", ()),
            15,
            message="the leaving client served",
        )
        before = {t: set(c) for t, c in (upstream_of(sim.state()) or {}).items()}
        await leaving.close()

        def shrank() -> bool:
            held = upstream_of(sim.state()) or {}
            return "KRW-LINK" not in held.get("ticker", ()) and "orderbook" in held

        await wait_for(shrank, ttl + 1, message="its streams out of the union")
        held = upstream_of(sim.state()) or {}
        assert "KRW-AVAX.1" not in held.get("orderbook", ())
        before["ticker"].discard("KRW-LINK")
        before["orderbook"].discard("KRW-AVAX.1")
        assert held == before  # nobody else's stream left with it
        assert len(sim.state()["connections"]) == 1


async def test_a_depth_5_client_gets_5_units_while_the_channel_carries_15(
    redis_url: str, tmp_path: Path
) -> None:
    async with (
        stack(redis_url, tmp_path) as (sim, gw),
        client(gw.url) as deep,
        client(gw.url) as shallow,
    ):
        await subscribe(deep, {"type": "orderbook", "codes": ["KRW-BTC.15"]})
        await subscribe(shallow, {"type": "orderbook", "codes": ["KRW-BTC.5"]}, fmt="SIMPLE")
        await wait_for(
            lambda: upstream_of(sim.state()) == {"orderbook": {"KRW-BTC.15"}},
            15,
            message="15 units upstream",
        )
        deep_frames = await read_until(deep, lambda f: len(f) >= 3, within=15)
        five = await read_until(shallow, lambda f: len(f) >= 3, within=15)
        assert {len(f["orderbook_units"]) for f in deep_frames[-2:]} == {15}
        for frame in five:
            units = frame["obu"]
            assert len(units) == 5
            total_ask = sum(Decimal(str(u["as"])) for u in units)
            assert Decimal(str(frame["tas"])) == total_ask
        # one channel, one subscriber, two variants
        assert [n for n in gw.hub.channels] == [b"t:orderbook:KRW-BTC"]


async def test_one_redis_subscriber_per_channel_whatever_the_clients(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with stack(redis_url, tmp_path) as (_, gw), AsyncExitStack() as ex:
        conns = []
        for i in range(30):
            ws = await ex.enter_async_context(client(gw.url))
            fmt = ("DEFAULT", "SIMPLE", "JSON_LIST")[i % 3]
            await subscribe(ws, {"type": "ticker", "codes": ["KRW-BTC"]}, fmt=fmt)
            conns.append(ws)
        for ws in conns:
            await read_until(ws, lambda f: len(f) >= 2, within=15)
        # from now on every client streams: each frame is converted once per variant (three
        # formats) and sent to its ten clients, not converted once per client
        hub = gw.hub
        variants, sent = hub.variants, hub.frames_out
        await wait_for(lambda: hub.variants >= variants + 30, 15, message="ten more frames")
        assert hub.frames_out - sent == 10 * (hub.variants - variants)
        numsub = await redis_client.pubsub_numsub("t:ticker:KRW-BTC")
        assert numsub == [(b"t:ticker:KRW-BTC", 1)]
        clients = await redis_client.client_list()
        pubsub = [c for c in clients if c["name"] == f"upbit-gateway-pubsub-{GW}"]
        assert len(pubsub) == 1 and int(pubsub[0]["sub"]) == 2  # the channel and the events
        for ws in conns:
            await ws.close()

        async def unsubscribed() -> bool:
            return await redis_client.pubsub_numsub("t:ticker:KRW-BTC") == [
                (b"t:ticker:KRW-BTC", 0)
            ]

        await wait_for(unsubscribed, 10, message="the last client out unsubscribes")


async def test_a_slow_client_is_cut_alone(redis_url: str, tmp_path: Path) -> None:
    """A client that stops reading is closed with 1008 once ``client_queue`` frames wait for
    it, and its lease is released; a client on the same streams keeps receiving."""
    books = {"type": "orderbook", "codes": CODES}
    async with (
        stack(redis_url, tmp_path, rate=1500, client_queue=16) as (_, gw),
        client(gw.url, max_queue=1) as slow,
        client(gw.url) as fast,
    ):
        await subscribe(slow, books)
        await subscribe(fast, books)
        received = 0

        async def keep_reading() -> None:
            nonlocal received
            async for _ in fast:
                received += 1

        reader = asyncio.create_task(keep_reading())
        try:
            await wait_for(lambda: gw.stats["slow_clients"] == 1, 60, message="slow cut")
            assert f"{GW}.1" not in gw.clients or gw.clients[f"{GW}.1"].left
            mark = received
            await wait_for(lambda: received > mark + 50, 15, message="fast goes on")
            await gw.lease_batcher.flush()
            assert await gw.leases.read(f"{GW}.1") is None
            assert await gw.leases.read(f"{GW}.2") is not None
            with pytest.raises(ConnectionClosed):  # what was buffered, then the close
                async with asyncio.timeout(scaled(30)):
                    while True:
                        await slow.recv()
            assert slow.close_code == 1008
            assert not reader.done()
        finally:
            reader.cancel()


async def test_a_broker_gap_resends_snapshots(redis_url: str, tmp_path: Path) -> None:
    async with stack(redis_url, tmp_path) as (sim, gw), client(gw.url) as ws:
        await subscribe(ws, TICKER, {"type": "orderbook", "codes": ["KRW-BTC.5"]})
        streams = {("ticker", "KRW-BTC"), ("orderbook", "KRW-BTC")}
        await read_until(ws, realtime_after_snapshot(streams, False), within=15)
        sim.drop()  # the broker's upstream connection: it reconnects and announces a gap
        frames = await read_until(
            ws,
            lambda f: (
                {(x["type"], x["code"]) for x in f if x["stream_type"] == "SNAPSHOT"} == streams
            ),
            within=20,
        )
        assert gw.stats["gaps"] == 1
        again = await read_until(ws, realtime_after_snapshot(streams, False, 1), within=15)
        assert again and ws.protocol.state.name == "OPEN"
        assert len([f for f in frames if f["stream_type"] == "SNAPSHOT"]) == 2


async def test_a_broker_gap_sends_no_snapshot_to_realtime_only_streams(
    redis_url: str, tmp_path: Path
) -> None:
    """A stream asked ``isOnlyRealtime`` (as pyupbit and cryptofeed ask) never gets a SNAPSHOT,
    not after a gap either (Upbit never sends one; a trade's would repeat a trade); a client
    on the same streams without the flag still gets its fresh SNAPSHOTs."""
    flags = {"isOnlyRealtime": True}
    async with (
        stack(redis_url, tmp_path) as (sim, gw),
        client(gw.url) as realtime,
        client(gw.url) as snapshots,
    ):
        await subscribe(realtime, {**TRADE, **flags}, {**TICKER, **flags})
        await subscribe(snapshots, TRADE, TICKER)
        streams = {("trade", "KRW-BTC"), ("ticker", "KRW-BTC")}
        before = await read_until(realtime, realtime_after_snapshot(streams, False, 1), within=15)
        await read_until(snapshots, realtime_after_snapshot(streams, False, 1), within=15)
        sim.drop()  # the broker reconnects and announces a gap
        await read_until(
            snapshots,
            lambda f: (
                {(x["type"], x["code"]) for x in f if x["stream_type"] == "SNAPSHOT"} == streams
            ),
            within=20,
        )
        live = await read_until(snapshots, realtime_after_snapshot(streams, False, 1), within=15)
        newest = max(x["sequential_id"] for x in live if x["type"] == "trade")
        # the hub fans out in order: once the realtime client has that trade, it has had
        # whatever the gap made of its streams
        after = await read_until(
            realtime,
            lambda f: any(x["type"] == "trade" and x["sequential_id"] >= newest for x in f),
            within=15,
        )
        assert gw.stats["gaps"] == 1
        assert {x["stream_type"] for x in before + after} == {"REALTIME"}
        assert {(x["type"], x["code"]) for x in after} == streams
        trades = [x["sequential_id"] for x in before + after if x["type"] == "trade"]
        assert len(trades) == len(set(trades))


async def test_after_a_gap_without_trades_no_client_gets_a_trade_twice(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No trade during a gap: the new upstream connection's SNAPSHOT is the last trade, which
    the client (ccxt's way: no flags) already has on a connection that never broke. It does not
    get it again (Upbit repeats a trade only in a new request's SNAPSHOT): its next frame is
    the next trade, marked SNAPSHOT."""
    frozen = False
    step = Market.step

    def market_step(self: Market, n: int, now_ms: int) -> Any:
        return iter(()) if frozen else step(self, n, now_ms)

    monkeypatch.setattr(Market, "step", market_step)
    async with (
        stack(redis_url, tmp_path) as (sim, gw),
        client(gw.url) as ws,
        redis_client.pubsub() as published,
    ):
        await published.subscribe(f"{NS}:trade:KRW-BTC")
        await subscribe(ws, TRADE)
        got = await read_until(
            ws, realtime_after_snapshot({("trade", "KRW-BTC")}, False), within=15
        )
        frozen = True  # the market stands still: no trade from now on
        _, log = await http_get(sim, "/_sim/trades?market=KRW-BTC")
        last = log["sequential_ids"][-1]
        if all(f["sequential_id"] != last for f in got):
            await read_until(ws, lambda f: any(x["sequential_id"] == last for x in f), within=15)

        sim.drop()  # the broker reconnects: the gap event, then the new SNAPSHOTs

        async def snapshot_published() -> bool:
            message = await published.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is None:
                return False
            frame = json.loads(message["data"])
            return frame["stream_type"] == "SNAPSHOT" and frame["sequential_id"] == last

        await wait_for(snapshot_published, 20, message="the last trade re-published as SNAPSHOT")
        await wait_for(lambda: gw.stats["gaps"] == 1, 10, message="the gap seen")
        frozen = False
        after = await read_until(ws, lambda f: any(x["sequential_id"] > last for x in f), within=15)
        assert [x["sequential_id"] for x in after if x["sequential_id"] <= last] == []
        assert after[0]["stream_type"] == "SNAPSHOT"  # fresh, as after any gap


async def test_a_broker_gap_closes_with_1012_when_asked(redis_url: str, tmp_path: Path) -> None:
    async with (
        stack(redis_url, tmp_path, on_gap="close") as (sim, gw),
        client(gw.url) as ws,
        client(gw.url) as idle,
    ):
        await subscribe(ws, TICKER)
        await read_until(ws, lambda f: len(f) >= 2, within=15)
        sim.drop()
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(scaled(20)):
                while True:
                    await ws.recv()
        assert ws.close_code == 1012
        # a client without streams lost nothing: it stays
        await idle.send("PING")
        assert idle.protocol.state.name == "OPEN"


async def test_a_simple_broker_serves_default_clients(redis_url: str, tmp_path: Path) -> None:
    """The broker may publish SIMPLE (``--upstream-format SIMPLE``): clients still get the
    format they asked for."""
    async with (
        stack(redis_url, tmp_path, broker={"upstream_format": "SIMPLE"}) as (_, gw),
        client(gw.url) as ws,
        client(gw.url) as simple,
    ):
        await subscribe(ws, TRADE, ORDERBOOK)
        await subscribe(simple, TRADE, fmt="SIMPLE_LIST")
        streams = {("trade", "KRW-BTC"), ("orderbook", "KRW-ETH")}
        frames = await read_until(ws, realtime_after_snapshot(streams, False, 1), within=15)
        for (type_, _), objs in by_stream(frames, False).items():
            assert all(set(o) == expected_keys(type_, False) for o in objs)
        lists = await read_until(simple, lambda f: len(f) >= 2, within=15)
        assert all(set(objects_of(f, True)[0]) == expected_keys("trade", True) for f in lists)


async def test_leases_show_every_client_with_its_address(redis_url: str, tmp_path: Path) -> None:
    async with stack(redis_url, tmp_path) as (_, gw):
        async with client(gw.url) as ws, client(gw.url + "/") as quiet:
            await subscribe(ws, TICKER, {"type": "orderbook", "codes": ["KRW-ETH.5"]})
            await read_until(ws, lambda f: len(f) >= 2, within=15)
            await gw.lease_batcher.flush()
            result = await arun_cli(
                "leases",
                "--json",
                env={"UPBIT_BROKER_REDIS_URL": redis_url, "UPBIT_BROKER_NAMESPACE": NS},
            )
            assert result.code == 0, result.output
            rows = {r["client_id"]: r for r in json.loads(result.stdout)}
            assert rows[f"{GW}.1"]["subscriptions"] == {
                "orderbook": ["KRW-ETH.5"],
                "ticker": ["KRW-BTC"],
            }
            ours = ws.local_address
            assert rows[f"{GW}.1"]["host"] == f"{ours[0]}:{ours[1]}"
            assert rows[f"{GW}.2"]["subscriptions"] == {}  # connected, wanting nothing yet
            assert quiet.protocol.state.name == "OPEN"
        await wait_for(lambda: not gw.clients, 5, message="both gone")
        await gw.lease_batcher.flush()
        store = LeaseStore(gw.redis, NS)
        assert (await store.list_all()).leases == []  # released on disconnect


async def test_idle_clients_are_dropped_as_upbit_drops_them(redis_url: str, tmp_path: Path) -> None:
    """Nothing either way for ``idle_timeout``: dropped without a close frame (1006), as Upbit
    does; protocol pings from the client keep a quiet connection alive."""
    async with (
        stack(redis_url, tmp_path, idle_timeout=1.0) as (_, gw),
        client(gw.url, ping_interval=None) as idle,
        client(gw.url, ping_interval=0.2) as pinging,
    ):
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(scaled(10)):
                await idle.recv()
        assert idle.close_code == 1006
        assert gw.stats["idle_drops"] == 1
        assert pinging.protocol.state.name == "OPEN"
        await pinging.send('[{"ticket":"l"},{"method":"LIST_SUBSCRIPTIONS"}]')
        frames = await read_until(pinging, lambda f: bool(f), within=5)
        assert frames[-1]["method"] == "LIST_SUBSCRIPTIONS"


async def test_the_gateways_own_lost_subscription_resends_snapshots(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Redis dropped the gateway's pub/sub connection (an output-buffer limit, a restart):
    frames may be lost, so each stream starts again with a SNAPSHOT."""
    async with stack(redis_url, tmp_path) as (_, gw), client(gw.url) as ws:
        await subscribe(ws, TICKER, TRADE)
        streams = {("ticker", "KRW-BTC"), ("trade", "KRW-BTC")}
        await read_until(ws, realtime_after_snapshot(streams, False, 1), within=15)
        pubsub = [
            c for c in await redis_client.client_list() if c["name"].startswith("upbit-gateway-pub")
        ]
        assert len(pubsub) == 1
        await redis_client.client_kill_filter(_id=pubsub[0]["id"])

        def snapshots_again(frames: list[Any]) -> bool:
            return {(f["type"], f["code"]) for f in frames if f["stream_type"] == "SNAPSHOT"} == (
                streams
            )

        await read_until(ws, snapshots_again, within=20)
        await read_until(ws, realtime_after_snapshot(streams, False, 1), within=15)


async def test_leases_are_written_and_renewed_in_one_round_for_all_clients(
    redis_client: aioredis.Redis,
) -> None:
    """Fifty clients' leases: one pipeline writes them all, one renews them all every TTL/3,
    one releases them (no broker needed: the leases are plain Redis)."""
    from gateway.leases import LeaseBatcher

    store = LeaseStore(redis_client, NS)
    batcher = LeaseBatcher(store, ttl=1.5, pid=4242)
    task = asyncio.create_task(batcher.run())
    try:
        for i in range(50):
            batcher.put(f"{GW}.{i}", SubscriptionSet.of({"ticker": ["KRW-BTC"]}), f"10.0.0.{i}:1")
        await batcher.flush()
        assert batcher.rounds == 1 and batcher.writes == 50
        first = {lease.client_id: lease for lease in (await store.list_all()).leases}
        assert len(first) == 50 and first[f"{GW}.7"].host == "10.0.0.7:1"
        await wait_for(lambda: batcher.rounds >= 2, 3, message="a renewal round")
        assert batcher.writes == 100
        renewed = {lease.client_id: lease for lease in (await store.list_all()).leases}
        assert all(renewed[c].renewed_ms > first[c].renewed_ms for c in first)
        batcher.drop(f"{GW}.0")
        batcher.put(f"{GW}.1", SubscriptionSet.of({"trade": ["KRW-ETH"]}), "10.0.0.1:1")
        await batcher.flush()
        assert await store.read(f"{GW}.0") is None
        changed = await store.read(f"{GW}.1")
        assert changed is not None and changed.subscriptions.by_type() == {"trade": ["KRW-ETH"]}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await batcher.release_all() == 49
    assert (await store.list_all()).leases == []
