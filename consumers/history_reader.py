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
last offset to the oldest entry retained, with the count), never moved on silently. The rules
are in ``consumers.history_window``; what they cost here:

* a reader that keeps up: nothing (its batches are shorter than COUNT, which is at most the
  smallest cap of the streams read, ``count_limit``);
* a stream behind, and every stream after the reader paused (waited for room, stalled,
  reconnected): one entry, ``last`` itself, read again (the read starts at its predecessor);
* a batch that comes full unexpectedly: ``XRANGE key last last`` in one pipeline after the read;
* ``XINFO STREAM``, in a *checked read* (``MULTI; XINFO STREAM ...; XREAD ...; EXEC``, atomic,
  so exact), only for a stream whose ``last`` is gone (its batch is dropped and read again) or
  is no entry, whose count is not known yet, after a Redis restart, and for each stream once
  every ``CHECK_INTERVAL_S`` (a stream deleted and recreated between two reads).

Latest-only streams (state: ticker, orderbook, candles) are never judged: skipping their older
entries is what was asked for. Of a batch only the newest live entry is delivered (a
back-filled one, ``origin`` = ``rest``, is old state appended late: skipped), and after a full
batch the reader jumps to the stream's newest entry (``XREVRANGE + - COUNT 1``) when it is a
live one.

On a Redis Cluster (a ``redis+cluster://`` URL) every history stream of the namespace shares
one hash tag (``{ns:hist}``, ``broker.keys``), hence one slot and one master: each connect asks
the cluster which master serves that slot (``broker.resp.RespAddress``: ``CLUSTER SLOTS``) and
reads there as on one server. A failover promotes the replica: another ``run_id``, handled as
a restart (below: what was not replicated is announced). A resharding that moves the slot
answers ``-MOVED``: the reader reconnects and asks again.

A Redis restart (a new ``run_id``) loses unread history with the server's data; it is reported
once (``on_restart``), and each stream is then read on from ``last`` if Redis kept it, else
from the new stream's start (its ids may be below ``last``: the new server's clock may be
behind). Any other failure of the reader is reported (``on_failure``) and retried from the
offsets delivered: the reader never stops silently.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import AskError, ClusterDownError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.clock import now_ms
from broker.cluster_slots import key_slot
from broker.errors import describe
from broker.redis_client import connection_pool
from broker.redis_url import ClusterUrl, is_cluster_url, parse_cluster_url
from broker.resp import RespAddress
from broker.settings import redact_url
from consumers.history_window import (
    UNSURE,
    ZERO,
    Lost,
    Offset,
    StreamInfo,
    judge,
    newest_live,
    offset_text,
    parse_offset,
    predecessor,
)

logger = logging.getLogger(__name__)

#: ``XREAD BLOCK``: how long one read waits for new entries (a new subscription is read from
#: the next read on; its start offset was fixed when it was made, so nothing is missed)
BLOCK_MS = 500
#: ``XREAD COUNT`` per stream by default; at most the broker's smallest cap (the client clamps
#: it to the caps in the broker's status)
DEFAULT_READ_COUNT = 100
#: Each stream is checked (``XINFO STREAM``) about this often, whatever else happens: a stream
#: deleted and recreated while the reader kept up is told by its counters only.
CHECK_INTERVAL_S = 30.0
#: A reader that did not read for this long (its process was stopped, its loop blocked) may
#: have missed entries that went meanwhile: its next read verifies every stream.
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
    #: ``last`` is an entry of the stream (delivered, or the newest when it started): while it
    #: is retained nothing after it was trimmed. False: a position between entries.
    anchored: bool = False
    #: the broker's cap for this stream's type (``None``: not known); COUNT stays at or below it
    cap: int | None = None
    #: when the cursor started, for a gap before anything was delivered
    started_ms: int = field(default_factory=now_ms)
    #: the last time a check found the stream as the cursor knew it (for a recreated stream)
    verified_ms: int = field(default_factory=now_ms)
    #: the next read makes sure ``last`` is still there (reads from its predecessor): the
    #: stream was behind, or the reader paused
    verify: bool = False
    #: the next read is a checked one (XINFO in the same transaction)
    check: bool = False
    #: when the periodic check is due (``time.monotonic``; 0: at the first read)
    due: float = 0.0
    #: Redis restarted since this cursor last read: its next check decides where it goes on
    restarted: bool = False
    #: a loss of unknown count is not announced once (Redis restarted: announced already)
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
#: lost unread (trimmed, or the stream was deleted: ``lost.recreated``); called before the
#: entries that follow them are delivered
OnTrimmed = Callable[[Cursor, Lost], None]
#: ``on_restart(since_ms, until_ms)``: Redis restarted; unread history may be gone
OnRestart = Callable[[int, int], None]


