"""The consumer and operator CLI, run as subprocesses against a real redis-server.

The broker is played by the test (frames PUBLISHed by hand, a status hash written by hand,
commands answered by hand), so these tests need no broker service.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from broker.leases import LeaseStore
from broker.testing import free_port, scaled, wait_for
from broker.upbit.types import SubscriptionSet
from cli.main import app
from cli.ops import check_status, parse_status
from consumers.items import now_ms

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "data" / "upbit_examples"  # copies of ../shared/upbit/examples
NS = "upbit"


def ticker_frame(code: str, price: float) -> bytes:
    frame = {
        "type": "ticker",
        "code": code,
        "opening_price": 100.0,
        "high_price": 110.0,
        "low_price": 90.0,
        "trade_price": price,
        "prev_closing_price": 100.0,
        "change": "RISE",
        "change_price": 1.0,
        "signed_change_price": 1.0,
        "change_rate": 0.01,
        "signed_change_rate": 0.01,
        "trade_volume": 0.5,
        "acc_trade_volume": 10.0,
        "acc_trade_volume_24h": 20.0,
        "acc_trade_price": 1000.0,
        "acc_trade_price_24h": 2000.0,
        "trade_date": "20240101",
        "trade_time": "000000",
        "trade_timestamp": 1_704_067_200_000,
        "ask_bid": "BID",
        "acc_ask_volume": 5.0,
        "acc_bid_volume": 5.0,
        "highest_52_week_price": 200.0,
        "highest_52_week_date": "2023-06-01",
        "lowest_52_week_price": 50.0,
        "lowest_52_week_date": "2023-01-01",
        "market_state": "ACTIVE",
        "timestamp": 1_704_067_200_001,
        "stream_type": "REALTIME",
    }
    return json.dumps(frame, separators=(",", ":")).encode()


def cli(*args: str, redis_url: str | None = None, **kwargs: Any) -> list[str]:
    argv = [sys.executable, "-m", "cli.main", *args]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    return argv


def spawn(*args: str, redis_url: str) -> subprocess.Popen[bytes]:
    """A long-running CLI command (tail, top) with its output piped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_BROKER_")}
    return subprocess.Popen(
        cli(*args, redis_url=redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


def run_cli(
    *args: str, redis_url: str | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_BROKER_")}
    return subprocess.run(
        cli(*args, redis_url=redis_url),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        cwd=ROOT,
        env=env,
    )


async def arun_cli(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, redis_url=redis_url)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


async def lease_clients(redis: aioredis.Redis) -> list[str]:
    return sorted(m.decode() for m in await redis.zrange(f"{NS}:leases", 0, -1))


# -- tail -------------------------------------------------------------------------------------


async def test_tail_json_count_prints_frames_and_releases(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    proc = spawn("tail", "ticker", "KRW-BTC,KRW-ETH", "--count", "3", "--json", redis_url=redis_url)
    try:
        await wait_for(lambda: lease_clients(redis_client), timeout=10, message="tail's lease")
        [client_id] = await lease_clients(redis_client)
        subs = await redis_client.hget(f"{NS}:lease:{client_id}", "subs")  # type: ignore[misc]
        assert json.loads(subs) == {"ticker": ["KRW-BTC", "KRW-ETH"]}
        frames = [
            ticker_frame("KRW-BTC", 1),
            ticker_frame("KRW-ETH", 2),
            ticker_frame("KRW-BTC", 3),
        ]
        # a multi-line frame (the shared example is pretty-printed) still prints as one line
        pretty = (EXAMPLES / "ticker.default.json").read_bytes()
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", frames[0])
        await redis_client.publish(f"{NS}:ticker:KRW-ETH", frames[1])
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", pretty)
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", frames[2])  # past --count
        out, err = await asyncio.to_thread(proc.communicate, timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].encode() == frames[0] and lines[1].encode() == frames[1]
    assert json.loads(lines[2]) == json.loads(pretty)
    assert await lease_clients(redis_client) == []


async def test_tail_human_output_and_sigterm_releases(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # events are accepted only from the leader the status names (design.md): named before
    # tail starts, so it accepts the gap at once, before the frame published after it (one
    # connection, in order): once the frame's line is out, the gap's is too.
    await redis_client.hset(f"{NS}:status", mapping={"leader": "b-1"})
    proc = spawn("tail", "ticker", "KRW-BTC", redis_url=redis_url)
    try:
        await wait_for(lambda: lease_clients(redis_client), timeout=10, message="tail's lease")
        gap = {"event": "gap", "epoch": 2, "since_ms": 1, "until_ms": 5, "reason": "stall"}
        await redis_client.publish(f"{NS}:events", json.dumps({**gap, "broker": "b-1"}))
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", ticker_frame("KRW-BTC", 12345))
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"KRW-BTC" in line and b"12,345" in line and b"+1.00%" in line
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"gap: stall from broker" in err
    assert await lease_clients(redis_client) == []


async def test_tail_duration_exits_zero(redis_url: str, redis_client: aioredis.Redis) -> None:
    start = time.monotonic()
    result = await arun_cli("tail", "trade", "KRW-BTC", "--duration", "0.5", redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < scaled(15)
    assert await lease_clients(redis_client) == []


async def test_top_shows_a_live_table(redis_url: str, redis_client: aioredis.Redis) -> None:
    proc = spawn("top", "KRW-BTC", "KRW-ETH", "--duration", "1.5", redis_url=redis_url)
    try:
        await wait_for(lambda: lease_clients(redis_client), timeout=10, message="top's lease")
        await redis_client.publish(f"{NS}:ticker:KRW-ETH", ticker_frame("KRW-ETH", 4_321_000))
        out, err = await asyncio.to_thread(proc.communicate, timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    text = out.decode()
    assert "KRW-BTC" in text and "KRW-ETH" in text and "4,321,000" in text and "+1.00%" in text
    assert await lease_clients(redis_client) == []


async def test_tail_prints_the_brokers_notices_about_its_own_lease(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    proc = spawn("tail", "ticker", "KRW-BTC", redis_url=redis_url)
    try:
        await wait_for(lambda: lease_clients(redis_client), timeout=10, message="tail's lease")
        [client_id] = await lease_clients(redis_client)
        why = "serving 1 stream, rejected 1 entry: invalid market code 'krw-eth' in ticker"
        await redis_client.hset(f"{NS}:status", mapping={"leader": "b-1"})  # the leader
        for owner in ("someone-else", client_id):
            event = {"event": "lease", "client_id": owner, "state": "partial", "why": why}
            event["broker"] = "b-1"
            await redis_client.publish(f"{NS}:events", json.dumps(event))
        # a frame after the events: once it is printed, the events were read
        await redis_client.publish(f"{NS}:ticker:KRW-BTC", ticker_frame("KRW-BTC", 1))
        assert proc.stdout is not None
        assert b"KRW-BTC" in await asyncio.to_thread(proc.stdout.readline)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err.decode().splitlines() == [f"lease {client_id}: partial: {why}"]


async def test_tail_and_top_say_once_when_no_broker_serves_the_namespace(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """After NO_BROKER_AFTER (3 s) without data: one line on stderr, and they keep waiting
    (exit 0 at --duration). With a live broker's status, nothing is said."""

    async def live_status() -> None:  # a leader that keeps its status fresh
        while True:
            seconds, micros = await redis_client.time()
            now = seconds * 1000 + micros // 1000
            fields = {"leader": "b1", "connected": "1", "epoch": "1", "updated_ms": str(now)}
            await redis_client.hset("served:status", mapping=fields)  # type: ignore[misc]
            await asyncio.sleep(0.2)  # a broker's status interval, not synchronisation

    writer = asyncio.create_task(live_status())
    try:
        tail, top, served = await asyncio.gather(
            arun_cli("tail", "ticker", "KRW-BTC", "--duration", "4", redis_url=redis_url),
            arun_cli("top", "KRW-BTC", "--duration", "4", redis_url=redis_url),
            arun_cli(
                "tail", "ticker", "KRW-BTC", "--duration", "4", "--namespace", "served",
                redis_url=redis_url,
            ),
        )  # fmt: skip
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    said = (
        "no data after 3s: no broker is serving namespace 'upbit' "
        "(no broker status: no leader is running); still waiting"
    )
    for result in (tail, top):
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [said]
    assert served.returncode == 0 and served.stderr == ""


def test_top_help_names_no_orderbook_depth() -> None:
    text = invoke("top", "--help").output
    assert "depth" not in text.lower() and "KRW-BTC" in text


# -- errors a person makes --------------------------------------------------------------------


async def test_user_errors_are_one_line_without_traceback(redis_url: str) -> None:
    dead = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    unreachable, bad_code, bad_type, bad_url = await asyncio.gather(
        arun_cli("tail", "ticker", "KRW-BTC", redis_url=dead),
        arun_cli("tail", "ticker", "btc", redis_url=redis_url),
        arun_cli("snapshot", "tickr", "KRW-BTC", redis_url=redis_url),
        arun_cli("leases", redis_url="http://u:s3cret@host/0"),
    )
    assert_one_line_error(unreachable, "cannot reach redis", "127.0.0.1")
    assert "s3cret" not in unreachable.stderr and unreachable.returncode == 1
    assert_one_line_error(bad_code, "invalid market code 'btc'")
    assert bad_code.returncode == 2
    assert_one_line_error(bad_type, "unknown data type 'tickr'")
    assert bad_type.returncode == 2
    assert_one_line_error(bad_url, "redis url")
    assert "s3cret" not in bad_url.stderr and bad_url.returncode == 2


def invoke(*args: str) -> Any:
    """In-process (typer's runner): the same code path as the subprocesses, minus startup."""
    return CliRunner().invoke(app, list(args), env={"UPBIT_BROKER_REDIS_URL": None})


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("status", "--redis-url", "redis://:s3cret@127.0.0.1:{port}/0"), 1, "cannot reach redis"),
        (("check", "--redis-url", "redis://127.0.0.1:{port}/0"), 1, "cannot reach redis"),
        (("check", "--namespace", "no spaces"), 2, "invalid namespace"),
        (("snapshot", "ticker", "KRW-BTC", "--redis-url", "redis://h:notaport/0"), 2, "redis url"),
        (("top", "KRW-BTC", "KRW BTC", "--redis-url", "redis://127.0.0.1:{port}/0"), 2, "invalid"),
    ],
)
def test_more_user_errors_in_process(args: tuple[str, ...], code: int, needle: str) -> None:
    port = str(free_port())
    result = invoke(*(a.replace("{port}", port) for a in args))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "s3cret" not in result.stderr


# -- snapshot ---------------------------------------------------------------------------------


async def answer_commands(redis: aioredis.Redis, reply: dict[str, Any]) -> dict[str, Any]:
    popped = await redis.blpop([f"{NS}:requests"], timeout=15)  # type: ignore[misc]
    assert popped is not None
    command = json.loads(popped[1])
    await redis.rpush(  # type: ignore[misc]
        f"{NS}:reply:{command['id']}", json.dumps({"id": command["id"], **reply})
    )
    return dict(command)


async def test_snapshot_json_and_missing(redis_url: str, redis_client: aioredis.Redis) -> None:
    btc = json.loads(ticker_frame("KRW-BTC", 7))
    leader = asyncio.create_task(
        answer_commands(redis_client, {"ok": True, "frames": {"KRW-BTC": btc}, "missing": []})
    )
    result = await arun_cli("snapshot", "ticker", "KRW-BTC", "--json", redis_url=redis_url)
    command = await leader
    assert result.returncode == 0, result.stderr
    assert command["op"] == "snapshot" and command["codes"] == ["KRW-BTC"]
    assert json.loads(result.stdout) == {"KRW-BTC": btc}

    leader = asyncio.create_task(
        answer_commands(
            redis_client, {"ok": True, "frames": {"KRW-BTC": btc}, "missing": ["KRW-ETH"]}
        )
    )
    result = await arun_cli("snapshot", "ticker", "KRW-BTC", "KRW-ETH", redis_url=redis_url)
    await leader
    assert result.returncode == 1
    assert "KRW-BTC" in result.stdout and "7" in result.stdout
    assert_one_line_error(result, "KRW-ETH")

    nobody = await asyncio.to_thread(
        invoke, "snapshot", "ticker", "KRW-BTC", "--timeout", "0.3", "--redis-url", redis_url
    )
    assert nobody.exit_code == 1 and "no broker answered" in nobody.stderr


# -- status, check ----------------------------------------------------------------------------


async def write_status(redis: aioredis.Redis, *, connected: bool, age_ms: int) -> None:
    seconds, micros = await redis.time()
    now = seconds * 1000 + micros // 1000
    await redis.hset(  # type: ignore[misc]
        f"{NS}:status",
        mapping={
            "leader": "broker-a",
            "connected": "1" if connected else "0",
            "epoch": "4",
            "reconnects": "2",
            "resubscribes": "9",
            "verify_mismatches": "1",
            "deferred_sends": "3",
            "frames_dropped_by_reason": json.dumps({"unleased": 5, "redis": 1}),
            "status_interval_ms": "3000",  # 9 s fresh: room for a slow CLI start
            "desired": json.dumps({"ticker": ["KRW-BTC"]}),
            "upstream": json.dumps({"ticker": ["KRW-BTC"]}),
            "last_error": "" if connected else "upstream closed 1006",
            "frames_in": "100",
            "updated_ms": str(now - age_ms),
            "upstream_url": "wss://api.upbit.com/websocket/v1",
            "quiet_codes": "[]",
        },
    )


async def test_status_and_check(redis_url: str, redis_client: aioredis.Redis) -> None:
    none_status, none_check = await asyncio.gather(
        arun_cli("status", "--json", redis_url=redis_url),
        arun_cli("check", redis_url=redis_url),
    )  # nothing written yet
    assert_one_line_error(none_status, "no status")
    assert none_status.returncode == 1
    assert_one_line_error(none_check, "no broker status")
    assert none_check.returncode == 1

    await write_status(redis_client, connected=True, age_ms=100)
    status, check = await asyncio.gather(
        arun_cli("status", "--json", redis_url=redis_url),
        arun_cli("check", redis_url=redis_url),
    )
    human = await asyncio.to_thread(invoke, "status", "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["connected"] is True and info["leader"] == "broker-a"
    assert info["epoch"] == 4 and info["reconnects"] == 2
    # every integer is a number (these two were strings), the breakdown an object
    assert info["verify_mismatches"] == 1 and info["deferred_sends"] == 3
    assert info["frames_dropped"] == 6 and info["frames_dropped_by_reason"]["unleased"] == 5
    assert info["status_interval_ms"] == 3000 and info["stale_after_ms"] == 9000
    assert info["desired"] == {"ticker": ["KRW-BTC"]}
    assert info["upstream"] == {"ticker": ["KRW-BTC"]}
    assert 0 <= info["age_ms"] < 5000
    assert human.exit_code == 0 and "broker-a" in human.stdout
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: leader broker-a connected")

    # stale (older than 3 x status_interval, 9 s) and disconnected: the same check, in-process
    await write_status(redis_client, connected=True, age_ms=10_000)
    raw = await redis_client.hgetall(f"{NS}:status")  # type: ignore[misc]
    healthy, line = check_status(parse_status(raw, now_ms()), status_interval=1.0)
    assert not healthy and "stale" in line
    await write_status(redis_client, connected=False, age_ms=0)
    raw = await redis_client.hgetall(f"{NS}:status")  # type: ignore[misc]
    healthy, line = check_status(parse_status(raw, now_ms()), status_interval=1.0)
    assert not healthy and "not connected" in line and "upstream closed 1006" in line
    await write_status(redis_client, connected=True, age_ms=0)
    await redis_client.hset(f"{NS}:status", "epoch", "four")  # type: ignore[misc]
    raw = await redis_client.hgetall(f"{NS}:status")  # type: ignore[misc]
    healthy, line = check_status(parse_status(raw, now_ms()), status_interval=1.0)
    assert not healthy
    assert line == "unreadable status: status field epoch: expected an integer, got 'four'"
    broken = await arun_cli("status", "--json", redis_url=redis_url)
    assert broken.returncode == 1
    assert_one_line_error(broken, "unreadable status at upbit:status: status field epoch")


# -- leases -----------------------------------------------------------------------------------


async def test_leases_json_lists_valid_and_invalid(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    store = LeaseStore(redis_client, NS)
    await store.write(
        "app-b",
        SubscriptionSet.of({"ticker": ["KRW-ETH"], "orderbook": ["KRW-BTC.15"]}),
        ttl_ms=30_000,
        host="h1",
        pid=42,
    )
    await redis_client.hset(  # type: ignore[misc]
        f"{NS}:lease:broken", mapping={"v": "1", "client_id": "broken", "subs": "{nope"}
    )
    await redis_client.zadd(f"{NS}:leases", {"broken": 1})
    result = await arun_cli("leases", "--json", redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    rows = {row["client_id"]: row for row in json.loads(result.stdout)}
    good = rows["app-b"]
    assert good["subscriptions"] == {"orderbook": ["KRW-BTC.15"], "ticker": ["KRW-ETH"]}
    assert good["host"] == "h1" and good["pid"] == 42
    assert 20_000 < good["expires_in_ms"] <= 30_000
    assert rows["broken"]["valid"] is False and rows["broken"]["invalid"]

    human = await arun_cli("leases", redis_url=redis_url)
    assert human.returncode == 0 and "app-b" in human.stdout and "invalid" in human.stdout


# -- resubscribe ------------------------------------------------------------------------------


async def test_resubscribe(redis_url: str, redis_client: aioredis.Redis) -> None:
    nobody = await asyncio.to_thread(
        invoke, "resubscribe", "--timeout", "0.5", "--redis-url", redis_url
    )
    assert nobody.exit_code == 1
    assert nobody.stderr.strip().splitlines() == [
        "error: no broker answered 'resubscribe' within 0.5s "
        "(is a broker running for namespace 'upbit'?)"
    ]
    assert await redis_client.llen(f"{NS}:requests") == 0  # type: ignore[misc]

    leader = asyncio.create_task(
        answer_commands(redis_client, {"ok": True, "epoch": 5, "upstream": {"ticker": ["KRW-BTC"]}})
    )
    result = await arun_cli("resubscribe", "--json", redis_url=redis_url)
    command = await leader
    assert command["op"] == "resubscribe"
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "ok": True,
        "epoch": 5,
        "upstream": {"ticker": ["KRW-BTC"]},
    }


@pytest.mark.parametrize(
    "command", ["tail", "snapshot", "top", "status", "leases", "check", "resubscribe", "demo"]
)
def test_every_command_reads_redis_url_and_namespace_from_env(command: str) -> None:
    # in-process (help text only): the subprocess tests above cover the real runs
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "UPBIT_BROKER_REDIS_URL" in result.output
    assert "UPBIT_BROKER_NAMESPACE" in result.output


def test_demo_without_redis_server_or_lua_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    import cli.demo

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(cli.demo.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lupa" else real_find_spec(name, *a),
    )
    result = invoke("demo", "--duration", "1")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: demo needs a Redis")
    assert "redis-server" in result.stderr and "Traceback" not in result.stderr
