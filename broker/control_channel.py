"""The leader's subscription to ``{ns}:control``, read in bursts (I/O adapter).

Any consumer may PUBLISH on the control channel (docs/design.md, the consumer ACL). redis-py's
``PubSub`` parses and wraps each message on its own: about 13 us a message measured here, so a
flood of 50,000 messages a second cost 0.65 core before the broker did anything with them (issue
12, item 4). This subscription is an asyncio protocol instead: every chunk the socket delivers
is fed to ``hiredis.Reader`` and each message in it folded into one
:class:`~broker.core.control_messages.ControlBatch` (about a microsecond a message, parse
included); the watcher takes the batch at most once per tick, so the core, the lease task and
the commands task see one wake-up per tick, whatever the flood.

A client that cannot take the raw road (:meth:`broker.resp.RespAddress.from_client` gives
None: a fake, a credential provider) keeps redis-py's ``PubSub`` and folds its messages the
same way (the parse then stays redis-py's). Through Sentinel, each subscription goes to the
master the sentinels name at that moment (:meth:`broker.resp.RespAddress.resolve`).

Every break surfaces as a ``ConnectionError`` from :meth:`ControlSubscription.take`: the
caller subscribes again and reads every lease; nothing reconnects behind its back. An idle
connection is PINGed every :data:`IDLE_PING` seconds and given as long to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker import resp
from broker.cluster_slots import key_slot
from broker.core.control_messages import ControlBatch

if resp.AVAILABLE:
    import hiredis

#: an idle subscription is PINGed this often, and is broken when the PING goes unanswered as long
IDLE_PING = 5.0
#: messages one ``take`` folds at most on redis-py's road (the raw road folds whole chunks)
_PUBSUB_TAKE_MAX = 10_000

_MESSAGE = b"message"
_SUBSCRIBE = b"subscribe"


class ControlSubscription(Protocol):
    """One subscription to the control channel."""

    async def take(self, not_before: float) -> ControlBatch:
        """Wait for a message, then for ``not_before`` (monotonic), and return every message
        read by then, folded.

        Raises:
            redis.exceptions.ConnectionError: the connection broke (or a PING went unanswered).
        """
        ...

    async def aclose(self) -> None:
        """Close the connection (never raises)."""
        ...


async def subscribe_control(redis: aioredis.Redis, channel: str) -> ControlSubscription:
    """SUBSCRIBE to ``channel`` on a connection of its own, on the raw road when ``redis``
    allows it; returns once Redis confirmed the subscription.

    Raises:
        redis.exceptions.RedisError: the connection, AUTH, SELECT or SUBSCRIBE failed.
        OSError: the socket failed.
    """
    address = resp.RespAddress.from_client(redis) if resp.AVAILABLE else None
    if address is None:
        return await _PubSubControl.subscribe(redis, channel)
    # On a cluster, the master holding the namespace's keys (a PUBLISH reaches every node, so
    # any would hear it; this one hears the lease script's first, and fails over with them)
    return await _RawControl.subscribe(address.routed(key_slot(channel)), channel)


class _RawControl(asyncio.Protocol):
    """The raw road: hiredis parses each chunk where it arrives (``data_received``)."""

    def __init__(self, handshake_replies: int) -> None:
        self._reader = hiredis.Reader()
        self._batch = ControlBatch()
        self._arrived = asyncio.Event()  # messages (or a pong, or the loss) arrived
        self._subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handshake = handshake_replies  # AUTH/SELECT replies still to come
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self._pinged_at: float | None = None

    @classmethod
    async def subscribe(cls, address: resp.RespAddress, channel: str) -> _RawControl:
        # through Sentinel: the master the sentinels name now, its role proven
        address = await address.resolve()
        commands: list[bytes] = []
        if address.password is not None:
            if address.username:
                commands.append(resp.encode_command(b"AUTH", address.username, address.password))
            else:
                commands.append(resp.encode_command(b"AUTH", address.password))
        if address.db:
            commands.append(resp.encode_command(b"SELECT", address.db))
        protocol = cls(len(commands))
        commands.append(resp.encode_command(b"SUBSCRIBE", channel))
        try:
            async with asyncio.timeout(address.connect_timeout):
                await address.connect(protocol)
                protocol._write(b"".join(commands))
                await protocol._subscribed
        except BaseException as exc:
            await protocol.aclose()
            if isinstance(exc, OSError | TimeoutError):
                raise RedisConnectionError(
                    f"cannot subscribe at {address.describe()}: {exc or 'timed out'}"
                ) from exc
            raise
        return protocol

    async def take(self, not_before: float) -> ControlBatch:
        while not self._batch:
            if self._lost is not None:
                raise self._lost
            self._arrived.clear()
            try:
                async with asyncio.timeout(IDLE_PING):
                    await self._arrived.wait()
            except TimeoutError:
                if self._pinged_at is not None:  # a whole IDLE_PING without a byte
                    self._lose(RedisConnectionError("control channel: PING unanswered"))
                    continue
                self._pinged_at = time.monotonic()
                self._write(resp.encode_command(b"PING"))
        wait = not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)  # the rest of the tick: later messages join this batch
        batch, self._batch = self._batch, ControlBatch()
        return batch

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self._subscribed.done():
            self._subscribed.cancel()

    # -- protocol callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._pinged_at = None  # any byte proves the connection alive
        reader = self._reader
        add = self._batch.add
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if type(reply) is list and len(reply) == 3 and reply[0] == _MESSAGE:
                    add(reply[2])
                else:
                    self._other(reply)
        except hiredis.ProtocolError as exc:
            self._lose(RedisConnectionError(f"redis protocol error: {exc}"))
        self._arrived.set()

    def _other(self, reply: Any) -> None:
        """A reply that is no message: the handshake's, the SUBSCRIBE confirmation, a pong."""
        if isinstance(reply, hiredis.ReplyError):
            kind = AuthenticationError if self._handshake else ResponseError
            self._lose(kind(str(reply)))
        elif self._handshake:
            self._handshake -= 1
        elif (
            type(reply) is list and reply and reply[0] == _SUBSCRIBE and not self._subscribed.done()
        ):
            self._subscribed.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(RedisConnectionError(f"control channel lost: {exc or 'closed by the server'}"))

    def _lose(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        if not self._subscribed.done():
            self._subscribed.set_exception(self._lost)
        if self._transport is not None:
            self._transport.close()
        self._arrived.set()

    def _write(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._transport is not None
        self._transport.write(data)


class _PubSubControl:
    """redis-py's road, for clients the raw road cannot reach: same folding, its parse."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    @classmethod
    async def subscribe(cls, redis: aioredis.Redis, channel: str) -> _PubSubControl:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return cls(pubsub)

    async def take(self, not_before: float) -> ControlBatch:
        batch = ControlBatch()
        while not batch:
            self._add(batch, await self._message(1.0))
        while batch.messages < _PUBSUB_TAKE_MAX:
            message = await self._message(max(0.0, not_before - time.monotonic()))
            if message is None:
                if time.monotonic() >= not_before:
                    break
                continue
            self._add(batch, message)
        return batch

    async def _message(self, timeout: float) -> Any:
        return await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)

    @staticmethod
    def _add(batch: ControlBatch, message: Any) -> None:
        if message is not None:
            data = message.get("data", b"")
            batch.add(data if isinstance(data, bytes) else b"")

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


__all__ = ["IDLE_PING", "ControlSubscription", "subscribe_control"]
