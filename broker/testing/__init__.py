"""Test tooling for upbit-broker and for your own consumers' tests (testing layer).

Real servers on free ports, started and stopped by context managers, the way websockets' and
uvicorn's own test utilities work: a ``redis-server`` you can kill and restart, the Upbit
simulator, brokers and consumers as real processes, and waits with deadlines instead of
sleeps. The project's tests and benchmarks use exactly this.

    from broker.testing import RedisServer, broker_process, simulator_process, wait_for
    from consumers import BrokerClient

    async def test_my_bot_gets_prices(tmp_path):
        async with (
            RedisServer() as redis,                              # redis-server on a free port
            simulator_process(tmp_path, rate=200) as sim,        # an offline Upbit
            broker_process(redis.url, sim.url, "b1", tmp_path),  # upbit-broker run
            BrokerClient(redis_url=redis.url, namespace="t") as client,
        ):
            await client.subscribe("ticker", ["KRW-BTC"])
            async for item in client.messages():
                assert item.kind == "data" and item.code == "KRW-BTC"
                break

Modules: :mod:`broker.testing.redis` (:class:`RedisServer`, :func:`write_lease`,
:func:`read_status`), :mod:`broker.testing.processes` (the simulator, brokers and CLI commands
as subprocesses), :mod:`broker.testing.consumer` (a consumer process recording every frame),
:mod:`broker.testing.wait` (:func:`wait_for`; every deadline scales with
``UPBIT_TEST_TIME_SCALE``) and :mod:`broker.testing.fake_redis` (an in-process fakeredis, the
demo's fallback). Brokers started here use namespace ``t`` and short TTLs
(:data:`FAST_BROKER_ENV`).

Layer: tooling, never imported by production code. It imports the broker's lease store, keys
and the protocol core; the simulator, the consumers and the CLI run in child processes.
"""

from __future__ import annotations

from broker.testing.consumer import ConsumerProcess, consumer_process
from broker.testing.processes import (
    FAST_BROKER_ENV,
    BrokerProcess,
    CliResult,
    ManagedProcess,
    SimulatorProcess,
    arun_cli,
    broker_process,
    clean_env,
    http_get,
    run_cli,
    simulator_process,
    workdir,
)
from broker.testing.redis import RedisServer, free_port, read_status, write_lease
from broker.testing.wait import WaitTimeout, scaled, wait_for, wait_for_sync

__all__ = [
    "FAST_BROKER_ENV",
    "BrokerProcess",
    "CliResult",
    "ConsumerProcess",
    "ManagedProcess",
    "RedisServer",
    "SimulatorProcess",
    "WaitTimeout",
    "arun_cli",
    "broker_process",
    "clean_env",
    "consumer_process",
    "free_port",
    "http_get",
    "read_status",
    "run_cli",
    "scaled",
    "simulator_process",
    "wait_for",
    "wait_for_sync",
    "workdir",
    "write_lease",
]
