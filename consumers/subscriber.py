"""The consumer's own pub/sub connection: one receive loop that notices every disconnect (I/O).

redis-py's ``PubSub`` reconnects and resubscribes by itself without telling anyone, so a
subscriber that Redis dropped at its output-buffer limit (or a Redis restart) silently loses
everything published in between (docs: shared notes on redis-py). This module does not use
``PubSub``: it owns a bare ``redis.asyncio`` connection created with retries disabled, sends
SUBSCRIBE itself and reads replies in one loop. Any error ends that connection; the loop logs
one line, reports the break, reconnects with backoff, resubscribes every channel and then
reports the incident (a :class:`Break`) so the client can emit a gap for the lost interval.

Two roads, one behaviour: the raw road (``consumers.raw_link``: an ``asyncio.Protocol`` with
``hiredis.Reader`` parsing whole socket chunks, each message handed on where it is parsed, no
``await`` per message) whenever ``consumers.raw_link.raw_address`` can express the URL and
hiredis is installed; otherwise redis-py's connection, read one reply at a time. Both connect,
classify, resubscribe and report exactly as described here.

Why the break is classified by the server's ``run_id``: Redis 7.0 does not say why it closed a
connection. If the same server (same ``run_id``) is there after the reconnect and it closed the
connection on us, it dropped this client on purpose, and the pub/sub output-buffer limit (a
subscriber that fell behind) is by far the usual reason; a new ``run_id`` means Redis restarted,
or, with a ``redis+sentinel://`` URL, that Sentinel promoted a replica: both roads ask the
sentinels for the master at every connect (redis-py's Sentinel pool; ``RespAddress.resolve``),
so the reconnect reaches the new master and resubscribes there.

Subscribing on a replica (``BrokerClient(subscribe_url=...)``; design.md "Fan-out from
replicas"): given ``master_replid`` (how to read the replication id of the master the leases
go to), every connect reads the node's ``INFO`` (server and replication) and refuses a node
that would hear nothing the broker publishes (``consumers.replica_link.judge``: a replica with
its link down, resyncing, or following another master; a master of its own); it then tries
``fallback_url`` (the lease URL: the master) in the same attempt. While subscribed on a
replica, a second, ordinary connection to that node reads ``INFO replication`` every
``link_check_interval`` (a subscribed RESP2 connection takes no INFO) and ends the
subscription as soon as the judgement fails, or the replica resynced from scratch: a
:class:`ReplicaLinkLost` break, reported once resubscribed like any other, its gap starting
when the replica's link went down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from broker.clock import now_ms
from broker.errors import describe
from broker.redis_client import connection_pool, redis_client
from broker.redis_url import is_sentinel_url, parse_sentinel_url
from broker.settings import redact_url
from consumers.items import CONSUMER_DISCONNECTED, FELL_BEHIND, gap_start_ms
from consumers.raw_link import RawAddress, RawLink, ServerClosed, raw_address
from consumers.replica_link import Replication, judge, parse_replication

logger = logging.getLogger(__name__)

#: SUBSCRIBE at most this many channels per command (keeps one command's size sane).
_CHUNK = 500
#: Take the raw road where it can be taken (False: always redis-py's; the fallback's tests).
RAW_ROAD = True


@dataclass(frozen=True, slots=True)
class Break:
    """One lost connection, reported once the replacement is subscribed again."""

    reason: str  # CONSUMER_DISCONNECTED or FELL_BEHIND
    since_ms: int  # when the last message received before the break was stamped or received
    until_ms: int  # when every channel was subscribed again
    error: str  # what the old connection died of
    attempts: int  # connection attempts it took
    #: another Redis server answers than before the break (INFO run_id): a restart or a
    #: failover, or the subscription moved between a replica and the master
    server_changed: bool = False
    #: the break was the subscribe node's replication (:class:`ReplicaLinkLost`): why
    replica: str = ""


class ReplicaLinkLost(RedisConnectionError):
    """The node subscribed on does not (or did not for a while) hear the master: its link to
    the master is down, it resyncs, follows another master, or resynced from scratch.

    Attributes:
        since_ms: when its link went down, as far as it says (None: not known).
    """

    def __init__(self, why: str, since_ms: int | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.since_ms = since_ms


#: what to read of the master: its ``master_replid`` (None: could not be read)
MasterReplid = Callable[[], Awaitable[str | None]]


@dataclass(slots=True)
class _Target:
    """One place to subscribe: the subscribe URL, then the fallback."""

    url: str
    pool: ConnectionPool
    address: RawAddress | None


class Subscriber:
    """SUBSCRIBE to a changing set of channels and hand each message to ``on_message``.

    Args:
        redis_url: where to connect.
        name: ``CLIENT SETNAME`` of the connection (shows in ``CLIENT LIST``).
        on_message: called with ``(channel, data, received_ms)`` for each message, in the
            reader (or, on the raw road, the protocol's ``data_received``); it must be quick
            (it only enqueues), the reader must keep reading.
        on_break: called when a connection is lost (before reconnecting).
        on_restored: awaited once a new connection has every channel subscribed again.
        ping_interval: with nothing received for this long, PING; no answer within another
            interval means the connection is dead.
        fallback_url: where to subscribe when ``redis_url`` cannot be used (the master, when
            ``redis_url`` names a replica).
        master_replid: reads the ``master_replid`` of the master the broker publishes on;
            given, every node is checked as the module docstring says.
        link_check_interval: seconds between two checks of a replica's link (default:
            ``ping_interval``).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        name: str,
        on_message: Callable[[bytes, bytes, int], None],
        on_break: Callable[[str], None] | None = None,
        on_restored: Callable[[Break], Awaitable[None]] | None = None,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        confirm_timeout: float = 5.0,
        fallback_url: str | None = None,
        master_replid: MasterReplid | None = None,
        link_check_interval: float | None = None,
    ) -> None:
        # no retries and no socket timeout (broker.redis_client): every wait here has its own
        # asyncio.timeout, and a failed connection must surface here, never be replaced silently
        urls = [redis_url] + ([fallback_url] if fallback_url and fallback_url != redis_url else [])
        self._targets = [
            _Target(
                url,
                connection_pool(url, name=name, connect_timeout=connect_timeout),
                raw_address(url) if RAW_ROAD else None,
            )
            for url in urls
        ]
        self._pool = self._targets[0].pool
        self._address = self._targets[0].address
        self._name = name[:128]
        self._url = redact_url(redis_url)
        self._master_replid = master_replid
        self._link_check_interval = link_check_interval or ping_interval
        #: the node subscribed on, when it is a replica to watch: (url to reach it, reading)
        self._replica: tuple[str, Replication] | None = None
        #: the node's replication at the last connect (None: not checked, or no INFO)
        self._node: Replication | None = None
        #: where the current connection is (redacted), for logs
        self._where = self._url
        self._on_message = on_message
        self._on_break = on_break
        self._on_restored = on_restored
        self._ping_interval = ping_interval
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._confirm_timeout = confirm_timeout
        self._desired: set[bytes] = set()
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future[bool]]] = {}
        self._conn: AbstractConnection | RawLink | None = None
        self._live = False
        self._run_id: str | None = None
        self._last_rx_ms = 0
        self._last_data: bytes | None = None
        self._connected = asyncio.Event()
        self._has_info = True

    # -- public -----------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while a connection is up with every desired channel subscribed."""
        return self._live

    @property
    def raw(self) -> bool:
        """True when this subscriber takes the raw road (``consumers.raw_link``) to its
        subscribe URL."""
        return self._address is not None

    @property
    def where(self) -> str:
        """The URL (redacted) of the connection now or last: the subscribe URL, or the
        fallback."""
        return self._where

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset(self._desired)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the first connection is subscribed; raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def subscribe(self, channels: Iterable[bytes]) -> None:
        """Add channels; when connected, return once Redis confirmed every one of them.

        While disconnected this only records them: the reconnect subscribes them.
        """
        new = [c for c in channels if c not in self._desired]
        self._desired.update(new)
        if not new or not self._live or self._conn is None:
            return
        loop = asyncio.get_running_loop()
        futures = []
        for channel in new:
            fut: asyncio.Future[bool] = loop.create_future()
            self._waiters.setdefault(channel, []).append(fut)
            futures.append(fut)
        try:
            await self._send_chunked(self._conn, b"SUBSCRIBE", new)
        except (RedisError, OSError, TimeoutError):
            # the reader sees the same failure and reconnects; the reconnect subscribes these
            return
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.gather(*futures)
        except TimeoutError:
            raise TimeoutError(
                f"redis did not confirm SUBSCRIBE within {self._confirm_timeout}s"
            ) from None

    async def unsubscribe(self, channels: Iterable[bytes]) -> None:
        """Drop channels (Redis' confirmation is not awaited; late messages are ignored)."""
        gone = [c for c in channels if c in self._desired]
        self._desired.difference_update(gone)
        if not gone or not self._live or self._conn is None:
            return
        try:
            await self._send_chunked(self._conn, b"UNSUBSCRIBE", gone)
        except (RedisError, OSError, TimeoutError):
            return

    async def run(self) -> None:
        """Connect, read, and on any failure reconnect with backoff; until cancelled."""
        broken: tuple[int, str, bool, str] | None = None  # (since_ms, error, closed, replica)
        attempts = 0
        delay = self._backoff_initial
        while True:
            attempts += 1
            previous_node = self._node
            try:
                conn, run_id = await self._connect()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if attempts == 1 or attempts % 20 == 0:
                    logger.warning(
                        "pubsub connect to %s failed (%s); retrying in %.2fs",
                        self._url,
                        describe(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            previous_run_id, self._run_id = self._run_id, run_id
            if broken is not None:
                since_ms, error, server_closed, replica = broken
                same_server = previous_run_id is not None and previous_run_id == self._run_id
                # the same server, promoted or re-pointed meanwhile: Sentinel closes every
                # client of the replica it promotes (CLIENT KILL TYPE pubsub): no slow reader
                same_role = (
                    previous_node is None
                    or self._node is None
                    or (previous_node.role, previous_node.replid)
                    == (self._node.role, self._node.replid)
                )
                dropped = same_server and server_closed and same_role
                incident = Break(
                    reason=FELL_BEHIND if dropped else CONSUMER_DISCONNECTED,
                    since_ms=since_ms,
                    until_ms=now_ms(),
                    error=error,
                    attempts=attempts,
                    server_changed=(
                        previous_run_id is not None
                        and self._run_id is not None
                        and previous_run_id != self._run_id
                    ),
                    replica=replica,
                )
                logger.info("pubsub reconnected after %d attempt(s); %s", attempts, incident.reason)
                if self._on_restored is not None:
                    await self._on_restored(incident)
            broken = None
            attempts = 0
            delay = self._backoff_initial
            try:
                await self._read_loop(conn)
            except asyncio.CancelledError:
                raise
            except ReplicaLinkLost as exc:
                since_ms = self._break_since_ms()
                if exc.since_ms is not None:
                    since_ms = min(since_ms, exc.since_ms)
                broken = (since_ms, exc.why, False, exc.why)
                logger.warning(
                    "pubsub on %s left: the replica %s; resubscribing", self._where, exc.why
                )
                if self._on_break is not None:
                    self._on_break(exc.why)
            except (RedisError, OSError, TimeoutError, ServerClosed) as exc:
                error = describe(exc)
                broken = (self._break_since_ms(), error, isinstance(exc, ServerClosed), "")
                logger.warning("pubsub connection to %s lost: %s; reconnecting", self._where, error)
                if self._on_break is not None:
                    self._on_break(error)
            finally:
                self._drop_connection()
                await _disconnect(conn)

    async def aclose(self) -> None:
        """Release the connection pool (call after cancelling :meth:`run`)."""
        conn = self._conn
        self._drop_connection()
        if conn is not None:
            await _disconnect(conn)
        for target in self._targets:
            await target.pool.disconnect(inuse_connections=True)

    # -- internals --------------------------------------------------------------------------

    async def _connect(self) -> tuple[AbstractConnection | RawLink, str | None]:
        """Connect to the subscribe URL, else to the fallback; the last failure is raised."""
        for i, target in enumerate(self._targets):
            result: tuple[AbstractConnection | RawLink, str | None]
            try:
                if target.address is not None:
                    result = await self._connect_raw(target)
                else:
                    result = await self._connect_redis_py(target)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if i + 1 == len(self._targets):
                    raise
                logger.info(
                    "pubsub cannot use %s (%s); trying %s",
                    redact_url(target.url),
                    describe(exc),
                    redact_url(self._targets[i + 1].url),
                )
                continue
            self._where = redact_url(target.url)
            return result
        raise AssertionError("no target")  # pragma: no cover: there is always one

    @property
    def _info_args(self) -> tuple[str, ...]:
        # the replication section too when nodes are checked (INFO without a section has
        # both: "INFO server replication" needs Redis 7)
        return () if self._master_replid is not None else ("server",)

    async def _check_node(
        self, target: _Target, info: object, host: str | None, port: int | None
    ) -> None:
        """Refuse a node that would hear nothing the broker publishes (module docstring);
        remember a replica to watch.

        Raises:
            ReplicaLinkLost: why the node cannot be used.
        """
        self._replica = None
        self._node = None
        if self._master_replid is None:
            return
        node = self._node = parse_replication(info)
        if node is None:
            return  # no INFO (fakeredis, an ACL without +info): nothing to judge by
        master = await self._read_master_replid()
        why = judge(node, master)
        where = redact_url(target.url)
        if why is not None:
            raise ReplicaLinkLost(f"{where}: {why}", _down_since_ms(node))
        if node.role == "slave":
            # the watcher's own connection reaches the same node: through Sentinel, the
            # replica this connection was given, with the URL's credentials and options
            url = target.url
            if is_sentinel_url(url) and host is not None and port is not None:
                url = parse_sentinel_url(url).redis_url(host, port)
            self._replica = (url, node)

    async def _read_master_replid(self) -> str | None:
        assert self._master_replid is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._master_replid()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the master unreadable: judge by the node alone
            logger.debug("could not read the master's replication id: %s", describe(exc))
            return None

    async def _connect_redis_py(self, target: _Target) -> tuple[AbstractConnection, str | None]:
        conn: AbstractConnection = target.pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                await conn.connect()  # type: ignore[no-untyped-call]
                info: object = b""
                if self._has_info:
                    await conn.send_command("INFO", *self._info_args)
                    try:
                        info = await conn.read_response()
                    except ResponseError as exc:
                        # a server without INFO (fakeredis): breaks go unclassified from now
                        # on; if it hung up after the error, the next attempt skips INFO
                        logger.debug("no INFO on this server (%s)", exc)
                        self._has_info = False
                host = getattr(conn, "host", None)
                port = getattr(conn, "port", None)
                await self._check_node(target, info, host, port)
            run_id = run_id_of(info)
            subscribed: set[bytes] = set()
            # a subscribe() during this handshake only records its channel (not live yet), so
            # loop until what is subscribed covers what is desired, with no await after the check
            while missing := sorted(self._desired - subscribed):
                pending = set(missing)
                async with asyncio.timeout(self._confirm_timeout):
                    for i in range(0, len(missing), _CHUNK):
                        await conn.send_command("SUBSCRIBE", *missing[i : i + _CHUNK])
                    while pending:
                        reply = await conn.read_response(disconnect_on_error=False)
                        kind = reply[0]
                        if kind == b"subscribe":
                            pending.discard(reply[1])
                            subscribed.add(reply[1])
                        elif kind == b"message":
                            self._deliver(reply[1], reply[2], now_ms())
            self._went_live(conn, subscribed)
            return conn, run_id
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def _connect_raw(self, target: _Target) -> tuple[RawLink, str | None]:
        assert target.address is not None
        async with asyncio.timeout(self._connect_timeout * 2):
            link, info = await RawLink.open(
                target.address,
                self._name,
                info=self._has_info,
                info_args=self._info_args,
                deliver=self._deliver,
                confirm=self._on_confirm,
            )
        try:
            if isinstance(info, ResponseError):
                logger.debug("no INFO on this server (%s)", info)  # as on redis-py's road
                self._has_info = False
            async with asyncio.timeout(self._connect_timeout * 2):
                await self._check_node(target, info, None, None)
            run_id = run_id_of(info)
            # as on redis-py's road: until what is subscribed covers what is desired
            while missing := sorted(self._desired - link.subscribed):
                async with asyncio.timeout(self._confirm_timeout):
                    link.send_chunked(b"SUBSCRIBE", missing, _CHUNK)
                    await link.wait_subscribed(missing)
            self._went_live(link, set(link.subscribed))
            return link, run_id
        except BaseException:
            link.close()
            raise

    def _went_live(self, conn: AbstractConnection | RawLink, subscribed: set[bytes]) -> None:
        self._conn = conn
        self._confirmed = subscribed
        self._live = True
        self._last_rx_ms = now_ms()
        self._last_data = None
        self._connected.set()

    async def _send_chunked(
        self, conn: AbstractConnection | RawLink, command: bytes, channels: list[bytes]
    ) -> None:
        if isinstance(conn, RawLink):
            conn.send_chunked(command, channels, _CHUNK)  # buffered by the transport
            return
        async with asyncio.timeout(self._confirm_timeout):
            for i in range(0, len(channels), _CHUNK):
                await conn.send_command(command, *channels[i : i + _CHUNK])

    async def _read_loop(self, conn: AbstractConnection | RawLink) -> None:
        """Read until the connection breaks, or, on a replica, until its link does."""
        if self._replica is None:
            await self._read(conn)
            return
        url, node = self._replica
        reader = asyncio.create_task(self._read(conn), name=f"{self._name}:read")
        watcher = asyncio.create_task(self._watch_replica(url, node), name=f"{self._name}:link")
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watcher):
                task.cancel()
            # both are ours and cancelled: wait for them, their errors are read below
            await asyncio.wait({reader, watcher})
        for task in (watcher, reader):  # the replica's verdict explains a break best
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        raise RedisConnectionError("the pub/sub reader stopped")  # pragma: no cover

    async def _watch_replica(self, url: str, first: Replication) -> None:
        """Read the replica's ``INFO replication`` every ``link_check_interval`` on a
        connection of its own; raise :class:`ReplicaLinkLost` once it fails the judgement.
        An unreadable INFO is no verdict (the pub/sub PING finds a dead node)."""
        previous = first
        client = redis_client(url, name=f"{self._name}:link", connect_timeout=self._connect_timeout)
        try:
            while True:
                await asyncio.sleep(self._link_check_interval)
                try:
                    async with asyncio.timeout(self._connect_timeout):
                        info = await client.execute_command(  # type: ignore[no-untyped-call]
                            "INFO", "replication"
                        )
                except ResponseError as exc:  # an ACL without +info: nothing more to learn
                    logger.warning("cannot watch the replica's link (%s)", exc)
                    await asyncio.Event().wait()  # the reader decides from now on
                    return
                except (RedisError, OSError, TimeoutError) as exc:
                    logger.debug("replica INFO failed: %s", describe(exc))
                    continue
                node = parse_replication(info)
                if node is None:
                    continue
                master = await self._read_master_replid()
                why = judge(node, master, previous)
                if why is not None:
                    raise ReplicaLinkLost(
                        f"{redact_url(url)}: {why}", _down_since_ms(node, self._link_check_interval)
                    )
                previous = node
        finally:
            await client.aclose()

    async def _read(self, conn: AbstractConnection | RawLink) -> None:
        if isinstance(conn, RawLink):
            await conn.watch(self._ping_interval)  # messages go by data_received
            return
        ping_sent: float | None = None
        while True:
            try:
                reply = await conn.read_response(
                    timeout=self._ping_interval, disconnect_on_error=False
                )
            except (RedisConnectionError, OSError) as exc:
                raise ServerClosed(str(exc) or "connection closed by server") from exc
            if reply is None:  # nothing within ping_interval
                if ping_sent is not None and time.monotonic() - ping_sent >= self._ping_interval:
                    raise TimeoutError(f"no answer to PING within {self._ping_interval}s")
                if ping_sent is None:
                    async with asyncio.timeout(self._ping_interval):
                        await conn.send_command("PING")
                    ping_sent = time.monotonic()
                continue
            kind = reply[0]
            if kind == b"message":
                self._deliver(reply[1], reply[2], now_ms())
            elif kind == b"pong":
                ping_sent = None
            elif kind == b"subscribe":
                self._on_confirm(reply[1], True)
            elif kind == b"unsubscribe":
                self._on_confirm(reply[1], False)

    def _on_confirm(self, channel: bytes, subscribed: bool) -> None:
        if not subscribed:
            self._confirmed.discard(channel)
            return
        self._confirmed.add(channel)
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_result(True)

    def _break_since_ms(self) -> int:
        return gap_start_ms(self._last_rx_ms, self._last_data)

    def _deliver(self, channel: bytes, data: bytes, received_ms: int) -> None:
        self._last_rx_ms = received_ms
        self._last_data = data
        if channel in self._desired:
            try:
                self._on_message(channel, data, received_ms)
            except Exception:  # a bug downstream must not stop the reader
                logger.exception("message handler failed on %r", channel)

    def _drop_connection(self) -> None:
        self._live = False
        self._conn = None
        self._confirmed = set()
        # waiters return: the channels stay desired and the reconnect subscribes them
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(False)
        self._waiters.clear()


async def _disconnect(conn: AbstractConnection | RawLink) -> None:
    if isinstance(conn, RawLink):
        conn.close()
    else:
        await conn.disconnect(nowait=True)


def _down_since_ms(node: Replication, at_most_s: float | None = None) -> int | None:
    """When the node's link to its master went down (None: up, or not said; a link that was
    never up, or went down and up between two checks: ``at_most_s`` ago, if given)."""
    if node.role != "slave":
        return None if at_most_s is None else now_ms() - int(at_most_s * 1000)
    if node.down_since_s is not None and node.down_since_s >= 0:
        return now_ms() - node.down_since_s * 1000
    return None if at_most_s is None else now_ms() - int(at_most_s * 1000)


def run_id_of(info: object) -> str | None:
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return None
