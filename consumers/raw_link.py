"""The consumer's pub/sub connection read as raw RESP, a whole socket chunk at a time (I/O).

redis-py reads a subscription one reply per ``await``: a task switch, a timeout context and a
dict per message. Measured beside a bare ``hiredis.Reader`` on an ``asyncio.Protocol``, that
loop costs a consumer 3x (800 frames/s) to 5x (4,000 frames/s) the CPU per frame (issue 16).
This link is the road ``broker.control_channel`` took for the leader's control channel: its own
connection as an ``asyncio.Protocol``, every chunk the socket delivers fed to ``hiredis.Reader``
in ``data_received`` and each message handed to ``deliver`` right there, so a burst of frames
costs one wake-up of the loop and no ``await`` per message. The application's bounded queue
(``consumers.queue``) is filled from this callback; nothing here waits on it.

It only carries bytes: what to subscribe, how a break is classified and reported, and the
reconnect belong to :class:`consumers.subscriber.Subscriber`, which takes this road whenever
:func:`raw_address` can express the URL and hiredis is installed, and keeps redis-py's
connection otherwise. (:func:`raw_address` is ``broker.resp.RespAddress``, the RESP wire layer
the broker's own raw connections use: it imports only redis-py and the standard library.)

Every break is raised from :meth:`RawLink.watch`: :class:`ServerClosed` when Redis closed the
connection (EOF, reset: the output-buffer limit looks like this), ``TimeoutError`` when a PING
went unanswered. Liveness costs nothing per chunk: a flag is set, and a timer every
``ping_interval`` looks at it (PING after an interval of silence, dead after one more).

On a Redis Cluster the same link carries sharded pub/sub
(:class:`consumers.sharded_subscriber.ShardedSubscriber`): ``SSUBSCRIBE`` is confirmed by
``ssubscribe`` like ``subscribe``, and ``smessage`` is delivered like ``message``. Redis sends
``sunsubscribe`` unasked when the slot of a shard channel stops being this node's (a failover,
a resharding): the channel hears nothing here from then on, so that ends the link with
:class:`SlotMoved`, as does a redirection (``-MOVED``, ``-ASK``) or ``-CLUSTERDOWN`` answering
a command of the link. A ``sunsubscribe`` this link asked for (``SUNSUBSCRIBE`` sent through
:meth:`RawLink.send_chunked`) is a confirmation like ``unsubscribe``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.redis_url import names_replica
from broker.resp import AVAILABLE, RespAddress, encode_command

if AVAILABLE:
    import hiredis

logger = logging.getLogger(__name__)

_MESSAGE = b"message"
_SMESSAGE = b"smessage"  # sharded pub/sub (Redis Cluster)
_SUBSCRIBE = b"subscribe"
_UNSUBSCRIBE = b"unsubscribe"
_SSUBSCRIBE = b"ssubscribe"
_SUNSUBSCRIBE = b"sunsubscribe"
_CONFIRMATIONS = (_SUBSCRIBE, _UNSUBSCRIBE, _SSUBSCRIBE, _SUNSUBSCRIBE)
#: error replies that say this node is not (or no longer) where the channel's slot is served
_TOPOLOGY_ERRORS = ("MOVED ", "ASK ", "CLUSTERDOWN")

#: called with (channel, data, received_ms) for each message, in ``data_received``
Deliver = Callable[[bytes, bytes, int], None]
#: called with (channel, subscribed) for each SUBSCRIBE / UNSUBSCRIBE confirmation
Confirm = Callable[[bytes, bool], None]


#: where and as whom the link connects (the broker's raw connections read URLs the same way)
RawAddress = RespAddress


def raw_address(url: str) -> RawAddress | None:
    """``url`` as redis-py reads it (``broker.resp.RespAddress.from_url``; a Sentinel URL
    gives the route to the master, resolved at each connect), or ``None`` when the raw road
    cannot honour it: no hiredis, a malformed URL or options it cannot express, a user without
    a password (whose AUTH redis-py spells its own way), a replica through Sentinel
    (``?role=replica``: ``RespAddress`` resolves masters only; redis-py's pool rotates over the
    replicas)."""
    if not AVAILABLE or names_replica(url):
        return None
    try:
        address = RespAddress.from_url(url)
    except ValueError:
        return None
    if address.username and address.password is None:
        return None
    return address


class ServerClosed(Exception):
    """Redis closed the connection (EOF/reset), as opposed to our own PING timeout."""


class SlotMoved(RedisConnectionError):
    """A Redis Cluster node stopped serving a shard channel of this link: it unsubscribed it
    unasked (``sunsubscribe``: the channel's slot moved, by failover or resharding), or answered
    a redirection or ``-CLUSTERDOWN``. The connection is fine; the subscription is not."""


class RawLink(asyncio.Protocol):
    """One pub/sub connection, parsed where its bytes arrive.

    Use :meth:`open` (connect, AUTH, SELECT, CLIENT SETNAME, INFO), then :meth:`send_chunked`
    SUBSCRIBE and :meth:`wait_subscribed` until every channel is confirmed, then :meth:`watch`
    until it raises. Messages go to ``deliver`` from ``data_received`` all along.
    """

    def __init__(self, deliver: Deliver, confirm: Confirm) -> None:
        self._reader = hiredis.Reader()
        self._deliver = deliver
        self._confirm = confirm
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        #: replies of the handshake's commands still to come, oldest first
        self._pending: deque[asyncio.Future[Any]] = deque()
        #: channels this connection has confirmed
        self.subscribed: set[bytes] = set()
        #: SUNSUBSCRIBEs sent and not yet confirmed, per channel (any other ``sunsubscribe``
        #: is Redis' own: the slot moved)
        self._leaving: Counter[bytes] = Counter()
        self._confirmed = asyncio.Event()  # a SUBSCRIBE confirmation arrived
        self._active = False  # bytes arrived since the watcher last looked

    @classmethod
    async def open(
        cls,
        address: RawAddress,
        name: str,
        *,
        info: bool,
        deliver: Deliver,
        confirm: Confirm,
        info_args: tuple[str, ...] = ("server",),
    ) -> tuple[RawLink, Any]:
        """Connect and authenticate; returns the link and, with ``info``, the reply to ``INFO
        server`` (``INFO *info_args``: ``()`` for the default sections, replication too; a
        ``ResponseError`` instance when the server has no INFO, e.g. fakeredis;
        ``b""`` without ``info``).

        Raises:
            redis.exceptions.ConnectionError: unreachable, or the connection broke; through
                Sentinel also no master found, or the node named is not one.
            redis.exceptions.AuthenticationError: AUTH was refused.
            redis.exceptions.ResponseError: SELECT or CLIENT SETNAME was refused.
        """
        # through Sentinel: the master the sentinels name now, its role proven
        address = await address.resolve()
        link = cls(deliver, confirm)
        try:
            await address.connect(link)
        except OSError as exc:
            link.close()
            raise RedisConnectionError(f"cannot connect to {address.describe()}: {exc}") from exc
        try:
            commands: list[tuple[bytes | str | int, ...]] = []
            if address.password is not None:
                if address.username:
                    commands.append((b"AUTH", address.username, address.password))
                else:
                    commands.append((b"AUTH", address.password))
            if address.db:
                commands.append((b"SELECT", address.db))
            commands.append((b"CLIENT", b"SETNAME", name))
            if info:
                commands.append((b"INFO", *info_args))
            replies = await link._call(commands)
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, Exception) and command[0] != b"INFO":
                    kind = AuthenticationError if command[0] == b"AUTH" else ResponseError
                    raise kind(str(reply))
            answer = replies[-1] if info else b""
            if isinstance(answer, Exception):
                answer = ResponseError(str(answer))
        except BaseException:
            link.close()
            raise
        return link, answer

    def send(self, *args: bytes | str | int) -> None:
        """Write one command (its reply is read like every other).

        Raises:
            redis.exceptions.ConnectionError: the connection is closed.
        """
        self._write(encode_command(*args))

    def send_chunked(self, command: bytes, channels: Iterable[bytes], chunk: int) -> None:
        """``command`` (SUBSCRIBE, UNSUBSCRIBE; SSUBSCRIBE, SUNSUBSCRIBE with channels of one
        slot) over ``channels``, ``chunk`` per command, in one write."""
        names = list(channels)
        if command == b"SUNSUBSCRIBE":
            self._leaving.update(names)
        self._write(
            b"".join(
                encode_command(command, *names[i : i + chunk]) for i in range(0, len(names), chunk)
            )
        )

    async def wait_subscribed(self, channels: Iterable[bytes]) -> None:
        """Return once every channel of ``channels`` is confirmed on this connection.

        Raises:
            redis.exceptions.ConnectionError (or what broke it): the connection broke first.
        """
        wanted = set(channels)
        while not wanted <= self.subscribed:
            self._raise_if_lost()
            self._confirmed.clear()
            confirmed: asyncio.Future[Any] = asyncio.ensure_future(self._confirmed.wait())
            either: set[asyncio.Future[Any]] = {confirmed, self._lost}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                confirmed.cancel()
        self._raise_if_lost()

    async def watch(self, ping_interval: float) -> None:
        """Keep the connection proven alive until it breaks; never returns.

        Raises:
            ServerClosed: Redis closed the connection (or it failed: reset, protocol error).
            SlotMoved: a cluster node stopped serving a shard channel of this link.
            TimeoutError: nothing arrived within ``ping_interval`` of a PING.
        """
        pinged_at: float | None = None
        while True:
            done, _ = await asyncio.wait({self._lost}, timeout=ping_interval)
            if done:
                why = self._lost.result()
                if isinstance(why, SlotMoved):
                    raise why  # Redis did not close anything: the cluster moved a slot
                raise ServerClosed(str(why))
            if self._active:  # traffic proves it alive: look again an interval later
                self._active = False
                pinged_at = None
                continue
            if pinged_at is not None and time.monotonic() - pinged_at >= ping_interval:
                raise TimeoutError(f"no answer to PING within {ping_interval:g}s")
            if pinged_at is None:
                self.send(b"PING")
                pinged_at = time.monotonic()

    def close(self) -> None:
        """Drop the connection now (never raises)."""
        if self._transport is not None:
            self._transport.abort()
        self._lose(RedisConnectionError("closed by this client"))

    # -- protocol callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # the hot path: one call per socket chunk, no await, no allocation beyond the replies
        self._active = True
        reader = self._reader
        reader.feed(data)
        deliver = self._deliver
        received_ms = 0
        try:
            while (reply := reader.gets()) is not False:
                if (
                    type(reply) is list
                    and len(reply) == 3
                    and (reply[0] == _MESSAGE or reply[0] == _SMESSAGE)
                ):
                    if not received_ms:
                        received_ms = time.time_ns() // 1_000_000  # broker.clock.now_ms
                    deliver(reply[1], reply[2], received_ms)
                else:
                    self._other(reply)
        except hiredis.ProtocolError as exc:
            self._lose(RedisConnectionError(f"redis protocol error: {exc}"))
            self.close()

    def _other(self, reply: Any) -> None:
        """A reply that is no message: a confirmation, a pong, or a handshake reply."""
        if type(reply) is list and len(reply) == 3 and reply[0] in _CONFIRMATIONS:
            kind = reply[0]
            subscribed = kind in (_SUBSCRIBE, _SSUBSCRIBE)
            channel = reply[1]
            if subscribed:
                self.subscribed.add(channel)
                self._confirmed.set()
            elif kind == _SUNSUBSCRIBE and not self._leaving[channel]:
                if channel in self.subscribed:  # not asked for: the slot left this node
                    self.subscribed.discard(channel)
                    self._lose(SlotMoved(f"redis unsubscribed {channel!r}: its slot moved"))
                    self.close()
                return
            else:
                if kind == _SUNSUBSCRIBE:
                    self._leaving[channel] -= 1
                    if not self._leaving[channel]:
                        del self._leaving[channel]
                self.subscribed.discard(channel)
            self._confirm(channel, subscribed)
        elif self._pending:
            waiter = self._pending.popleft()
            if not waiter.done():
                waiter.set_result(reply)
        elif isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith(_TOPOLOGY_ERRORS):
                # a shard channel is not served here (our slot map is old): a break, so the
                # subscription is made again from a fresh map
                self._lose(SlotMoved(f"redis answered {reply}"))
                self.close()
                return
            # e.g. -NOPERM for a channel the ACL denies: its SUBSCRIBE is never confirmed,
            # and subscribe() says so when its wait runs out
            logger.warning("redis refused a pub/sub command: %s", reply)
        # else: a pong (["pong", ""] once subscribed): its arrival set _active already

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(RedisConnectionError(f"{exc}" if exc else "connection closed by server"))

    # -- internals --------------------------------------------------------------------------

    async def _call(self, commands: list[tuple[bytes | str | int, ...]]) -> list[Any]:
        """Write ``commands`` in one buffer; their replies (error replies as instances)."""
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in commands]
        self._pending.extend(waiters)
        self._write(b"".join(encode_command(*c) for c in commands))
        replies: asyncio.Future[list[Any]] = asyncio.gather(*waiters)
        either: set[asyncio.Future[Any]] = {replies, self._lost}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self._lost.done():
            replies.cancel()
            raise self._lost.result()
        return replies.result()

    def _write(self, data: bytes) -> None:
        self._raise_if_lost()
        assert self._transport is not None
        self._transport.write(data)

    def _raise_if_lost(self) -> None:
        if self._lost.done():
            raise self._lost.result()

    def _lose(self, why: Exception) -> None:
        if not self._lost.done():
            self._lost.set_result(why)
        for waiter in self._pending:
            if not waiter.done():
                waiter.cancel()
        self._pending.clear()


__all__ = ["AVAILABLE", "RawAddress", "RawLink", "ServerClosed", "SlotMoved", "raw_address"]
