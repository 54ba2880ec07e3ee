"""The Redis Cluster fixture (``tests/support/cluster.py``) does what tests of sharded pub/sub
and in-cluster failover rely on: every slot served once a cluster is up, SPUBLISH delivered by
the owner of a channel's slot and MOVED elsewhere, a slot moved with its keys, ASK while a slot
is half migrated, a replica taking over a killed master (``-m slow``). Real processes: three
masters (six nodes with replicas) and ``redis-cli``; each test talks to single nodes."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError

from broker.testing import wait_for
from tests.support.cluster import NO_REDIS_CLI, SLOTS, ClusterSetup, running_cluster

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def node(port: int) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the one node on ``port`` (no cluster routing)."""
    client = aioredis.Redis(port=port, socket_connect_timeout=1)
    try:
        yield client
    finally:
        await client.aclose()


async def another_master(cluster: ClusterSetup, than: int) -> int:
    return next(port for port in await cluster.masters() if port != than)


async def key_served_by(cluster: ClusterSetup, port: int) -> bytes:
    for i in range(1000):
        key = f"k{i}".encode()
        if await cluster.owner(await cluster.slot_of(key)) == port:
            return key
    raise AssertionError(f"no key k0..k999 is served by {port}")


async def test_a_cluster_comes_up_with_every_slot_served_and_its_url_names_every_node(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        masters = await cluster.masters()
        assert len(masters) == 3
        ranges = sorted(rng for owned in masters.values() for rng in owned)
        assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
        assert all(a[1] + 1 == b[0] for a, b in pairwise(ranges))
        ports = [n.port for n in cluster.nodes]
        assert cluster.url() == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        assert cluster.url("rediss+cluster").startswith("rediss+cluster://127.0.0.1:")
        for port in ports:
            async with node(port) as client:
                info: bytes = await client.execute_command("CLUSTER", "INFO")
                assert b"cluster_state:ok" in info
    assert not any(n.alive for n in cluster.nodes)


async def test_the_owner_delivers_a_sharded_publish_and_another_master_answers_moved(
    tmp_path: Path,
) -> None:
    channel = b"t:ticker:KRW-BTC"
    async with running_cluster(tmp_path) as cluster:
        owner = await cluster.owner(await cluster.slot_of(channel))
        async with node(owner) as subscriber_client, node(owner) as publisher:
            subscriber = subscriber_client.pubsub()
            try:
                await subscriber.ssubscribe(channel)
                confirmation = await subscriber.get_message(timeout=5)
                assert confirmation is not None and confirmation["type"] == "ssubscribe"
                receivers = await publisher.execute_command("SPUBLISH", channel, b"frame")
                assert receivers == 1

                async def delivered() -> dict[str, Any] | None:
                    message: dict[str, Any] | None = await subscriber.get_message(timeout=0.1)
                    return message

                message = await wait_for(delivered, 5, message="the sharded message")
                assert message["type"] == "smessage"
                assert (message["channel"], message["data"]) == (channel, b"frame")
            finally:
                await subscriber.aclose()
        async with node(await another_master(cluster, owner)) as elsewhere:
            with pytest.raises(MovedError) as moved:
                await elsewhere.execute_command("SPUBLISH", channel, b"frame")
            assert moved.value.port == owner


async def test_move_slot_moves_a_slot_with_its_keys(tmp_path: Path) -> None:
    # more keys than one MIGRATE batch, all in one slot (one hash tag)
    keys = [f"{{moving}}:{i}".encode() for i in range(250)]
    async with running_cluster(tmp_path) as cluster:
        slot = await cluster.slot_of(keys[0])
        source = await cluster.owner(slot)
        target = await another_master(cluster, source)
        async with node(source) as client:
            await client.mset({key: b"v" for key in keys})
        await cluster.move_slot(slot, target)
        assert await cluster.owner(slot) == target
        async with node(target) as client:
            assert await client.mget(keys) == [b"v"] * len(keys)
        async with node(source) as client:
            with pytest.raises(MovedError) as moved:
                await client.get(keys[0])
            assert (moved.value.slot_id, moved.value.port) == (slot, target)


async def test_a_slot_held_in_migration_answers_ask_for_a_key_already_moved(
    tmp_path: Path,
) -> None:
    moved_key, staying_key = b"{half}:moved", b"{half}:staying"
    async with running_cluster(tmp_path) as cluster:
        slot = await cluster.slot_of(moved_key)
        source = await cluster.owner(slot)
        target = await another_master(cluster, source)
        async with node(source) as client:
            await client.mset({moved_key: b"1", staying_key: b"2"})
        await cluster.begin_migration(slot, target)
        await cluster.migrate_keys(slot, target, moved_key)
        async with node(source) as client:
            with pytest.raises(AskError) as ask:
                await client.get(moved_key)
            assert not isinstance(ask.value, MovedError)
            assert (ask.value.slot_id, ask.value.port) == (slot, target)
            assert await client.get(staying_key) == b"2"  # still here: served, no redirect
        async with node(target) as client:
            with pytest.raises(MovedError):  # the target does not own the slot yet
                await client.get(moved_key)
            async with client.pipeline(transaction=False) as pipe:  # one connection
                pipe.execute_command("ASKING")
                pipe.get(moved_key)
                assert await pipe.execute() == [True, b"1"]
        await cluster.finish_migration(slot, target)
        assert await cluster.owner(slot) == target
        async with node(target) as client:
            assert await client.mget([moved_key, staying_key]) == [b"1", b"2"]


@pytest.mark.slow
async def test_a_killed_master_is_replaced_by_its_replica(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, replicas=1) as cluster:
        assert len(cluster.nodes) == 6
        before = await cluster.masters()
        replicas = {n.port for n in cluster.nodes} - set(before)
        old = await cluster.owner(0)
        cluster.node_on(old).kill()
        new = await cluster.wait_failover(old)
        assert new in replicas, cluster.logs()
        after = await cluster.masters()
        assert after[new] == before[old]
        assert old not in after
        async with node(new) as client:
            assert await client.set(await key_served_by(cluster, new), b"v")


def test_a_cluster_needs_three_masters_and_redis_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="at least 3 masters"):
        ClusterSetup(tmp_path, masters=2)
    only_server = tmp_path / "bin"
    only_server.mkdir()
    (only_server / "redis-server").symlink_to(str(shutil.which("redis-server")))
    monkeypatch.setenv("PATH", str(only_server))
    with pytest.raises(RuntimeError) as missing:
        ClusterSetup(tmp_path)
    assert str(missing.value) == NO_REDIS_CLI
