"""The simulator's operator endpoints and REST slice, over real HTTP on the WebSocket port."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broker.testing import scaled, wait_for
from simulator import frame_key
from tests.support.sim import (
    client,
    fetch_state,
    http_get,
    read_for,
    read_until,
    recv_frame,
    running_simulator,
    subscribe,
)


async def test_state_shows_connections_subscriptions_and_totals() -> None:
    async with running_simulator(rate=3000, seed=1) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-NOPE"]},
            {"type": "orderbook", "codes": ["KRW-ETH.5"]},
            {"type": "orderbook", "codes": ["KRW-BTC"], "level": 10000},
            fmt="SIMPLE",
        )
        await read_until(ws, lambda f: len(f) >= 5)
        state = await fetch_state(sim)
        (conn,) = state["connections"]
        assert conn["subscriptions"] == {
            "orderbook": ["KRW-ETH.5"],
            "orderbook@10000": ["KRW-BTC"],
            "ticker": ["KRW-BTC"],
        }
        assert conn["format"] == "SIMPLE"
        assert conn["requests"] == 1 and conn["frames_sent"] >= 5 and conn["ping"] is False
        assert conn["peer"].startswith("127.0.0.1:")
        assert state["totals"]["connections_opened"] == 1
        assert state["totals"]["frames_sent"] >= conn["frames_sent"]
        assert state["seed"] == 1 and state["market"]["started"] is True
        await ws.send("PING")
        await wait_for(lambda: sim.state()["connections"][0]["ping"], message="PING state")
        assert (await fetch_state(sim))["connections"][0]["ping"] is True


async def test_drop_cuts_every_connection_without_a_close_frame() -> None:
    async with running_simulator(rate=500) as sim, client(sim) as a, client(sim) as b:
        await subscribe(a, {"type": "trade", "codes": ["KRW-BTC"]})
        await recv_frame(a)
        assert await http_get(sim, "/_sim/drop") == (200, {"dropped": 2})
        for ws in (a, b):
            async with asyncio.timeout(scaled(3)):
                await ws.wait_closed()
            assert ws.close_code == 1006 and ws.protocol.close_rcvd is None
        assert sim.state()["totals"]["operator_drops"] == 2


async def test_stall_sends_nothing_and_answers_no_ping_until_it_ends() -> None:
    async with running_simulator(rate=3000) as sim, client(sim, ping_interval=None) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"]})
        await read_until(ws, lambda f: len(f) >= 3)
        started = time.monotonic()
        assert await http_get(sim, "/_sim/stall?seconds=1.0") == (200, {"stalled_for": 1.0})
        await read_for(ws, 0.1)  # frames already on the wire before the stall
        pong = asyncio.ensure_future(await ws.ping())
        assert await read_for(ws, 0.4) == []
        assert not pong.done()
        assert (await fetch_state(sim))["stalled_for"] > 0  # operator HTTP still answers
        async with asyncio.timeout(scaled(3)):
            await pong
        assert time.monotonic() - started >= 0.9
        await read_until(ws, lambda f: len(f) >= 3)  # the stream resumed
        assert sim.state()["totals"]["stalls"] == 1


async def test_mute_silences_only_the_named_codes_for_a_while() -> None:
    async with running_simulator(rate=3000) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC", "KRW-XRP"]})
        await read_until(ws, lambda f: len(f) >= 5)
        status, body = await http_get(sim, "/_sim/mute?codes=KRW-BTC&seconds=1.0")
        assert (status, body) == (200, {"muted": ["KRW-BTC"], "seconds": 1.0})
        await read_for(ws, 0.05)  # in flight before the mute
        during = await read_until(ws, lambda f: len(f) >= 10)
        assert {f["code"] for f in during} == {"KRW-XRP"}
        assert "KRW-BTC" in sim.state()["muted"]
        after = await read_until(ws, lambda f: any(x["code"] == "KRW-BTC" for x in f), within=4)
        assert after[-1]["stream_type"] == "REALTIME"


async def test_rest_market_all_lists_every_code() -> None:
    async with running_simulator(markets=3, seed=1) as sim:
        status, body = await http_get(sim, "/v1/market/all")
        assert status == 200
        assert [m["market"] for m in body] == sim.codes
        assert all(set(m) == {"market", "korean_name", "english_name"} for m in body)
        assert body[0] == {
            "market": "KRW-BTC",
            "korean_name": "비트코인",
            "english_name": "Bitcoin",
        }
        assert body[-1]["market"] == "KRW-SIM0003"


async def test_rest_ticker_is_shaped_like_upbits() -> None:
    async with running_simulator(seed=2) as sim:
        status, body = await http_get(sim, "/v1/ticker?markets=KRW-BTC,BTC-ETH")
        assert status == 200 and [t["market"] for t in body] == ["KRW-BTC", "BTC-ETH"]
        for ticker in body:
            assert not {"type", "code", "stream_type"} & set(ticker)
            assert {"trade_date_kst", "trade_time_kst", "trade_price", "timestamp"} <= set(ticker)
            utc_hour, kst_hour = int(ticker["trade_time"][:2]), int(ticker["trade_time_kst"][:2])
            assert (utc_hour + 9) % 24 == kst_hour
        async with client(sim) as ws:
            await subscribe(ws, {"type": "ticker", "codes": ["KRW-BTC"], "is_only_snapshot": True})
            snapshot = await recv_frame(ws)
        assert snapshot["trade_price"] == body[0]["trade_price"]
        assert await http_get(sim, "/v1/ticker") == (
            400,
            {"error": {"name": 400, "message": "Invalid parameter. Check the given value!"}},
        )
        status, body = await http_get(sim, "/v1/ticker?markets=KRW-NOPE")
        assert status == 404


async def test_unknown_paths_get_upbits_404_shape() -> None:
    async with running_simulator() as sim:
        assert await http_get(sim, "/v1/nope") == (
            404,
            {"error": {"name": 404, "message": "Code not found"}},
        )
        with pytest.raises(InvalidStatus) as refused:
            async with connect(sim.url.replace("/websocket/v1", "/websocket/v2")):
                pass
        assert refused.value.response.status_code == 404


async def test_send_log_records_every_frame_by_its_key() -> None:
    async with running_simulator(rate=3000, record_sends=True) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"]})
        received = []
        for _ in range(20):
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            received.append((time.time_ns(), frame_key(raw), msgspec.json.decode(raw)))
        status, log = await http_get(sim, "/_sim/sends?clear=1")
        assert status == 200
        sent_at = {key: t for t, key in log}
        for got_at, key, frame in received:
            assert key in sent_at, frame
            assert 0 <= got_at - sent_at[key] < 5_000_000_000
        assert len({k for _, k, _ in received}) == len(received)  # every frame unique
        assert len((await http_get(sim, "/_sim/sends"))[1]) < len(log)  # cleared
