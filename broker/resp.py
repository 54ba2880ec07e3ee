"""Raw RESP for the publish hot path: commands packed into one buffer, replies read by hiredis
(I/O adapter).

redis-py spends nearly all of a pipeline's cost on per-command Python work (building command
objects, one parser call per reply); measured on this project's machines, packing PUBLISH
commands into one buffer and reading the integer replies with ``hiredis.Reader`` is 5-8x
faster. This module is that road and nothing more: one connection, ``execute(buffer, n)``
writes a packed buffer and reads ``n`` replies. Addresses come from redis-py itself
(:meth:`RespAddress.from_url` uses ``redis.asyncio.connection.parse_url``;
:meth:`RespAddress.from_client` reads an existing client's connection pool), so ``redis://``,
``rediss://`` (TLS, same SSL options as redis-py), ``unix://``, ``AUTH [user] password`` and
the database number mean what they mean everywhere else. Whatever it cannot express (a
credential provider, a fake or cluster client) gives ``None``: the caller keeps redis-py.

Failures raise redis-py's exceptions (``ConnectionError``, ``AuthenticationError``,
``ResponseError``), so callers handle one family of Redis errors. After any failure, timeout or
cancellation mid-command the connection is closed: its replies would no longer line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

try:
    import hiredis

    #: whether the raw road is open at all (it needs hiredis to parse replies)
    AVAILABLE = True
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    AVAILABLE = False
#: bytes read per socket read while collecting replies
READ_SIZE = 1 << 16


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    if AVAILABLE:
        packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
        return packed
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def publish_prefix(channel: bytes) -> bytes:
    """``PUBLISH channel`` up to the message: append ``$len\\r\\n`` + message + ``\\r\\n``."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)


