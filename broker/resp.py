"""Raw RESP for the publish hot path: commands packed into one buffer, replies read by hiredis
(I/O adapter).

redis-py spends nearly all of a pipeline's cost on per-command Python work (building command
objects, one parser call per reply); measured on this project's machines, packing PUBLISH
commands into one buffer and reading the integer replies with ``hiredis.Reader`` is 5-8x
faster. This module is that road and nothing more: one connection, ``send(buffer, n)`` writes
a packed buffer and counts its ``n`` replies as they arrive (no waiting), ``execute(buffer, n)``
awaits them. Addresses come from redis-py itself
(:meth:`RespAddress.from_url` uses ``redis.asyncio.connection.parse_url``;
:meth:`RespAddress.from_client` reads an existing client's connection pool), so ``redis://``,
``rediss://`` (TLS, same SSL options as redis-py), ``unix://``, ``AUTH [user] password`` and
the database number mean what they mean everywhere else. Whatever it cannot express (a
credential provider, a fake or cluster client) gives ``None``: the caller keeps redis-py.

A master found through Sentinel (a ``redis+sentinel://`` URL, ``broker.redis_url``, or a client
built on redis-py's ``SentinelConnectionPool``) is an address with a :class:`SentinelRoute`.
Every connect resolves it afresh (:meth:`RespAddress.discover`): the sentinels are asked in
order (``SENTINEL get-master-addr-by-name``) until one names the master, and the connection
then proves with ``ROLE`` that the node it reached is a master before it is used
(:class:`NotMasterError` otherwise): a sentinel that has not yet noticed a failover names the
demoted master, which still takes ``PUBLISH`` (only for its own subscribers) and must never be
written to. Readers that open their own protocol (the control channel, the consumer's
subscription) resolve with :meth:`RespAddress.resolve`, which proves the role on a short
connection of its own.

A Redis Cluster (a ``redis+cluster://`` URL, or redis-py's ``RedisCluster``) is an address
with a :class:`ClusterRoute`: its seed nodes and the slot whose master a connection wants.
:meth:`RespAddress.slot_map` asks the seeds in order for ``CLUSTER SLOTS``; a connect goes to
the master owning the route's slot (the publisher, which writes to every master, routes each
command itself: ``broker.sharded``).

Failures raise redis-py's exceptions (``ConnectionError``, ``AuthenticationError``,
``ResponseError``), so callers handle one family of Redis errors. After any failure, timeout or
cancellation mid-command the connection is closed: its replies would no longer line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.cluster_slots import ClusterReplyError, SlotMap, parse_cluster_slots
from broker.redis_url import is_cluster_url, is_sentinel_url, parse_cluster_url, parse_sentinel_url

try:
    import hiredis

    #: whether the raw road is open at all (it needs hiredis to parse replies)
    AVAILABLE = True
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    AVAILABLE = False


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


def bulk(data: bytes) -> bytes:
    """``data`` as a RESP bulk string (one argument of a command)."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def publish_prefix(channel: bytes, *, sharded: bool = False) -> bytes:
    """``PUBLISH channel`` (``SPUBLISH`` on a cluster: sharded pub/sub) up to the message:
    append ``$len\\r\\n`` + message + ``\\r\\n``."""
    if sharded:
        return b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)


def xadd_prefix(key: bytes, cap: int) -> bytes:
    """``XADD key MAXLEN ~ cap * f`` up to the value: append ``$len\r\n`` + frame + ``\r\n``
    (the history entry's one field, ``broker.keys.HISTORY_FRAME_FIELD``)."""
    head = encode_command(b"XADD", key, b"MAXLEN", b"~", cap, b"*", b"f", b"")
    return head[: -len(b"$0\r\n\r\n")]  # the empty value, which the frame replaces


class NotMasterError(RedisConnectionError):
    """The node a sentinel named is not a master (any more, or not yet): not to be used."""


