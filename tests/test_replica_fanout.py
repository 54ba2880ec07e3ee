"""Fan-out from replicas (issue 15): a consumer writes its lease to the master and SUBSCRIBEs on
a replica (``BrokerClient(subscribe_url=...)``); a replica that stops hearing the master is
left for the master with a gap, never waited on forever. Real processes: a master and a
replica (``redis-server --replicaof``), the simulator, a broker in this loop (a process under
the failover); three sentinels for ``?role=replica`` (``tests/support/sentinel.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, broker_process, free_port, wait_for
from consumers import BrokerClient, Gap, StreamMessage
from consumers import subscriber as subscriber_module
from simulator import Simulator
from tests.support.broker_env import fast_settings, started_broker
from tests.support.processes import upstream_of
from tests.support.sentinel import link_up, running_sentinels
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

NS = "t"  # fast_settings' namespace


@dataclass
class Pair:
    master: RedisServer
    replica: RedisServer
    sim: Simulator

    def client(self, **kwargs: Any) -> BrokerClient:
        kwargs.setdefault("ping_interval", 0.5)  # also the replica's link check
        return BrokerClient(
            redis_url=self.master.url,
            subscribe_url=self.replica.url,
            namespace=NS,
            lease_ttl=3.0,
            **kwargs,
        )


@asynccontextmanager
async def master_and_replica() -> AsyncIterator[Pair]:
    """A master, its replica in sync, the simulator and a leading broker on the master."""
    no_delay = ("--repl-diskless-sync-delay", "0")
    async with RedisServer(no_delay) as master:
        replica_args = ("--replicaof", "127.0.0.1", str(master.port), *no_delay)
        async with RedisServer(replica_args) as replica:
            await wait_for(lambda: link_up(replica.port), 20, interval=0.05, message="in sync")
            async with (
                running_simulator(seed=15, rate=200) as sim,
                started_broker(fast_settings(master.url, sim.url)),
            ):
                yield Pair(master, replica, sim)


async def next_data(client: BrokerClient, timeout: float = 10.0) -> StreamMessage:
    async with asyncio.timeout(timeout):
        while True:
            item = await client.next_message(timeout)
            if isinstance(item, StreamMessage):
                return item


async def client_names(port: int) -> set[str]:
    probe = aioredis.Redis(port=port)
    try:
        return {c["name"] for c in await probe.client_list()}
    finally:
        await probe.aclose()


async def test_frames_reach_a_consumer_subscribed_on_the_replica() -> None:
    async with master_and_replica() as pair, pair.client() as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        message = await next_data(client)
        assert message.code == "KRW-BTC"
        # the lease on the master, the union upstream, the subscription on the replica only
        master = aioredis.Redis(port=pair.master.port)
        try:
            assert await master.exists(f"{NS}:lease:{client.client_id}")
        finally:
            await master.aclose()
        assert (upstream_of(pair.sim.state()) or {}).get("ticker") == {"KRW-BTC"}
        sub = f"{client.client_id}:sub"
        assert sub in await client_names(pair.replica.port)
        assert sub not in await client_names(pair.master.port)
        assert f"{client.client_id}:cmd" in await client_names(pair.master.port)
        assert client.stats.gaps == 0


@pytest.mark.parametrize("road", ["raw", "redis-py"])
@pytest.mark.parametrize("cut", ["replicaof-no-one", "replicaof-elsewhere"])
async def test_a_replica_cut_from_its_master_is_left_with_a_gap(
    cut: str, road: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's link to the master goes (it becomes a master of its own, or follows a
    master that is not there): it keeps the subscriber's connection open and answers PING,
    but hears nothing. The client reports a gap within a few check intervals, subscribes on
    the master and receives frames again."""
    monkeypatch.setattr(subscriber_module, "RAW_ROAD", road == "raw")
    async with master_and_replica() as pair, pair.client() as client:
        assert client._subscriber is not None and client._subscriber.raw == (road == "raw")
        await client.subscribe("ticker", ["KRW-BTC"])
        await next_data(client)
        replica = aioredis.Redis(port=pair.replica.port)
        try:
            if cut == "replicaof-no-one":
                await replica.execute_command("REPLICAOF", "NO", "ONE")
            else:
                await replica.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        finally:
            await replica.aclose()
        # a gap within a bound (checks every 0.5 s), never a silent wait
        gap: Gap | None = None
        async with asyncio.timeout(10):
            while gap is None:
                item = await client.next_message(10)
                if isinstance(item, Gap):
                    gap = item
        assert gap.reason == "consumer-disconnected" and gap.source == "local"
        assert "did not hear the master" in gap.detail, gap.detail
        assert gap.since_ms <= gap.until_ms
        # on the master now, and frames flow again
        assert f"{client.client_id}:sub" in await client_names(pair.master.port)
        assert (await next_data(client)).code == "KRW-BTC"
        assert client.stats.reconnects == 1


