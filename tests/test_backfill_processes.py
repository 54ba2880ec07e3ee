"""The back-fill of upstream gaps with real processes (issue 13, "Done when": upstream cut 5
times while trades flow, and a leader SIGKILL with a standby; after back-fill, 0
``sequential_id``s missing from the history against the simulator's trade log; each gap has a
``filled`` follow-up).

The simulator runs in the test's event loop (so the test can cut it and read its trade log); a
redis-server and two ``upbit-broker run`` processes (leader and standby) run beside it. The
brokers derive their REST base from the upstream URL: the simulator serves Upbit's REST API on
the same port, from the same trade log it streamed, with Upbit's rate limit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.backfill import SETTLE_MS
from broker.testing import RedisServer, broker_process, free_port, wait_for, write_lease
from broker.testing import read_status as redis_status
from broker.upbit.messages import Candle, Trade, decode_message
from broker.upbit.rest_frames import candle_start_ms
from tests.support.broker_env import EventTap
from tests.support.processes import sim_upstream, union_of
from tests.support.sim import http_get, running_simulator
from tests.test_backfill_io import ScriptedRest

pytestmark = pytest.mark.timeout(240)

TRADES = ["KRW-BTC", "KRW-ETH", "KRW-XRP"]
SUBS = {"trade": TRADES, "candle.1s": ["KRW-BTC"], "ticker": ["KRW-BTC"]}
CUTS = 5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def follow_up_of(tap: EventTap, gap: dict[str, Any]) -> dict[str, Any] | None:
    """The follow-up of ``gap`` (the same gap, with a ``state``), once published."""
    for event in tap.follow_ups():
        if all(event.get(k) == gap.get(k) for k in ("epoch", "since_ms", "until_ms", "reason")):
            return event
    return None


async def trade_history(redis: aioredis.Redis, code: str) -> tuple[set[int], list[int], int]:
    """The history of ``code``'s trades: every ``sequential_id`` in it, the trade times of its
    live REALTIME entries (oldest first), and how many entries were back-filled. A back-filled
    trade is never one the history holds otherwise (live, or back-filled before or after)."""
    live_sids: set[int] = set()
    rest_sids: list[int] = []
    live: list[int] = []
    for _, fields in await redis.xrange(f"t:hist:trade:{code}"):
        message = decode_message(fields[b"f"])
        assert isinstance(message, Trade)
        if fields.get(b"origin") == b"rest":
            rest_sids.append(message.sequential_id)
        else:
            # Each trade once: a SNAPSHOT repeating the last trade is not appended (SnapshotTwin)
            assert message.sequential_id not in live_sids, f"{code}: a trade twice in history"
            live_sids.add(message.sequential_id)
            if message.stream_type == "REALTIME":
                live.append(message.trade_timestamp)
    assert len(set(rest_sids)) == len(rest_sids), "a trade back-filled twice"
    assert not live_sids & set(rest_sids), "a live trade back-filled too"
    return live_sids | set(rest_sids), live, len(rest_sids)


async def candle_history(redis: aioredis.Redis, key: str) -> dict[int, int]:
    """Candle start -> the latest ``timestamp`` the history holds for it."""
    known: dict[int, int] = {}
    for _, fields in await redis.xrange(key):
        message = decode_message(fields[b"f"])
        assert isinstance(message, Candle)
        start = candle_start_ms(message.candle_date_time_utc)
        known[start] = max(known.get(start, 0), message.timestamp)
    return known


@pytest.mark.slow
async def test_cuts_and_a_takeover_are_back_filled_from_rest(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url
    union = union_of(SUBS)
    gaps: list[dict[str, Any]] = []
    follow_ups: list[dict[str, Any]] = []
    async with (
        running_simulator(seed=61, rate=800, trade_share=0.9) as sim,
        EventTap(redis_client) as tap,
        broker_process(url, sim.url, "bf-a", tmp_path) as first,
    ):
        await write_lease(redis_client, "bf-consumer", SUBS, ttl_ms=600_000)
        await wait_for(lambda: sim_upstream(sim) == union, 20, message="union upstream")
        await wait_for(lambda: tap.of("connected"), 10, message="connected event")

        async def back_filled(gap: dict[str, Any]) -> dict[str, Any]:
            done = await wait_for(lambda: follow_up_of(tap, gap), 30, message=f"follow-up {gap}")
            gaps.append(gap)
            follow_ups.append(done)
            return done

        await wait_for(lambda: sim.market.trades > 200, 10, message="trades flowing")
        for i in range(CUTS):
            epoch = tap.of("connected")[-1]["epoch"]
            assert sim.drop() == 1
            (gap,) = await wait_for(
                lambda e=epoch: [g for g in tap.of("gap") if g["epoch"] > e and "state" not in g],
                10,
                message=f"gap after cut {i + 1}",
            )
            assert gap["reason"] == "reconnect"
            await back_filled(gap)

        async with broker_process(url, sim.url, "bf-b", tmp_path) as second:
            await wait_for(lambda: "standby: leader is" in second.output(), 20, message="standby")
            epoch = tap.of("connected")[-1]["epoch"]
            first.kill()
            (takeover,) = await wait_for(
                lambda: [g for g in tap.of("gap") if g["epoch"] > epoch and "state" not in g],
                20,
                message="takeover gap",
            )
            assert takeover["reason"] == "takeover" and takeover["broker"] == "bf-b"
            await back_filled(takeover)
            # trades keep flowing live for a while: the window checked ends well inside them
            mark = sim.market.trades
            await wait_for(lambda: sim.market.trades > mark + 1_000, 20, message="more trades")
            checked_until = now_ms() - 1_000

            async def live_past_the_window() -> bool:
                for code in TRADES:
                    _, live, _ = await trade_history(redis_client, code)
                    if not live or live[-1] <= checked_until + 500:
                        return False
                return True

            await wait_for(live_past_the_window, 10, message="live trades past the window")
            status = await redis_status(redis_client)
            histories = {code: await trade_history(redis_client, code) for code in TRADES}
            logs = {}
            for code in TRADES:
                code_status, body = await http_get(sim, f"/_sim/trades?market={code}&full=1")
                assert code_status == 200 and body["evicted"] == 0, body.get("evicted")
                logs[code] = body["trades"]
            candles = await candle_history(redis_client, "t:hist:candle.1s:KRW-BTC")
            candles_status, rest_candles = await http_get(
                sim, "/v1/candles/seconds?market=KRW-BTC&count=200"
            )
            assert second.alive
        assert status["leader"] == "bf-b"

    # every gap got exactly one follow-up, filled; ticker restored by the new connections
    assert len(gaps) == CUTS + 1
    for gap, done in zip(gaps, follow_ups, strict=True):
        assert done["state"] == "filled", done
        assert done["restored"] == ["ticker"], done
        assert done["backfill"]["streams"] == len(TRADES) + 1 and done["backfill"]["failed"] == 0
        assert [g for g in tap.follow_ups() if g["epoch"] == gap["epoch"]] == [done]

    # 0 sequential_ids missing from the history against the simulator's trade log, from the
    # first live trade of each code to a second before the end (trades after it were in flight)
    figures = []
    for code in TRADES:
        sids, live, rest = histories[code]
        start = live[0]
        expected = [t for t in logs[code] if start <= t["timestamp"] <= checked_until]
        missing = [t["sequential_id"] for t in expected if t["sequential_id"] not in sids]
        figures.append(f"{code}: trades={len(expected)} back-filled={rest} missing={len(missing)}")
        assert len(expected) > 100, figures
        assert missing == [], (code, missing[:10], figures)
    print("\n[figures] back-fill after 5 cuts and a takeover: " + "; ".join(figures))
    print(
        "[figures] follow-ups: "
        + ", ".join(f"{d['reason']}:{d['state']}:{d['backfill']['appended']}" for d in follow_ups)
    )

    # every complete 1-s candle since the first live one is in the history as complete
    assert candles_status == 200
    first_start = min(candles)
    behind = [
        c["candle_date_time_utc"]
        for c in rest_candles
        if first_start < (s := candle_start_ms(c["candle_date_time_utc"])) < checked_until - 2_000
        and candles.get(s, -1) < c["timestamp"]
    ]
    assert behind == []


def garbage(path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"<html>not json</html>"


def refusing(path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
    return 429, {"Remaining-Req": "group=trade; min=600; sec=0"}, b""


@pytest.mark.slow
@pytest.mark.parametrize("rest", ["down", "garbage", "429-forever", "backfill-off"])
async def test_a_rest_api_that_fails_costs_the_follow_up_not_the_live_stream(
    rest: str, redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    """Whatever the REST API does, the leader keeps leading and publishing; the gap's
    follow-up says ``lost`` (and still names what the new connection's snapshots restored).
    With the back-fill off there is no follow-up at all."""
    subs = {"trade": ["KRW-BTC"], "orderbook": ["KRW-ETH"]}
    handler = {"garbage": garbage, "429-forever": refusing}.get(rest)
    async with contextlib.AsyncExitStack() as stack:
        settings: dict[str, Any] = {}
        if rest == "backfill-off":
            settings["backfill"] = "false"
        elif handler is None:
            settings["rest_url"] = f"http://127.0.0.1:{free_port()}"  # nobody listens
        else:
            server = await stack.enter_async_context(ScriptedRest(handler))
            settings["rest_url"] = server.url
        sim = await stack.enter_async_context(running_simulator(seed=62, rate=400))
        tap = await stack.enter_async_context(EventTap(redis_client))
        broker = await stack.enter_async_context(
            broker_process(redis_server.url, sim.url, "bf-fail", tmp_path, **settings)
        )
        await write_lease(redis_client, "bf-fail-consumer", subs, ttl_ms=600_000)
        await wait_for(lambda: sim_upstream(sim) == union_of(subs), 20, message="upstream")
        await wait_for(lambda: tap.of("connected"), 10, message="connected event")
        assert sim.drop() == 1
        (gap,) = await wait_for(
            lambda: [g for g in tap.of("gap") if "state" not in g], 10, message="gap"
        )
        if rest == "backfill-off":
            # None by the time a second gap arrives, announced after the first gap's follow-up
            # would have been due: one events channel keeps their order.
            due_ms = gap["until_ms"] + SETTLE_MS
            await wait_for(
                lambda: _live_after(redis_client, "t:hist:trade:KRW-BTC", due_ms + 1_000),
                20,
                message="live trades past the follow-up's due time",
            )
            assert sim.drop() == 1
            await wait_for(
                lambda: [g for g in tap.of("gap") if g["epoch"] > gap["epoch"]],
                10,
                message="second gap",
            )
            assert tap.follow_ups() == []
        else:
            done = await wait_for(lambda: follow_up_of(tap, gap), 40, message="follow-up")
            assert done["state"] == "lost" and done["restored"] == ["orderbook"], done
            assert done["backfill"] == {"streams": 1, "appended": 0, "failed": 1}
        # still the leader, still publishing live frames to the history
        before = int(await redis_client.xlen("t:hist:trade:KRW-BTC"))
        await wait_for(
            lambda: _grew(redis_client, "t:hist:trade:KRW-BTC", before), 10, message="growing"
        )
        status = await redis_status(redis_client)
        assert status["leader"] == "bf-fail" and status["connected"] == "1"
        assert broker.alive
        assert "Traceback" not in broker.output()


async def _grew(redis: aioredis.Redis, key: str, before: int) -> bool:
    return int(await redis.xlen(key)) > before + 20


async def _live_after(redis: aioredis.Redis, key: str, at_ms: int) -> bool:
    """The newest trade in the history ``key`` was made after ``at_ms``."""
    for _, fields in await redis.xrevrange(key, count=1):
        message = decode_message(fields[b"f"])
        return isinstance(message, Trade) and message.trade_timestamp > at_ms
    return False
