"""The consumer's pub/sub on a Redis Cluster (``consumers.sharded_subscriber``): one subscriber
SSUBSCRIBEs data channels on every master and SUBSCRIBEs the events channel; a break of a link
(a killed connection, a slot moved away, a master failed over) is one reported break, after
which that link's channels are subscribed again where their slots now are and frames flow,
while the other links deliver without interruption (frames numbered per channel, published all
along, arrive without a hole).

Real processes: a three-master cluster (``tests/support/cluster.py``), frames SPUBLISHed by
hand on the master owning each channel (no broker). The plan of the commands is pure and
tested without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import MovedError, RedisError

from broker.cluster_slots import SLOTS, SlotMap, key_slot
from broker.errors import ConfigError
from broker.redis_client import redis_client
from broker.testing import wait_for
from consumers import CONSUMER_DISCONNECTED, FELL_BEHIND, BrokerClient, Gap, StreamMessage
from consumers.sharded_subscriber import ShardedSubscriber, node_commands, plan_commands
from consumers.subscriber import Break
from tests.support.cluster import ClusterSetup, running_cluster

pytestmark = pytest.mark.timeout(90)

NS = "upbit"
EVENTS = b"{upbit}:events"  # broker.keys.keys_for(NS, a cluster url).events


def frame(code: str, n: int, tag: str = "") -> bytes:
    now = time.time_ns() // 1_000_000
    return json.dumps(
        {"type": "ticker", "code": code, "n": n, "tag": tag, "timestamp": now}
    ).encode()


def is_data(channel: bytes) -> bool:
    return channel != EVENTS


# -- the plan (pure) ------------------------------------------------------------------------


def two_masters() -> SlotMap:
    """Slots 0-8191 on A, the rest on B."""
    half = SLOTS // 2
    return SlotMap((("a", 1), ("b", 2)), (0,) * half + (1,) * (SLOTS - half))


def channels_by_owner(slots: SlotMap, count: int) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    for i in range(1000):
        channel = f"upbit:ticker:KRW-C{i}".encode()
        found.setdefault(slots.owner[key_slot(channel)], []).append(channel)
        if all(len(found.get(m, [])) >= count for m in range(len(slots.masters))):
            return found
    raise AssertionError("no channels on every master")


def test_each_slot_gets_its_own_ssubscribe_on_its_master_and_classic_channels_a_subscribe() -> None:
    slots = two_masters()
    on = channels_by_owner(slots, 2)
    same_slot = [b"upbit:ticker:{KRW-X}.1", b"upbit:ticker:{KRW-X}.2"]  # one hash tag
    events_master = slots.masters[slots.owner[key_slot(EVENTS)]]
    plan, unowned = plan_commands(slots, [*on[0][:2], *on[1][:2], *same_slot, EVENTS], is_data)
    assert unowned == []
    assert set(plan) == {("a", 1), ("b", 2)}
    for node, commands in plan.items():
        if node == events_master:
            assert commands[0] == (b"SUBSCRIBE", [EVENTS])  # classic first
            commands = commands[1:]
        assert all(command == b"SSUBSCRIBE" for command, _ in commands)
        for _, names in commands:  # one slot per command (else -CROSSSLOT)
            assert len({key_slot(n) for n in names}) == 1
    sent = sorted(n for commands in plan.values() for _, names in commands for n in names)
    assert sent == sorted([*on[0][:2], *on[1][:2], *same_slot, EVENTS])
    assert [names for commands in plan.values() for _, names in commands if len(names) > 1] == [
        same_slot
    ]


def test_leaving_mirrors_joining_and_a_slot_without_a_master_is_reported() -> None:
    half = SLOTS // 2
    slots = SlotMap((("a", 1),), (0,) * half + (-1,) * (SLOTS - half))
    names = [f"upbit:trade:KRW-C{i}".encode() for i in range(100)]
    served = next(n for n in names if key_slot(n) < half)
    orphan = next(n for n in names if key_slot(n) >= half)
    plan, unowned = plan_commands(slots, [served, orphan], is_data, leave=True)
    assert plan == {("a", 1): [(b"SUNSUBSCRIBE", [served])]}
    assert unowned == [orphan]


def test_one_master_s_commands_are_the_classic_channels_then_one_per_slot() -> None:
    same_slot = [b"upbit:ticker:{KRW-X}.1", b"upbit:ticker:{KRW-X}.2"]
    other = next(
        c
        for i in range(100)
        if key_slot(c := f"upbit:ticker:KRW-C{i}".encode()) != key_slot(same_slot[0])
    )
    commands = node_commands([same_slot[0], other, EVENTS, same_slot[1]], is_data, leave=True)
    assert commands[0] == (b"UNSUBSCRIBE", [EVENTS])
    assert sorted(commands[1:]) == sorted(
        [(b"SUNSUBSCRIBE", same_slot), (b"SUNSUBSCRIBE", [other])]
    )
    assert node_commands([], is_data) == []


# -- against a cluster ----------------------------------------------------------------------


class Probe:
    """A running :class:`ShardedSubscriber` and what it handed on."""

    def __init__(self, url: str, name: str = "probe") -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        #: data channel -> the numbers of its frames received, in order
        self.numbers: dict[bytes, list[int]] = {}
        #: data channel -> how many of its frames arrived while a break was open
        self.during_break: dict[bytes, int] = {}
        self.breaks: list[str] = []
        self.restored: list[Break] = []
        self.subscriber = ShardedSubscriber(
            url,
            name=name,
            on_message=self._message,
            sharded=is_data,
            on_break=self.breaks.append,
            on_restored=self._restored,
            connect_timeout=2.0,
        )

    def _message(self, channel: bytes, data: bytes, _received_ms: int) -> None:
        self.messages.append((channel, data))
        if is_data(channel):
            self.numbers.setdefault(channel, []).append(json.loads(data)["n"])
            if len(self.breaks) > len(self.restored):
                self.during_break[channel] = self.during_break.get(channel, 0) + 1

    async def _restored(self, incident: Break) -> None:
        self.restored.append(incident)

    def got(self, channel: bytes, data: bytes) -> bool:
        return (channel, data) in self.messages

    def last(self, channel: bytes) -> int:
        """The number of the last frame received on ``channel`` (-1: none yet)."""
        numbers = self.numbers.get(channel)
        return numbers[-1] if numbers else -1


@asynccontextmanager
async def probe(url: str, channels: list[bytes]) -> AsyncIterator[Probe]:
    p = Probe(url)
    await p.subscriber.subscribe(channels)
    task = asyncio.create_task(p.subscriber.run())
    try:
        await p.subscriber.wait_connected(10)
        yield p
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await p.subscriber.aclose()


async def on_every_master(cluster: ClusterSetup) -> dict[int, bytes]:
    """Master port -> a data channel whose slot it owns."""
    masters = await cluster.masters()
    found: dict[int, bytes] = {}
    for i in range(1000):
        channel = f"{NS}:ticker:KRW-C{i}".encode()
        found.setdefault(owner_in(masters, channel), channel)
        if len(found) == len(masters):
            return found
    raise AssertionError("no channel on every master")


def owner_in(masters: dict[int, list[tuple[int, int]]], channel: bytes) -> int:
    """The port of the master whose slot ranges (``ClusterSetup.masters``) hold ``channel``."""
    slot = key_slot(channel)
    return next(port for port, ranges in masters.items() if any(a <= slot <= b for a, b in ranges))


async def call(port: int, *args: object) -> object:
    client = aioredis.Redis(port=port, socket_connect_timeout=2)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


async def spublish(cluster: ClusterSetup, channel: bytes, data: bytes) -> None:
    """SPUBLISH on the master owning ``channel`` now (a subscriber there must hear it)."""
    port = await cluster.owner(key_slot(channel))
    assert await call(port, "SPUBLISH", channel, data) == 1


class Feed:
    """Frames SPUBLISHed on every channel all along, each numbered (``n``) from 0 per channel,
    on the master owning it now: single-node clients, the owner looked up again after a
    failure (a master gone, a slot moved); a frame that failed is sent again, so each
    channel's numbers are published without a hole."""

    def __init__(self, cluster: ClusterSetup, channels: list[bytes], every: float) -> None:
        self.cluster = cluster
        self.channels = channels
        self.every = every
        #: channel -> frames published (the next one's number)
        self.sent = dict.fromkeys(channels, 0)
        #: channel -> numbers whose SPUBLISH timed out: sent or not, nobody knows (a loaded
        #: machine); never sent again, and not required to arrive
        self.uncertain: dict[bytes, set[int]] = {c: set() for c in channels}
        self._owners: dict[bytes, int | None] = dict.fromkeys(channels)
        self._clients: dict[int, aioredis.Redis] = {}

    async def run(self) -> None:
        try:
            while True:
                for channel in self.channels:
                    await self._publish(channel)
                await asyncio.sleep(self.every)  # the feed's pace, not synchronisation
        finally:
            for client in self._clients.values():
                await client.aclose()

    async def _publish(self, channel: bytes) -> None:
        port = self._owners[channel]
        try:
            if port is None:
                port = self._owners[channel] = await self.cluster.owner(key_slot(channel))
            client = self._clients.get(port)
            if client is None:
                client = self._clients[port] = redis_client(
                    f"redis://127.0.0.1:{port}/0", connect_timeout=1
                )
            data = frame(channel.decode(), self.sent[channel])
            async with asyncio.timeout(2):
                await client.execute_command("SPUBLISH", channel, data)
        except TimeoutError:
            # written, maybe: Redis may have published it; the next frame gets the next number
            self.uncertain[channel].add(self.sent[channel])
            self.sent[channel] += 1
            self._owners[channel] = None
            if port is not None and (client := self._clients.pop(port, None)) is not None:
                await client.aclose()
            return
        except (RedisError, OSError, LookupError, RuntimeError):
            self._owners[channel] = None  # dead or moved: ask again next round
            if port is not None and (client := self._clients.pop(port, None)) is not None:
                await client.aclose()
            return
        self.sent[channel] += 1


