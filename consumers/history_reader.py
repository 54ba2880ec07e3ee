"""The durable road: a consumer's streams read from their history with XREAD (I/O).

Beside each PUBLISH the broker appends the frame to a capped Redis Stream,
``{ns}:hist:{stream}:{code}`` (``broker.keys.Keys.history``; the frame in field ``f``, and
``origin`` = ``rest`` on entries the backfill fetched over REST after a gap). A durable
consumer reads those streams instead of SUBSCRIBEing to their channels: one connection, every
stream in one ``XREAD COUNT n BLOCK ms STREAMS ...``, each from the last entry it delivered.
So what a connection loss, a pause or a slow phase would cost is not lost while the entries
are still retained: a reconnect reads on from the same offsets, and the reader reads only as
fast as the application takes (``wait_room``: it waits for room in the client's queues
instead of reading on; Redis keeps the backlog, no output buffer fills up). Replies are parsed
in bulk: one ``await`` per read, none per entry.

A consumer that falls off the retained window is told precisely (a ``trimmed`` gap from its
last offset to the oldest entry retained, with the count), never moved on silently. The rule
is :func:`consumers.history_window.judge`; it needs an ``XINFO STREAM``, read only where a
loss is possible:

* after an XREAD that returned a full COUNT for a stream: a consumer trimmed past always gets
  a full COUNT, since trimming keeps at least the cap (so COUNT must not exceed the broker's
  smallest cap: ``read_count``). The XINFO follows in the next round trip; if trimming
  overtook the batch in between, the batch is dropped and read again in a checked read.
* a *checked read*, ``MULTI; XINFO STREAM ...; XREAD ...; EXEC``, is atomic and so exact: a
  stream's first read, every read after a reconnect, after the reader waited for room, after
  the reader itself stalled (its process stopped, its loop blocked), and the re-read above.

Latest-only streams (state: ticker, orderbook) are never judged: skipping their older
entries is what was asked for. Of a batch only the newest entry is delivered, and after a
full batch the reader jumps to the stream's newest entry (``XREVRANGE + - COUNT 1``).

A Redis restart (a new ``run_id``) loses unread history with the server's data; it is
reported once (``on_restart``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from broker.clock import now_ms
from broker.errors import describe
from broker.redis_client import connection_pool
from broker.settings import redact_url
from consumers.history_window import (
    UNSURE,
    ZERO,
    Lost,
    Offset,
    StreamInfo,
    judge,
    offset_text,
    parse_offset,
    predecessor,
)

logger = logging.getLogger(__name__)

#: ``XREAD BLOCK``: how long one read waits for new entries (a new subscription is read from
#: the next read on; its start offset was fixed when it was made, so nothing is missed)
BLOCK_MS = 500
#: ``XREAD COUNT`` per stream by default; keep it at or below the broker's smallest cap
DEFAULT_READ_COUNT = 100
#: A reader that did not read for this long (its process was stopped, its loop blocked) may
#: have been trimmed past: its next read is a checked one.
STALL_S = 2.0


@dataclass(slots=True, eq=False)
class Cursor:
    """One durable stream: where its history is and how far it was delivered."""

    key: str
    #: whatever the owner routes by (the client: the stream's pub/sub channel name)
    channel: str
    #: the last entry delivered (reads continue after it)
    last: Offset
    #: how many entries of the stream came up to ``last`` (``None``: not known yet;
    #: ``consumers.history_window``)
    n: int | None = None
    latest_only: bool = False
    #: when the cursor started, for a gap before anything was delivered
    started_ms: int = field(default_factory=now_ms)
    #: the next read is a checked one (XINFO in the same transaction)
    check: bool = True
    #: a loss judged by ids alone is not announced once (Redis restarted: announced already)
    quiet: bool = False
    key_bytes: bytes = b""

    def __post_init__(self) -> None:
        self.key_bytes = self.key.encode()

    @property
    def since_ms(self) -> int:
        return self.last[0] if self.last != ZERO else self.started_ms


#: ``on_entries(cursor, entries, received_ms)``: raw XREAD entries ``[id, [field, value ...]]``
#: of one stream, oldest first, to deliver (the cursor is advanced after the call)
OnEntries = Callable[[Cursor, Sequence[Any], int], None]
#: ``on_trimmed(cursor, lost)``: entries after ``cursor.last`` and before ``lost.to`` were
#: trimmed unread (called before the entries that follow them are delivered)
OnTrimmed = Callable[[Cursor, Lost], None]
#: ``on_restart(since_ms, until_ms)``: Redis restarted; unread history may be gone
OnRestart = Callable[[int, int], None]


class HistoryReader:
    """Read every cursor's stream with XREAD on one connection, reconnecting as needed.

    Args:
        redis_url: where to connect.
        name: ``CLIENT SETNAME`` of the connection.
        on_entries / on_trimmed / on_restart: see the aliases of the same names; they run in
            the reader and must not wait (they only enqueue).
        on_break: called with the error when the connection is lost (before reconnecting).
        room: how many more entries the owner's queues take now.
        wait_room: awaited with how many entries a read would like; returns once enough fit,
            True when it had to wait.
        read_count: ``XREAD COUNT`` per stream, at most.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        name: str,
        on_entries: OnEntries,
        on_trimmed: OnTrimmed,
        on_restart: OnRestart | None = None,
        on_break: Callable[[str], None] | None = None,
        room: Callable[[], int],
        wait_room: Callable[[int], Awaitable[bool]],
        read_count: int = DEFAULT_READ_COUNT,
        connect_timeout: float = 5.0,
        block_ms: int = BLOCK_MS,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self._pool = connection_pool(redis_url, name=name, connect_timeout=connect_timeout)
        self._url = redact_url(redis_url)
        self._on_entries = on_entries
        self._on_trimmed = on_trimmed
        self._on_restart = on_restart
        self._on_break = on_break
        self._room = room
        self._wait_room = wait_room
        self._read_count = read_count
        self._connect_timeout = connect_timeout
        self._block_ms = block_ms
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._cursors: dict[str, Cursor] = {}
        self._changed = asyncio.Event()
        self._run_id: str | None = None
        self._has_info = True
        self._last_read = time.monotonic()
        self._refusal_logged = False
        #: connections lost (each is followed by a reconnect and checked reads)
        self.reconnects = 0
        #: XREAD (and checked-read) round trips
        self.reads = 0
        #: the reader waits for the application to take what was read (back-pressure)
        self.waiting_for_room = False

    # -- cursors ----------------------------------------------------------------------------

    @property
    def cursors(self) -> dict[str, Cursor]:
        return self._cursors

    def add(self, cursor: Cursor) -> None:
        """Read ``cursor``'s stream from the next read on (replacing one of the same key)."""
        self._cursors[cursor.key] = cursor
        self._changed.set()

    def remove(self, key: str) -> None:
        """Stop reading ``key`` (entries of a read in flight are not delivered)."""
        self._cursors.pop(key, None)

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until cancelled; connect once there is a cursor, reconnect on any failure."""
        attempts = 0
        delay = self._backoff_initial
        broken_ms: int | None = None
        while True:
            while not self._cursors:
                self._changed.clear()
                await self._changed.wait()
            attempts += 1
            try:
                conn = await self._connect()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if attempts == 1 or attempts % 20 == 0:
                    logger.warning(
                        "history reader: connect to %s failed (%s); retrying in %.2fs",
                        self._url,
                        describe(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            if broken_ms is not None:
                logger.info("history reader reconnected after %d attempt(s)", attempts)
            attempts = 0
            delay = self._backoff_initial
            for cursor in self._cursors.values():
                cursor.check = True  # whatever happened meanwhile, the next read tells
            try:
                await self._restarted(conn, broken_ms)
                broken_ms = None
                await self._serve(conn)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self.reconnects += 1
                broken_ms = now_ms() if broken_ms is None else broken_ms
                error = describe(exc)
                logger.warning(
                    "history reader: connection to %s lost: %s; reconnecting", self._url, error
                )
                if self._on_break is not None:
                    self._on_break(error)
            finally:
                await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Release the connection pool (call after cancelling :meth:`run`)."""
        await self._pool.disconnect(inuse_connections=True)

    # -- internals --------------------------------------------------------------------------

    async def _connect(self) -> AbstractConnection:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

    async def _restarted(self, conn: AbstractConnection, broken_ms: int | None) -> None:
        """Compare the server's ``run_id`` with the last connection's: a restart lost what
        this reader had not read yet (unless Redis persisted it)."""
        if not self._has_info:
            return
        try:
            info = await self._call(conn, self._connect_timeout, "INFO", "server")
        except ResponseError:
            self._has_info = False  # e.g. an ACL without INFO: restarts go unnoticed
            return
        text = info.decode() if isinstance(info, bytes) else str(info)
        run_id = next(
            (ln.partition(":")[2].strip() for ln in text.splitlines() if ln.startswith("run_id:")),
            None,
        )
        previous, self._run_id = self._run_id, run_id
        if previous is None or run_id == previous:
            return
        for cursor in self._cursors.values():
            # a new stream (unless Redis persisted it): the count starts again, judged by ids
            # until learnt; what the restart lost is announced here, once
            cursor.n = None
            cursor.quiet = True
        if self._on_restart is not None:
            until = now_ms()
            self._on_restart(until if broken_ms is None else broken_ms, until)

    async def _serve(self, conn: AbstractConnection) -> None:
        self._last_read = time.monotonic()
        while True:
            while not self._cursors:
                self._changed.clear()
                await self._changed.wait()
            judged = sum(1 for c in self._cursors.values() if not c.latest_only) or 1
            self.waiting_for_room = True
            try:
                waited = await self._wait_room(self._read_count * judged)
            finally:
                self.waiting_for_room = False
            if waited or time.monotonic() - self._last_read > STALL_S:
                for cursor in self._cursors.values():
                    cursor.check = True
            cursors = list(self._cursors.values())
            if not cursors:
                continue
            count = max(1, min(self._read_count, self._room() // judged))
            checked = [c for c in cursors if c.check and not c.latest_only]
            try:
                await self._read(conn, cursors, checked, count)
            except ResponseError as exc:
                for cursor in checked:
                    cursor.check = True
                # refused (an ACL without XREAD or XINFO, a key of another type): say so,
                # then retry slowly; the offsets stay where they are
                level = logging.DEBUG if self._refusal_logged else logging.WARNING
                self._refusal_logged = True
                logger.log(level, "history reader: redis refused a read: %s", exc)
                await asyncio.sleep(self._backoff_max)

    async def _read(
        self, conn: AbstractConnection, cursors: list[Cursor], checked: list[Cursor], count: int
    ) -> None:
        sent = time.monotonic()
        for cursor in cursors:
            cursor.check = False
        xread: tuple[Any, ...] = (
            "XREAD",
            "COUNT",
            count,
            "STREAMS",
            *(c.key_bytes for c in cursors),
            *(offset_text(c.last) for c in cursors),
        )
        infos: dict[Cursor, StreamInfo | None] = {}
        if checked:
            # atomic with the XINFOs, so the verdict is exact (and never blocks: in a
            # transaction XREAD returns at once)
            commands = [("XINFO", "STREAM", c.key_bytes) for c in checked]
            replies = await self._pipeline(
                conn, [("MULTI",), *commands, xread, ("EXEC",)], self._connect_timeout
            )
            results = replies[-1]
            if not isinstance(results, list):
                raise ResponseError(f"checked read failed: {results}")
            infos = {c: _info(r) for c, r in zip(checked, results, strict=False)}
            reply = results[-1]
            if isinstance(reply, Exception):
                raise reply
        else:
            timeout = self._block_ms / 1000 + self._connect_timeout
            reply = await self._call(conn, timeout, *xread[:3], "BLOCK", self._block_ms, *xread[3:])
        self.reads += 1
        self._last_read = time.monotonic()
        if self._last_read - sent > STALL_S + self._block_ms / 1000:
            # this process was stopped (or its loop blocked) while the read was out: the
            # reply is as of before, the next read may find the stream trimmed past it
            for cursor in self._cursors.values():
                cursor.check = True
        received_ms = now_ms()
        batches: dict[bytes, Any] = {key: entries for key, entries in reply or ()}
        later: list[tuple[Cursor, Any]] = []  # full batches to look at once more
        for cursor in cursors:
            if self._cursors.get(cursor.key) is not cursor:
                continue  # removed (or replaced) while the read was in flight
            entries = batches.get(cursor.key_bytes)
            if cursor in infos:
                info = infos[cursor]
                first = parse_offset(entries[0][0]) if entries else None
                self._judged(cursor, judge(cursor.last, cursor.n, info, first, atomic=True))
                if entries:
                    self._deliver(cursor, entries, received_ms)
                self._learn(cursor, info)
                if cursor.n is None and entries and len(entries) >= count:
                    cursor.check = True  # more to read, and still to learn its `n`
                continue
            if not entries:
                continue
            if len(entries) >= count:
                later.append((cursor, entries))
                continue
            self._deliver(cursor, entries, received_ms)
            if cursor.n is None and not cursor.latest_only:
                cursor.check = True  # learn its `n` (a checked read returns at once)
        if later:
            await self._look_again(conn, later, received_ms)

    async def _look_again(
        self, conn: AbstractConnection, later: list[tuple[Cursor, Any]], received_ms: int
    ) -> None:
        """Full batches: XINFO for judged streams (see the module docstring), the newest entry
        for latest-only ones (they jump to it); one pipeline."""
        commands: list[tuple[Any, ...]] = [
            ("XREVRANGE", c.key_bytes, "+", "-", "COUNT", 1)
            if c.latest_only
            else ("XINFO", "STREAM", c.key_bytes)
            for c, _ in later
        ]
        replies = await self._pipeline(conn, commands, self._connect_timeout)
        for (cursor, entries), reply in zip(later, replies, strict=True):
            if self._cursors.get(cursor.key) is not cursor:
                continue
            if cursor.latest_only:
                newest = reply if reply and not isinstance(reply, Exception) else []
                if newest and parse_offset(newest[0][0]) > parse_offset(entries[-1][0]):
                    entries = newest
                self._deliver(cursor, entries, received_ms)
                continue
            info = _info(reply)
            verdict = judge(cursor.last, cursor.n, info, parse_offset(entries[0][0]), atomic=False)
            if verdict == UNSURE:
                cursor.check = True  # dropped unread: read again, atomically
                continue
            self._judged(cursor, verdict)
            self._deliver(cursor, entries, received_ms)
            self._learn(cursor, info)

    def _judged(self, cursor: Cursor, verdict: Lost | str) -> None:
        if not isinstance(verdict, Lost):
            return
        if cursor.quiet and verdict.count is None:
            cursor.quiet = False  # announced already (Redis restarted)
        else:
            logger.warning(
                "history %s: %s entries after %s and before %s were trimmed before this "
                "consumer read them",
                cursor.key,
                "some" if verdict.count is None else verdict.count,
                offset_text(cursor.last),
                offset_text(verdict.to),
            )
            self._on_trimmed(cursor, verdict)
        # what follows is judged from the loss's end on
        cursor.last = max(cursor.last, predecessor(verdict.to))
        cursor.n = verdict.n

    @staticmethod
    def _learn(cursor: Cursor, info: StreamInfo | None) -> None:
        """A cursor at the stream's newest entry knows its ``n``: every entry ever added."""
        if cursor.n is None and info is not None and cursor.last == info.last_generated:
            cursor.n = info.added
        cursor.quiet = False

    def _deliver(self, cursor: Cursor, entries: Sequence[Any], received_ms: int) -> None:
        if cursor.latest_only:
            cursor.n = None  # never judged
            entries = entries[-1:]
        elif cursor.n is not None:
            cursor.n += len(entries)
        self._on_entries(cursor, entries, received_ms)
        cursor.last = parse_offset(entries[-1][0])

    async def _call(self, conn: AbstractConnection, timeout: float, *args: Any) -> Any:
        async with asyncio.timeout(timeout):
            await conn.send_command(*args)
            return await conn.read_response(disconnect_on_error=False)

    async def _pipeline(
        self, conn: AbstractConnection, commands: list[tuple[Any, ...]], timeout: float
    ) -> list[Any]:
        """Send ``commands`` in one write; their replies, error replies as instances."""
        replies: list[Any] = []
        async with asyncio.timeout(timeout):
            await conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await conn.read_response(disconnect_on_error=False))
                except ResponseError as exc:
                    replies.append(exc)
        return replies


def _info(reply: Any) -> StreamInfo | None:
    """An XINFO STREAM reply; ``None`` for a stream that does not exist.

    Raises:
        ResponseError: any other error reply (e.g. ``NOPERM``: without XINFO a loss could
            not be told, so the reader does not read on).
    """
    if isinstance(reply, Exception):
        if "no such key" in str(reply).lower():
            return None
        raise reply if isinstance(reply, ResponseError) else ResponseError(str(reply))
    return StreamInfo.parse(reply)


__all__ = ["BLOCK_MS", "DEFAULT_READ_COUNT", "STALL_S", "Cursor", "HistoryReader"]
