"""A Sentinel-managed Redis for tests: one master, one replica, three sentinels, real processes.

    async with running_sentinels(tmp_path) as ha:
        ha.url()                                   # redis+sentinel://127.0.0.1:P1,...:P3/mymaster/0
        ha.master.kill()                           # SIGKILL the master
        await ha.wait_failover(old_port)           # until every sentinel names the replica

The master and the replica are :class:`broker.testing.RedisServer` processes (the replica with
``--replicaof``); each sentinel is ``redis-server <conf> --sentinel`` with its config file in
the test's directory (Sentinel rewrites it), on a free port. The replica is attached before the
sentinels start, so their first ``INFO`` of the master already lists it; readiness then waits
until every sentinel sees the replica and the two other sentinels (they find each other through
the master's hello channel, every 2 s). Everything is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.testing import RedisServer, free_port, wait_for
from broker.testing.redis import NO_REDIS_SERVER
from broker.testing.wait import scaled

#: the name the sentinels monitor the master under
SERVICE = "mymaster"
#: sentinels that must agree the master is down before a failover
QUORUM = 2
#: a master silent this long is down for a sentinel (Sentinel's default: 30 s)
DOWN_AFTER_MS = 1000
#: how long a failover may take before another is tried (Sentinel's default: 3 min)
FAILOVER_TIMEOUT_MS = 3000


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``master_port`` on 127.0.0.1."""

    def __init__(self, master_port: int, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(NO_REDIS_SERVER)
        self.binary = binary
        self.port = free_port()
        self.conf = directory / f"sentinel-{self.port}.conf"
        self.log = directory / f"sentinel-{self.port}.log"
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {directory}\n"
            f"logfile {self.log}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start and return once it answers PING (blocking: call it from a thread)."""
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sentinel exited with {self.proc.returncode}: {self.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
            ):
                raw.sendall(b"PING\r\n")
                if raw.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"sentinel did not answer within {timeout:g} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        """The end of its log (for a failing test's message)."""
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class SentinelSetup:
    """The master, its replica and three sentinels (see the module docstring)."""

    def __init__(self, directory: Path, sentinels: int = 3) -> None:
        self.directory = directory
        # no delay before a full sync: the replica attaches at once
        self.master = RedisServer(("--repl-diskless-sync-delay", "0"))
        self.replica = RedisServer(
            ("--replicaof", "127.0.0.1", str(self.master.port), "--repl-diskless-sync-delay", "0")
        )
        self.sentinels = [SentinelProcess(self.master.port, directory) for _ in range(sentinels)]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def url(self, db: int = 0, *, scheme: str = "redis+sentinel", query: str = "") -> str:
        """The Sentinel URL of the master, sentinels in order."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{scheme}://{hosts}/{SERVICE}/{db}" + (f"?{query}" if query else "")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    async def start(self) -> None:
        """Start everything and wait until the sentinels know the whole topology."""
        await asyncio.to_thread(self.master.start)
        await asyncio.to_thread(self.replica.start)
        await wait_for(
            lambda: _link_up(self.replica.port), 20, interval=0.05, message="replica in sync"
        )
        for sentinel in self.sentinels:
            await asyncio.to_thread(sentinel.start)
        await wait_for(self._sentinels_ready, 30, interval=0.1, message="sentinels ready")

    async def _sentinels_ready(self) -> bool:
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            state = await _master_state(sentinel.port)
            if state is None or state.get("num-slaves", 0) < 1:
                return False
            if state.get("num-other-sentinels", 0) < others:
                return False
        return True

    async def master_port(self) -> int | None:
        """The master's port as the first live sentinel names it (None: none answers)."""
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            try:
                client = aioredis.Redis(port=sentinel.port, socket_connect_timeout=1)
                try:
                    reply: Any = await client.execute_command(
                        "SENTINEL", "get-master-addr-by-name", SERVICE
                    )
                finally:
                    await client.aclose()
            except (RedisError, OSError):
                continue
            if reply:
                return int(reply[1])
        return None

    async def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every live sentinel names another master than ``old_port`` and that
        node says it is one (ROLE); returns its port."""

        async def done() -> int | None:
            ports = set()
            for sentinel in self.sentinels:
                if sentinel.proc is None:
                    continue
                state = await _master_state(sentinel.port)
                if state is None:
                    return None
                ports.add(int(state["port"]))
            if len(ports) != 1:
                return None
            port = ports.pop()
            if port == old_port or await _role(port) != "master":
                return None
            return port

        port: int = await wait_for(done, timeout, interval=0.02, message="failover")
        return port

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        return "\n".join(f"-- sentinel {s.port}\n{s.tail()}" for s in self.sentinels)


@asynccontextmanager
async def running_sentinels(directory: Path) -> AsyncIterator[SentinelSetup]:
    """A started :class:`SentinelSetup` in ``directory``, stopped at the end."""
    setup = SentinelSetup(directory)
    try:
        await setup.start()
        yield setup
    finally:
        setup.stop()


async def _master_state(port: int) -> dict[str, Any] | None:
    """``SENTINEL MASTER`` of :data:`SERVICE` as a dict (None: the sentinel did not answer)."""
    client = aioredis.Redis(port=port, socket_connect_timeout=1, decode_responses=True)
    try:
        state: dict[str, Any] = await client.sentinel_master(SERVICE)
        return state
    except (RedisError, OSError):
        return None
    finally:
        await client.aclose()


async def _role(port: int) -> str | None:
    client = aioredis.Redis(port=port, socket_connect_timeout=1)
    try:
        reply: Any = await client.execute_command("ROLE")
        return str(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])
    except (RedisError, OSError):
        return None
    finally:
        await client.aclose()


async def _link_up(replica_port: int) -> bool:
    client = aioredis.Redis(port=replica_port, socket_connect_timeout=1, decode_responses=True)
    try:
        info: dict[str, Any] = await client.info("replication")
        return info.get("master_link_status") == "up"
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


#: whether the replica on ``replica_port`` is in sync with its master (``master_link_status``)
link_up = _link_up

__all__ = ["SERVICE", "SentinelProcess", "SentinelSetup", "link_up", "running_sentinels"]
