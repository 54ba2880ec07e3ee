"""A Redis Cluster for tests and benchmarks: real ``redis-server --cluster-enabled`` processes on
free ports (testing layer).

    async with running_cluster(tmp_path, masters=3, replicas=1) as cluster:
        cluster.url()                                # redis+cluster://127.0.0.1:P1,...,:P6
        slot = await cluster.slot_of(b"t:ticker:KRW-BTC")
        port = await cluster.owner(slot)             # the master serving that slot
        await cluster.move_slot(slot, other_port)    # a full migration, keys and all
        cluster.node_on(port).kill()                 # SIGKILL a master
        await cluster.wait_failover(port)            # until its replica serves its slots

Each node is a :class:`broker.testing.RedisServer` (no persistence) with its cluster config
file and log in the test's directory, a bus port of its own (``--cluster-port``: port + 10000,
the default, may be taken or past 65535) and a short node timeout (:data:`NODE_TIMEOUT_MS`), so
a failover takes seconds. ``redis-cli --cluster create`` assigns the slots and the replicas;
readiness then waits until every node says ``cluster_state:ok`` with all 16384 slots assigned,
knows every other node and names the same masters, slots and replicas, and every replica's link
to its master is up: a client connecting next sees a stable cluster, and a master's failure is
voted on by masters that all know its replica. That takes about 2 s: a master started moments
ago waits that long before it calls the cluster ok. Everything is killed at the end, also when
the start fails.

The fixture talks to one node at a time with plain single-node clients, closed after each
command, and reads raw replies (``"CLUSTER", "SLOTS"`` as two words: redis-py applies no
callback then).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

from redis.exceptions import RedisError

from broker.redis_client import redis_client
from broker.testing import RedisServer, wait_for
from broker.testing.wait import WaitTimeout, scaled

#: a node silent this long is failing (Redis' default: 15 s); a replica's election follows
NODE_TIMEOUT_MS = 1000
#: hash slots of a Redis Cluster
SLOTS = 16384
#: keys moved per ``MIGRATE`` while a slot moves
MIGRATE_BATCH = 100
#: how long one ``MIGRATE`` may take
MIGRATE_TIMEOUT_MS = 5000
#: What ``redis-cli`` missing from PATH says.
NO_REDIS_CLI = "redis-cli is not on PATH (Debian: apt-get install redis-tools)"

#: slot ranges, ``(first, last)`` inclusive, in order
Ranges = list[tuple[int, int]]


class Shard(NamedTuple):
    """One master's slots and the replicas a node lists for it (``CLUSTER SLOTS``)."""

    ranges: tuple[tuple[int, int], ...]
    replicas: frozenset[int]


#: a node's view of the cluster: master port -> its shard
View = dict[int, Shard]


