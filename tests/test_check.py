"""``upbit-broker check`` as a container health check runs it: a process that prints ONE line
and exits 0 (a leader is connected upstream and its status is fresh) or 1 (anything else)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker.testing import free_port, scaled, wait_for
from tests.support.sim import running_simulator

ROOT = Path(__file__).resolve().parents[1]
NS = "t"
STATUS_INTERVAL = 0.2  # so "stale" (3 intervals) comes within a test's patience
SETTINGS = {
    "UPBIT_BROKER_NAMESPACE": NS,
    "UPBIT_BROKER_STATUS_INTERVAL": str(STATUS_INTERVAL),
    "UPBIT_BROKER_LEADER_TTL": "1.5",
    "UPBIT_BROKER_BACKOFF_INITIAL": "0.2",
    "UPBIT_BROKER_BACKOFF_MAX": "1.0",
}


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "upbit-broker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env.update(SETTINGS)
    env.update(extra)
    return env


def check(redis_url: str) -> tuple[int, str]:
    """Run ``upbit-broker check``: (exit code, its one line of output)."""
    result = subprocess.run(
        [*entry_point(), "check", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        cwd=ROOT,
        env=clean_env(),
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert "Traceback" not in lines[0]
    return result.returncode, lines[0]


async def acheck(redis_url: str) -> tuple[int, str]:
    # In a thread: the simulator serves from this test's event loop meanwhile.
    return await asyncio.to_thread(check, redis_url)


@contextmanager
def broker_process(
    redis_url: str, upstream_url: str, broker_id: str, status_interval: float = STATUS_INTERVAL
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*entry_point(), "run", "--log-level", "warning"],
        env=clean_env(
            UPBIT_BROKER_REDIS_URL=redis_url,
            UPBIT_BROKER_UPSTREAM_URL=upstream_url,
            UPBIT_BROKER_BROKER_ID=broker_id,
            UPBIT_BROKER_STATUS_INTERVAL=str(status_interval),
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def status(redis: aioredis.Redis) -> dict[str, str]:
    raw: dict[Any, Any] = await redis.hgetall(f"{NS}:status")
    return {k.decode(): v.decode() for k, v in raw.items()}


async def status_age_ms(redis: aioredis.Redis) -> int:
    """How old the status is by the Redis server's clock (what ``check`` judges)."""
    seconds, micros = await redis.time()
    updated = int((await status(redis)).get("updated_ms", "0"))
    return int(seconds) * 1000 + int(micros) // 1000 - updated


def test_check_fails_without_any_broker(redis_url: str) -> None:
    code, line = check(redis_url)
    assert code == 1
    assert "no broker status" in line


def test_check_fails_when_redis_is_unreachable() -> None:
    code, line = check(f"redis://127.0.0.1:{free_port()}/0")
    assert code == 1
    assert line.startswith("error: cannot reach redis")


async def test_check_passes_with_a_healthy_leader_and_fails_once_it_stopped(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    # The leader writes its status every second (check judges it by the leader's interval: stale
    # after 3 s), so a loaded machine that delays a write by a few hundred ms is not "stale".
    interval = 1.0
    async with running_simulator(seed=5) as sim:
        with broker_process(redis_url, sim.url, "checked", status_interval=interval):

            async def connected() -> bool:
                return (await status(redis_client)).get("connected") == "1"

            await wait_for(connected, 20, message="the broker connected upstream")
            code, line = await acheck(redis_url)
            assert code == 0, line
            assert line.startswith("ok: leader checked connected, epoch 1"), line
        # The broker has exited (the context manager waited). Its status stays behind (a
        # successor reads it), so check goes by its age: stale after three status intervals.
        limit_ms = int(interval * 3000)

        async def stale() -> bool:
            return await status_age_ms(redis_client) > limit_ms

        await wait_for(stale, 15, message="the status went stale")
        code, line = await acheck(redis_url)
    assert code == 1, line
    assert "leader checked: status is stale" in line, line


async def test_check_fails_while_the_leader_cannot_reach_upstream(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    nowhere = f"ws://127.0.0.1:{free_port()}/websocket/v1"  # nothing listens there
    with broker_process(redis_url, nowhere, "cut-off"):

        async def leads() -> bool:
            st = await status(redis_client)
            return st.get("leader") == "cut-off" and "connect failed" in st.get("last_error", "")

        await wait_for(leads, 20, message="the broker leads without a connection")
        code, line = await acheck(redis_url)
    assert code == 1, line
    assert "leader cut-off is not connected upstream (connect failed" in line, line


async def write_status(redis: aioredis.Redis, **fields: str) -> None:
    """A status hash as a leader writes it, ``updated_ms`` by the Redis server clock."""
    seconds, micros = await redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    age = int(fields.pop("age_ms", "0"))
    base = {"leader": "hand", "connected": "1", "epoch": "2", "updated_ms": str(now - age)}
    await redis.hset(f"{NS}:status", mapping={**base, **fields})  # type: ignore[misc]


async def test_check_judges_a_status_by_the_interval_its_leader_wrote(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    # 2 s old: stale by this command's own interval (3 x 0.2 s), fresh by the leader's (3 x 3 s)
    # (7 s of room for the CLI to start: a loaded machine takes 2 s or more to import it)
    await write_status(redis_client, age_ms="2000", status_interval_ms="3000")
    code, line = await acheck(redis_url)
    assert code == 0, line
    assert line.startswith("ok: leader hand connected, epoch 2"), line
    await write_status(redis_client, age_ms="2000", status_interval_ms="0")  # an older broker
    code, line = await acheck(redis_url)
    assert code == 1 and "leader hand: status is stale" in line and "limit 600 ms" in line, line


async def test_check_fails_on_a_status_it_cannot_read(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    await write_status(redis_client, epoch="two")
    code, line = await acheck(redis_url)
    assert code == 1
    assert line == "unreadable status: status field epoch: expected an integer, got 'two'"
