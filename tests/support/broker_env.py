"""Start a broker in the test's event loop with settings fast enough for tests.

Leases are written with :func:`broker.testing.write_lease`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis

from broker.service import Broker, run_broker
from broker.settings import BrokerSettings
from broker.testing import wait_for


def fast_settings(redis_url: str, upstream_url: str, **overrides: Any) -> BrokerSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "upstream_url": upstream_url,
        "namespace": "t",
        "lease_ttl": 2.0,
        "leader_ttl": 1.5,
        "coalesce_delay": 0.02,
        "status_interval": 0.2,
        "reconcile_interval": 0.5,
        "stall_timeout": 12.0,
        "backoff_initial": 0.2,
        "backoff_max": 1.0,
        "backoff_reset_after": 0.5,
        "quiet_after": 5.0,
    }
    values.update(overrides)
    return BrokerSettings(**values)


@asynccontextmanager
async def started_broker(settings: BrokerSettings, timeout: float = 10.0) -> AsyncIterator[Broker]:
    async with run_broker(settings) as broker:
        await wait_for(lambda: broker.ready.is_set(), timeout, message="broker connected upstream")
        yield broker


class EventTap:
    """Collects JSON events from ``{ns}:events`` in the background."""

    def __init__(self, redis: aioredis.Redis, namespace: str = "t") -> None:
        self.redis = redis
        self.channel = f"{namespace}:events"
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventTap:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.channel)
        self._pubsub = pubsub

        async def pump() -> None:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    self.events.append(json.loads(msg["data"]))

        self._task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of one kind; for ``gap``, the announcements only (a gap's follow-up,
        after the back-fill, repeats it with a ``state``: :meth:`follow_ups`)."""
        events = [e for e in self.events if e.get("event") == kind]
        if kind == "gap":
            return [e for e in events if "state" not in e]
        return events

    def follow_ups(self) -> list[dict[str, Any]]:
        """The gaps' follow-ups (``state``: filled, partial, lost)."""
        return [e for e in self.events if e.get("event") == "gap" and "state" in e]


def sim_connections(sim: Any) -> list[dict[str, Any]]:
    """The simulator's open connections (``/_sim/state`` "connections"), in-process."""
    conns: list[dict[str, Any]] = sim.state()["connections"]
    return conns