@dataclass(frozen=True, slots=True)
class SentinelRoute:
    """How a master is found: the sentinels, asked in order, the service they monitor, and how
    to reach them (their own credentials; TLS like the master's)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    def describe(self) -> str:
        """The sentinels and the service, without credentials (for logs)."""
        scheme = "rediss+sentinel" if self.tls is not None else "redis+sentinel"
        return f"{scheme}://{','.join(f'{h}:{p}' for h, p in self.sentinels)}/{self.service}"


@dataclass(frozen=True, slots=True)
class ClusterRoute:
    """How a Redis Cluster is found: seed nodes asked in order for the slot map, and the slot
    whose master a single connection goes to."""

    nodes: tuple[tuple[str, int], ...]
    slot: int = 0

    def describe(self) -> str:
        return f"redis+cluster://{','.join(f'{h}:{p}' for h, p in self.nodes)}"


class ClusterDownError(RedisConnectionError):
    """No seed node answered with a map in which the slot wanted has a master."""


@dataclass(frozen=True, slots=True)
class RespAddress:
    """Where and as whom to connect. ``path`` set means a unix socket; ``sentinel`` set means
    the master those sentinels name (``host`` and ``port`` are then found at each connect)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    connect_timeout: float = 5.0
    sentinel: SentinelRoute | None = None
    #: named by a sentinel: a connection proves with ROLE that it reached a master
    master_only: bool = False
    #: a node of a Redis Cluster: the master of ``cluster.slot`` (found at each connect)
    cluster: ClusterRoute | None = None

    @classmethod
    def from_url(cls, url: str) -> RespAddress:
        """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``, ``unix:///path``,
        ``redis+sentinel://...`` and ``rediss+sentinel://...`` (``broker.redis_url``).

        Raises:
            ValueError: a scheme redis-py does not know, a malformed Sentinel URL
                (``RedisUrlError``), or options this module cannot honour.
        """
        route: SentinelRoute | None = None
        cluster: ClusterRoute | None = None
        if is_cluster_url(url):
            parsed_cluster = parse_cluster_url(url)
            url = parsed_cluster.node_url(*parsed_cluster.nodes[0])
            cluster = ClusterRoute(parsed_cluster.nodes)
        elif is_sentinel_url(url):
            parsed = parse_sentinel_url(url)
            url = parsed.redis_url()  # the master's options, read by redis-py
            route = SentinelRoute(
                parsed.sentinels, parsed.service, parsed.sentinel_username, parsed.sentinel_password
            )
        kwargs: dict[str, Any] = dict(parse_url(url))
        connection_class = kwargs.pop("connection_class", Connection)
        address = cls._from_kwargs(connection_class, kwargs)
        if address is None:
            raise ValueError("this Redis URL needs redis-py (unsupported options)")
        if route is not None:
            address = replace(address, sentinel=replace(route, tls=address.tls))
        if cluster is not None:
            address = replace(address, cluster=cluster)
        return address

    @classmethod
    def from_client(cls, client: aioredis.Redis) -> RespAddress | None:
        """The address of ``client``'s connection pool; ``None`` when it is anything but a
        plain TCP, TLS or unix-socket pool, or a Sentinel pool of a master reached over TCP or
        TLS (fakes, replicas, credential providers)."""
        if isinstance(client, aioredis.RedisCluster):
            return cls._from_cluster_client(client)
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        kwargs = getattr(pool, "connection_kwargs", None)
        if not isinstance(kwargs, dict):
            return None
        if isinstance(pool, SentinelConnectionPool):
            return cls._from_sentinel_pool(pool, dict(kwargs))
        return cls._from_kwargs(pool.connection_class, dict(kwargs))

    @classmethod
    def _from_cluster_client(cls, client: aioredis.RedisCluster) -> RespAddress | None:
        """A cluster client's seed nodes (the ones it was given, and those it has found) and
        the options of its connections."""
        kwargs = dict(client.connection_kwargs)
        connection_class = kwargs.pop("connection_class", Connection)
        seeds = [(str(node.host), int(node.port)) for node in client.startup_nodes]
        seeds += [(str(node.host), int(node.port)) for node in client.get_primaries()]
        nodes = tuple(dict.fromkeys(seeds))
        if not nodes:
            return None
        host, port = nodes[0]
        address = cls._from_kwargs(connection_class, {**kwargs, "host": host, "port": port})
        return None if address is None else replace(address, cluster=ClusterRoute(nodes))

    def routed(self, slot: int) -> RespAddress:
        """This cluster address, for the master of ``slot`` (unchanged for a single server)."""
        if self.cluster is None:
            return self
        return replace(self, cluster=replace(self.cluster, slot=slot))

    def node(self, host: str, port: int) -> RespAddress:
        """One node of this cluster, connected to as is (no routing)."""
        return replace(self, host=host, port=port, cluster=None, sentinel=None)

    async def slot_map(self) -> SlotMap:
        """The cluster's slot map, from the first seed that answers ``CLUSTER SLOTS``.

        The seeds are asked in their order, each :data:`SEED_STAGGER` seconds after the one
        before without waiting for it (each bounded by ``connect_timeout``): a seed that does
        not answer at all (a host gone, a frozen process) costs the next one a quarter of a
        second, not the whole timeout, and the first answer wins.

        Raises:
            ClusterDownError: no seed answered (each one's reason in the message).
            redis.exceptions.AuthenticationError: every seed refused our AUTH.
        """
        route = self.cluster
        if route is None:
            raise RedisConnectionError(f"{self.describe()} is not a cluster")

        async def ask(order: int, host: str, port: int) -> SlotMap | tuple[str, bool]:
            await asyncio.sleep(order * SEED_STAGGER)
            try:
                conn = await RespConnection.connect(self.node(host, port))
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        [reply] = await conn.execute(encode_command(b"CLUSTER", b"SLOTS"), 1)
                finally:
                    await conn.aclose()
                if isinstance(reply, Exception):
                    raise ResponseError(str(reply))
                return parse_cluster_slots(reply, default_host=host)
            except (RedisError, OSError, TimeoutError, ClusterReplyError) as exc:
                return f"{host}:{port}: {exc or 'timed out'}", isinstance(exc, AuthenticationError)

        tasks = [
            asyncio.ensure_future(ask(order, host, port))
            for order, (host, port) in enumerate(route.nodes)
        ]
        errors: list[str] = []
        refused = 0
        try:
            for done in asyncio.as_completed(tasks):
                answer = await done
                if isinstance(answer, SlotMap):
                    return answer
                errors.append(answer[0])
                refused += answer[1]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        why = f"no node of {route.describe()} gave its slot map: {'; '.join(errors)}"
        if refused == len(route.nodes):
            raise AuthenticationError(why)
        raise ClusterDownError(why)

    @classmethod
    def _from_sentinel_pool(
        cls, pool: SentinelConnectionPool, kwargs: dict[str, Any]
    ) -> RespAddress | None:
        if not pool.is_master:
            return None
        kwargs.pop("connection_pool", None)
        classes: dict[Any, Any] = {
            SentinelManagedConnection: Connection,
            SentinelManagedSSLConnection: SSLConnection,
        }
        master = cls._from_kwargs(classes.get(pool.connection_class), kwargs)
        # the sentinels as redis-py reaches them (one credential and TLS setting for all)
        sentinels = []
        for client in pool.sentinel_manager.sentinels:
            sentinel_pool = client.connection_pool
            node = cls._from_kwargs(
                sentinel_pool.connection_class, dict(sentinel_pool.connection_kwargs)
            )
            if node is None or node.path is not None:
                return None
            sentinels.append(node)
        if master is None or not sentinels:
            return None
        first = sentinels[0]
        if any(
            (s.username, s.password, s.tls is None)
            != (first.username, first.password, first.tls is None)
            for s in sentinels
        ):
            return None
        route = SentinelRoute(
            tuple((s.host, s.port) for s in sentinels),
            str(pool.service_name),
            first.username,
            first.password,
            first.tls,
        )
        return replace(master, sentinel=route)

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

    async def discover(self) -> RespAddress:
        """The address to connect to now: this one, or, through Sentinel, the master the first
        sentinel that knows the service names (``master_only``: the connection must prove it
        with ROLE). Each sentinel is given ``connect_timeout`` to answer.

        Raises:
            redis.asyncio.sentinel.MasterNotFoundError: no sentinel named a master (each one's
                reason in the message).
            redis.exceptions.AuthenticationError: every sentinel refused our AUTH.
        """
        if self.cluster is not None:
            slots = await self.slot_map()
            master = slots.node_of(self.cluster.slot)
            if master is None:
                raise ClusterDownError(
                    f"{self.cluster.describe()}: no master owns slot {self.cluster.slot}"
                )
            return self.node(*master)
        route = self.sentinel
        if route is None:
            return self
        errors: list[str] = []
        refused = 0
        query = encode_command(b"SENTINEL", b"get-master-addr-by-name", route.service)
        for host, port in route.sentinels:
            node = RespAddress(
                host=host,
                port=port,
                tls=route.tls,
                username=route.username,
                password=route.password,
                connect_timeout=self.connect_timeout,
            )
            try:
                conn = await RespConnection.connect(node)
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        [reply] = await conn.execute(query, 1)
                finally:
                    await conn.aclose()
            except (RedisError, OSError, TimeoutError) as exc:
                refused += isinstance(exc, AuthenticationError)
                errors.append(f"{host}:{port}: {exc or 'timed out'}")
                continue
            if isinstance(reply, Exception):
                errors.append(f"{host}:{port}: {reply}")
            elif not reply or len(reply) != 2:
                errors.append(f"{host}:{port}: knows no master {route.service!r}")
            else:
                found = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                return replace(
                    self, host=found, port=int(reply[1]), sentinel=None, master_only=True
                )
        why = f"no sentinel named the master of {route.service!r}: {'; '.join(errors)}"
        if refused == len(route.sentinels):
            raise AuthenticationError(why)
        raise MasterNotFoundError(why)

    async def resolve(self) -> RespAddress:
        """:meth:`discover`, and for a master found through Sentinel, proof on a short
        connection of its own (AUTH, ROLE) that it is one: for readers that speak their own
        protocol on the connection they open next.

        Raises:
            redis.exceptions.ConnectionError: no master found, or the node named is not a
                master (:class:`NotMasterError`), or it cannot be reached.
            redis.exceptions.AuthenticationError: AUTH was refused.
        """
        if self.cluster is not None:
            return await self.discover()
        if self.sentinel is None:
            return self
        conn = await RespConnection.connect(self)
        await conn.aclose()
        assert conn.address is not None
        return conn.address

    async def connect(self, protocol: asyncio.Protocol) -> None:
        """Open a TCP, TLS or unix-socket connection to this address driven by ``protocol``
        (no timeout of its own: the callers bound it). Raises ``OSError`` when it cannot; an
        address with a Sentinel route must be resolved first (:meth:`discover`)."""
        if self.sentinel is not None or self.cluster is not None:
            raise RedisConnectionError(f"{self.describe()}: resolve the master first")
        loop = asyncio.get_running_loop()
        if self.path is not None:
            await loop.create_unix_connection(lambda: protocol, self.path)
        else:
            await loop.create_connection(
                lambda: protocol,
                self.host,
                self.port,
                ssl=self.tls,
                server_hostname=self.host if self.tls is not None else None,
            )

    def describe(self) -> str:
        """Where, without credentials (for logs)."""
        if self.cluster is not None:
            return f"{self.cluster.describe()} (slot {self.cluster.slot})"
        if self.sentinel is not None:
            return f"{self.sentinel.describe()}/{self.db}"
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


