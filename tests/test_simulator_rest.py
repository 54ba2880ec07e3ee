"""The simulator's REST API over real sockets: trades and candles agree with what the
WebSocket streamed, a client that lost frames gets them back, Remaining-Req and the 429."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from broker.testing import scaled, wait_for
from simulator import Simulator
from tests.support.sim import client, http_get, read_until, running_simulator, subscribe

REMAINING = re.compile(r"group=([a-z]+); min=(\d+); sec=(\d+)")
BTC = "KRW-BTC"


async def rest_get(sim: Simulator, path: str) -> tuple[int, dict[str, str], Any]:
    """GET ``path``: (status, headers with lower-case names, decoded JSON body)."""
    async with asyncio.timeout(scaled(5)):
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{sim.port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, msgspec.json.decode(body)


async def trade_log(sim: Simulator, code: str = BTC) -> list[int]:
    status, _, body = await rest_get(sim, f"/_sim/trades?market={code}")
    assert status == 200
    return list(body["sequential_ids"])


async def back_fill(sim: Simulator, cursor: int, down_to: int, code: str = BTC) -> list[int]:
    """Ids of the trades older than ``cursor`` and newer than ``down_to``, paged back from
    ``cursor`` as a client fills a gap (newest first)."""
    out: list[int] = []
    while True:
        status, _, page = await rest_get(
            sim, f"/v1/trades/ticks?market={code}&count=100&cursor={cursor}"
        )
        assert status == 200
        ids = [t["sequential_id"] for t in page]
        newer = [i for i in ids if i > down_to]
        out += newer
        if not ids or len(newer) < len(ids):
            return out
        cursor = ids[-1]


async def drain(ws: ClientConnection) -> list[Any]:
    """Frames still queued on a closed connection."""
    frames: list[Any] = []
    while True:
        try:
            raw = await ws.recv()
        except ConnectionClosed:
            return frames
        frames.append(msgspec.json.decode(raw))


def gaps(received: list[int], log: list[int]) -> list[tuple[int, int, list[int]]]:
    """(last id before, first id after, the logged ids between) for each gap in ``received``."""
    out = []
    for a, b in itertools.pairwise(received):
        between = [i for i in log if a < i < b]
        if between:
            out.append((a, b, between))
    return out


# -- trades ---------------------------------------------------------------------------------------


async def test_trades_ticks_are_the_trades_the_websocket_streamed() -> None:
    async with running_simulator(rate=3000, seed=3, rest_rate=0) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "trade", "codes": [BTC]})
        frames = await read_until(ws, lambda f: len(f) >= 40)
        ids = [f["sequential_id"] for f in frames]
        assert ids == sorted(ids) and frames[0]["stream_type"] == "SNAPSHOT"
        status, _, body = await rest_get(
            sim, f"/v1/trades/ticks?market={BTC}&count={len(ids)}&cursor={ids[-1] + 1}"
        )
    assert status == 200
    assert [t["sequential_id"] for t in body] == ids[::-1]
    for rest, frame in zip(body, frames[::-1], strict=True):
        assert rest["market"] == frame["code"]
        assert rest["timestamp"] == frame["trade_timestamp"]
        assert rest["trade_date_utc"] == frame["trade_date"]
        assert rest["trade_time_utc"] == frame["trade_time"]
        for key in ("trade_price", "trade_volume", "ask_bid", "prev_closing_price"):
            assert rest[key] == frame[key], key
        sign = -1 if frame["change"] == "FALL" else 1
        assert rest["change_price"] == sign * frame["change_price"]


async def test_cursor_pages_cover_the_trade_log_without_duplicates() -> None:
    async with running_simulator(rate=3000, seed=4, rest_rate=0) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "ticker", "codes": ["KRW-ETH"]})  # starts the market
        await wait_for(lambda: len(sim.market.states[BTC].log) >= 600, message="600 trades")
        status, _, first = await rest_get(sim, f"/v1/trades/ticks?market={BTC}&count=500")
        assert status == 200 and len(first) == 500
        pages = [t["sequential_id"] for t in first]
        while True:
            _, _, page = await rest_get(
                sim, f"/v1/trades/ticks?market={BTC}&count=500&cursor={pages[-1]}"
            )
            if not page:
                break
            pages += [t["sequential_id"] for t in page]
        log = await trade_log(sim)
    assert len(pages) == len(set(pages)) >= 600
    assert pages == [i for i in log if i <= pages[0]][::-1]  # every logged trade, in order


async def test_trades_made_while_the_client_was_dropped_are_served() -> None:
    async with running_simulator(rate=3000, seed=5, rest_rate=0) as sim:
        async with client(sim) as ws:
            await subscribe(ws, {"type": "trade", "codes": [BTC]})
            before = await read_until(ws, lambda f: len(f) >= 10)
            assert await http_get(sim, "/_sim/drop") == (200, {"dropped": 1})
            before += await drain(ws)
        last = before[-1]["sequential_id"]
        # Nobody is subscribed now; the market trades on. 51: the newest of them may become
        # the snapshot of the next subscription, which is not missed (a fresh clone once saw
        # exactly 49 missed after waiting for 50, on a loaded machine).
        await wait_for(
            lambda: (
                sim.market.states[BTC].log.count_below(last + 1)
                <= len(sim.market.states[BTC].log) - 51
            ),
            message="51 trades made while disconnected",
        )
        async with client(sim) as ws:
            await subscribe(ws, {"type": "trade", "codes": [BTC]})
            after = await read_until(ws, lambda f: len(f) >= 5)
        resumed = after[0]["sequential_id"]  # the snapshot: the newest trade at the request
        missed = await back_fill(sim, cursor=resumed, down_to=last)
        log = await trade_log(sim)
    assert len(missed) >= 50
    assert missed == [i for i in log if last < i < resumed][::-1]
    received = [f["sequential_id"] for f in before + after]
    window = [i for i in log if received[0] <= i <= received[-1]]
    assert sorted(received + missed) == window  # nothing missing against the trade log


@pytest.mark.parametrize(
    "fault", ["/_sim/mute?codes=KRW-BTC&seconds=0.5", "/_sim/stall?seconds=0.5"]
)
async def test_trades_made_while_muted_or_stalled_are_logged_and_served(fault: str) -> None:
    async with (
        running_simulator(rate=3000, seed=6, rest_rate=0) as sim,
        client(sim, ping_interval=None) as ws,
    ):
        await subscribe(ws, {"type": "trade", "codes": [BTC]})
        frames = await read_until(ws, lambda f: len(f) >= 10)
        started_ms = time.time_ns() // 1_000_000
        assert (await http_get(sim, fault))[0] == 200
        frames += await read_until(
            ws, lambda f: bool(f) and f[-1]["trade_timestamp"] >= started_ms + 700, within=5
        )
        received = [f["sequential_id"] for f in frames]
        log = await trade_log(sim)
        holes = gaps(received, log)
        assert holes and sum(len(between) for _, _, between in holes) >= 20
        for before, after, between in holes:
            assert await back_fill(sim, cursor=after, down_to=before) == between[::-1]


# -- candles --------------------------------------------------------------------------------------


async def test_rest_candles_agree_with_the_streamed_candle_frames() -> None:
    keys = ("candle_date_time_kst", "opening_price", "high_price", "low_price", "trade_price",
            "candle_acc_trade_volume", "candle_acc_trade_price", "timestamp")  # fmt: skip
    async with running_simulator(rate=3000, seed=7, rest_rate=0) as sim, client(sim) as ws:
        await subscribe(
            ws, {"type": "candle.1s", "codes": [BTC]}, {"type": "candle.1m", "codes": [BTC]}
        )

        def seconds_seen(frames: list[Any]) -> int:
            return len({f["candle_date_time_utc"] for f in frames if f["type"] == "candle.1s"})

        frames = await read_until(ws, lambda f: seconds_seen(f) >= 4, within=10)
        status, headers, seconds = await rest_get(
            sim, f"/v1/candles/seconds?market={BTC}&count=200"
        )
        _, _, minutes = await rest_get(sim, f"/v1/candles/minutes/1?market={BTC}&count=200")
    assert status == 200 and headers["remaining-req"].startswith("group=candle;")
    for type_, rest in (("candle.1s", seconds), ("candle.1m", minutes)):
        last: dict[str, Any] = {}  # the last push of each candle wins, as on Upbit
        for f in frames:
            if f["type"] == type_:
                last[f["candle_date_time_utc"]] = f
        by_start = {c["candle_date_time_utc"]: c for c in rest}
        newest = max(last)
        for start, frame in last.items():
            candle = by_start[start]
            if start != newest:  # a closed candle: its last push is the whole candle
                assert {k: candle[k] for k in keys} == {k: frame[k] for k in keys}, start
            else:  # still open: REST holds every trade so far, the push those up to it
                assert candle["opening_price"] == frame["opening_price"]
                assert candle["candle_acc_trade_volume"] >= frame["candle_acc_trade_volume"]
                assert candle["timestamp"] >= frame["timestamp"]
        if type_ == "candle.1s":
            assert len(last) >= 4
        assert [c["candle_date_time_utc"] for c in rest] == sorted(by_start, reverse=True)


# -- rate limit, headers --------------------------------------------------------------------------


async def test_every_rest_answer_names_its_group_and_what_is_left() -> None:
    paths = {
        "/v1/market/all": "market",
        "/v1/ticker?markets=KRW-BTC": "ticker",
        "/v1/ticker/all?quote_currencies=KRW": "ticker",
        "/v1/orderbook/instruments?markets=KRW-BTC": "orderbook",
        "/v1/trades/ticks?market=KRW-BTC": "trade",
        "/v1/candles/seconds?market=KRW-BTC": "candle",
        "/v1/candles/days?market=KRW-BTC": "candle",
        "/v1/trades/ticks?market=KRW-BTC&count=501": "trade",  # a 400 says it too
    }
    async with running_simulator(seed=8) as sim:
        seen: dict[str, list[int]] = {}
        for path, group in paths.items():
            status, headers, _ = await rest_get(sim, path)
            assert status in (200, 400), path
            match = REMAINING.fullmatch(headers["remaining-req"])
            assert match is not None, headers
            assert match[1] == group and match[2] == "600"
            seen.setdefault(group, []).append(int(match[3]))
        status, headers, _ = await rest_get(sim, "/_sim/trades?market=KRW-BTC")
        assert status == 200 and "remaining-req" not in headers  # operator, not Upbit
    # Each request in a group leaves one less (the window is a second; these came faster).
    assert all(left[0] == 9 and left == sorted(left, reverse=True) for left in seen.values())


async def test_the_eleventh_request_of_a_group_in_a_second_gets_429() -> None:
    async with running_simulator(seed=9) as sim:
        path = f"/v1/candles/minutes/1?market={BTC}"
        answers = await asyncio.gather(*(rest_get(sim, path) for _ in range(11)))
        assert sorted(status for status, _, _ in answers) == [200] * 10 + [429]
        left = sorted(
            int(REMAINING.fullmatch(h["remaining-req"])[3])  # type: ignore[index]
            for status, h, _ in answers
            if status == 200
        )
        assert left == list(range(10))
        (refused,) = [(h, body) for status, h, body in answers if status == 429]
        assert refused[0]["remaining-req"] == "group=candle; min=600; sec=0"
        assert refused[1] == {
            "error": {"name": "Too Many Requests", "message": "Too many API requests."}
        }
        # Another group has its own budget; the operator endpoints none.
        status, headers, _ = await rest_get(sim, f"/v1/trades/ticks?market={BTC}")
        assert status == 200 and headers["remaining-req"] == "group=trade; min=600; sec=9"
        assert (await http_get(sim, "/_sim/state"))[1]["totals"]["rate_limited_rest"] == 1


async def test_rest_rate_zero_turns_the_limit_off() -> None:
    async with running_simulator(seed=10, rest_rate=0) as sim:
        path = f"/v1/trades/ticks?market={BTC}"
        answers = await asyncio.gather(*(rest_get(sim, path) for _ in range(25)))
    assert {status for status, _, _ in answers} == {200}
    assert {h["remaining-req"] for _, h, _ in answers} == {"group=trade; min=600; sec=999"}


# -- market list, errors, the operator's trade log -------------------------------------------------


async def test_market_all_with_details_adds_market_events() -> None:
    async with running_simulator(seed=11, markets=100) as sim:
        status, headers, plain = await rest_get(sim, "/v1/market/all")
        assert status == 200 and headers["remaining-req"].startswith("group=market;")
        status, _, detailed = await rest_get(sim, "/v1/market/all?is_details=true")
        # the older spelling, which pyupbit's get_tickers(is_details=True) sends
        camel = await rest_get(sim, "/v1/market/all?isDetails=true")
        assert (await rest_get(sim, "/v1/market/all?isDetails=false"))[2] == plain
    assert camel[0] == 200 and camel[2] == detailed
    assert status == 200 and len(detailed) == len(plain) == len(sim.codes)
    assert all(set(x) == {"market", "korean_name", "english_name"} for x in plain)
    for x in detailed:
        event = x["market_event"]
        assert isinstance(event["warning"], bool)
        assert list(event["caution"]) == [
            "PRICE_FLUCTUATIONS", "TRADING_VOLUME_SOARING", "DEPOSIT_AMOUNT_SOARING",
            "GLOBAL_PRICE_DIFFERENCES", "CONCENTRATION_OF_SMALL_ACCOUNTS",
        ]  # fmt: skip
    assert any(x["market_event"]["warning"] for x in detailed)
    assert any(any(x["market_event"]["caution"].values()) for x in detailed)


async def test_bad_parameters_get_upbits_400_and_404() -> None:
    bad = {"error": {"name": 400, "message": "Invalid parameter. Check the given value!"}}
    missing = {"error": {"name": 404, "message": "Code not found"}}
    async with running_simulator(seed=12, rest_rate=0) as sim:
        for path, expected in (
            (f"/v1/trades/ticks?market={BTC}&count=0", (400, bad)),
            (f"/v1/trades/ticks?market={BTC}&count=501", (400, bad)),
            (f"/v1/trades/ticks?market={BTC}&days_ago=8", (400, bad)),
            ("/v1/trades/ticks", (400, bad)),
            ("/v1/trades/ticks?market=KRW-NOPE", (404, missing)),
            (f"/v1/candles/minutes/7?market={BTC}", (400, bad)),
            (f"/v1/candles/days?market={BTC}&to=soon", (400, bad)),
            ("/v1/candles/seconds?market=KRW-NOPE", (404, missing)),
            ("/v1/market/all?is_details=perhaps", (400, bad)),
        ):
            status, _, body = await rest_get(sim, path)
            assert (status, body) == expected, path


async def test_sim_trades_is_the_whole_bounded_log() -> None:
    async with running_simulator(rate=3000, seed=13, trade_log_size=30) as sim, client(sim) as ws:
        await subscribe(ws, {"type": "ticker", "codes": [BTC]})
        await wait_for(lambda: sim.market.states[BTC].log.evicted > 0, message="a full log")
        status, _, body = await rest_get(sim, f"/_sim/trades?market={BTC}&full=1")
        assert status == 200
        assert body["market"] == BTC and body["capacity"] == 30 and body["count"] == 30
        assert body["evicted"] > 0
        ids = body["sequential_ids"]
        assert ids == sorted(ids) and len(set(ids)) == 30
        assert [t["sequential_id"] for t in body["trades"]] == ids
        assert set(body["trades"][0]) == {
            "market", "trade_date_utc", "trade_time_utc", "timestamp", "trade_price",
            "trade_volume", "prev_closing_price", "change_price", "ask_bid", "sequential_id",
        }  # fmt: skip
        _, _, plain = await rest_get(sim, f"/_sim/trades?market={BTC}")
        assert "trades" not in plain
        assert (await rest_get(sim, "/_sim/trades?market=KRW-NOPE"))[0] == 404
