"""The publisher's connection to a Redis Cluster: one raw RESP connection per master, one
logical pipeline (I/O adapter).

A burst of frames goes to several masters at once: each frame's ``SPUBLISH`` to the master
owning its channel's slot, its ``XADD`` to the one owning its history stream, each cache
``HSET`` to the one owning that hash (:mod:`broker.cluster_slots`). The publisher routes every
command itself, with one list lookup (:attr:`ShardedConnection.owner`), and hands over one
buffer per master (:meth:`ShardedConnection.send_parts`); this class keeps the promise
``broker.resp.RespConnection`` keeps for one server, so the publisher's accounting is unchanged:
every burst is reported exactly once, as

- **answered** (``on_answered``, its error replies first through ``on_refused``) once every
  master it went to has answered its part;
- **lost** (``on_lost``) when a master's connection breaks before answering its part: the
  bursts that had a part there. Their parts on the other masters may have been published: a
  gap then announces more than was lost, never less (a consumer told of a gap re-reads; one
  never told loses data silently);
- **dropped** (``on_dropped``) when it had a part for a master that has no connection now: its
  other parts are written (their subscribers get their frames), the burst counts as lost.

**One master down does not stop the others.** A master whose connection broke (it died, a
failover is under way) is left out until the cluster serves its slots again: a task reads the
slot map every so often (from the masters last seen, then the URL's nodes) and, once every slot
has a master again (the replica promoted, or the master back), connects whatever master it lacks
and routes by the new map. Meanwhile the frames for that master's slots are dropped and
announced, and every other master's subscribers keep theirs. Only when no master is left is the
connection closed (the publisher then reconnects from scratch).

**Redirections.** A ``-MOVED`` reply (the slot moved: a resharding, or a failover seen first by
another node) means the command did not run: the whole connection is dropped, every burst not
yet answered is lost, and the next connect reads the slot map afresh, asking the node the
redirect named first (it knows its own slots before anyone else does). An ``-ASK`` reply (the
slot is migrating and this key already left) is an error reply like any other: the map has not
changed, so reconnecting would not help. Only keys are asked about (a shard channel is no key:
its SPUBLISH runs on the source until the slot has moved), so it is an XADD or a cache HSET
that did not run: the publisher counts the burst's history as refused and announces it (a
``redis`` gap for durable readers), the frames themselves were published. It is not retried
with ``ASKING``: a slot migrates in milliseconds.

Replies are read like the single connection's: behind the next write to that master, or by
its timer (:meth:`broker.resp.RespConnection.poll_replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.clock import now_ms
from broker.cluster_slots import SlotMap, parse_redirect
from broker.resp import ClusterDownError, OnAnswered, OnLost, OnRefused, RespAddress, RespConnection

logger = logging.getLogger(__name__)

#: a master, as ``CLUSTER SLOTS`` names it
Node = tuple[str, int]
#: called with a burst's token when it could not be written whole (a master had no connection)
OnDropped = Callable[[Any], None]

#: while a master is missing, the slot map is read again after this long, doubling up to
#: :data:`HEAL_MAX` (a failover takes the cluster's node timeout plus an election)
HEAL_INITIAL = 0.05
HEAL_MAX = 1.0


class MasterLost(RedisConnectionError):
    """One master's connection broke. ``fences``: that master holds the leader lock (or which
    one does is not known), so the leader must renew it before publishing again."""

    def __init__(self, message: str, *, fences: bool) -> None:
        super().__init__(message)
        self.fences = fences


class _Burst:
    """One burst written to several masters, answered when all its parts are."""

    __slots__ = ("dropped", "errors", "redirect", "refusals", "remaining", "token")

    def __init__(self, token: Any, parts: int) -> None:
        self.token = token
        self.remaining = parts
        self.errors = 0
        self.refusals: list[Exception] = []
        #: "MOVED 3999 host:port": a part ran nowhere
        self.redirect: str | None = None
        #: a part had no master to go to: the burst counts as lost once the others answered
        self.dropped = False


class ShardedConnection:
    """Raw RESP connections to the masters of a cluster, as one pipeline."""

    def __init__(
        self,
        address: RespAddress,
        slots: SlotMap,
        on_answered: OnAnswered | None,
        on_lost: OnLost | None,
        on_refused: OnRefused | None,
        on_dropped: OnDropped | None,
        fence_slot: int | None = None,
    ) -> None:
        self._address = address
        #: the slot of the leader lock (None: unknown; every master's loss then fences)
        self._fence_slot = fence_slot
        self.slots = slots
        #: slot -> index of its master (what the publisher routes by)
        self.owner = slots.owner
        #: master index -> its connection, None while it has none
        self._by_index: list[RespConnection | None] = [None] * len(slots.masters)
        #: every open connection, by master
        self._conns: dict[Node, RespConnection] = {}
        self._on_answered = on_answered
        self._on_lost = on_lost
        self._on_refused = on_refused
        self._on_dropped = on_dropped
        #: bursts written and not yet answered, in write order (dicts keep it)
        self._unanswered: dict[int, _Burst] = {}
        self.closed = False
        #: the node a redirect named (ask it first for the new map), if one ended this
        self.redirected_to: Node | None = None
        self._healing: asyncio.Task[None] | None = None
        #: connect() has returned: a loss now is the publisher's to hear of
        self._connected = False
        #: wall clock (ms) since when every master has a connection (0: not now); a burst
        #: written before it may have been routed without one
        self.whole_since_ms = 0

    @classmethod
    async def connect(
        cls,
        address: RespAddress,
        *,
        on_answered: OnAnswered | None = None,
        on_lost: OnLost | None = None,
        on_refused: OnRefused | None = None,
        on_dropped: OnDropped | None = None,
        fence_slot: int | None = None,
    ) -> ShardedConnection:
        """Read the slot map and connect to every master (all at once). A master that cannot
        be reached is left out and looked for again (see the module docstring), as long as
        one can be.

        Raises:
            ClusterDownError: no seed gave a map, or some slot has no master.
            redis.exceptions.ConnectionError, AuthenticationError: no master can be used.
        """
        slots = await address.slot_map()
        if not slots.complete:
            raise ClusterDownError(f"{slots.unowned()} slots have no master: the cluster is down")
        self = cls(address, slots, on_answered, on_lost, on_refused, on_dropped, fence_slot)
        failure = await self._connect_missing()
        if not self._conns:
            raise failure or RedisConnectionError("every master's connection broke at once")
        self._connected = True
        if self.missing:
            logger.warning("redis cluster: a master cannot be reached (%s): left out", failure)
            self._start_healing()
        return self

    # -- what the publisher asks of a connection ------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return any(conn.writing_paused for conn in self._conns.values())

    @property
    def unanswered_since(self) -> float | None:
        times = [t for c in self._conns.values() if (t := c.unanswered_since) is not None]
        return min(times) if times else None

    @property
    def missing(self) -> int:
        """How many masters of the current map have no open connection."""
        return sum(1 for conn in self._by_index if conn is None or conn.closed)

    def send_parts(self, parts: dict[int, tuple[bytes, int]], token: Any) -> None:
        """Write each master's part (``master index -> (buffer, commands)``) without waiting;
        ``on_answered(token, errors)`` follows once all are answered, or ``on_dropped(token)``
        when a part had no master to go to.

        Raises:
            redis.exceptions.ConnectionError: the connection is closed.
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        by_index = self._by_index
        sends = []
        dropped = False
        for index, (buffer, commands) in parts.items():
            conn = by_index[index]
            if conn is None or conn.closed:
                dropped = True
            else:
                sends.append((conn, buffer, commands))
        if not sends:
            if self._on_dropped is not None:
                self._on_dropped(token)
            return
        # Registered before the first write: a write reads the replies that came since (the
        # polled road), which may answer this very part, or break a connection, or redirect.
        burst = _Burst(token, len(sends))
        burst.dropped = dropped
        key = id(burst)
        self._unanswered[key] = burst
        for conn, buffer, commands in sends:
            if key not in self._unanswered:
                return  # reported meanwhile (a connection broke, an abort): not written on
            try:
                conn.send(buffer, commands, token=burst)
            except RedisConnectionError:
                # closed under us since the routing: this part goes nowhere
                burst.dropped = True
                self._part_done(burst, 0)

    async def wait_writable(self) -> None:
        """Return once every master's transport takes writes.

        Raises:
            redis.exceptions.ConnectionError: the connection was closed meanwhile.
        """
        for conn in list(self._conns.values()):
            with contextlib.suppress(RedisConnectionError):
                await conn.wait_writable()  # (a broken one is left out by then)
        if self.closed:
            raise RedisConnectionError("connection closed")

    async def drain(self) -> None:
        """Wait until every burst written so far is answered (or reported lost).

        Raises:
            redis.exceptions.ConnectionError: the connection is closed.
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        await asyncio.gather(
            *(conn.drain() for conn in self._conns.values()), return_exceptions=True
        )

    def abort_stalled(self, older_than: float, why: Exception) -> None:
        """Drop the connection of every master with a buffer unanswered since before
        ``older_than`` (monotonic): that master is gone, the others go on."""
        for conn in list(self._conns.values()):
            since = conn.unanswered_since
            if since is not None and since < older_than:
                conn.abort(why)  # reported through _node_lost

    def abort(self, why: Exception, *, report: bool = True) -> None:
        """Drop every connection now; ``on_lost`` hears of the unanswered bursts unless
        ``report`` is false."""
        if self.closed:
            return
        self.closed = True
        self.whole_since_ms = 0
        if self._healing is not None:
            self._healing.cancel()
        for conn in self._conns.values():
            conn.abort(why, report=False)
        lost, self._unanswered = list(self._unanswered.values()), {}
        # Reported even with nothing in flight: the publisher counts the error (and stops the
        # leader publishing until its lock is renewed), as for one server's connection.
        if report and self._on_lost is not None:
            self._on_lost(why, [burst.token for burst in lost])

    async def aclose(self) -> None:
        """Close every connection (``on_lost`` is not called)."""
        self.closed = True
        self._unanswered = {}
        healing, self._healing = self._healing, None
        if healing is not None:
            healing.cancel()
            await asyncio.gather(healing, return_exceptions=True)
        for conn in list(self._conns.values()):
            with contextlib.suppress(RedisError, OSError):
                await conn.aclose()

    # -- the masters' callbacks -----------------------------------------------------------------

    def _part_refused(self, burst: _Burst, replies: list[Exception]) -> None:
        for reply in replies:
            redirect = parse_redirect(reply)
            if redirect is not None and redirect.kind == "MOVED":
                burst.redirect = str(reply)
            else:
                burst.refusals.append(reply)

    def _part_answered(self, burst: _Burst, errors: int) -> None:
        self._part_done(burst, errors)

    def _part_done(self, burst: _Burst, errors: int) -> None:
        """A part of ``burst`` was answered (or went nowhere); the last one reports it."""
        if self.closed or id(burst) not in self._unanswered:
            return  # reported lost already
        burst.errors += errors
        burst.remaining -= 1
        if burst.remaining:
            return
        if burst.redirect is not None:
            redirect = parse_redirect(burst.redirect)
            if redirect is not None:
                self.redirected_to = (redirect.host, redirect.port)
            # (still unanswered: the abort reports it lost with the others)
            self.abort(RedisConnectionError(f"the cluster redirected a write: {burst.redirect}"))
            return
        del self._unanswered[id(burst)]
        if burst.dropped:
            if self._on_dropped is not None:
                self._on_dropped(burst.token)
            return
        if burst.refusals and self._on_refused is not None:
            self._on_refused(burst.token, burst.refusals)
        if self._on_answered is not None:
            self._on_answered(burst.token, burst.errors)

    def _node_lost(self, node: Node, why: Exception, bursts: list[Any]) -> None:
        """A master's connection broke: the bursts with a part there are lost; the others go
        on without it until the slot map is whole again."""
        current = self._conns.get(node)
        if current is not None and current.closed:  # (not a newer, open one of that node)
            del self._conns[node]
        self._by_index = [None if c is None or c.closed else c for c in self._by_index]
        self.whole_since_ms = 0
        if self.closed or not self._connected:
            return  # (connect() leaves it out, or gives up)
        lost = [b for b in bursts if self._unanswered.pop(id(b), None) is not None]
        fence = self._fence_slot
        fences = fence is None or self.slots.node_of(fence) in (node, None)
        if not self._conns:
            # no master left: the publisher reconnects from scratch
            self.abort(MasterLost(f"{node[0]}:{node[1]}: {why}", fences=True))
            return
        if self._on_lost is not None:
            # reported with nothing in flight too: the error is counted, and losing the lock's
            # master stops the leader publishing until it renewed the lock
            self._on_lost(
                MasterLost(f"{node[0]}:{node[1]}: {why}", fences=fences), [b.token for b in lost]
            )
        logger.warning(
            "redis cluster: the connection to master %s:%d broke (%s): its slots' frames are "
            "dropped and announced until the cluster serves them again",
            *node,
            why,
        )
        self._start_healing()

    # -- healing --------------------------------------------------------------------------------

    def _start_healing(self) -> None:
        if self._healing is None and not self.closed:
            self._healing = asyncio.get_running_loop().create_task(
                self._heal(), name="cluster-heal"
            )

    async def _heal(self) -> None:
        """Until every slot's master has a connection: read the map, connect what is missing."""
        delay = HEAL_INITIAL
        try:
            while not self.closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, HEAL_MAX)
                try:
                    slots = await self._fresh_map()
                except (RedisError, OSError, TimeoutError) as exc:
                    logger.debug("redis cluster: no slot map yet (%s)", exc)
                    continue
                if not slots.complete or self.closed:
                    continue
                self.slots, self.owner = slots, slots.owner
                self._by_index = [self._conns.get(node) for node in slots.masters]
                for node in [n for n in self._conns if n not in slots.masters]:
                    # demoted (an old master back as a replica): its bursts are lost
                    self._conns[node].abort(RedisConnectionError(f"{node} is no master now"))
                failure = await self._connect_missing()
                if failure is None and not self.missing and not self.closed:
                    logger.info(
                        "redis cluster: every slot has a master again (%d masters)",
                        len(slots.masters),
                    )
                    return
        finally:
            self._healing = None

    async def _fresh_map(self) -> SlotMap:
        """The slot map, asking the masters last seen first, then the URL's nodes."""
        route = self._address.cluster
        assert route is not None
        seeds = tuple(dict.fromkeys([*self._conns, *self.slots.masters, *route.nodes]))
        return await replace(self._address, cluster=replace(route, nodes=seeds)).slot_map()

    async def _connect_missing(self) -> Exception | None:
        """Connect every master of the current map that has no connection; the first failure
        (None: all connected)."""
        wanted = [
            (index, node)
            for index, (node, conn) in enumerate(
                zip(self.slots.masters, self._by_index, strict=True)
            )
            if conn is None or conn.closed
        ]
        tasks = [
            asyncio.ensure_future(
                RespConnection.connect(
                    self._address.node(*node),
                    on_answered=self._part_answered,
                    on_lost=functools.partial(self._node_lost, node),
                    on_refused=self._part_refused,
                )
            )
            for _, node in wanted
        ]
        try:
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:  # connected before the cancel: closed, not leaked
                if not task.cancelled() and task.exception() is None:
                    task.result().close()
            raise
        failure: Exception | None = None
        for (index, node), task in zip(wanted, tasks, strict=True):
            error = task.exception()
            if error is not None:
                if not isinstance(error, Exception):
                    raise error
                failure = failure or error
                continue
            conn = task.result()
            if self.closed or conn.closed:
                # closed meanwhile, or broke between its connect and now: not used
                conn.close()
                failure = failure or RedisConnectionError(f"{node[0]}:{node[1]}: closed")
                continue
            conn.poll_replies()
            self._conns[node] = conn
            self._by_index[index] = conn
        if failure is None and not self.closed and not self.missing:
            self.whole_since_ms = self.whole_since_ms or now_ms()
        return failure


__all__ = ["HEAL_INITIAL", "HEAL_MAX", "MasterLost", "OnDropped", "ShardedConnection"]
