"""The publisher's connection to a Redis Cluster: one raw RESP connection per master, one
logical pipeline (I/O adapter).

A burst of frames goes to several masters at once: each frame's ``SPUBLISH`` to the master
owning its channel's slot, its ``XADD`` to the one owning its history stream, each cache
``HSET`` to the one owning that hash (:mod:`broker.cluster_slots`). The publisher routes every
command itself, with one list lookup (:attr:`ShardedConnection.owner`), and hands over one
buffer per master (:meth:`ShardedConnection.send_parts`); this class keeps the promise
``broker.resp.RespConnection`` keeps for one server, so the publisher's accounting is unchanged:

- a burst is **answered** once every master it went to has answered its part (errors summed,
  error replies reported first through ``on_refused``), exactly once;
- a burst is **lost** when any connection breaks before it is answered: the whole sharded
  connection is dropped (the other masters' connections too), and every burst not yet
  answered is reported through ``on_lost``, exactly once. Some of their frames may have been
  published on the masters that stayed up: a gap then announces more than was lost, never
  less (a consumer told of a gap re-reads; one never told loses data silently);
- a ``-MOVED`` reply (the slot has moved: a failover inside the cluster, a resharding) means
  the command was not run: the burst is lost like above, and the next connect reads the slot
  map afresh, asking the node the redirect named first (it knows its own slots before anyone
  else does);
- an ``-ASK`` reply (the slot is migrating and this key already left) is an error reply like
  any other: the map has not changed, so reconnecting would not help. Only keys are asked
  about (a shard channel is no key: its SPUBLISH runs on the source until the slot has moved),
  so it is an XADD or a cache HSET that did not run: the publisher counts the burst's history
  as refused and announces it (a ``redis`` gap for durable readers), the frames themselves
  were published. It is not retried with ``ASKING``: a slot migrates in milliseconds.

Replies are read like the single connection's: behind the next write to that master, or by
its timer (:meth:`broker.resp.RespConnection.poll_replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.cluster_slots import SlotMap, parse_redirect
from broker.resp import ClusterDownError, OnAnswered, OnLost, OnRefused, RespAddress, RespConnection


class _Burst:
    """One burst written to several masters, answered when all its parts are."""

    __slots__ = ("errors", "redirect", "refusals", "remaining", "token")

    def __init__(self, token: Any, parts: int) -> None:
        self.token = token
        self.remaining = parts
        self.errors = 0
        self.refusals: list[Exception] = []
        #: "MOVED 3999 host:port" or "ASK ...": a part ran nowhere
        self.redirect: str | None = None


class ShardedConnection:
    """Raw RESP connections to every master of a cluster, as one pipeline."""

    def __init__(
        self,
        slots: SlotMap,
        on_answered: OnAnswered | None,
        on_lost: OnLost | None,
        on_refused: OnRefused | None,
    ) -> None:
        self.slots = slots
        #: slot -> index of its master's connection (what the publisher routes by)
        self.owner = slots.owner
        self._conns: list[RespConnection] = []
        self._on_answered = on_answered
        self._on_lost = on_lost
        self._on_refused = on_refused
        #: bursts written and not yet answered, in write order (dicts keep it)
        self._unanswered: dict[int, _Burst] = {}
        self.closed = False
        #: the node a redirect named (ask it first for the new map), if one ended this
        self.redirected_to: tuple[str, int] | None = None

    @classmethod
    async def connect(
        cls,
        address: RespAddress,
        *,
        on_answered: OnAnswered | None = None,
        on_lost: OnLost | None = None,
        on_refused: OnRefused | None = None,
    ) -> ShardedConnection:
        """Read the slot map and connect to every master (all at once).

        Raises:
            ClusterDownError: no seed gave a map, or some slot has no master.
            redis.exceptions.ConnectionError, AuthenticationError: a master cannot be used.
        """
        slots = await address.slot_map()
        if not slots.complete:
            raise ClusterDownError(f"{slots.unowned()} slots have no master: the cluster is down")
        self = cls(slots, on_answered, on_lost, on_refused)
        results = await asyncio.gather(
            *(
                RespConnection.connect(
                    address.node(host, port),
                    on_answered=self._part_answered,
                    on_lost=self._part_lost,
                    on_refused=self._part_refused,
                )
                for host, port in slots.masters
            ),
            return_exceptions=True,
        )
        conns = [r for r in results if isinstance(r, RespConnection)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for conn in conns:
                await conn.aclose()
            raise failure
        self._conns = conns
        for conn in conns:
            conn.poll_replies()
        return self

    # -- what the publisher asks of a connection ------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return any(conn.writing_paused for conn in self._conns)

    @property
    def unanswered_since(self) -> float | None:
        times = [t for conn in self._conns if (t := conn.unanswered_since) is not None]
        return min(times) if times else None

    def send_parts(self, parts: dict[int, tuple[bytes, int]], token: Any) -> None:
        """Write each master's part (``master index -> (buffer, commands)``) without waiting;
        ``on_answered(token, errors)`` follows once all are answered.

        Raises:
            redis.exceptions.ConnectionError: the connection is closed.
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        burst = _Burst(token, len(parts))
        self._unanswered[id(burst)] = burst
        for index, (buffer, commands) in parts.items():
            self._conns[index].send(buffer, commands, token=burst)

    async def wait_writable(self) -> None:
        """Return once every master's transport takes writes.

        Raises:
            redis.exceptions.ConnectionError: a connection broke meanwhile.
        """
        for conn in self._conns:
            await conn.wait_writable()
        if self.closed:
            raise RedisConnectionError("connection closed")

    async def drain(self) -> None:
        """Wait until every burst written so far is answered.

        Raises:
            redis.exceptions.ConnectionError: a connection broke first.
        """
        if self.closed:
            raise RedisConnectionError("connection closed")
        await asyncio.gather(*(conn.drain() for conn in self._conns))

    def abort(self, why: Exception, *, report: bool = True) -> None:
        """Drop every connection now; ``on_lost`` hears of the unanswered bursts unless
        ``report`` is false."""
        if self.closed:
            return
        self.closed = True
        for conn in self._conns:
            conn.abort(why, report=False)
        lost, self._unanswered = list(self._unanswered.values()), {}
        if report and self._on_lost is not None:
            self._on_lost(why, [burst.token for burst in lost])

    async def aclose(self) -> None:
        """Close every connection (``on_lost`` is not called)."""
        self.closed = True
        self._unanswered = {}
        for conn in self._conns:
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
        if burst.refusals and self._on_refused is not None:
            self._on_refused(burst.token, burst.refusals)
        if self._on_answered is not None:
            self._on_answered(burst.token, burst.errors)

    def _part_lost(self, why: Exception, tokens: list[Any]) -> None:
        self.abort(why)


__all__ = ["ShardedConnection"]