class ClusterNode(RedisServer):
    """One ``redis-server --cluster-enabled yes`` on ``port`` with its bus on ``bus_port``."""

    def __init__(
        self, directory: Path, port: int, bus_port: int, extra_args: Sequence[str] = ()
    ) -> None:
        self.bus_port = bus_port
        self.config_file = directory / f"nodes-{port}.conf"
        self.log = directory / f"node-{port}.log"
        super().__init__(
            (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.config_file),
                "--cluster-port", str(bus_port),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--logfile", str(self.log),
                # no delay before a full sync: a replica attaches at once
                "--repl-diskless-sync-delay", "0",
                # CLUSTER SLOTS lists no replica at replication offset 0, and a master with
                # nothing to write moves the offset by its pings alone (default: every 10 s)
                "--repl-ping-replica-period", "1",
                *extra_args,
            ),
            port=port,
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The end of its log (for a failing test's message)."""
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class ClusterSetup:
    """``masters`` masters with ``replicas`` replicas each (see the module docstring).

    Raises:
        ValueError: fewer than 3 masters (Redis Cluster's minimum).
        RuntimeError: no ``redis-server`` or ``redis-cli`` on PATH.
    """

    def __init__(
        self,
        directory: Path,
        masters: int = 3,
        replicas: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``extra_args``: more ``redis-server`` arguments for every node."""
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, not {masters}")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(NO_REDIS_CLI)
        self.cli = cli
        self.directory = directory
        self.replicas_per_master = replicas
        count = masters * (1 + replicas)
        ports = _distinct_free_ports(2 * count)
        #: every node; masters first once started
        self.nodes = [
            ClusterNode(directory, ports[i], ports[count + i], extra_args) for i in range(count)
        ]
        # the last view every node agreed on (what a failover or a slot move starts from)
        self._agreed: View = {}

    def url(self, scheme: str = "redis+cluster", *, query: str = "") -> str:
        """The cluster URL naming every node, masters first (as at the start)."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"{scheme}://{hosts}" + (f"?{query}" if query else "")

    def node_on(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    @property
    def live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive]

    async def start(self) -> None:
        """Start the nodes, create the cluster and wait until it is stable.

        Raises:
            RuntimeError: a node did not start, or ``redis-cli`` failed.
            WaitTimeout: the cluster did not settle (the message ends with the nodes' logs).
        """
        for node in self.nodes:
            await asyncio.to_thread(node.start)
        await self._create()
        try:
            view = await wait_for(
                lambda: self._settled(self.live_ports, replicas=True),
                30,
                interval=0.05,
                message="the cluster to settle",
            )
            assert view is not None  # wait_for returns a truthy value
            masters = set(view)
            self.nodes.sort(key=lambda node: node.port not in masters)  # stable: masters first
            replica_ports = [node.port for node in self.nodes if node.port not in masters]
            await wait_for(
                lambda: _all_linked(replica_ports), 20, interval=0.05, message="replicas in sync"
            )
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}\n{self.logs()}") from None

    async def _create(self) -> None:
        args = [self.cli, "--cluster", "create"]
        args += [f"127.0.0.1:{node.port}" for node in self.nodes]
        args += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        done = await _run(args, timeout=scaled(60))
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create exited with {done.returncode}:\n"
                f"{done.stdout}{done.stderr}\n{self.logs()}"
            )

    async def _settled(self, ports: Sequence[int], *, replicas: bool = False) -> View | None:
        """The view every node on ``ports`` agrees on, each saying ``cluster_state:ok`` with
        every slot assigned (None: not yet). ``replicas``: the replicas must agree too, every
        node must know all nodes and every master must have its replicas."""
        views: list[View] = []
        for port in ports:
            info = await _cluster_info(port)
            if info is None or info.get("cluster_state") != "ok":
                return None
            if info.get("cluster_slots_assigned") != str(SLOTS):
                return None
            if replicas and info.get("cluster_known_nodes") != str(len(self.nodes)):
                return None
            view = await _view(port)
            if view is None:
                return None
            views.append(view if replicas else _without_replicas(view))
        if not views or any(view != views[0] for view in views):
            return None
        if replicas and any(len(s.replicas) != self.replicas_per_master for s in views[0].values()):
            return None
        self._agreed = views[0]
        return views[0]

    async def masters(self) -> dict[int, Ranges]:
        """Master port -> its slot ranges, as the first live node that answers sees them.

        Raises:
            RuntimeError: no live node answered.
        """
        for port in self.live_ports:
            view = await _view(port)
            if view is not None:
                return {master: list(shard.ranges) for master, shard in view.items()}
        raise RuntimeError(f"no cluster node answered CLUSTER SLOTS\n{self.logs()}")

    async def owner(self, slot: int) -> int:
        """The port of the master serving ``slot``.

        Raises:
            LookupError: no master serves it.
        """
        for port, ranges in (await self.masters()).items():
            if _covers(ranges, slot):
                return port
        raise LookupError(f"no master serves slot {slot}")

    async def slot_of(self, key: str | bytes) -> int:
        """The hash slot of ``key`` (``CLUSTER KEYSLOT`` on a live node)."""
        slot: int = await _call(self.live_ports[0], "CLUSTER", "KEYSLOT", key)
        return slot

    async def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """After the master on ``old_port`` was killed: wait until another node serves all its
        slots and every live node says ``cluster_state:ok`` and agrees; returns its port.

        Raises:
            ValueError: ``old_port`` served no slots when the nodes last agreed.
            WaitTimeout: no failover in time.
        """
        if old_port not in self._agreed:
            raise ValueError(f"{old_port} was no master when the nodes last agreed")
        old_ranges = self._agreed[old_port].ranges

        async def done() -> int | None:
            live = [port for port in self.live_ports if port != old_port]
            view = await self._settled(live)
            if view is None:
                return None
            for port, shard in view.items():
                if port != old_port and all(_holds(shard.ranges, rng) for rng in old_ranges):
                    return port
            return None

        try:
            port = await wait_for(done, timeout, interval=0.05, message="failover")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}\n{self.logs()}") from None
        assert port is not None  # wait_for returns a truthy value
        return port

    async def move_slot(self, slot: int, to_port: int) -> None:
        """Move ``slot`` with all its keys to the master on ``to_port``; returns once every
        live node agrees that it serves the slot."""
        await self.begin_migration(slot, to_port)
        await self.finish_migration(slot, to_port)

    async def begin_migration(self, slot: int, to_port: int) -> None:
        """Mark ``slot`` IMPORTING on ``to_port`` and MIGRATING on its owner (no key moves):
        the owner then answers ASK for a key of the slot it no longer holds.

        Raises:
            ValueError: ``to_port`` is no master, or already serves the slot.
        """
        source = await self._source(slot, to_port)
        source_id = await _call(source, "CLUSTER", "MYID")
        target_id = await _call(to_port, "CLUSTER", "MYID")
        # importing first: a client sent on by the source's ASK must find the target ready
        await _call(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await _call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)

    async def migrate_keys(self, slot: int, to_port: int, *keys: str | bytes) -> None:
        """Move these keys of ``slot`` to ``to_port`` now, the slot still migrating (after
        :meth:`begin_migration`): its owner answers ASK for them from then on."""
        await _migrate(await self._source(slot, to_port), to_port, keys)

    async def finish_migration(self, slot: int, to_port: int) -> None:
        """Migrate the keys of ``slot`` left on its owner to ``to_port`` and assign the slot to
        it everywhere (after :meth:`begin_migration`); returns once every live node agrees."""
        source = await self._source(slot, to_port)
        while keys := await _call(source, "CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH):
            await _migrate(source, to_port, keys)
        target_id = await _call(to_port, "CLUSTER", "MYID")
        live = self.live_ports
        others = [p for p in await self.masters() if p in live and p not in (source, to_port)]
        # the target first (it bumps its epoch, so its claim wins), then the source (it stops
        # answering ASK), then the other masters, so they redirect at once (the order of the
        # Redis Cluster specification)
        for port in [to_port, source, *others]:
            await _call(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

        async def moved() -> bool:
            view = await self._settled(self.live_ports)
            return view is not None and _covers(view[to_port].ranges, slot)

        await wait_for(moved, 20, interval=0.05, message=f"slot {slot} on {to_port} everywhere")

    async def _source(self, slot: int, to_port: int) -> int:
        masters = await self.masters()
        if to_port not in masters:
            raise ValueError(f"{to_port} is no master")
        source = await self.owner(slot)
        if source == to_port:
            raise ValueError(f"{to_port} already serves slot {slot}")
        return source

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"-- node {node.port}\n{node.tail()}" for node in self.nodes)


@asynccontextmanager
async def running_cluster(
    directory: Path, masters: int = 3, replicas: int = 0
) -> AsyncIterator[ClusterSetup]:
    """A started :class:`ClusterSetup` in ``directory``, stopped at the end."""
    setup = ClusterSetup(directory, masters, replicas)
    try:
        await setup.start()
        yield setup
    finally:
        setup.stop()


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` different ports on 127.0.0.1 that were free a moment ago (bound all at once, so
    no two are the same; a node's client and bus ports come from here)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


async def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=timeout, check=False
    )


async def _call(port: int, *args: Any) -> Any:
    """One command on the node on ``port`` (a fresh client, closed after it)."""
    client = redis_client(f"redis://127.0.0.1:{port}/0", connect_timeout=1)
    try:
        async with asyncio.timeout(10):  # (its clients have no socket timeout: callers bound)
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def _migrate(source: int, to_port: int, keys: Sequence[str | bytes]) -> None:
    await _call(source, "MIGRATE", "127.0.0.1", to_port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys)


async def _probe(port: int, *args: Any) -> Any:
    """:func:`_call`, None when the node does not answer (it may be dead or starting)."""
    try:
        return await _call(port, *args)
    except (RedisError, OSError):
        return None


async def _cluster_info(port: int) -> dict[str, str] | None:
    reply = await _probe(port, "CLUSTER", "INFO")
    if reply is None:
        return None
    fields = (line.split(":", 1) for line in reply.decode().splitlines() if ":" in line)
    return {name: value for name, value in fields}


async def _view(port: int) -> View | None:
    """``CLUSTER SLOTS`` of one node as master port -> :class:`Shard` (None: no answer)."""
    reply = await _probe(port, "CLUSTER", "SLOTS")
    if reply is None:
        return None
    ranges: dict[int, list[tuple[int, int]]] = {}
    replicas: dict[int, set[int]] = {}
    for first, last, master, *others in reply:
        port_of_master = int(master[1])
        ranges.setdefault(port_of_master, []).append((int(first), int(last)))
        replicas.setdefault(port_of_master, set()).update(int(other[1]) for other in others)
    return {
        master: Shard(tuple(sorted(ranges[master])), frozenset(replicas[master]))
        for master in ranges
    }


def _without_replicas(view: View) -> View:
    return {master: Shard(shard.ranges, frozenset()) for master, shard in view.items()}


def _covers(ranges: Sequence[tuple[int, int]], slot: int) -> bool:
    return any(first <= slot <= last for first, last in ranges)


def _holds(ranges: Sequence[tuple[int, int]], wanted: tuple[int, int]) -> bool:
    """Whether one of ``ranges`` holds every slot of ``wanted``."""
    return any(first <= wanted[0] and wanted[1] <= last for first, last in ranges)


async def _all_linked(replica_ports: Sequence[int]) -> bool:
    """Whether every replica's link to its master is up (``master_link_status``)."""
    for port in replica_ports:
        info = await _probe(port, "INFO", "replication")  # parsed by redis-py: a dict
        if info is None or info.get("master_link_status") != "up":
            return False
    return True


__all__ = [
    "NODE_TIMEOUT_MS",
    "NO_REDIS_CLI",
    "SLOTS",
    "ClusterNode",
    "ClusterSetup",
    "Shard",
    "running_cluster",
]