@asynccontextmanager
async def feeding(cluster: ClusterSetup, channels: list[bytes]) -> AsyncIterator[Feed]:
    """A :class:`Feed` publishing every 10 ms until the block ends."""
    feed = Feed(cluster, channels, every=0.01)
    task = asyncio.create_task(feed.run())
    try:
        yield feed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def all_received(p: Probe, feed: Feed, channels: list[bytes]) -> None:
    """After the feed stopped: every frame published on ``channels`` arrives, in order, once."""

    def certain(channel: bytes) -> list[int]:
        return [n for n in range(feed.sent[channel]) if n not in feed.uncertain[channel]]

    await wait_for(
        lambda: all(p.last(c) >= max(certain(c), default=-1) for c in channels),
        10,
        message="the last frames",
    )
    for channel in channels:
        got = p.numbers[channel]
        assert got == sorted(set(got)), channel  # in order, once
        assert set(certain(channel)) <= set(got), channel  # none missing


async def flows(cluster: ClusterSetup, p: Probe, channels: list[bytes], tag: str) -> None:
    """One frame on each channel arrives (published where its slot is now)."""
    sent = [(channel, frame(channel.decode(), 0, tag)) for channel in channels]
    for channel, data in sent:
        await spublish(cluster, channel, data)
    await wait_for(lambda: all(p.got(*m) for m in sent), 10, message=f"{tag} frames")


