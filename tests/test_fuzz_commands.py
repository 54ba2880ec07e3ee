"""Bad commands to the leader: a clear answer or a clean refusal, and the broker keeps serving.

Commands go through ``{ns}:requests`` exactly as design.md says (RPUSH, PUBLISH ``request``,
BLPOP the reply). The broker is a subprocess against a real Redis and an in-process simulator;
MONITOR records every command it sends, so no reply key is ever built from a garbage id.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.testing import RedisServer, broker_process, wait_for, write_lease
from broker.testing import read_status as redis_status
from tests.support.processes import MonitorTap, contract_key_re, sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

OWN = "fuzz-cmd"


async def ask(redis: aioredis.Redis, payload: bytes | str, reply_id: str | None, wait: float = 5):
    await redis.rpush("t:requests", payload)  # type: ignore[misc]
    await redis.publish("t:control", "request")
    if reply_id is None:
        return None
    found = await redis.blpop([f"t:reply:{reply_id}"], timeout=wait)  # type: ignore[misc]
    return None if found is None else json.loads(found[1])


def snapshot(rid: Any, **fields: Any) -> str:
    return json.dumps({"op": "snapshot", "id": rid, "type": "ticker", **fields})


# (payload, reply id to wait for, what the reply must say)
ANSWERED: list[tuple[str, str, dict[str, Any]]] = [
    (
        snapshot("u1", codes=["KRW-NOPE", "KRW-BTC"], timeout_ms=1500),
        "u1",
        {"ok": True, "missing": ["KRW-NOPE"], "frames": ["KRW-BTC"]},
    ),
    (
        snapshot("many", codes=[f"KRW-C{i:03d}" for i in range(101)]),
        "many",
        {"ok": False, "error": "100"},
    ),
    (snapshot("lower", codes=["krw-btc"]), "lower", {"ok": False, "error": "invalid codes"}),
    (snapshot("star", codes=["KRW-*"]), "star", {"ok": False, "error": "invalid codes"}),
    (snapshot("nl", codes=["KRW-BTC\nPUBLISH"]), "nl", {"ok": False}),
    (snapshot("empty", codes=[]), "empty", {"ok": False}),
    (snapshot("str", codes="KRW-BTC"), "str", {"ok": False}),
    (snapshot("nums", codes=[1, None, ["KRW-BTC"]]), "nums", {"ok": False}),
    (snapshot("nocodes"), "nocodes", {"ok": False}),
    (
        json.dumps({"op": "snapshot", "id": "type", "type": "tickr", "codes": ["KRW-BTC"]}),
        "type",
        {"ok": False},
    ),
    (
        json.dumps({"op": "snapshot", "id": "type2", "type": None, "codes": ["KRW-BTC"]}),
        "type2",
        {"ok": False},
    ),
    (snapshot("lvl", codes=["KRW-BTC"], level="abc"), "lvl", {"ok": False}),
    (snapshot("lvl2", codes=["KRW-BTC"], level={"a": 1}), "lvl2", {"ok": False}),
    (snapshot("tmo", codes=["KRW-BTC"], timeout_ms="soon"), "tmo", {"ok": False}),
    (snapshot("neg", codes=["KRW-NOPE"], timeout_ms=-5), "neg", {"ok": True}),
    (snapshot("huge-t", codes=["KRW-BTC"], timeout_ms=1e300), "huge-t", {"ok": True}),
    (json.dumps({"op": "launch", "id": "op"}), "op", {"ok": False, "error": "unknown op"}),
    (json.dumps({"id": "noop"}), "noop", {"ok": False}),
    (json.dumps({"op": "snapshot", "id": 123, "type": "ticker", "codes": ["KRW-BTC"]}), "123", {}),
    (
        json.dumps(
            {
                "op": "snapshot",
                "id": "pad",
                "type": "ticker",
                "codes": ["KRW-BTC"],
                "pad": "x" * 1_000_000,
            }
        ),
        "pad",
        {"ok": True},
    ),
]

# Orderbook levels that name no level: a clean refusal, not a broken upstream request.
BAD_LEVELS = ["nan", "inf", -1]

# No usable reply id: nothing can be answered, and nothing may be written.
UNANSWERABLE: list[str | bytes] = [
    snapshot(None, codes=["KRW-BTC"]).replace('"id": null, ', ""),
    snapshot("a b", codes=["KRW-BTC"]),
    snapshot("*", codes=["KRW-BTC"]),
    snapshot("../../x", codes=["KRW-BTC"]),
    snapshot("x" * 200, codes=["KRW-BTC"]),
    snapshot("", codes=["KRW-BTC"]),
    snapshot("new\nline", codes=["KRW-BTC"]),
    snapshot({"nested": 1}, codes=["KRW-BTC"]),
    json.dumps({"op": "resubscribe"}),
    "garbage",
    "",
    b"\xff\xfe\x00",
    "[1,2,3]",
    "null",
    "123",
    '"snapshot"',
    "{" * 10_000,
]

#: A command nested deeper than the decoder's recursion limit.
DEEP = "[" * 50_000 + "]" * 50_000


async def test_bad_commands_get_clean_answers_and_the_broker_keeps_serving(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    url = redis_server.url
    own = aioredis.Redis.from_url(url, client_name=OWN, socket_timeout=30)
    try:
        async with (
            running_simulator(seed=91, rate=100) as sim,
            MonitorTap("127.0.0.1", redis_server.port) as monitor,
            broker_process(url, sim.url, "cmd-b", tmp_path) as broker,
        ):
            await write_lease(own, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=120_000)
            await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 20)
            await wait_for(lambda: _cached(own), 10, message="KRW-BTC in the cache")
            first = await _connected_status(own)
            answers: dict[str, Any] = {}
            for payload, rid, _ in ANSWERED:
                answers[rid] = await ask(own, payload, rid)
            for payload in UNANSWERABLE:
                await ask(own, payload, None)

            # hypothesis: arbitrary command objects, then the broker must still answer
            sent = 0

            @settings(
                max_examples=150,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(_commands())
            def flood(command: Any) -> None:
                nonlocal sent
                payload = json.dumps(command) if not isinstance(command, bytes) else command
                asyncio.run_coroutine_threadsafe(ask(own, payload, None), loop).result(5)
                sent += 1

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(flood)
            final = await ask(own, snapshot("final", codes=["KRW-BTC"]), "final", wait=10)
            await asyncio.sleep(0.5)
            status = await redis_status(own)
            keys = [k.decode("utf-8", "backslashreplace") for k in await own.keys("*")]
            skip = {c["addr"] for c in await own.client_list() if c.get("name") == OWN}
            odd = monitor.audit(skip)
            audited = len(monitor.commands)
            alive = broker.alive
    finally:
        await own.aclose()
    print(
        f"\n[figures] bad commands: answered_cases={len(ANSWERED)}, "
        f"unanswerable={len(UNANSWERABLE)}, hypothesis_commands={sent}, broker_alive={alive}, "
        f"epoch {first['epoch']}->{status['epoch']}, reconnects={status['reconnects']}, "
        f"redis_commands_audited={audited}, off_contract_commands={len(odd)}"
    )
    for payload, rid, want in ANSWERED:
        got = answers[rid]
        assert got is not None, f"no answer to {payload[:80]}"
        assert got["id"] == rid
        if "ok" in want:
            assert got["ok"] is want["ok"], (rid, got)
        if "error" in want:
            assert want["error"] in got["error"], (rid, got)
        if "missing" in want:
            assert got["missing"] == want["missing"], (rid, got)
        if "frames" in want:
            assert sorted(got["frames"]) == want["frames"], (rid, got)
    assert final is not None and final["ok"] and list(final["frames"]) == ["KRW-BTC"]
    assert alive
    assert not odd, odd[:20]
    assert all(contract_key_re("t").fullmatch(k) for k in keys), keys
    # none of it cost the upstream connection (a new leader phase would bump the epoch)
    assert status["epoch"] == first["epoch"] and status["reconnects"] == "0"
    assert status["leader"] == "cmd-b"


async def test_a_snapshot_level_that_names_no_level_is_refused_cleanly(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """``level`` NaN, infinite or negative on an orderbook snapshot: refused with a reason,
    while the upstream connection and the leadership stay as they were."""
    url = redis_server.url
    own = aioredis.Redis.from_url(url, client_name=OWN, socket_timeout=30)
    answers: dict[str, Any] = {}
    try:
        async with (
            running_simulator(seed=92, rate=100) as sim,
            broker_process(url, sim.url, "level-b", tmp_path) as broker,
        ):
            await write_lease(own, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=120_000)
            await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 20)
            first = await _connected_status(own)
            for i, level in enumerate(BAD_LEVELS):
                body = {"op": "snapshot", "id": f"level-{i}", "type": "orderbook"}
                body.update(codes=["KRW-ETH"], level=level, timeout_ms=1000)
                answers[str(level)] = await ask(own, json.dumps(body), f"level-{i}")
            await asyncio.sleep(1.0)
            status = await _connected_status(own)
            log = broker.output()
    finally:
        await own.aclose()
    ended = log.count("leader phase ended")
    print(
        f"\n[figures] snapshot with a bad orderbook level: injected={len(BAD_LEVELS)}, "
        f"refused={sum(1 for a in answers.values() if a and a['ok'] is False)}, "
        f"epoch {first['epoch']}->{status['epoch']}, leader_phases_ended={ended}"
    )
    assert ended == 0, log[log.index("leader phase ended") :][:1500]
    for level, answer in answers.items():
        assert answer is not None and answer["ok"] is False, (level, answer)
    assert status["epoch"] == first["epoch"]


async def test_a_deeply_nested_command_is_dropped_not_fatal(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """A command nested deeper than msgspec's recursion limit is unreadable like any other."""
    url = redis_server.url
    own = aioredis.Redis.from_url(url, client_name=OWN, socket_timeout=30)
    try:
        async with (
            running_simulator(seed=93, rate=100) as sim,
            broker_process(url, sim.url, "deep-b", tmp_path) as broker,
        ):
            await write_lease(own, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=120_000)
            await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 20)
            first = await _connected_status(own)
            await ask(own, DEEP, None)
            after = await ask(own, snapshot("after", codes=["KRW-BTC"]), "after", wait=5)
            status = await _connected_status(own)
            log = broker.output()
    finally:
        await own.aclose()
    ended = log.count("leader phase ended")
    print(
        f"\n[figures] deeply nested command: injected=1, answered_after={bool(after)}, "
        f"epoch {first['epoch']}->{status['epoch']}, leader_phases_ended={ended}"
    )
    assert ended == 0, log[log.index("leader phase ended") :][:1500]
    # the command popped in the same batch is answered too
    assert after is not None and after["ok"]
    assert status["epoch"] == first["epoch"]


