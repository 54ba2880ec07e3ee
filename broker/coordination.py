"""Server-side questions asked of the node that holds the namespace's coordination keys (I/O).

On one Redis (or through Sentinel) there is one server: ``TIME`` and ``INFO`` go to it. On a
Redis Cluster there are many, with clocks of their own, and redis-py sends a command without a
key to whichever node it likes. The lease deadlines are written by the lease script with the
clock of the node owning ``{ns}:leases`` (``broker.keys``: every coordination key shares its
slot), so every reader comparing against them must read that node's clock, and a failover is
a failover of that node. These helpers say "that node" once:

- :func:`queue_time` adds the clock read to a pipeline: ``TIME`` on one server; on a cluster a
  one-line script keyed on ``{ns}:leases`` (a script is routed by its key; ``TIME`` is not).
- :func:`server_time` and :func:`server_info` are the awaited forms.
- :func:`on_coordination_node` is the keyword that sends a keyless command (``SCAN`` for the
  lease hashes) to that node only: a cluster client would ask every master, and a dead master
  holding none of them would fail the listing.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from broker.keys import Keys

#: the clock of the node that runs it (the node owning its key)
TIME_LUA = "return redis.call('TIME')"


def queue_time(pipe: Pipeline, keys: Keys) -> None:
    """Add a read of the coordination node's clock to ``pipe``; its result is a ``TIME`` reply
    ``(seconds, microseconds)`` (ints, or text: ``broker.clock.server_time_ms`` reads both)."""
    if keys.hash_tag:
        pipe.eval(TIME_LUA, 1, keys.leases)
    else:
        pipe.time()


async def server_time(redis: Redis, keys: Keys) -> tuple[Any, Any]:
    """The coordination node's clock as a ``TIME`` reply ``(seconds, microseconds)``."""
    if keys.hash_tag:
        seconds, micros = await redis.eval(TIME_LUA, 1, keys.leases)
        return seconds, micros
    return await redis.time()


def on_coordination_node(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Keyword arguments that route a keyless command to the coordination node (none on one
    server)."""
    if keys.hash_tag:
        return {"target_nodes": redis.get_node_from_key(keys.leases)}  # type: ignore[attr-defined]
    return {}


async def server_info(redis: Redis, keys: Keys, section: str) -> dict[str, Any]:
    """``INFO section`` of the coordination node."""
    if keys.hash_tag:
        node = redis.get_node_from_key(keys.leases)  # type: ignore[attr-defined]
        info = await redis.info(section, target_nodes=node)
    else:
        info = await redis.info(section)
    return dict(info)


__all__ = ["TIME_LUA", "on_coordination_node", "queue_time", "server_info", "server_time"]