class HistoryReader:
    """Read every cursor's stream with XREAD on one connection, reconnecting as needed.

    Args:
        redis_url: where to connect (always RESP2, whatever ``?protocol=`` says: the reader
            parses the raw replies).
        name: ``CLIENT SETNAME`` of the connection.
        on_entries / on_trimmed / on_restart: see the aliases of the same names; they run in
            the reader and must not wait (they only enqueue).
        on_break: called with the error when the connection is lost (before reconnecting).
        on_failure: called with the error when the reader failed otherwise (a bug, a reply it
            cannot read); it retries from the offsets delivered, with a backoff. Called once
            per run of failures.
        room: how many more entries the owner's queues take now.
        wait_room: awaited with how many entries a read would like; returns once enough fit,
            True when it had to wait.
        read_count: ``XREAD COUNT`` per stream, at most (lowered to the smallest ``cap`` of
            the judged cursors).
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
        on_failure: Callable[[str], None] | None = None,
        room: Callable[[], int],
        wait_room: Callable[[int], Awaitable[bool]],
        read_count: int = DEFAULT_READ_COUNT,
        connect_timeout: float = 5.0,
        block_ms: int = BLOCK_MS,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        cluster_key: str | None = None,
    ) -> None:
        """``cluster_key``: with a ``redis+cluster://`` URL, a key in the slot of every stream
        this reader reads (``Keys.history`` of any stream: they share one hash tag)."""
        self._name = name
        #: a cluster: the master of the history's slot, found at each connect
        self._cluster: tuple[ClusterUrl, RespAddress] | None = None
        if is_cluster_url(redis_url):
            if cluster_key is None:
                raise ValueError("a cluster's history reader needs cluster_key")
            route = RespAddress.from_url(redis_url).routed(key_slot(cluster_key))
            parsed = parse_cluster_url(redis_url)
            self._cluster = (parsed, route)
            # (replaced at each connect by the pool of the master found then)
            self._pool = self._node_pool(parsed.node_url(*parsed.nodes[0]), connect_timeout)
        else:
            self._pool = self._node_pool(redis_url, connect_timeout)
        self._url = redact_url(redis_url)
        self._on_entries = on_entries
        self._on_trimmed = on_trimmed
        self._on_restart = on_restart
        self._on_break = on_break
        self._on_failure = on_failure
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
        self._refusal_logged = False
        self._failing = False
        self._last_read = time.monotonic()
        #: connections lost (each is followed by a reconnect)
        self.reconnects = 0
        #: other failures (each reported, then retried)
        self.failures = 0
        #: XREAD (and checked-read) round trips
        self.reads = 0
        #: streams checked with XINFO STREAM
        self.checks = 0
        #: the reader waits for the application to take what was read (back-pressure)
        self.waiting_for_room = False

    # -- cursors ----------------------------------------------------------------------------

    @property
    def cursors(self) -> dict[str, Cursor]:
        return self._cursors

    def add(self, cursor: Cursor) -> None:
        """Read ``cursor``'s stream from the next read on (replacing one of the same key)."""
        if not cursor.due:
            # spread over the interval: cursors made together are not all checked together
            cursor.due = time.monotonic() + CHECK_INTERVAL_S * random.uniform(0.5, 1.5)
        self._cursors[cursor.key] = cursor
        self._changed.set()

    def remove(self, key: str) -> None:
        """Stop reading ``key`` (entries of a read in flight are not delivered)."""
        self._cursors.pop(key, None)

    def count_limit(self) -> int:
        """``XREAD COUNT`` at most: ``read_count``, lowered to the smallest cap known of the
        judged streams (a larger COUNT would let a stream trimmed past look whole)."""
        caps = [c.cap for c in self._cursors.values() if c.cap and not c.latest_only]
        return min(self._read_count, *caps) if caps else self._read_count

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until cancelled; connect once there is a cursor, reconnect on any failure.

        Never returns: an unexpected error is reported (``on_failure``) and the reader starts
        again from the offsets delivered, after a backoff.
        """
        delay = self._backoff_initial
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                error = describe(exc)
                if self._failing:  # no read went through since the last failure
                    delay = min(delay * 2, self._backoff_max)
                    logger.debug("history reader failed again: %s", error)
                else:
                    self._failing = True
                    delay = self._backoff_initial
                    logger.exception("history reader failed: %s; retrying", error)
                    if self._on_failure is not None:
                        self._on_failure(error)
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Release the connection pool (call after cancelling :meth:`run`)."""
        await self._pool.disconnect(inuse_connections=True)

    # -- internals --------------------------------------------------------------------------

    async def _run(self) -> None:
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
            self._suspect()  # whatever happened meanwhile, the next read tells
            try:
                await self._restarted(conn, broken_ms)
                broken_ms = None
                await self._serve(conn)
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

    def _node_pool(self, url: str, connect_timeout: float) -> ConnectionPool:
        pool = connection_pool(url, name=self._name, connect_timeout=connect_timeout)
        # a URL's ?protocol=3 wins over the argument (redis-py); RESP3 replies are maps the
        # parsing below does not read, so the reader's own connections speak RESP2
        pool.connection_kwargs["protocol"] = 2
        return pool

    async def _connect(self) -> AbstractConnection:
        if self._cluster is not None:
            parsed, route = self._cluster
            async with asyncio.timeout(self._connect_timeout * 2):
                node = await route.discover()  # the master serving the history's slot now
            self._pool = self._node_pool(
                parsed.node_url(node.host, node.port), self._connect_timeout
            )
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
            # a new stream unless Redis persisted it: the next check reads on from `last` if
            # it is still there, else from the new stream's start; what the restart lost is
            # announced here, once
            cursor.n = None
            cursor.quiet = True
            cursor.restarted = True
            cursor.check = True
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
                waited = await self._wait_room(self.count_limit() * judged)
            finally:
                self.waiting_for_room = False
            if waited or time.monotonic() - self._last_read > STALL_S:
                self._suspect()  # unread entries may have gone meanwhile
            cursors = list(self._cursors.values())
            if not cursors:
                continue
            count = max(1, min(self.count_limit(), self._room() // judged))
            now = time.monotonic()
            for cursor in cursors:
                if cursor.verify and not cursor.anchored and not cursor.latest_only:
                    cursor.check = True  # no entry to look for: count instead
            checked = [c for c in cursors if c.check or c.due <= now]
            try:
                await self._read(conn, cursors, checked, count)
            except ResponseError as exc:
                if _redirected(exc):
                    # a cluster moved the history's slot (a resharding, a failover seen
                    # first elsewhere): reconnect, and ask again where it is
                    raise RedisConnectionError(f"the cluster redirected a read: {exc}") from exc
                for cursor in checked:
                    cursor.check = True
                # refused (an ACL without XREAD or XINFO, a key of another type): say so,
                # then retry slowly; the offsets stay where they are
                level = logging.DEBUG if self._refusal_logged else logging.WARNING
                self._refusal_logged = True
                logger.log(level, "history reader: redis refused a read: %s", exc)
                await asyncio.sleep(self._backoff_max)

    def _suspect(self) -> None:
        """The reader did not read for a while (it waited for room, stalled, reconnected): the
        next read makes sure each stream's ``last`` is still there."""
        for cursor in self._cursors.values():
            cursor.verify = not cursor.latest_only

    async def _read(
        self, conn: AbstractConnection, cursors: list[Cursor], checked: list[Cursor], count: int
    ) -> None:
        is_checked = set(checked)
        # read from `last`'s predecessor: `last` comes first while it is retained (rule 2)
        probed = {
            c
            for c in cursors
            if c.anchored and (c in is_checked or (c.verify and not c.latest_only))
        }
        positions = [offset_text(predecessor(c.last) if c in probed else c.last) for c in cursors]
        xread: tuple[Any, ...] = (
            "XREAD",
            "COUNT",
            count + 1 if probed else count,  # `last` itself and `count` more
            "STREAMS",
            *(c.key_bytes for c in cursors),
            *positions,
        )
        infos: dict[Cursor, StreamInfo | None] = {}
        sent = time.monotonic()
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
            reply = _reply(results[-1])
            for cursor in checked:
                cursor.check = False
        elif probed:
            reply = await self._call(conn, self._connect_timeout, *xread)  # data is there
        else:
            timeout = self._block_ms / 1000 + self._connect_timeout
            reply = await self._call(conn, timeout, *xread[:3], "BLOCK", self._block_ms, *xread[3:])
        self.reads += 1
        self._last_read = time.monotonic()
        if self._last_read - sent > STALL_S + self._block_ms / 1000:
            # this process was stopped (or its loop blocked) while the read was out: what
            # the reply says is as of before
            self._suspect()
        received_ms = now_ms()
        batches: dict[bytes, Any] = {key: entries for key, entries in reply or ()}
        later: list[tuple[Cursor, Any]] = []  # full batches to look at once more
        for cursor in cursors:
            if self._cursors.get(cursor.key) is not cursor:
                continue  # removed (or replaced) while the read was in flight
            entries = batches.get(cursor.key_bytes) or []
            retained: bool | None = None
            if cursor in probed:
                retained = bool(entries) and parse_offset(entries[0][0]) == cursor.last
                if retained:
                    entries = entries[1:]
            if cursor in is_checked:
                self._checked(cursor, infos[cursor], entries, retained, count, received_ms)
            elif cursor in probed:
                if not retained:
                    cursor.check = True  # `last` gone: dropped unread, read again checked
                    continue
                if entries:
                    self._deliver(cursor, entries, received_ms)
                cursor.verify = len(entries) >= count  # behind: the next read verifies too
            elif not entries:
                continue
            elif len(entries) < count:
                # whole (rule 1): a stream trimmed past `last` would have filled the COUNT
                self._deliver(cursor, entries, received_ms)
                if cursor.n is None and not cursor.latest_only:
                    cursor.check = True  # learn its `n` (a checked read returns at once)
            elif cursor.anchored or cursor.latest_only:
                later.append((cursor, entries))
            else:
                cursor.check = True  # dropped unread: `last` is no entry, read again checked
        if later:
            await self._look_again(conn, later, received_ms)
        self._failing = False  # a whole read went through

    def _checked(
        self,
        cursor: Cursor,
        info: StreamInfo | None,
        entries: Any,
        retained: bool | None,
        count: int,
        received_ms: int,
    ) -> None:
        """A checked read's batch: judged by the XINFO of the same transaction."""
        self.checks += 1
        cursor.due = time.monotonic() + CHECK_INTERVAL_S * random.uniform(0.75, 1.25)
        first = parse_offset(entries[0][0]) if entries else None
        verdict = judge(
            cursor.last,
            cursor.n,
            info,
            first,
            atomic=True,
            last_retained=retained,
            restarted=cursor.restarted,
        )
        cursor.restarted = False
        delivered = self._judged(cursor, verdict) and bool(entries)
        if delivered:
            self._deliver(cursor, entries, received_ms)
        # behind: the next read verifies too
        cursor.verify = delivered and len(entries) >= count and not cursor.latest_only
        self._learn(cursor, info)

    async def _look_again(
        self, conn: AbstractConnection, later: list[tuple[Cursor, Any]], received_ms: int
    ) -> None:
        """Full batches, one pipeline: is each judged stream's ``last`` still there (then the
        batch is whole), and the newest entry of each latest-only one (it jumps to it)."""
        commands: list[tuple[Any, ...]] = []
        for cursor, _ in later:
            if cursor.latest_only:
                commands.append(("XREVRANGE", cursor.key_bytes, "+", "-", "COUNT", 1))
            else:
                last = offset_text(cursor.last)
                commands.append(("XRANGE", cursor.key_bytes, last, last))
        replies = await self._pipeline(conn, commands, self._connect_timeout)
        for (cursor, entries), reply in zip(later, replies, strict=True):
            if self._cursors.get(cursor.key) is not cursor:
                continue
            found = _reply(reply)
            if cursor.latest_only:
                # the newest entry may be a back-filled one (old state): then no jump
                if (
                    found
                    and parse_offset(found[0][0]) > parse_offset(entries[-1][0])
                    and newest_live(found) is not None
                ):
                    entries = found
                self._deliver(cursor, entries, received_ms)
            elif found:
                self._deliver(cursor, entries, received_ms)  # `last` still there (rule 2)
                cursor.verify = True  # behind: the next read verifies in the read itself
            else:
                cursor.check = True  # `last` gone: dropped unread, read again checked

    def _judged(self, cursor: Cursor, verdict: Lost | str) -> bool:
        """Apply a verdict to the cursor; whether the batch read with it is delivered."""
        if verdict == UNSURE:
            cursor.check = True
            return False
        if not isinstance(verdict, Lost):
            cursor.verified_ms = now_ms()
            return True
        if cursor.latest_only:
            # skipping entries is what it asked for: only a new stream moves it
            if verdict.recreated and verdict.resume is not None and verdict.resume != cursor.last:
                logger.info("history %s: a new stream, read from its start", cursor.key)
                cursor.last = verdict.resume
                cursor.anchored = False
                return False
            return True
        if cursor.quiet and verdict.count is None:
            cursor.quiet = False  # announced already (Redis restarted)
        else:
            logger.warning(
                "history %s: %s entries after %s%s were lost before this consumer read them%s",
                cursor.key,
                "some" if verdict.count is None else verdict.count,
                offset_text(cursor.last),
                "" if verdict.to is None else f" and before {offset_text(verdict.to)}",
                " (the stream was deleted and recreated)" if verdict.recreated else "",
            )
            self._on_trimmed(cursor, verdict)
        cursor.n = verdict.n
        if verdict.resume is not None:
            moved = verdict.resume != cursor.last
            cursor.last = verdict.resume
            if moved:
                # the new stream, from its start: the batch read after the old `last` may
                # have skipped some of it, so it is read again
                cursor.anchored = False
                return False
            return True
        # what follows is judged from the loss's end on
        assert verdict.to is not None
        cursor.last = max(cursor.last, predecessor(verdict.to))
        cursor.anchored = False
        return True

    @staticmethod
    def _learn(cursor: Cursor, info: StreamInfo | None) -> None:
        """A cursor at the stream's newest entry knows its ``n``: every entry ever added
        (a latest-only one skips entries: it has none)."""
        if (
            cursor.n is None
            and not cursor.latest_only
            and info is not None
            and cursor.last == info.last_generated
        ):
            cursor.n = info.added
        cursor.quiet = False

    def _deliver(self, cursor: Cursor, entries: Sequence[Any], received_ms: int) -> None:
        if cursor.latest_only:
            cursor.n = None  # never judged
            newest = newest_live(entries)  # back-filled entries are old state: skipped
            if newest is not None:
                self._on_entries(cursor, [newest], received_ms)
        else:
            if cursor.n is not None:
                cursor.n += len(entries)
            self._on_entries(cursor, entries, received_ms)
        cursor.last = parse_offset(entries[-1][0])
        cursor.anchored = True

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


def _redirected(error: Exception) -> bool:
    """Whether a refused read was a cluster's redirection (or its being down): not a refusal
    of this reader, a reason to find the history's master again."""
    if isinstance(error, AskError | ClusterDownError):  # (MovedError is an AskError)
        return True
    text = str(error)
    return any(f"{word} " in text for word in ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"))


def _reply(reply: Any) -> Any:
    """A reply, raising an error reply (``ResponseError``: refused, the reader retries)."""
    if isinstance(reply, Exception):
        raise reply if isinstance(reply, ResponseError) else ResponseError(str(reply))
    return reply


def _info(reply: Any) -> StreamInfo | None:
    """An XINFO STREAM reply; ``None`` for a stream that does not exist.

    Raises:
        ResponseError: any other error reply (e.g. ``NOPERM``: without XINFO a loss could
            not be told, so the reader does not read on).
    """
    if isinstance(reply, Exception) and "no such key" in str(reply).lower():
        return None
    return StreamInfo.parse(_reply(reply))


__all__ = [
    "BLOCK_MS",
    "CHECK_INTERVAL_S",
    "DEFAULT_READ_COUNT",
    "STALL_S",
    "Cursor",
    "HistoryReader",
]