async def test_a_replica_with_its_link_down_is_never_subscribed_on() -> None:
    """At start: a replica not in sync is refused; the subscription goes to the master."""
    no_delay = ("--repl-diskless-sync-delay", "0")
    async with (
        RedisServer(no_delay) as master,
        RedisServer(("--replicaof", "127.0.0.1", str(free_port()), *no_delay)) as replica,
        BrokerClient(
            redis_url=master.url, subscribe_url=replica.url, namespace=NS, ping_interval=0.5
        ) as client,
    ):
        sub = f"{client.client_id}:sub"
        assert sub in await client_names(master.port)
        assert sub not in await client_names(replica.port)


async def test_role_replica_subscribes_on_a_replica_the_sentinels_know(tmp_path: Path) -> None:
    async with (
        running_sentinels(tmp_path) as ha,
        BrokerClient(
            redis_url=ha.url(),
            subscribe_url=ha.url(query="role=replica"),
            namespace=NS,
            ping_interval=0.5,
        ) as client,
    ):
        await client.subscribe("ticker", ["KRW-BTC"])
        sub = f"{client.client_id}:sub"
        assert sub in await client_names(ha.replica.port)
        assert sub not in await client_names(ha.master.port)
        master = aioredis.Redis(port=ha.master.port)
        replica = aioredis.Redis(port=ha.replica.port)
        try:
            assert await master.exists(f"{NS}:lease:{client.client_id}")
            events = f"{NS}:events"
            assert dict(await replica.pubsub_numsub(events))[events.encode()] == 1
            assert dict(await master.pubsub_numsub(events))[events.encode()] == 0
        finally:
            await master.aclose()
            await replica.aclose()


async def test_a_full_resync_of_the_replica_is_a_gap() -> None:
    """The replica's link breaks and the master's backlog no longer holds its offset: it
    resyncs from scratch (an RDB carries no pub/sub), losing what was published meanwhile.
    Even when no check falls into the short outage, the next one tells by the replica's new
    backlog, and the client reports a gap."""
    no_delay = ("--repl-diskless-sync-delay", "0")
    small_backlog = ("--repl-backlog-size", "16384")  # Redis's minimum
    async with RedisServer((*no_delay, *small_backlog)) as master:
        replica_args = ("--replicaof", "127.0.0.1", str(master.port), *no_delay)
        async with RedisServer(replica_args) as replica:
            await wait_for(lambda: link_up(replica.port), 20, interval=0.05, message="in sync")
            probe = aioredis.Redis(port=master.port)
            try:
                async with BrokerClient(
                    redis_url=master.url,
                    subscribe_url=replica.url,
                    namespace=NS,
                    ping_interval=3.0,  # the first check comes after the outage
                ) as client:
                    full_before = (await probe.info("stats"))["sync_full"]
                    # well within the first check: the link away, the master's backlog
                    # overrun, the link back (the replica asks for a partial resync, in vain)
                    on_replica = aioredis.Redis(port=replica.port)
                    try:
                        await on_replica.replicaof("127.0.0.1", free_port())
                        for i in range(4):
                            await probe.set(f"filler{i}", b"x" * 50_000)
                        await on_replica.replicaof("127.0.0.1", master.port)
                    finally:
                        await on_replica.aclose()
                    await wait_for(
                        lambda: _full_syncs_past(probe, full_before), 10, message="a full sync"
                    )
                    await wait_for(lambda: link_up(replica.port), 10, interval=0.02)
                    async with asyncio.timeout(10):
                        item = await client.next_message(10)
                        while not isinstance(item, Gap):
                            item = await client.next_message(10)
                    assert item.reason == "consumer-disconnected"
                    assert "resynced from scratch" in item.detail, item.detail
            finally:
                await probe.aclose()


async def _full_syncs_past(probe: aioredis.Redis, before: int) -> bool:
    full: int = (await probe.info("stats"))["sync_full"]
    return full > before


