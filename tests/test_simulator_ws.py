"""The simulator over a real WebSocket: every protocol rule a client can observe."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

from broker.testing import scaled
from broker.upbit import fields
from simulator.encode import DEFAULT_KEYS
from tests.support.sim import (
    client,
    read_for,
    read_until,
    recv_frame,
    running_simulator,
    subscribe,
)

BUSY = ["KRW-BTC", "KRW-XRP", "KRW-ETH"]


def of(frames: list[Any], type_: str, code: str | None = None) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == type_ and (code is None or f["code"] == code)]


def realtime(frames: list[Any]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("stream_type") == "REALTIME"]


async def test_default_frames_decode_with_the_documented_keys() -> None:
    async with running_simulator(rate=3000, seed=5) as sim, client(sim) as ws:
        types = ["ticker", "trade", "orderbook", "candle.1s", "candle.1m"]
        await subscribe(ws, *({"type": t, "codes": BUSY[:2]} for t in types))

        def enough(frames: list[Any]) -> bool:
            return all(len(realtime(of(frames, t))) >= 2 for t in ("ticker", "trade", "orderbook"))

        frames = await read_until(ws, enough)
    for frame in frames:
        type_ = frame["type"]
        names = set(DEFAULT_KEYS["candle" if type_.startswith("candle.") else type_])
        assert set(frame) == names, type_
        assert names <= set(fields.fields_for(type_))
        if type_ == "orderbook":
            assert all(set(u) == set(fields.ORDERBOOK_UNIT) for u in frame["orderbook_units"])
    for type_ in types:  # one snapshot per (type, code), first
        for code in BUSY[:2]:
            assert of(frames, type_, code)[0]["stream_type"] == "SNAPSHOT"


async def test_trades_carry_increasing_sequential_ids_above_2_pow_53() -> None:
    async with running_simulator(rate=3000, seed=2) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": BUSY})
        frames = await read_until(ws, lambda f: len(f) >= 60)
    ids = [f["sequential_id"] for f in frames[len(BUSY) :]]  # after the snapshots
    assert all(isinstance(i, int) and i > 2**53 for i in ids)
    assert all(b > a for a, b in itertools.pairwise(ids))
    for f in frames:
        assert f["sequential_id"] // 10_000 == f["trade_timestamp"]
        assert f["best_ask_price"] > f["best_bid_price"] > 0
        assert f["trade_date"].count("-") == 2 and f["trade_time"].count(":") == 2


async def test_every_realtime_frame_is_unique_in_bytes() -> None:
    async with running_simulator(rate=5000, seed=15) as sim, client(sim) as ws:
        codes = sim.codes[:10] + sim.market.thin_codes()[:2]
        await subscribe(
            ws,
            {"type": "trade", "codes": codes},
            {"type": "ticker", "codes": codes},
            {"type": "orderbook", "codes": [f"{c}.1" for c in codes]},
            {"type": "orderbook", "codes": [f"{c}.5" for c in codes[:5]]},
            {"type": "orderbook", "codes": ["KRW-BTC", "KRW-XRP"], "level": 10000},
            {"type": "candle.1s", "codes": codes},
        )
        raws: list[bytes] = []
        async with asyncio.timeout(scaled(20)):
            while len(raws) < 6000:
                raw = await ws.recv()
                assert isinstance(raw, bytes)
                if b'"REALTIME"' in raw:
                    raws.append(raw)
    repeated = [raw[:100] for raw, n in Counter(raws).items() if n > 1]
    assert repeated == []


async def test_a_new_request_replaces_the_whole_set() -> None:
    async with running_simulator(rate=3000, seed=3) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"]})
        await read_until(ws, lambda f: len(realtime(f)) >= 3)
        await subscribe(ws, {"type": "trade", "codes": ["KRW-ETH"]}, ticket="second")
        frames = await read_until(ws, lambda f: len(realtime(of(f, "trade", "KRW-ETH"))) >= 3)
        state = sim.state()
    first_eth = next(i for i, f in enumerate(frames) if f["code"] == "KRW-ETH")
    assert frames[first_eth]["stream_type"] == "SNAPSHOT"
    assert all(f["code"] == "KRW-ETH" for f in frames[first_eth:])  # the tail ended before
    assert len(frames[:first_eth]) < 50  # a short tail of the old set at most
    assert state["connections"][0]["subscriptions"] == {"trade": ["KRW-ETH"]}


async def test_exactly_one_snapshot_per_code_even_when_named_twice() -> None:
    async with running_simulator(rate=3000, seed=4) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "ticker", "codes": BUSY},
            {"type": "ticker", "codes": ["KRW-BTC"]},
        )
        frames = await read_until(
            ws, lambda f: all(len(realtime(of(f, "ticker", c))) >= 2 for c in BUSY)
        )
    snapshots = Counter(f["code"] for f in frames if f["stream_type"] == "SNAPSHOT")
    assert snapshots == dict.fromkeys(BUSY, 1)


async def test_is_only_snapshot_sends_one_frame_then_silence() -> None:
    async with running_simulator(rate=3000, seed=6) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "ticker", "codes": ["KRW-BTC"], "is_only_snapshot": True},
            {"type": "trade", "codes": ["KRW-XRP"]},  # proof that the socket is alive
        )
        frames = await read_until(ws, lambda f: len(realtime(of(f, "trade"))) >= 15)
    tickers = of(frames, "ticker")
    assert len(tickers) == 1 and tickers[0]["stream_type"] == "SNAPSHOT"


@pytest.mark.parametrize("flag", ["is_only_realtime", "isOnlyRealtime"])
async def test_is_only_realtime_sends_no_snapshot(flag: str) -> None:
    async with running_simulator(rate=3000, seed=7) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"], flag: True})
        frames = await read_until(ws, lambda f: len(f) >= 5)
    assert {f["stream_type"] for f in frames} == {"REALTIME"}


@pytest.mark.parametrize("fmt", ["DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST"])
async def test_all_four_formats(fmt: str) -> None:
    async with running_simulator(rate=3000, seed=8) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "trade", "codes": ["KRW-BTC"]},
            {"type": "orderbook", "codes": ["KRW-BTC.1"]},
            fmt=fmt,
        )
        frames = await read_until(ws, lambda f: len(f) >= 6)
    simple = fmt.startswith("SIMPLE")
    for frame in frames:
        if fmt.endswith("LIST"):
            assert isinstance(frame, list) and len(frame) == 1
            frame = frame[0]
        assert isinstance(frame, dict)
        type_ = frame["ty" if simple else "type"]
        names = fields.fields_for(type_)
        expected = set(DEFAULT_KEYS[type_])
        assert set(frame) == ({names[k] for k in expected} if simple else expected)
        if type_ == "orderbook" and simple:
            assert set(frame["obu"][0]) == {"ap", "bp", "as", "bs"}


async def test_orderbook_depth_suffix_and_plain_code_in_frames() -> None:
    async with running_simulator(rate=100, seed=9) as sim, client(sim) as ws:
        codes = {"KRW-BTC.5": 5, "KRW-XRP.15": 15, "KRW-ETH.20": 30, "KRW-SOL.1": 1, "KRW-DOGE": 30}
        await subscribe(ws, {"type": "orderbook", "codes": list(codes)})
        frames = await read_until(ws, lambda f: len(f) >= len(codes))
    depth = {f["code"]: len(f["orderbook_units"]) for f in frames[: len(codes)]}
    assert depth == {code.partition(".")[0]: n for code, n in codes.items()}
    for f in frames:
        asks = [u["ask_price"] for u in f["orderbook_units"] if u["ask_price"]]
        bids = [u["bid_price"] for u in f["orderbook_units"] if u["bid_price"]]
        assert asks == sorted(asks) and bids == sorted(bids, reverse=True)
        assert f["level"] == 0
        assert f["total_ask_size"] == pytest.approx(
            sum(u["ask_size"] for u in f["orderbook_units"])
        )


async def test_thin_books_are_padded_with_zero_slots() -> None:
    async with running_simulator(rate=10, seed=1) as sim, client(sim) as ws:
        thin = sim.market.thin_codes()
        assert thin
        await subscribe(ws, {"type": "orderbook", "codes": thin})
        frames = await read_until(ws, lambda f: len(f) >= len(thin))
    for f in frames[: len(thin)]:
        units = f["orderbook_units"]
        assert len(units) == 30
        last = units[-1]
        assert (last["ask_price"], last["ask_size"]) == (0, 0) or (
            last["bid_price"],
            last["bid_size"],
        ) == (0, 0)


async def test_level_groups_krw_books_and_silences_other_markets() -> None:
    async with running_simulator(rate=3000, seed=10) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "orderbook", "codes": ["KRW-BTC"], "level": 10000},
            {"type": "orderbook", "codes": ["KRW-BTC.5"]},
            {"type": "orderbook", "codes": ["BTC-ETH", "USDT-BTC"], "level": 100},
            {"type": "trade", "codes": ["KRW-XRP"]},
        )
        frames = await read_until(ws, lambda f: len(realtime(of(f, "trade"))) >= 10)
    books = of(frames, "orderbook")
    assert {f["code"] for f in books} == {"KRW-BTC"}  # BTC-ETH and USDT-BTC: silence
    grouped = [f for f in books if f["level"] == 10000]
    plain = [f for f in books if f["level"] == 0]
    assert grouped and plain
    assert all(len(f["orderbook_units"]) == 5 for f in plain)
    for f in grouped:
        for u in f["orderbook_units"]:
            assert u["ask_price"] % 10000 == 0 and u["bid_price"] % 10000 == 0


async def test_candles_all_units_and_at_most_one_push_a_second() -> None:
    units = ["1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m"]
    async with running_simulator(rate=3000, seed=11) as sim, client(sim) as ws:
        await subscribe(ws, *({"type": f"candle.{u}", "codes": BUSY[:2]} for u in units))
        arrivals: dict[tuple[str, str], list[float]] = defaultdict(list)
        start = time.monotonic()
        frames: list[Any] = []
        while time.monotonic() - start < 2.6:
            frame = await recv_frame(ws)
            frames.append(frame)
            if frame["stream_type"] == "REALTIME":
                arrivals[(frame["type"], frame["code"])].append(time.monotonic())
    snapshots = Counter((f["type"], f["code"]) for f in frames if f["stream_type"] == "SNAPSHOT")
    assert set(snapshots) == {(f"candle.{u}", c) for u in units for c in BUSY[:2]}
    assert set(snapshots.values()) == {1}
    assert arrivals  # busy codes trade every second
    for times in arrivals.values():
        assert len(times) <= 4
        assert all(b - a > 0.5 for a, b in itertools.pairwise(times))
    for f in frames:
        utc, kst = f["candle_date_time_utc"], f["candle_date_time_kst"]
        assert (int(utc[11:13]) + 9) % 24 == int(kst[11:13]) and utc[13:] == kst[13:]


@pytest.mark.parametrize(
    ("message", "name"),
    [
        ("not json", "WRONG_FORMAT"),
        ('[{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
        ('[{"ticket":"t"},{"codes":["KRW-BTC"]}]', "NO_TYPE"),
        ('[{"ticket":"t"},{"type":"ticker"}]', "NO_CODES"),
        ('[{"ticket":"t"},{"type":"nope","codes":["KRW-BTC"]}]', "INVALID_PARAM"),
    ],
)
async def test_errors_in_upbit_shape_then_close_1000(message: str, name: str) -> None:
    async with running_simulator(rate=100, seed=12) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"]})
        await recv_frame(ws)
        await ws.send(message)
        frames = await read_until(ws, lambda f: "error" in f[-1] if f else False)
        error = frames[-1]
        assert list(error) == ["error"] and set(error["error"]) == {"name", "message"}
        assert error["error"]["name"] == name
        with pytest.raises(ConnectionClosedOK):
            await recv_frame(ws)
        assert ws.close_code == 1000 and ws.protocol.close_rcvd is not None
        assert sim.state()["totals"]["errors"] == 1


async def test_unknown_and_lower_case_codes_are_ignored() -> None:
    async with running_simulator(rate=3000, seed=13) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": ["KRW-NOPE", "krw-btc", "KRW-XRP"]})
        frames = await read_until(ws, lambda f: len(f) >= 10)
        assert {f["code"] for f in frames} == {"KRW-XRP"}
        assert sim.state()["totals"]["errors"] == 0


async def test_list_subscriptions_reports_the_set_and_switches_the_format() -> None:
    async with running_simulator(rate=3000, seed=14) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "trade", "codes": ["KRW-BTC", "KRW-NOPE"]},
            {"type": "orderbook", "codes": ["KRW-XRP.15"], "level": 0},
            {"type": "ticker", "codes": ["KRW-ETH"], "is_only_snapshot": True},
        )
        await ws.send('[{"ticket":"list-me"},{"method":"LIST_SUBSCRIPTIONS"}]')
        frames = await read_until(ws, lambda f: bool(f) and "method" in f[-1])
        assert frames[-1] == {
            "method": "LIST_SUBSCRIPTIONS",
            "result": [
                {"type": "trade", "codes": ["KRW-BTC"]},
                {"type": "orderbook", "codes": ["KRW-XRP.15"], "level": 0},
            ],
            "ticket": "list-me",
        }
        await ws.send('[{"ticket":"l2"},{"method":"LIST_SUBSCRIPTIONS"},{"format":"SIMPLE"}]')
        frames = await read_until(ws, lambda f: bool(f) and "mthd" in f[-1])
        assert frames[-1]["rslt"][0] == {"ty": "trade", "cds": ["KRW-BTC"]}
        after = await read_until(ws, lambda f: len(f) >= 5)
        assert all("ty" in f for f in after)  # the running streams switched to SIMPLE


async def test_text_ping_starts_one_up_cycle() -> None:
    async with running_simulator(up_interval=0.2) as sim, client(sim) as ws:
        await ws.send("PING")
        assert await recv_frame(ws, within=2) == {"status": "UP"}
        await ws.send("PING")
        await ws.send("PING")  # repeated PINGs start no extra cycle
        stamps = []
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            assert await recv_frame(ws, within=2) == {"status": "UP"}
            stamps.append(time.monotonic())
        assert 3 <= len(stamps) <= 7
        assert all(b - a > 0.1 for a, b in itertools.pairwise(stamps))
        assert sim.state()["connections"][0]["ping"] is True


async def test_idle_connection_is_dropped_without_a_close_frame() -> None:
    async with running_simulator(idle_timeout=0.4) as sim:
        async with client(sim, ping_interval=None) as ws:
            await _wait_closed(ws, 3)
            assert ws.close_code == 1006
            assert ws.protocol.close_rcvd is None
        assert sim.state()["totals"]["idle_drops"] == 1


async def test_protocol_pings_and_data_keep_a_connection_alive() -> None:
    async with running_simulator(idle_timeout=0.4, rate=3000) as sim:
        async with (
            client(sim, ping_interval=0.1) as pinging,
            client(sim, ping_interval=None) as streaming,
        ):
            await subscribe(streaming, {"type": "trade", "codes": ["KRW-BTC"]})
            frames = await read_for(streaming, 1.2)
            assert len(frames) > 10
            assert pinging.state.name == "OPEN" and streaming.state.name == "OPEN"
        assert sim.state()["totals"]["idle_drops"] == 0


async def _wait_closed(ws: ClientConnection, within: float) -> None:
    async with asyncio.timeout(scaled(within)):
        await ws.wait_closed()


async def test_message_rate_limit_refuses_with_too_many_requests() -> None:
    async with running_simulator() as sim, client(sim) as ws:
        for i in range(6):
            await ws.send(f'[{{"ticket":"t{i}"}},{{"method":"LIST_SUBSCRIPTIONS"}}]')
        frames = await read_until(ws, lambda f: bool(f) and "error" in f[-1])
        assert [f.get("method") for f in frames[:-1]] == ["LIST_SUBSCRIPTIONS"] * 5
        assert frames[-1] == {
            "error": {"name": "Too Many Requests", "message": frames[-1]["error"]["message"]}
        }
        with pytest.raises(ConnectionClosedOK):
            await recv_frame(ws)
        assert ws.close_code == 1000
        assert sim.state()["totals"]["rate_limited_messages"] == 1


async def test_connect_rate_limit_answers_http_429() -> None:
    async with running_simulator(connect_rate=2) as sim:
        async with client(sim), client(sim):
            with pytest.raises(InvalidStatus) as refused:
                async with client(sim):
                    pass
        assert refused.value.response.status_code == 429
        assert sim.state()["totals"]["rate_limited_connects"] == 1


VOLATILE = {
    "timestamp", "trade_timestamp", "trade_date", "trade_time", "sequential_id",
    "highest_52_week_date", "lowest_52_week_date",
}  # fmt: skip


async def _run(seed: int) -> list[dict[str, Any]]:
    async with running_simulator(rate=2000, seed=seed) as sim, client(sim) as ws:
        await subscribe(
            ws,
            {"type": "trade", "codes": BUSY},
            {"type": "ticker", "codes": BUSY},
            {"type": "orderbook", "codes": [f"{c}.5" for c in BUSY]},
        )
        frames = await read_until(ws, lambda f: len(f) >= 150)
    return [{k: v for k, v in f.items() if k not in VOLATILE} for f in frames[:150]]


async def test_same_seed_same_frames() -> None:
    first, second = await _run(42), await _run(42)
    assert first == second
    assert first != await _run(43)
