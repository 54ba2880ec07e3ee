"""The command protocol to the leader: snapshot and resubscribe (I/O over redis.asyncio).

design.md "Commands to the leader" (the Structs: ``broker.contract``): RPUSH one JSON object
to ``{ns}:requests``, PUBLISH ``request`` on ``{ns}:control`` to wake the leader, then BLPOP
``{ns}:reply:{id}``. A request nobody picked up by the deadline is taken back out of the list
(LREM), so a broker that starts later does not act on a question nobody is waiting for any
more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from typing import Literal, overload

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.clock import server_time_ms
from broker.contract import (
    Command,
    ContractError,
    ErrorReply,
    ResubscribeCommand,
    ResubscribeReply,
    SnapshotCommand,
    SnapshotReply,
    decode_reply,
    encode_command,
)
from broker.coordination import queue_time
from broker.keys import Keys, stream_name
from broker.upbit.codes import validate_code
from consumers.errors import (
    CommandRefused,
    NoBrokerError,
    NoBrokerSnapshotError,
    PartialSnapshotError,
)

#: Longest single BLPOP, so a cancelled wait ends promptly on the server side too.
_BLPOP_SLICE = 1.0
#: What one Redis round trip may take beyond the BLPOP's own wait.
_ROUND_TRIP = 5.0


def new_request_id() -> str:
    return uuid.uuid4().hex


@overload
async def send_command(
    redis: Redis, keys: Keys, command: SnapshotCommand, *, timeout: float
) -> SnapshotReply: ...
@overload
async def send_command(
    redis: Redis, keys: Keys, command: ResubscribeCommand, *, timeout: float
) -> ResubscribeReply: ...
async def send_command(
    redis: Redis, keys: Keys, command: Command, *, timeout: float
) -> SnapshotReply | ResubscribeReply:
    """Queue ``command`` for the leader and wait up to ``timeout`` s for its one reply.

    Raises:
        NoBrokerError: nothing answered in time.
        CommandRefused: the leader refused it (or answered what is no reply).
    """
    op: Literal["snapshot", "resubscribe"] = (
        "snapshot" if isinstance(command, SnapshotCommand) else "resubscribe"
    )
    reply_key = keys.reply(command.id)
    payload = encode_command(command)
    deadline = time.monotonic() + timeout
    async with (
        asyncio.timeout(max(timeout, _BLPOP_SLICE)),
        redis.pipeline(transaction=True) as pipe,
    ):
        pipe.rpush(keys.requests, payload)
        # (redis-py's cluster pipeline refuses pipe.publish(); the command is fine)
        pipe.execute_command("PUBLISH", keys.control, "request")
        await pipe.execute()
    raw: bytes | None = None
    try:
        while raw is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # BLPOP's timeout has a resolution of 1 ms in Redis >= 6
            wait = min(left, _BLPOP_SLICE)
            # the client has no socket timeout (see consumers.client): bound the round trip
            async with asyncio.timeout(wait + _ROUND_TRIP):
                found = await redis.blpop([reply_key], timeout=wait)
            if found is not None:
                value = found[1]
                raw = value.encode() if isinstance(value, str) else value
    finally:
        if raw is None:
            # shielded: take the request back even when the wait was cancelled (Ctrl-C)
            await asyncio.shield(_withdraw(redis, keys, payload))
    if raw is None:
        raise NoBrokerError(
            f"no broker answered {op!r} within {timeout:g}s "
            f"(is a broker running for namespace {keys.namespace!r}?)"
        )
    try:
        reply = decode_reply(raw, op)
    except ContractError as exc:
        raise CommandRefused(f"unreadable reply from the broker: {exc}") from None
    if isinstance(reply, ErrorReply):
        raise CommandRefused(f"the broker refused {op!r}: {reply.error or '?'}")
    return reply


async def _withdraw(redis: Redis, keys: Keys, payload: bytes) -> None:
    # best effort: a stale request is harmless, only wasteful
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(2.0):
            await redis.lrem(keys.requests, 1, payload.decode())


async def snapshot_frames(
    redis: Redis,
    keys: Keys,
    type_: str,
    codes: Iterable[str],
    *,
    level: float = 0.0,
    timeout: float = 3.0,
) -> dict[str, bytes]:
    """The latest frame of each code, raw bytes, via the leader (cache or upstream).

    Raises:
        InvalidCodeError / ConfigError: before anything is sent.
        NoBrokerError: no broker answered within ``timeout``.
        PartialSnapshotError: some codes got no data (it carries what did arrive).
    """
    wanted = sorted({validate_code(c) for c in codes})
    if not wanted:
        raise ValueError("snapshot needs at least one code")
    stream = stream_name(type_, level)
    # leave the broker a margin to answer "missing" before our own wait ends
    broker_timeout_ms = max(100, int(timeout * 800))
    command = SnapshotCommand(
        id=new_request_id(),
        type=stream,
        codes=wanted,
        level=level,
        timeout_ms=broker_timeout_ms,
    )
    try:
        reply = await send_command(redis, keys, command, timeout=timeout)
    except NoBrokerError as exc:
        raise NoBrokerSnapshotError(
            f"no snapshot of {stream} {', '.join(wanted)}: {exc}", tuple(wanted)
        ) from None
    frames = {code: bytes(raw) for code, raw in reply.frames.items()}
    missing = tuple(sorted(set(reply.missing) | (set(wanted) - set(frames))))
    if missing:
        raise PartialSnapshotError(
            f"no {stream} data for {', '.join(missing)} within {timeout:g}s",
            missing,
            frames,
        )
    return frames


async def read_status(
    redis: Redis, keys: Keys, *, timeout: float = _ROUND_TRIP
) -> tuple[dict[bytes, bytes], int]:
    """The leader's status hash ``{ns}:status`` (empty when no broker ever wrote one) and the
    Redis server clock in ms, by which its ``updated_ms`` is judged (design.md "Status").

    Raises:
        TimeoutError: Redis did not answer within ``timeout``.
    """
    async with asyncio.timeout(timeout), redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.status)
        queue_time(pipe, keys)
        raw, server_time = await pipe.execute()
    status = {_bytes(k): _bytes(v) for k, v in raw.items()}
    return status, server_time_ms(server_time)


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


async def resubscribe(
    redis: Redis, keys: Keys, *, timeout: float = 10.0
) -> tuple[int, dict[str, list[str]]]:
    """Ask the leader to resubscribe upstream; returns ``(epoch, upstream {stream: [codes]})``.

    Raises:
        NoBrokerError: no broker answered within ``timeout``.
        CommandRefused: the leader refused.
    """
    reply = await send_command(
        redis, keys, ResubscribeCommand(id=new_request_id()), timeout=timeout
    )
    return reply.epoch, reply.upstream