async def test_frames_on_every_master_and_the_events_arrive_through_one_subscriber(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            assert p.subscriber.live and p.subscriber.raw
            assert p.subscriber.channels == {EVENTS, *channels}
            for port, channel in by_master.items():  # one sharded subscription per master
                listed = await call(port, "CLIENT", "LIST", "TYPE", "pubsub")
                assert isinstance(listed, bytes) and b"name=probe" in listed
                assert await call(port, "PUBSUB", "SHARDNUMSUB", channel) == [channel, 1]
            await flows(cluster, p, channels, "first")
            # the events channel is classic: PUBLISHed on any node, forwarded to every one
            events_master = await cluster.owner(key_slot(EVENTS))
            elsewhere = next(port for port in by_master if port != events_master)
            await call(elsewhere, "PUBLISH", EVENTS, b'{"event":"leader"}')
            await wait_for(lambda: p.got(EVENTS, b'{"event":"leader"}'), 10, message="event")
            assert p.breaks == [] and p.restored == []


async def test_subscribing_while_live_opens_links_and_unsubscribing_stops_delivery(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS]) as p:
            await p.subscriber.subscribe(channels)  # returns once confirmed on every master
            links = dict(p.subscriber._links)
            assert len(links) == 3
            await flows(cluster, p, channels, "live")
            # leave and join again, twice: Redis confirms each SUNSUBSCRIBE with a
            # sunsubscribe, which is no slot moving away
            for _ in range(2):
                await p.subscriber.unsubscribe(channels[:1])
                await p.subscriber.subscribe(channels[:1])
            await p.subscriber.unsubscribe(channels[1:2])
            gone = frame("gone", 0)
            port = await cluster.owner(key_slot(channels[1]))
            await wait_for(
                lambda: _no_subscriber(port, channels[1]), 10, message="the channel left"
            )
            assert await call(port, "SPUBLISH", channels[1], gone) == 0
            await flows(cluster, p, [channels[0], channels[2]], "after")
            assert not p.got(channels[1], gone)
            assert p.breaks == [] and p.subscriber._links == links


