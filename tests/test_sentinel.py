"""Redis Sentinel (issue 15): every client through a ``redis+sentinel://`` URL, the raw-RESP roads
resolving the master at each connect and refusing a node that is no master, the leader core's
rule for another Redis server, and a master SIGKILLed under leader + standby brokers and
consumers (``-m slow``). Real processes: a master, a replica and three sentinels
(``tests/support/sentinel.py``), the simulator, ``upbit-broker run`` and consumer processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import RedisError, ResponseError

from broker.control_channel import subscribe_control
from broker.core.leader import REPLICATION_SLACK_MS
from broker.redis_client import ClosingSentinelPool, RedisUrlError, connection_pool, redis_client
from broker.resp import (
    NotMasterError,
    RespAddress,
    RespConnection,
    SentinelRoute,
    encode_command,
)
from broker.testing import broker_process, consumer_process, free_port, wait_for
from broker.testing import read_status as redis_status
from consumers.raw_link import RawLink, raw_address
from simulator.sends import frame_key
from tests.support.processes import (
    audit_consumer,
    delivered_past,
    gap_windows,
    record_data_sends,
    stopped_counts,
    union_of,
    upstream_of,
)
from tests.support.sentinel import SERVICE, SentinelSetup, running_sentinels
from tests.support.sim import running_simulator
from tests.test_leader_core import BTC, ETH, T0_MS, TTL, connect, events, leading, list_leases, sset

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """One topology for the tests that leave it as they found it (no failover)."""
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        asyncio.run(setup.start())
        yield setup
    finally:
        setup.stop()


@pytest.fixture
async def ha(tmp_path: Path) -> AsyncIterator[SentinelSetup]:
    """A topology of its own, for a test that fails it over."""
    async with running_sentinels(tmp_path) as setup:
        yield setup


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- what a Sentinel URL builds (no I/O) --------------------------------------------------------


def test_a_sentinel_address_keeps_the_two_credentials_apart() -> None:
    url = "rediss+sentinel://u:pw@h1,h2:5000/svc/3?sentinel_password=spw&ssl_cert_reqs=none"
    address = RespAddress.from_url(url)
    assert (address.username, address.password, address.db) == ("u", "pw", 3)
    assert address.tls is not None and not address.master_only
    assert address.sentinel == SentinelRoute(
        (("h1", 26379), ("h2", 5000)), "svc", None, "spw", address.tls
    )
    assert address.describe() == "rediss+sentinel://h1:26379,h2:5000/svc/3"
    plain = RespAddress.from_url("redis://:pw@h:1/2")  # unchanged: no route, no ROLE check
    assert plain.sentinel is None and not plain.master_only and plain.describe() == "redis://h:1/2"


async def test_redis_client_builds_a_sentinel_pool() -> None:
    client = redis_client(
        "redis+sentinel://:pw@s1:1,s2:2/svc/4?sentinel_password=spw", name="n", retries=2
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, ClosingSentinelPool) and pool.service_name == "svc"
        kwargs = pool.connection_kwargs
        assert (kwargs["password"], kwargs["db"], kwargs["client_name"]) == ("pw", 4, "n")
        assert kwargs["socket_timeout"] is None  # redis_client's rule, through Sentinel too
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(k["host"], k["port"], k["password"]) for k in sentinels] == [
            ("s1", 1, "spw"),
            ("s2", 2, "spw"),
        ]
        assert all(k["socket_timeout"] is None for k in sentinels)
    finally:
        await client.aclose()
    with pytest.raises(RedisUrlError, match="no service name"):
        redis_client("redis+sentinel://:secret@h:1")
    with pytest.raises(RedisUrlError, match="must be from 1 to 65535"):
        connection_pool("redis+sentinel://h:99999/svc")


# -- clients through Sentinel -------------------------------------------------------------------


async def test_every_client_reaches_the_master_through_the_sentinels(shared: SentinelSetup) -> None:
    ha = shared
    url = ha.url(db=2)
    master = aioredis.Redis(port=ha.master.port, db=2)
    client = redis_client(url, name="sentinel-test", retries=1)
    pool = connection_pool(url, name="sentinel-pool")
    try:
        await client.set("k", "v")
        assert await master.get("k") == b"v"  # on the master, database 2
        conn = pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        await conn.send_command("GET", "k")
        assert await conn.read_response() == b"v"
        assert conn.port == ha.master.port
        names = [c["name"] for c in await master.client_list()]
        assert "sentinel-test" in names and "sentinel-pool" in names
        await conn.disconnect()
    finally:
        await client.aclose()
        await pool.disconnect()
        await master.aclose()
    # closing the client closed what it opened to the sentinels too
    await wait_for(lambda: _no_client_of_ours(ha), 5, message="sentinel connections closed")


async def _no_client_of_ours(ha: SentinelSetup) -> bool:
    """No sentinel holds a connection whose last command was redis-py's master discovery
    (the sentinels' links to each other send other commands)."""
    for sentinel in ha.sentinels:
        probe = aioredis.Redis(port=sentinel.port)
        try:
            clients = await probe.client_list()
        finally:
            await probe.aclose()
        if any(c.get("cmd") == "sentinel|masters" for c in clients):
            return False
    return True


async def test_the_raw_roads_resolve_the_master(shared: SentinelSetup) -> None:
    ha = shared
    url = ha.url(db=1)
    address = RespAddress.from_url(url)
    assert address.sentinel is not None and address.sentinel.service == SERVICE
    assert address.sentinel.sentinels == tuple(("127.0.0.1", s.port) for s in ha.sentinels)
    assert address.db == 1 and address.describe().startswith("redis+sentinel://127.0.0.1:")
    client = redis_client(url)
    try:
        # the broker's publisher and control channel read the address off their client
        from_client = RespAddress.from_client(client)
        assert from_client is not None and from_client.sentinel == address.sentinel
        assert from_client.db == 1
        conn = await RespConnection.connect(from_client)
        try:
            assert conn.address is not None and conn.address.port == ha.master.port
            assert conn.address.master_only
            assert await conn.execute(encode_command(b"SET", b"raw", b"1"), 1) == [b"OK"]
        finally:
            await conn.aclose()
        assert await client.get("raw") == b"1"
        control = await subscribe_control(client, "t:control")
        try:
            await client.publish("t:control", "lease a")
            batch = await asyncio.wait_for(control.take(time.monotonic()), 5)
            assert batch.messages == 1
        finally:
            await control.aclose()
    finally:
        await client.aclose()
    # the consumer's raw link (consumers.raw_link) takes the same road
    raw = raw_address(url)
    assert raw is not None and raw.sentinel is not None
    got: list[bytes] = []
    link, info = await RawLink.open(
        raw, "raw-test", info=True, deliver=lambda c, d, t: got.append(d), confirm=lambda c, s: None
    )
    try:
        assert f"tcp_port:{ha.master.port}" in info.decode()
    finally:
        link.close()


async def test_sentinels_are_asked_in_order_and_every_failure_is_named(
    shared: SentinelSetup,
) -> None:
    ha = shared
    dead = free_port()
    live = ",".join(f"127.0.0.1:{s.port}" for s in ha.sentinels)
    address = RespAddress.from_url(f"redis+sentinel://127.0.0.1:{dead},{live}/{SERVICE}")
    found = await address.discover()
    assert (found.port, found.master_only, found.sentinel) == (ha.master.port, True, None)
    nobody = RespAddress.from_url(f"redis+sentinel://127.0.0.1:{dead}/{SERVICE}")
    with pytest.raises(MasterNotFoundError, match=f"127.0.0.1:{dead}"):
        await RespConnection.connect(nobody)
    unknown = RespAddress.from_url(f"redis+sentinel://{live}/nosuchmaster")
    with pytest.raises(MasterNotFoundError, match="knows no master 'nosuchmaster'"):
        await unknown.resolve()
    client = redis_client(f"redis+sentinel://{live}/nosuchmaster")
    try:
        with pytest.raises(MasterNotFoundError):  # redis-py's road says the same
            await client.ping()
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def fake_sentinel(port: int) -> AsyncIterator[int]:
    """A "sentinel" that names the node on ``port`` as the master, whatever it is asked."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                writer.write(encode_command(b"127.0.0.1", port))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_node_that_is_no_master_is_never_used(shared: SentinelSetup) -> None:
    ha = shared
    """A sentinel that lags behind a failover names a demoted master: a replica that still
    takes PUBLISH (for its own subscribers only). Every raw road refuses it."""
    roles_before = await _role_calls(ha.replica.port)
    async with fake_sentinel(ha.replica.port) as port:
        address = RespAddress.from_url(f"redis+sentinel://127.0.0.1:{port}/{SERVICE}")
        with pytest.raises(NotMasterError, match="is a slave, not the master"):
            await RespConnection.connect(address)
        with pytest.raises(NotMasterError):
            await address.resolve()  # the control channel's and the consumer's road
        client = redis_client(f"redis+sentinel://127.0.0.1:{port}/{SERVICE}")
        try:
            with pytest.raises(NotMasterError):
                await subscribe_control(client, "t:control")  # the broker's control channel
        finally:
            await client.aclose()
    assert await _role_calls(ha.replica.port) - roles_before == 3  # asked each time


async def _role_calls(port: int) -> int:
    client = aioredis.Redis(port=port)
    try:
        stats: dict[str, Any] = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_role", {}).get("calls", 0))


async def test_a_least_privilege_user_proves_the_role_with_info(shared: SentinelSetup) -> None:
    """ROLE is in @admin and @dangerous, which the documented ACLs leave out; they grant
    +info, and INFO replication says the same. With neither, the refusal says what to grant."""
    admin = aioredis.Redis(port=shared.master.port)
    rules = ("on", ">pw", "~*", "&*", "+@all", "-@dangerous", "-@admin")
    try:
        await admin.execute_command("ACL", "SETUSER", "lim", *rules, "+info")
        await admin.execute_command("ACL", "SETUSER", "blind", *rules)
        lim = RespAddress(port=shared.master.port, username="lim", password="pw", master_only=True)
        conn = await RespConnection.connect(lim)
        await conn.aclose()
        with pytest.raises(ResponseError, match="grant \\+role or \\+info"):
            await RespConnection.connect(replace(lim, username="blind"))
    finally:
        await admin.execute_command("ACL", "DELUSER", "lim", "blind")
        await admin.aclose()


# -- the leader core: another Redis server ----------------------------------------------------


def test_another_redis_server_holds_the_union_and_announces_a_gap(caplog: Any) -> None:
    core = leading()
    list_leases(core, 0.0, BTC, ETH)
    connect(core, 0.5, epoch=4)
    events(core)  # the connected event
    core.redis_server_seen("a" * 40, 1.0, T0_MS + 1_000)  # the first sighting: nothing to say
    core.redis_server_seen("a" * 40, 2.0, T0_MS + 2_000)  # the same server after a reconnect
    assert not core.in_grace(2.0) and events(core) == []
    core.control_lost("Connection reset by peer", 3.0)  # the master died at 3.0
    core.redis_server_seen("b" * 40, 6.0, T0_MS + 6_000)  # a replica was promoted
    assert "another redis server answers (run_id aaaaaaaa.. -> bbbbbbbb.." in caplog.text
    assert core.in_grace(6.0 + TTL - 0.001) and not core.in_grace(6.0 + TTL)
    [gap] = events(core)
    assert gap == {
        "event": "gap",
        "epoch": 4,
        "since_ms": T0_MS + 3_000 - REPLICATION_SLACK_MS,
        "until_ms": T0_MS + 6_000,
        "reason": "redis",
        "broker": "b1",
    }
    list_leases(core, 6.1, BTC)  # ETH's lease never reached the new master (yet)
    assert core.desired == sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core.tick(6.0 + TTL)
    assert core.desired == sset(ticker=["KRW-BTC"])
    # the next server change without a loss seen first: the gap starts at the sighting
    core.redis_server_seen("c" * 40, 20.0, T0_MS + 20_000)
    [gap] = events(core)
    assert gap["since_ms"] == T0_MS + 20_000 - REPLICATION_SLACK_MS


def test_no_gap_before_any_frame_flowed() -> None:
    core = leading()
    list_leases(core, 0.0, BTC)
    core.redis_server_seen("a" * 40, 1.0, T0_MS + 1_000)
    core.redis_server_seen("b" * 40, 2.0, T0_MS + 2_000)
    assert core.in_grace(2.0)  # the union is held all the same
    assert [e for e in events(core) if e["event"] == "gap"] == []


def test_a_takeover_holds_the_union_the_status_names() -> None:
    """A standby that takes over during a failover reads a new master that may have lost (or
    let expire) leases its predecessor served: the predecessor's union, from the status, is
    held for one lease TTL, from before the first lease read."""
    both = sset(ticker=["KRW-BTC"], trade=["KRW-ETH"])
    core = leading()
    core.inherit_union(both, T0_MS - 1_000, 0.0, T0_MS)
    assert core.desired == both and core.take_controller_changed()  # subscribed at once
    list_leases(core, 0.5, BTC)  # ETH's lease is not on the new master (yet)
    assert core.desired == both
    assert events(core) == []  # no expiry announced meanwhile
    core.tick(TTL)
    assert core.desired == sset(ticker=["KRW-BTC"])
    # a status older than one lease TTL: its leases have had their time to come back
    stale = leading()
    stale.inherit_union(both, T0_MS - int(TTL * 1000) - 1, 0.0, T0_MS)
    assert stale.desired == sset() and not stale.in_grace(0.0)


# -- a forced failover: the raw roads follow, the demoted master is refused ---------------------


@pytest.mark.slow  # ~11 s: Sentinel converts the old master at its next INFO of it
async def test_a_forced_failover_is_followed_and_the_old_master_refused(ha: SentinelSetup) -> None:
    """SENTINEL FAILOVER with the old master alive: the raw road reaches the new master at its
    next connect; once Sentinel turns the old master into a replica it drops its clients (ours
    too) and a connection that must reach a master refuses it."""
    url = ha.url()
    old_port = ha.master.port
    address = RespAddress.from_url(url)
    old = await RespConnection.connect(address)
    conn: RespConnection | None = None
    sentinel = aioredis.Redis(port=ha.sentinels[0].port)
    try:
        await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        new_port = await ha.wait_failover(old_port)
        conn = await wait_for(lambda: _connect_when_master(address), 10, message="reconnect")
        assert conn.address is not None and conn.address.port == new_port
        assert await conn.execute(encode_command(b"SET", b"after", b"1"), 1) == [b"OK"]
        # Sentinel converts the old master (it checks each replica's INFO every few seconds)
        await wait_for(
            lambda: old.closed, 20, interval=0.05, message="old master's clients dropped"
        )
        with pytest.raises(NotMasterError, match="is a slave"):
            await RespConnection.connect(RespAddress(port=old_port, master_only=True))
    finally:
        await old.aclose()
        if conn is not None:
            await conn.aclose()
        await sentinel.aclose()


async def _connect_when_master(address: RespAddress) -> RespConnection | None:
    try:
        return await RespConnection.connect(address)
    except RedisError:
        return None  # a sentinel still names the old master: it says "slave" now


# -- the scenario: SIGKILL the master under brokers and consumers -------------------------------

SUBS_A = {"trade": ["KRW-BTC", "KRW-ETH"], "ticker": ["KRW-BTC"]}
SUBS_B = {"ticker": ["KRW-XRP", "KRW-ETH"]}
LEASE_TTL = 3.0  # a heartbeat every second; a lease expires on the new master during failover
LEADER_TTL = 5.0  # the default: long enough for the lock to outlive a failover of ~3 s


def streams_of(subs: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(t, c) for t, codes in subs.items() for c in codes}


def covers(held: dict[str, set[str]] | None, union: dict[str, set[str]]) -> bool:
    return held is not None and all(codes <= held.get(t, set()) for t, codes in union.items())


@contextlib.asynccontextmanager
async def sampling(sim: Any, interval: float = 0.01) -> AsyncIterator[list[list[Any]]]:
    """The sets of the subscribed upstream connections open at once, sampled."""
    samples: list[list[Any]] = []

    async def run() -> None:
        while True:
            samples.append(
                [
                    {t: set(codes) for t, codes in c["subscriptions"].items()}
                    for c in sim.state()["connections"]
                    if c["subscriptions"]
                ]
            )
            await asyncio.sleep(interval)

    task = asyncio.create_task(run())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def leader_of(probe: aioredis.Redis) -> str:
    try:
        status = await redis_status(probe)
    except RedisError:
        return ""
    return status.get("leader", "") if status.get("connected") == "1" else ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "leader_ttl",
    [
        pytest.param(LEADER_TTL, id="lock-outlives-the-failover"),
        pytest.param(1.5, id="lock-expires-during-the-failover"),
    ],
)
async def test_master_sigkill_under_brokers_and_consumers(
    tmp_path: Path, leader_ttl: float
) -> None:
    """SIGKILL the master: the sentinels promote the replica; brokers and consumers follow
    through the same URL. Leases lost 0 (the union upstream never loses a stream, and every
    lease is on the new master afterwards), one upstream connection at most, every consumer
    told of a gap, nothing lost outside one, nothing twice; time to data again printed."""
    union = union_of(SUBS_A, SUBS_B)
    pairs = (SUBS_A, SUBS_B)
    async with running_sentinels(tmp_path) as ha, running_simulator(seed=151, rate=300) as sim:
        url = ha.url()
        log = record_data_sends(sim)
        probe = redis_client(url, retries=3)
        try:
            async with (
                broker_process(url, sim.url, "sen-a", tmp_path, leader_ttl=leader_ttl) as a,
                consumer_process(url, "ca", SUBS_A, tmp_path, lease_ttl=LEASE_TTL) as ca,
                consumer_process(url, "cb", SUBS_B, tmp_path, lease_ttl=LEASE_TTL) as cb,
            ):
                consumers = (ca, cb)
                await wait_for(lambda: leader_of(probe), 20, message="a leader")
                async with broker_process(
                    url, sim.url, "sen-b", tmp_path, leader_ttl=leader_ttl
                ) as b:
                    await wait_for(lambda: covers(upstream_of(sim.state()), union), 10)
                    await wait_for(
                        lambda: "waiting for the lock" in b.output(), 20, message="a standby"
                    )
                    leader_before = await leader_of(probe)
                    async with sampling(sim) as samples:
                        old_port = ha.master.port
                        ha.master.kill()
                        killed, killed_ms = time.monotonic(), now_ms()
                        await ha.wait_failover(old_port)
                        failover_s = time.monotonic() - killed
                        again = await wait_for(
                            lambda: data_again(log, consumers, killed_ms),
                            30,
                            interval=0.05,
                            message="data again",
                        )
                        # past one lease TTL after the new master was seen: a lease that did not
                        # come back would show now, the union's grace being over
                        await asyncio.sleep(LEASE_TTL + 1.5)
                        leases = {
                            c.client_id: await probe.exists(f"t:lease:{c.client_id}")
                            for c in consumers
                        }
                    end_ms = now_ms() - 500
                    for c, subs in zip(consumers, pairs, strict=True):
                        await delivered_past(log, c, streams_of(subs), end_ms)
                    leader_after = await leader_of(probe)
                    status = await redis_status(probe)
                    assert a.alive and b.alive
                    audits = [
                        audit_consumer(
                            log,
                            c,
                            streams_of(subs),
                            gap_windows(c),
                            start_ms=c.ready_ms(),
                            end_ms=end_ms,
                        )
                        for c, subs in zip(consumers, pairs, strict=True)
                    ]
                    gaps = {
                        c.client_id: [
                            (g["reason"], g["source"])
                            for g in c.gaps()
                            if g["until_ms"] > killed_ms
                        ]
                        for c in consumers
                    }
                    follow_ups = {
                        c.client_id: [g["reason"] for g in c.follow_ups()] for c in consumers
                    }
            # both brokers stopped: their last line counts what each published
            published = {
                p.broker_id: (stopped_counts(p.output()) or {}).get("frames_published", -1)
                for p in (a, b)
            }
            noticed = [p.broker_id for p in (a, b) if "redis server changed" in p.output()]
        finally:
            await probe.aclose()
    # the union shrank: connections are subscribed, and none of them holds all of it
    shrank = [sets for sets in samples if sets and not any(covers(h, union) for h in sets)]
    max_connections = max(len(sets) for sets in samples)
    without_s = sum(1 for sets in samples if not sets) * 0.01
    two_s = sum(1 for sets in samples if len(sets) > 1) * 0.01
    after_failover = {k: round(v - failover_s, 2) for k, v in again.items()}
    print(
        f"\n[figures] redis master SIGKILLed, sentinel failover (down-after 1 s), leader + "
        f"standby (lock ttl {leader_ttl:g} s), 2 consumers (lease ttl {LEASE_TTL:g} s): "
        f"failover_s={failover_s:.2f}, data_again_after_kill_s={again}, "
        f"data_again_after_failover_s={after_failover}, leader_before={leader_before}, "
        f"leader_after={leader_after}, frames_published_by_broker={published} (the whole run, "
        f"the stop sequence included), "
        f"brokers_that_saw_another_server={noticed}, max_subscribed_connections_at_once="
        f"{max_connections} (two for ~{two_s:.2f} s), without_upstream_connection_s~"
        f"{without_s:.2f}, "
        f"union_shrank_samples={len(shrank)}, leases_present_after={leases}, "
        f"publishing_brokers={[k for k, v in published.items() if v]}, "
        f"duplicate_frames={sum(x.duplicates for x in audits)}, consumer_gaps={gaps}, "
        f"broker_gap_follow_ups_at_consumers={follow_ups}, "
        f"redis_errors={status.get('redis_errors')}"
    )
    for audit in audits:
        print(f"[audit] {audit.line()}")
    assert not shrank, shrank[:3]  # leases lost: 0 (the union upstream never lost a stream)
    assert all(leases.values()), leases  # and every lease is on the new master
    if leader_ttl == LEADER_TTL:  # the lock outlived the failover: the same leader went on
        assert leader_after == leader_before and noticed == [leader_before]
        assert max_connections == 1 and published[leader_after] > 0
        assert [k for k, v in published.items() if v] == [leader_after]
    # else a standby may win the lock on the new master: the old leader keeps its upstream
    # connection (fenced, never publishing) until its next renewal fails, so two may be open
    # for a moment; the duplicates below say whether both ever published at once
    for cid, reasons in gaps.items():
        assert reasons, cid  # every consumer was told of a gap
    for audit in audits:
        assert audit.lost_silently == 0, (audit.line(), audit.examples)
        assert audit.duplicates == 0 and audit.foreign == 0, audit.line()


def data_again(log: Any, consumers: tuple[Any, ...], killed_ms: int) -> dict[str, float] | None:
    """Seconds from the kill to each consumer's first frame that the simulator sent after it
    (None until every consumer has one)."""
    sent_after = {key for t_ns, key, *_ in log.records if t_ns // 1_000_000 > killed_ms}
    first: dict[str, float] = {}
    for consumer in consumers:
        for message in consumer.messages():
            if frame_key(message["raw"].encode()) in sent_after:
                first[consumer.client_id] = round((int(message["t"]) - killed_ms) / 1000, 3)
                break
    return first if len(first) == len(consumers) else None