async def _connected_status(redis: aioredis.Redis) -> dict[str, str]:
    async def connected() -> dict[str, str] | None:
        st = await redis_status(redis)
        return st if st.get("connected") == "1" else None

    return await wait_for(connected, 10, message="leader connected")


async def _cached(redis: aioredis.Redis) -> bool:
    return bool(await redis.hget("t:last:ticker", "KRW-BTC"))  # type: ignore[misc]


def _commands() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False).filter(math.isfinite),
        st.text(max_size=12),
    )
    codes = st.lists(
        st.one_of(st.sampled_from(["KRW-BTC", "KRW-ETH", "KRW-NOPE", "krw-btc", "*"]), scalars),
        max_size=4,
    )
    obj = st.fixed_dictionaries(
        {},
        optional={
            "op": st.one_of(st.sampled_from(["snapshot", "resubscribe", "SNAPSHOT"]), scalars),
            "id": st.one_of(st.text(max_size=10), scalars),
            "type": st.one_of(st.sampled_from(["ticker", "trade", "orderbook@10000"]), scalars),
            "codes": st.one_of(codes, scalars),
            # negative and non-finite levels have their own test
            "level": st.one_of(st.sampled_from([0, 10000, "1e3", "5"]), st.none(), st.booleans()),
            "timeout_ms": st.one_of(st.integers(-10, 500), scalars),
        },
    )
    return st.one_of(obj, scalars, st.lists(scalars, max_size=3), st.binary(max_size=20))