#: a cluster's seeds are asked this long apart, without waiting for an answer (slot_map)
SEED_STAGGER = 0.25

#: with :meth:`RespConnection.poll_replies` on, replies wait unread at most this long after the
#: last write (the next write reads them without a wake-up of its own; this timer reads them
#: when no write comes)
REPLY_POLL_INTERVAL = 0.05
#: a write reads the replies if the last read was at least this long ago (at 100 bursts a
#: second, every write; at thousands of small writes a second, a read every few of them)
REPLY_POLL_GAP = 0.002
#: bytes asked of one ``recv`` when replies are polled
_POLL_CHUNK = 262_144


class _InFlight:
    """One buffer of commands written and not yet fully answered."""

    __slots__ = ("errors", "refusals", "remaining", "replies", "sent_at", "token", "waiter")

    def __init__(
        self,
        remaining: int,
        token: Any = None,
        replies: list[Any] | None = None,
        waiter: asyncio.Future[_InFlight] | None = None,
    ) -> None:
        self.remaining = remaining
        self.errors = 0
        #: the error replies themselves (None: none), for ``on_refused``
        self.refusals: list[Exception] | None = None
        self.token = token
        self.replies = replies
        self.waiter = waiter
        self.sent_at = time.monotonic()


#: called with (token, error replies) when a buffer given to :meth:`RespConnection.send` is
#: fully answered
OnAnswered = Callable[[Any, int], None]
#: called with (why, tokens of unanswered buffers) when the connection broke (never for close())
OnLost = Callable[[Exception, list[Any]], None]
#: called with (token, its error replies) before ``on_answered`` when a buffer given to
#: :meth:`RespConnection.send` got error replies (which command refused what: ``-OOM`` ...)
OnRefused = Callable[[Any, list[Exception]], None]


