"""``tail`` and ``top`` subscribe on ``--subscribe-url`` / ``UPBIT_BROKER_SUBSCRIBE_URL`` (a
replica) while their lease goes to ``--redis-url`` (the master): the CLI as a subprocess
against a real master and replica; the broker is played by the test (frames PUBLISHed on the
master by hand)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from broker.testing import RedisServer, scaled, wait_for
from cli.main import app
from tests.support.sentinel import link_up
from tests.test_cli_consumers import lease_clients, ticker_frame

ROOT = Path(__file__).resolve().parents[1]
NS = "upbit"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("command", ["tail", "top"])
def test_the_consumer_commands_take_a_subscribe_url(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "--subscribe-url" in result.output
    assert "UPBIT_BROKER_SUBSCRIBE_URL" in result.output
    assert "redis+sentinel://" in result.output  # --redis-url names the sentinel schemes
    assert "role=replica" in result.output


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)


async def test_tail_subscribes_on_the_replica_and_leases_on_the_master() -> None:
    no_delay = ("--repl-diskless-sync-delay", "0")
    async with RedisServer(no_delay) as master:
        replica_args = ("--replicaof", "127.0.0.1", str(master.port), *no_delay)
        async with RedisServer(replica_args) as replica:
            await wait_for(lambda: link_up(replica.port), 20, interval=0.05, message="in sync")
            env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_BROKER_")}
            env["UPBIT_BROKER_SUBSCRIBE_URL"] = replica.url  # the variable, not the flag
            argv = [sys.executable, "-m", "cli.main", "tail", "ticker", "KRW-BTC"]
            argv += ["--count", "1", "--json", "--redis-url", master.url]
            proc = spawn(argv, env)
            on_master = aioredis.Redis(port=master.port)
            on_replica = aioredis.Redis(port=replica.port)
            try:
                await wait_for(lambda: lease_clients(on_master), 15, message="tail's lease")
                channel = f"{NS}:ticker:KRW-BTC"

                async def subscribed_on_replica() -> bool:
                    counts = dict(await on_replica.pubsub_numsub(channel))
                    return counts.get(channel.encode(), 0) == 1

                await wait_for(subscribed_on_replica, 15, message="tail on the replica")
                assert dict(await on_master.pubsub_numsub(channel))[channel.encode()] == 0
                frame = ticker_frame("KRW-BTC", 7)
                await on_master.publish(channel, frame)  # reaches it through the replica
                out, err = await asyncio.to_thread(proc.communicate, timeout=scaled(15))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
                await on_master.aclose()
                await on_replica.aclose()
            assert proc.returncode == 0, err
            assert out.decode().splitlines() == [frame.decode()]