@pytest.mark.slow  # ~6 s: a Sentinel failover
async def test_a_consumer_on_the_replica_follows_a_master_failover(tmp_path: Path) -> None:
    """SIGKILL the master under a consumer subscribed on the replica (``?role=replica``):
    the replica's link goes down, the client leaves it, and once Sentinel promoted it the
    client is subscribed on the new master, with a gap, and frames flow again."""
    async with (
        running_sentinels(tmp_path) as ha,
        running_simulator(seed=16, rate=200) as sim,
        # a process, as in tests/test_sentinel.py: this test is about the consumer
        broker_process(ha.url(), sim.url, "fo", tmp_path),
        BrokerClient(
            redis_url=ha.url(),
            subscribe_url=ha.url(query="role=replica"),
            namespace=NS,
            lease_ttl=3.0,
            ping_interval=0.5,
        ) as client,
    ):
        await client.subscribe("ticker", ["KRW-BTC"])
        await next_data(client, 30)  # the broker process starts meanwhile
        assert f"{client.client_id}:sub" in await client_names(ha.replica.port)
        old_port = ha.master.port
        ha.master.kill()
        gap: Gap | None = None
        async with asyncio.timeout(30):
            while gap is None:
                item = await client.next_message(30)
                if isinstance(item, Gap) and item.source == "local":
                    gap = item
        assert gap.reason == "consumer-disconnected"
        await ha.wait_failover(old_port)
        assert (await next_data(client, 20)).code == "KRW-BTC"
        assert f"{client.client_id}:sub" in await client_names(ha.replica.port)


@pytest.mark.parametrize("road", ["raw", "redis-py"])
async def test_a_replica_promoted_under_us_is_no_slow_reader(
    road: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Sentinel does to the replica it promotes: ``REPLICAOF NO ONE``, then ``CLIENT KILL
    TYPE normal`` and ``TYPE pubsub``. The same server (same ``run_id``) closed us, which would
    read as "it dropped a slow reader"; its role changed, so the break is
    ``consumer-disconnected``. (Here the promoted node is also the master the leases go to, as
    through Sentinel.)"""
    monkeypatch.setattr(subscriber_module, "RAW_ROAD", road == "raw")
    no_delay = ("--repl-diskless-sync-delay", "0")
    async with RedisServer(no_delay) as master:
        replica_args = ("--replicaof", "127.0.0.1", str(master.port), *no_delay)
        async with RedisServer(replica_args) as replica:
            await wait_for(lambda: link_up(replica.port), 20, interval=0.05, message="in sync")
            probe = aioredis.Redis(port=replica.port)

            async def lease_master_replid() -> str | None:
                # the replica's own view: its master's id now, its own once promoted
                info = await probe.info("replication")
                return str(info["master_replid"])

            breaks: list[subscriber_module.Break] = []

            async def restored(incident: subscriber_module.Break) -> None:
                breaks.append(incident)

            sub = subscriber_module.Subscriber(
                replica.url,
                name="promoted-test",
                on_message=lambda *_: None,
                on_restored=restored,
                ping_interval=30.0,  # no link check: the CLIENT KILL comes first
                master_replid=lease_master_replid,
            )
            task = asyncio.create_task(sub.run())
            try:
                await sub.subscribe([b"ch"])
                await sub.wait_connected(10)
                await probe.execute_command("REPLICAOF", "NO", "ONE")
                await probe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                await wait_for(lambda: breaks, 10, message="resubscribed")
            finally:
                task.cancel()
                await asyncio.wait({task})
                await sub.aclose()
                await probe.aclose()
            [incident] = breaks
            assert incident.reason == "consumer-disconnected", incident
            assert not incident.server_changed


async def test_sentinel_promoting_the_replica_under_us_is_no_slow_reader(tmp_path: Path) -> None:
    """``SENTINEL FAILOVER``: Sentinel promotes the replica we subscribe on and closes its
    clients (``CLIENT KILL TYPE pubsub``). The same server (same ``run_id``) closed us, which
    would read as "it dropped a slow reader"; its role changed, so the gap says
    ``consumer-disconnected`` and the subscription goes on."""
    async with (
        running_sentinels(tmp_path) as ha,
        BrokerClient(
            redis_url=ha.url(),
            subscribe_url=ha.url(query="role=replica"),
            namespace=NS,
            ping_interval=30.0,  # no link check before Sentinel's CLIENT KILL
        ) as client,
    ):
        await client.subscribe("ticker", ["KRW-BTC"])
        assert f"{client.client_id}:sub" in await client_names(ha.replica.port)
        sentinel = aioredis.Redis(port=ha.sentinels[0].port)
        try:
            await sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        finally:
            await sentinel.aclose()
        gap: Gap | None = None
        async with asyncio.timeout(20):
            while gap is None:
                item = await client.next_message(20)
                if isinstance(item, Gap):
                    gap = item
        assert gap.reason == "consumer-disconnected", gap
        assert client.stats.fell_behind == 0
        # subscribed again (where the sentinels pointed at that moment: the promoted replica,
        # or the old master until Sentinel converts it, which closes its clients in turn)
        names = await client_names(ha.replica.port) | await client_names(ha.master.port)
        assert f"{client.client_id}:sub" in names