@dataclass(frozen=True, slots=True)
class RespAddress:
    """Where and as whom to connect. ``path`` set means a unix socket."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    connect_timeout: float = 5.0

    @classmethod
    def from_url(cls, url: str) -> RespAddress:
        """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``, ``unix:///path``.

        Raises:
            ValueError: a scheme redis-py does not know, or options this module cannot honour.
        """
        kwargs: dict[str, Any] = dict(parse_url(url))
        connection_class = kwargs.pop("connection_class", Connection)
        address = cls._from_kwargs(connection_class, kwargs)
        if address is None:
            raise ValueError("this Redis URL needs redis-py (unsupported options)")
        return address

    @classmethod
    def from_client(cls, client: aioredis.Redis) -> RespAddress | None:
        """The address of ``client``'s connection pool; ``None`` when it is anything but a
        plain TCP, TLS or unix-socket pool (fakes, sentinels, credential providers)."""
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        kwargs = getattr(pool, "connection_kwargs", None)
        if not isinstance(kwargs, dict):
            return None
        return cls._from_kwargs(pool.connection_class, dict(kwargs))

    @classmethod
    def _from_kwargs(cls, connection_class: Any, kwargs: dict[str, Any]) -> RespAddress | None:
        if kwargs.get("credential_provider") is not None:
            return None
        db = int(kwargs.get("db") or 0)
        timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or 5.0
        common: dict[str, Any] = {
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "db": db,
            "connect_timeout": float(timeout),
        }
        if connection_class is UnixDomainSocketConnection:
            if not kwargs.get("path"):
                return None
            return cls(path=str(kwargs["path"]), **common)
        host = str(kwargs.get("host") or "localhost")
        port = int(kwargs.get("port") or 6379)
        if connection_class is SSLConnection:
            try:
                # redis-py builds the context from the same ssl_* options it would use itself.
                context = SSLConnection(**kwargs).ssl_context.get()
            except Exception:
                return None
            return cls(host=host, port=port, tls=context, **common)
        if connection_class is Connection:
            return cls(host=host, port=port, **common)
        return None

    def describe(self) -> str:
        """Where, without credentials (for logs)."""
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


class RespConnection:
    """One Redis connection for packed pipelines. Not for concurrent use: one caller awaits
    one :meth:`execute` at a time (the publisher's single task)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()
        self.closed = False

    @classmethod
    async def connect(cls, address: RespAddress) -> RespConnection:
        """Open, authenticate and select the database.

        Raises:
            redis.exceptions.ConnectionError: the server cannot be reached (or timed out).
            redis.exceptions.AuthenticationError: AUTH was refused.
            redis.exceptions.ResponseError: SELECT was refused.
        """
        if not AVAILABLE:  # pragma: no cover
            raise RedisConnectionError("raw RESP needs hiredis")
        try:
            async with asyncio.timeout(address.connect_timeout):
                if address.path is not None:
                    reader, writer = await asyncio.open_unix_connection(address.path)
                else:
                    reader, writer = await asyncio.open_connection(
                        address.host,
                        address.port,
                        ssl=address.tls,
                        server_hostname=address.host if address.tls is not None else None,
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to {address.describe()}: {exc or 'timed out'}"
            ) from exc
        conn = cls(reader, writer)
        try:
            async with asyncio.timeout(address.connect_timeout):
                await conn._handshake(address)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, TimeoutError):
                raise RedisConnectionError(f"{address.describe()}: handshake timed out") from exc
            raise
        return conn

    async def _handshake(self, address: RespAddress) -> None:
        commands: list[bytes] = []
        if address.password is not None:
            if address.username:
                commands.append(encode_command(b"AUTH", address.username, address.password))
            else:
                commands.append(encode_command(b"AUTH", address.password))
        if address.db:
            commands.append(encode_command(b"SELECT", address.db))
        if not commands:
            return
        replies = await self.execute(b"".join(commands), len(commands))
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                is_auth = address.password is not None and i == 0
                kind = AuthenticationError if is_auth else ResponseError
                raise kind(str(reply))

    async def execute(self, buffer: bytes, replies: int) -> list[Any]:
        """Send ``buffer`` (``replies`` packed commands) and return the replies in order.

        A command's error reply is returned as an ``Exception`` instance, not raised (like
        ``pipeline.execute(raise_on_error=False)``).

        Raises:
            redis.exceptions.ConnectionError: the connection broke (it is closed).
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        parser = self._parser
        gets = parser.gets
        out: list[Any] = []
        try:
            self._writer.write(buffer)
            await self._writer.drain()
            read = self._reader.read
            while len(out) < replies:
                reply = gets()
                if reply is False:
                    data = await read(READ_SIZE)
                    if not data:
                        raise RedisConnectionError("connection closed by the server")
                    parser.feed(data)
                    continue
                out.append(reply)
            return out
        except BaseException as exc:
            # Half-read replies would pair the next command with a stale answer.
            self.close()
            if isinstance(exc, OSError | hiredis.ProtocolError):
                raise RedisConnectionError(f"redis connection lost: {exc}") from exc
            raise

    async def count_errors(self, buffer: bytes, replies: int) -> int:
        """:meth:`execute` for commands whose successful replies do not matter: only the
        number of error replies is returned (no list of replies is built)."""
        if self.closed:
            raise RedisConnectionError("connection closed")
        parser = self._parser
        gets = parser.gets
        reply_error = hiredis.ReplyError
        errors = 0
        got = 0
        try:
            self._writer.write(buffer)
            await self._writer.drain()
            read = self._reader.read
            while got < replies:
                reply = gets()
                if reply is False:
                    data = await read(READ_SIZE)
                    if not data:
                        raise RedisConnectionError("connection closed by the server")
                    parser.feed(data)
                    continue
                got += 1
                if type(reply) is reply_error:
                    errors += 1
            return errors
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError | hiredis.ProtocolError):
                raise RedisConnectionError(f"redis connection lost: {exc}") from exc
            raise

    def close(self) -> None:
        """Close at once (no QUIT round trip); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._writer.close()

    async def aclose(self) -> None:
        """Close and wait for the transport to finish closing."""
        self.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()


__all__ = [
    "AVAILABLE",
    "RespAddress",
    "RespConnection",
    "encode_command",
    "publish_prefix",
]
