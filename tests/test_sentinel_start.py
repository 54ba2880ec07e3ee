"""A broker started through Sentinel while no master can be reached (a failover in progress)
waits for one, logging, instead of exiting with a configuration error; a plain URL to nothing
is still the one-line setup error. Real processes: a sentinel, then the master it monitors,
``upbit-broker run``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, free_port, wait_for
from broker.testing import read_status as redis_status
from tests.support.sentinel import SERVICE, SentinelProcess
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)


async def test_a_broker_waits_for_the_sentinels_to_name_a_master(tmp_path: Path) -> None:
    master_port = free_port()
    sentinel = SentinelProcess(master_port, tmp_path)  # its master is not there yet
    await asyncio.to_thread(sentinel.start)
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0"
        async with (
            running_simulator(seed=4, rate=50) as sim,
            broker_process(url, sim.url, "early", tmp_path) as broker,
        ):
            await wait_for(
                lambda: "no redis master through" in broker.output(), 20, message="the wait"
            )
            assert broker.alive, broker.output()
            assert "configuration" not in broker.output().lower()
            async with RedisServer(port=master_port):
                probe = aioredis.Redis(port=master_port)
                try:

                    async def leading() -> bool:
                        status = await redis_status(probe)
                        return status.get("leader") == "early"

                    await wait_for(leading, 30, interval=0.1, message="the broker leading")
                finally:
                    await probe.aclose()
            assert broker.alive
    finally:
        sentinel.kill()


async def test_a_plain_url_to_nothing_is_still_a_setup_error(tmp_path: Path) -> None:
    async with (
        running_simulator(seed=4, rate=50) as sim,
        broker_process(f"redis://127.0.0.1:{free_port()}/0", sim.url, "nowhere", tmp_path) as b,
    ):
        await wait_for(lambda: not b.alive, 30, message="the broker exiting")
        assert "cannot use redis" in b.output(), b.output()
        assert "no redis master through" not in b.output()