async def _no_subscriber(port: int, channel: bytes) -> bool:
    return await call(port, "PUBSUB", "SHARDNUMSUB", channel) == [channel, 0]


async def test_a_killed_connection_is_one_break_then_every_channel_flows_again(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            await flows(cluster, p, channels, "before")
            victim = next(iter(by_master))
            assert await call(victim, "CLIENT", "KILL", "TYPE", "pubsub") == 1
            await wait_for(lambda: p.restored, 15, message="the subscription back")
            [incident] = p.restored
            assert len(p.breaks) == 1
            # the same server closed it and is there again: as Subscriber, a dropped reader
            assert incident.reason == FELL_BEHIND and not incident.server_changed
            assert incident.since_ms <= incident.until_ms
            await flows(cluster, p, channels, "after")
            await call(victim, "PUBLISH", EVENTS, b'{"event":"again"}')
            await wait_for(lambda: p.got(EVENTS, b'{"event":"again"}'), 10, message="event")
            assert len(p.breaks) == 1 and len(p.restored) == 1


async def test_a_slot_moved_away_is_a_break_and_its_frames_come_from_the_new_master(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            await flows(cluster, p, channels, "before")
            source, moving = next(iter(by_master.items()))
            target = next(port for port in by_master if port != source)
            await cluster.move_slot(key_slot(moving), target)
            await wait_for(lambda: p.restored, 15, message="the subscription back")
            [incident] = p.restored
            assert incident.reason == CONSUMER_DISCONNECTED and incident.server_changed
            assert "moved" in incident.error, incident.error
            with pytest.raises(MovedError):  # the old master no longer takes it
                await call(source, "SPUBLISH", moving, b"x")
            await flows(cluster, p, channels, "after")  # `moving` from the target
            assert len(p.breaks) == 1 and len(p.restored) == 1


async def test_a_channel_subscribed_on_an_old_map_is_redirected_and_subscribed_again(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            source = next(iter(by_master))
            target = next(port for port in by_master if port != source)
            masters = await cluster.masters()
            # a channel nobody subscribed yet, whose slot moves: Redis has nothing to tell us
            names = (f"{NS}:trade:KRW-C{i}".encode() for i in range(1000))
            late = next(c for c in names if owner_in(masters, c) == source)
            await cluster.move_slot(key_slot(late), target)
            # our map still says `source`, which answers -MOVED: the subscription breaks
            await p.subscriber.subscribe([late])
            await wait_for(lambda: p.restored, 15, message="the subscription back")
            [incident] = p.restored
            assert incident.reason == CONSUMER_DISCONNECTED and "MOVED" in incident.error
            await flows(cluster, p, [*channels, late], "after")  # `late` from the target
            assert len(p.breaks) == 1 and len(p.restored) == 1


@pytest.mark.slow
async def test_a_failed_over_master_is_a_break_and_its_replica_serves_the_frames(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, replicas=1) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            await flows(cluster, p, channels, "before")
            old = next(iter(by_master))
            cluster.node_on(old).kill()
            new = await cluster.wait_failover(old)
            await wait_for(lambda: p.restored, 30, message="the subscription back")
            incident = p.restored[0]
            assert incident.reason == CONSUMER_DISCONNECTED and incident.server_changed
            await flows(cluster, p, channels, "after")  # the killed master's from `new`
            assert await cluster.owner(key_slot(by_master[old])) == new
            assert len(p.breaks) == len(p.restored)


def node_of(p: Probe, port: int) -> tuple[str, int]:
    """The subscriber's name of the master on ``port`` (as ``CLUSTER SLOTS`` gave it)."""
    return next(node for node in p.subscriber._links if node[1] == port)


@pytest.mark.slow
async def test_a_dead_master_costs_only_its_own_channels_and_one_break(tmp_path: Path) -> None:
    """The master carrying a data channel and the events channel is SIGKILLed while frames
    are published on every master: the two others' frames arrive all through the failover,
    without a hole; one break is reported, from the dead link's last frame to when its
    channels are subscribed on the promoted replica, which then delivers them."""
    async with running_cluster(tmp_path, replicas=1) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        old = await cluster.owner(key_slot(EVENTS))  # its link carries the events channel too
        dying = by_master[old]
        healthy = [channel for port, channel in by_master.items() if port != old]
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            kept = {node: link for node, link in p.subscriber._links.items() if node[1] != old}
            async with feeding(cluster, channels) as feed:
                await wait_for(lambda: all(p.last(c) >= 0 for c in channels), 10, message="frames")
                cluster.node_on(old).kill()
                killed_ms = time.time_ns() // 1_000_000  # after the process is gone
                await wait_for(lambda: p.breaks, 10, message="the break")
                # the healthy masters' frames keep coming while the dead one's are missing
                await wait_for(
                    lambda: all(p.during_break.get(c, 0) >= 10 for c in healthy),
                    20,
                    message="frames of the healthy masters during the failover",
                )
                new = await cluster.wait_failover(old)
                await wait_for(lambda: p.restored, 30, message="the lost channels back")
                resumed_at = feed.sent[dying]
                await wait_for(
                    lambda: p.last(dying) >= resumed_at, 10, message="the dead master's channel"
                )
                assert await cluster.owner(key_slot(dying)) == new
            await all_received(p, feed, healthy)
            dead = p.numbers[dying]  # a hole (the failover), but in order and never twice
            assert dead == sorted(set(dead))
            assert len(p.breaks) == 1 and len(p.restored) == 1, (p.breaks, p.restored)
            [incident] = p.restored
            assert incident.reason == CONSUMER_DISCONNECTED and incident.server_changed
            assert str(old) in incident.error, incident.error
            assert incident.since_ms <= killed_ms < incident.until_ms
            # the healthy links were never touched; the replica got one of its own
            links = p.subscriber._links
            assert all(links[node] is link for node, link in kept.items())
            assert {port for _, port in links} == {new, *(port for _, port in kept)}
            assert p.subscriber.live
            # the events channel was subscribed again, on the promoted replica
            await call(new, "PUBLISH", EVENTS, b'{"event":"again"}')
            await wait_for(lambda: p.got(EVENTS, b'{"event":"again"}'), 10, message="event")


async def test_a_moved_slot_breaks_only_its_link_and_joins_an_open_link(tmp_path: Path) -> None:
    """A slot of one channel moves to another master while frames are published on every
    master: one break; the channel is subscribed on the target's open link (no new link);
    the other channels' frames arrive without a hole."""
    async with running_cluster(tmp_path) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        events_master = await cluster.owner(key_slot(EVENTS))
        source = next(port for port in by_master if port != events_master)
        moving = by_master[source]
        target = next(port for port in by_master if port != source)
        others = [channel for channel in channels if channel != moving]
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            source_node = node_of(p, source)
            kept = {n: link for n, link in p.subscriber._links.items() if n != source_node}
            async with feeding(cluster, channels) as feed:
                await wait_for(lambda: all(p.last(c) >= 0 for c in channels), 10, message="frames")
                await cluster.move_slot(key_slot(moving), target)
                await wait_for(lambda: p.restored, 15, message="the moved channel back")
                resumed_at = feed.sent[moving]
                await wait_for(
                    lambda: p.last(moving) >= resumed_at, 10, message="the moved channel's frames"
                )
            await all_received(p, feed, others)
            assert p.numbers[moving] == sorted(set(p.numbers[moving]))
            assert len(p.breaks) == 1 and len(p.restored) == 1, (p.breaks, p.restored)
            [incident] = p.restored
            assert incident.reason == CONSUMER_DISCONNECTED and incident.server_changed
            assert "moved" in incident.error, incident.error
            # the source had nothing else of ours: its link is gone, no other link changed
            assert p.subscriber._links == kept
            assert p.subscriber._placed[moving] == node_of(p, target)


@pytest.mark.slow
async def test_a_second_break_during_a_failover_joins_its_incident(tmp_path: Path) -> None:
    """A master is SIGKILLed; while its replica is not yet promoted, a second master drops our
    link (CLIENT KILL) and a channel of the third is subscribed: the second master's channel
    is back at once and the new one confirmed and delivered, the third's frames never stop,
    and the whole is one break (the earliest start, until the dead master's channel is back),
    classified by the link that broke first."""
    async with running_cluster(tmp_path, replicas=1) as cluster:
        by_master = await on_every_master(cluster)
        channels = list(by_master.values())
        dead_port, killed_port, spared_port = by_master
        masters = await cluster.masters()
        names = (f"{NS}:trade:KRW-C{i}".encode() for i in range(1000))
        fresh = next(c for c in names if owner_in(masters, c) == spared_port)
        async with probe(cluster.url(), [EVENTS, *channels]) as p:
            async with feeding(cluster, channels) as feed:
                await wait_for(lambda: all(p.last(c) >= 0 for c in channels), 10, message="frames")
                cluster.node_on(dead_port).kill()
                await wait_for(lambda: p.breaks, 10, message="the first break")
                assert not p.subscriber.live
                # a failover takes the node timeout at least: this comes while it is under way
                assert await call(killed_port, "CLIENT", "KILL", "TYPE", "pubsub") == 1
                await p.subscriber.subscribe([fresh])  # on a master not in the incident
                assert await call(spared_port, "SPUBLISH", fresh, frame("fresh", 0)) == 1
                await wait_for(lambda: p.last(fresh) == 0, 10, message="the new channel")
                killed = by_master[killed_port]
                resumed_at = feed.sent[killed]
                await wait_for(
                    lambda: p.last(killed) >= resumed_at, 10, message="the killed link's channel"
                )
                await cluster.wait_failover(dead_port)
                await wait_for(lambda: p.restored, 30, message="the dead master's channel back")
                dying = by_master[dead_port]
                resumed_at = feed.sent[dying]
                await wait_for(lambda: p.last(dying) >= resumed_at, 10, message="its frames")
            spared = by_master[spared_port]
            await all_received(p, feed, [spared])
            assert p.during_break.get(spared, 0) > 0
            assert len(p.breaks) == 1 and len(p.restored) == 1, (p.breaks, p.restored)
            [incident] = p.restored
            # the dead master's break classifies it; both links are named
            assert incident.reason == CONSUMER_DISCONNECTED and incident.server_changed
            assert str(dead_port) in incident.error and str(killed_port) in incident.error
            assert p.subscriber.live


async def test_a_broker_client_on_a_cluster_url_receives_its_leased_stream_and_a_gap(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        url = cluster.url()
        async with BrokerClient(redis_url=url, client_id="sharded", namespace=NS) as client:
            assert isinstance(client._subscriber, ShardedSubscriber)
            await client.subscribe("ticker", ["KRW-BTC"])
            channel = f"{NS}:ticker:KRW-BTC".encode()
            lease = await call(
                await cluster.owner(key_slot(b"{upbit}:lease:sharded")),
                "HGETALL",
                "{upbit}:lease:sharded",
            )
            assert lease, "the lease is written on the cluster"
            await spublish(cluster, channel, frame("KRW-BTC", 1))
            item = await client.next_message(timeout=10)
            assert isinstance(item, StreamMessage) and json.loads(item.raw)["n"] == 1
            assert item.code == "KRW-BTC"
            await call(await cluster.owner(key_slot(channel)), "CLIENT", "KILL", "TYPE", "pubsub")
            gap = await client.next_message(timeout=15)
            assert isinstance(gap, Gap) and gap.reason == FELL_BEHIND and gap.source == "local"
            await spublish(cluster, channel, frame("KRW-BTC", 2))
            item = await client.next_message(timeout=10)
            assert isinstance(item, StreamMessage) and json.loads(item.raw)["n"] == 2


async def test_mixed_urls_are_refused_on_a_cluster() -> None:
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    with pytest.raises(ConfigError, match="both must name the cluster"):
        BrokerClient(redis_url=url, subscribe_url="redis://127.0.0.1:7000/0")
    with pytest.raises(ConfigError, match="both must name the cluster"):
        BrokerClient(redis_url="redis://127.0.0.1:7000/0", subscribe_url=url)
    with pytest.raises(ConfigError):
        ShardedSubscriber("redis://127.0.0.1:7000/0", name="x", on_message=print, sharded=is_data)
