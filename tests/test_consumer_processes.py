"""Consumers in separate OS processes: each holds its own lease; a SIGKILLed one expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis

from broker.testing import scaled, wait_for

# A minimal consumer process: leases what argv says, prints "ready", then one line per item.
CONSUMER = r"""
import asyncio, json, signal, sys
from consumers import BrokerClient, Gap

async def main() -> None:
    url, client_id, ttl, type_, *codes = sys.argv[1:]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with BrokerClient(redis_url=url, client_id=client_id, lease_ttl=float(ttl)) as client:
        await client.subscribe(type_, codes)
        print("ready", flush=True)

        async def pump() -> None:
            async for item in client.messages():
                if isinstance(item, Gap):
                    print(json.dumps({"gap": item.reason}), flush=True)
                else:
                    print(json.dumps({"code": item.code, "raw": item.raw.decode()}), flush=True)

        task = asyncio.create_task(pump())
        await stop.wait()
        task.cancel()
    print("bye", flush=True)

asyncio.run(main())
"""


@contextmanager
def consumer(
    url: str, client_id: str, ttl: float, type_: str, *codes: str
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, url, client_id, str(ttl), type_, *codes],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes the pipes


async def test_two_processes_hold_leases_and_a_killed_one_expires(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    with (
        consumer(redis_url, "proc-a", 1.0, "ticker", "KRW-BTC") as a,
        consumer(redis_url, "proc-b", 5.0, "ticker", "KRW-ETH", "KRW-XRP") as b,
    ):
        subs_a = json.loads(await redis_client.hget("upbit:lease:proc-a", "subs"))  # type: ignore[misc]
        subs_b = json.loads(await redis_client.hget("upbit:lease:proc-b", "subs"))  # type: ignore[misc]
        assert subs_a == {"ticker": ["KRW-BTC"]}
        assert subs_b == {"ticker": ["KRW-ETH", "KRW-XRP"]}
        pid_a = int(await redis_client.hget("upbit:lease:proc-a", "pid"))  # type: ignore[misc]
        assert pid_a == a.pid

        # each process receives its own streams only
        await redis_client.publish("upbit:ticker:KRW-ETH", b'{"x":1}')
        await redis_client.publish("upbit:ticker:KRW-BTC", b'{"x":2}')
        assert b.stdout is not None and a.stdout is not None
        assert json.loads(b.stdout.readline()) == {"code": "KRW-ETH", "raw": '{"x":1}'}
        assert json.loads(a.stdout.readline()) == {"code": "KRW-BTC", "raw": '{"x":2}'}

        # SIGKILL: no release, the lease expires after its TTL (1 s) by itself
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=5)

        async def gone() -> bool:
            return await redis_client.exists("upbit:lease:proc-a") == 0

        await wait_for(gone, timeout=3, message="proc-a's lease to expire")
        assert await redis_client.exists("upbit:lease:proc-b") == 1

        # SIGTERM: a clean exit releases at once (the test ttl is 5 s, checked well before)
        b.send_signal(signal.SIGTERM)
        out, err = b.communicate(timeout=scaled(10))
        assert b.returncode == 0, err
        assert out.strip().endswith("bye")
        assert await redis_client.exists("upbit:lease:proc-b") == 0
        assert await redis_client.zscore("upbit:leases", "proc-b") is None
