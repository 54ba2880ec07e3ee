"""A real ``redis-server`` on a free port that a test can kill, restart and stop (testing layer).

    with RedisServer() as server:                     # or: async with RedisServer() as server
        ... server.url ...                            # redis://127.0.0.1:PORT/0
        server.restart()                              # SIGKILL, then back empty on the same port

    RedisServer(("--requirepass", "pw", "--user", "bot", "on", ">secret", "~t:*", "+@all"))
    RedisServer(tls=(cert, key, ca))                  # TLS only; url is rediss://...

No persistence (``--save ""``, no AOF, a throwaway ``--dir``): a restart comes back empty, as
after a crash of a cache. Needs ``redis-server`` on PATH.

Also here, for tests and benchmarks that talk to such a server: :func:`free_port`,
:func:`write_lease` (one consumer's lease, written by the very script consumers run) and
:func:`read_status` (the leader's status hash as text).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis

from broker.keys import Keys
from broker.leases import LeaseStore
from broker.redis_client import is_cluster_client
from broker.testing.wait import scaled
from broker.upbit.types import SubscriptionSet

#: What ``redis-server`` missing from PATH says.
NO_REDIS_SERVER = "redis-server is not on PATH (Debian: apt-get install redis-server)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1.

    Args:
        extra_args: more ``redis-server`` arguments (``--requirepass``, ``--user`` ACL rules,
            ``--client-output-buffer-limit`` ...).
        port: the port (default: a free one). It stays the same across :meth:`restart`.
        tls: ``(cert, key, ca)`` file paths: listen with TLS only (clients are not asked for a
            certificate); :attr:`url` is then ``rediss://`` and names the CA.

    Raises:
        RuntimeError: no ``redis-server`` on PATH.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        tls: tuple[str | Path, str | Path, str | Path] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(NO_REDIS_SERVER)
        self.binary = binary
        self.port = port or free_port()
        self.tls = tuple(Path(p) for p in tls) if tls is not None else None
        self.extra_args = tuple(extra_args)
        self.dir = tempfile.mkdtemp(prefix="upbit-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://...?ssl_ca_certs=CA`` with TLS)."""
        return self.url_for()

    def url_for(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """The URL of this server as ``user`` with ``password`` (both optional), database ``db``."""
        scheme = "rediss" if self.tls else "redis"
        auth = f"{user or ''}:{password}@" if password is not None else ""
        url = f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"
        if self.tls:
            url += f"?ssl_ca_certs={self.tls[2]}"
        return url

    @property
    def pid(self) -> int:
        """The running server's process id."""
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers (``PING``, or ``NOAUTH`` with a password).

        Blocks up to ``timeout`` seconds (scaled): call it through ``asyncio.to_thread`` from a
        running event loop, or use ``async with``.

        Raises:
            RuntimeError: it exited, or did not answer in time.
        """
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            args += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*args, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if self._answers():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {timeout:g} s")

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            if self.tls is None:
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            ctx = ssl.create_default_context(cafile=str(self.tls[2]))
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (nothing is saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """:meth:`kill`, then :meth:`start` on the same port: the server comes back empty."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the server and remove its directory (it is never started again)."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def write_lease(
    redis: Redis,
    client_id: str,
    streams: Mapping[str, Iterable[str]],
    ttl_ms: int = 5000,
    namespace: str = "t",
    *,
    host: str = "test",
) -> None:
    """Write (or renew) ``client_id``'s lease on ``streams`` (``{"ticker": ["KRW-BTC"]}``)
    with the very script consumers run; a running broker serves it at once."""
    await LeaseStore(redis, namespace).write(
        client_id, SubscriptionSet.of(streams), ttl_ms=ttl_ms, host=host, pid=os.getpid()
    )


async def read_status(redis: Redis, namespace: str = "t") -> dict[str, str]:
    """The leader's status hash ``{ns}:status`` as text (empty: no broker wrote one); on a
    Redis Cluster client, ``{{ns}}:status`` (``broker.keys``)."""
    status = Keys(namespace, hash_tag=is_cluster_client(redis)).status
    raw: dict[Any, Any] = await redis.hgetall(status)
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


__all__ = ["NO_REDIS_SERVER", "RedisServer", "free_port", "read_status", "write_lease"]