class RespConnection(asyncio.Protocol):
    """One Redis connection for packed pipelines, as an asyncio protocol.

    Replies are parsed where they arrive (``data_received``), so a writer need not wait for
    them: :meth:`send` writes a buffer and returns at once, and the buffer's replies are
    counted later, in order, and reported through ``on_answered`` (its error replies first
    through ``on_refused``: an ``-OOM`` is not a ``-NOPERM``). That is the publisher's
    road: one write per receive burst, no task switch waiting for Redis. :meth:`execute` and
    :meth:`count_errors` are the awaiting variants (handshake, tests, benchmarks). Buffers are
    answered in the order they were written, whichever way they were sent.
    """

    def __init__(
        self,
        on_answered: OnAnswered | None = None,
        on_lost: OnLost | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        self._parser = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._inflight: deque[_InFlight] = deque()
        self._on_answered = on_answered
        self._on_lost = on_lost
        self._on_refused = on_refused
        self._writable: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._report_loss = True
        self._abort_reason: Exception | None = None
        self.closed = False
        #: the transport's buffer is over its high-water mark: stop writing until it drains
        self.writing_paused = False
        #: the node this connection reached (through Sentinel: the master found)
        self.address: RespAddress | None = None
        #: a duplicate of the socket's descriptor, read directly while replies are polled
        #: (None: polling is off, or the transport cannot be read this way, e.g. TLS)
        self._poll_sock: socket.socket | None = None
        #: the transport is paused for reading: replies are read by :meth:`_poll`
        self._polling = False
        self._in_poll = False
        self._poll_timer: asyncio.TimerHandle | None = None
        self._written_since_poll = False
        self._polled_at = 0.0

    @classmethod
    async def connect(
        cls,
        address: RespAddress,
        *,
        on_answered: OnAnswered | None = None,
        on_lost: OnLost | None = None,
        on_refused: OnRefused | None = None,
    ) -> RespConnection:
        """Open, authenticate and select the database; through Sentinel, find the master first
        and prove its role (:attr:`address` is then the node reached).

        Raises:
            redis.exceptions.ConnectionError: the server cannot be reached (or timed out); no
                sentinel named a master (``MasterNotFoundError``); the node named is not a
                master (:class:`NotMasterError`).
            redis.exceptions.AuthenticationError: AUTH was refused.
            redis.exceptions.ResponseError: SELECT was refused.
        """
        if not AVAILABLE:  # pragma: no cover
            raise RedisConnectionError("raw RESP needs hiredis")
        target = await address.discover()
        conn = cls(on_answered, on_lost, on_refused)
        conn.address = target
        try:
            async with asyncio.timeout(target.connect_timeout):
                await target.connect(conn)
        except (OSError, TimeoutError) as exc:
            conn.close()
            raise RedisConnectionError(
                f"cannot connect to {target.describe()}: {exc or 'timed out'}"
            ) from exc
        try:
            async with asyncio.timeout(target.connect_timeout):
                await conn._handshake(target)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, TimeoutError):
                raise RedisConnectionError(f"{target.describe()}: handshake timed out") from exc
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
        if address.master_only:
            commands.append(encode_command(b"ROLE"))
        if not commands:
            return
        replies = await self.execute(b"".join(commands), len(commands))
        role = replies.pop() if address.master_only else None
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                is_auth = address.password is not None and i == 0
                kind = AuthenticationError if is_auth else ResponseError
                raise kind(str(reply))
        if address.master_only:
            if isinstance(role, Exception):
                # ROLE is in @admin and @dangerous, which least-privilege ACLs leave out;
                # INFO (granted for the memory and server checks) says the same.
                [role] = await self.execute(encode_command(b"INFO", b"replication"), 1)
            if isinstance(role, Exception):
                raise ResponseError(
                    f"cannot tell whether {address.describe()} is a master: ROLE and INFO were "
                    f"refused ({role}); grant +role or +info"
                )
            name = _role(role)
            if name != "master":
                raise NotMasterError(
                    f"{address.describe()} is a {name or 'node of no role'}, "
                    "not the master: the sentinel has not seen the failover yet"
                )

    # -- writing ----------------------------------------------------------------------------

    def send(self, buffer: bytes, replies: int, token: Any = None) -> None:
        """Write ``buffer`` (``replies`` packed commands) without waiting; ``on_answered(token,
        errors)`` follows once all its replies are in.

        Raises:
            redis.exceptions.ConnectionError: the connection is closed.
        """
        entry = _InFlight(replies, token)
        self._write(buffer, entry)
        if self._poll_sock is not None:
            self._written_since_poll = True
            if not self._polling:
                self._start_polling()
            elif not self._in_poll and entry.sent_at - self._polled_at >= REPLY_POLL_GAP:
                # The replies that came since the last write, without a wake-up of their own;
                # read after this write, so that they never delay it. Writes closer together
                # than the gap leave them to a later one (fewer reads, each of more replies).
                self._poll()

    def poll_replies(self) -> bool:
        """Read the replies to :meth:`send` without a wake-up of their own (the publisher's
        road: at ~100 bursts a second, waking for each burst's replies cost as much as the
        write). The transport stops reading while buffers are in flight; each :meth:`send`,
        once it has written, reads (one non-blocking ``recv``) what Redis has answered so
        far, and a timer
        reads them ``REPLY_POLL_INTERVAL`` after the last write when no further write comes,
        then the transport reads again (an idle connection's close is noticed at once).
        Replies are counted exactly as before, only up to that long later; an awaited
        command (:meth:`execute`, :meth:`drain`) reads as usual. False: this transport cannot
        be read directly (TLS, no socket), and replies keep their own wake-ups.
        """
        transport = self._transport
        if self._poll_sock is not None:
            return True
        if transport is None or self.closed or transport.get_extra_info("sslcontext") is not None:
            return False
        raw = transport.get_extra_info("socket")
        if raw is None:
            return False
        try:
            # A duplicate of the descriptor (the same socket; the transport keeps its own):
            # asyncio's and uvloop's transports hand out no socket that may be read.
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
        except (OSError, ValueError):
            return False
        self._poll_sock = sock
        return True

    def _start_polling(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()
        self._polling = True
        self._poll_timer = asyncio.get_running_loop().call_later(
            REPLY_POLL_INTERVAL, self._poll_due
        )

    def _stop_polling(self) -> None:
        """The transport reads again (replies already waiting are read at the loop's next
        turn)."""
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if self._polling:
            self._polling = False
            if not self.closed and self._transport is not None:
                self._transport.resume_reading()

    def _poll_due(self) -> None:
        """No write for a while may have read the replies: read them now; once a whole
        interval passed without a write, the transport reads again."""
        self._poll_timer = None
        if self.closed or not self._polling:
            return
        self._poll()
        if self.closed:
            return
        if self._written_since_poll:
            self._written_since_poll = False
            self._poll_timer = asyncio.get_running_loop().call_later(
                REPLY_POLL_INTERVAL, self._poll_due
            )
        else:
            self._stop_polling()

    def _poll(self) -> None:
        """Read whatever Redis has sent (non-blocking) and count it like the transport would;
        an end of stream or a socket error breaks the connection as the transport would."""
        sock = self._poll_sock
        assert sock is not None
        self._polled_at = time.monotonic()
        self._in_poll = True
        try:
            while not self.closed:
                try:
                    data = sock.recv(_POLL_CHUNK)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self.abort(RedisConnectionError(str(exc)))  # (reported as a loss)
                    return
                if not data:
                    self.abort(RedisConnectionError("closed by the server"))
                    return
                self.data_received(data)
                if len(data) < _POLL_CHUNK:
                    return
        finally:
            self._in_poll = False

    async def execute(self, buffer: bytes, replies: int) -> list[Any]:
        """Send ``buffer`` (``replies`` packed commands) and return the replies in order.

        A command's error reply is returned as an ``Exception`` instance, not raised (like
        ``pipeline.execute(raise_on_error=False)``). Cancelled half way, the connection is
        closed: its next reply would belong to the abandoned command.

        Raises:
            redis.exceptions.ConnectionError: the connection broke (it is closed).
        """
        entry = await self._roundtrip(buffer, replies, collect=True)
        assert entry.replies is not None
        return entry.replies

    async def count_errors(self, buffer: bytes, replies: int) -> int:
        """:meth:`execute` for commands whose successful replies do not matter: only the
        number of error replies is returned (no list of replies is built)."""
        return (await self._roundtrip(buffer, replies, collect=False)).errors

    async def drain(self) -> None:
        """Wait until every buffer written so far is answered.

        Raises:
            redis.exceptions.ConnectionError: the connection broke first.
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        if self._inflight:
            await self._roundtrip(b"", 0, collect=False)

    async def wait_writable(self) -> None:
        """Return once the transport takes writes again (at once when it does).

        Raises:
            redis.exceptions.ConnectionError: the connection broke meanwhile.
        """
        while self.writing_paused and not self.closed:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._writable)
        if self.closed:
            raise RedisConnectionError("connection closed")

    @property
    def unanswered_since(self) -> float | None:
        """Monotonic time the oldest unanswered buffer was written; None if all are answered."""
        return self._inflight[0].sent_at if self._inflight else None

    async def _roundtrip(self, buffer: bytes, replies: int, *, collect: bool) -> _InFlight:
        waiter: asyncio.Future[_InFlight] = asyncio.get_running_loop().create_future()
        entry = _InFlight(replies, replies=[] if collect else None, waiter=waiter)
        if self._polling:
            self._poll()  # (replies read so far keep their order before this one's)
            self._stop_polling()  # an awaited reply is read as soon as it comes
            if self.closed:
                # The poll found the connection broken: return once that is reported, as
                # when the transport finds it while we wait.
                await asyncio.shield(self._lost)
        self._write(buffer, entry)
        if replies == 0 and len(self._inflight) == 1:
            self._complete(self._inflight.popleft())
        try:
            return await waiter
        except asyncio.CancelledError:
            # Buffers written by send() die with the connection: their owner must hear of it.
            unawaited = any(e.waiter is None for e in self._inflight)
            self.abort(RedisConnectionError("a command was abandoned half way"), report=unawaited)
            raise

    def _write(self, buffer: bytes, entry: _InFlight) -> None:
        if self.closed or self._transport is None:
            raise RedisConnectionError("connection closed")
        if buffer:
            self._transport.write(buffer)
        self._inflight.append(entry)

    # -- protocol callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        gets = parser.gets
        inflight = self._inflight
        reply_error = hiredis.ReplyError
        try:
            while True:
                # A zero-command marker (drain) is complete once everything before it is.
                while inflight and inflight[0].remaining == 0:
                    self._complete(inflight.popleft())
                if not inflight:
                    reply = gets()
                    if reply is False:
                        return
                    raise hiredis.ProtocolError(f"a reply nobody asked for: {reply!r:.80}")
                # The oldest buffer's replies in one tight loop (a burst's are ~10-20).
                entry = inflight[0]
                remaining = entry.remaining
                replies = entry.replies
                while remaining:
                    reply = gets()
                    if reply is False:
                        entry.remaining = remaining
                        return
                    remaining -= 1
                    if type(reply) is reply_error:
                        entry.errors += 1
                        if entry.refusals is None:
                            entry.refusals = [reply]
                        else:
                            entry.refusals.append(reply)
                    if replies is not None:
                        replies.append(reply)
                entry.remaining = 0
                inflight.popleft()
                self._complete(entry)
        except hiredis.ProtocolError as exc:
            self.abort(RedisConnectionError(f"redis protocol error: {exc}"))

    def _complete(self, entry: _InFlight) -> None:
        if entry.waiter is not None:
            if not entry.waiter.done():
                entry.waiter.set_result(entry)
        else:
            if entry.refusals is not None and self._on_refused is not None:
                self._on_refused(entry.token, entry.refusals)
            if self._on_answered is not None:
                self._on_answered(entry.token, entry.errors)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writing_paused = False
        self._close_poll_sock()
        reason = exc or self._abort_reason or "closed by the server"
        why = RedisConnectionError(f"redis connection lost: {reason}")
        unanswered = list(self._inflight)
        self._inflight.clear()
        for entry in unanswered:
            if entry.waiter is not None and not entry.waiter.done():
                entry.waiter.set_exception(why)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._lost.done():
            self._lost.set_result(None)
        if self._report_loss and self._on_lost is not None:
            self._on_lost(why, [e.token for e in unanswered if e.waiter is None])

    # -- closing ----------------------------------------------------------------------------

    def _close_poll_sock(self) -> None:
        self._polling = False
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        sock, self._poll_sock = self._poll_sock, None
        if sock is not None:
            sock.close()  # (the duplicate only: the transport closes its own)

    def abort(self, why: Exception, *, report: bool = True) -> None:
        """Drop the connection now (unsent writes too): its replies can no longer be trusted.
        ``on_lost`` hears of it unless ``report`` is false."""
        if self.closed:
            return
        self._report_loss = report
        self._abort_reason = why
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        else:
            self.connection_lost(why)

    def close(self) -> None:
        """Close after the buffered writes (no QUIT round trip); ``on_lost`` is not called.
        Safe to call twice, and after :meth:`abort` (whose loss is still reported)."""
        if self.closed:
            return
        self._report_loss = False
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():
            self._lost.set_result(None)

    async def aclose(self) -> None:
        """Close and wait for the transport to finish closing."""
        self.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await asyncio.shield(self._lost)


def _role(reply: Any) -> str:
    """The role in a ROLE reply (``[b"master", ...]``) or an ``INFO replication`` text."""
    if isinstance(reply, list) and reply:
        first = reply[0]
        return first.decode() if isinstance(first, bytes) else str(first)
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    for line in text.splitlines():
        if line.startswith("role:"):
            return line[5:].strip()
    return ""


__all__ = [
    "AVAILABLE",
    "ClusterDownError",
    "ClusterRoute",
    "NotMasterError",
    "RespAddress",
    "RespConnection",
    "SentinelRoute",
    "bulk",
    "encode_command",
    "publish_prefix",
]
