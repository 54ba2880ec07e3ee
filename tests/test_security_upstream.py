"""What the broker sends upstream: never an ``Origin`` header (Upbit puts browser-like clients
on a far stricter rate limit), and nothing that identifies the Redis behind it.

A fake upstream records the request headers of every connection the broker (a subprocess)
opens, including the reconnects after a cut and the fresh connection of make-before-break.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.leases import LeaseStore
from broker.testing import RedisServer, broker_process, wait_for, write_lease
from tests.support.processes import FakeConnection, FakeUpstream

pytestmark = pytest.mark.timeout(60)


async def test_the_broker_never_sends_an_origin_header(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    url = redis_server.url

    async def play(ws: Any, conn: FakeConnection) -> None:
        await ws.send(b'{"type":"ticker","code":"KRW-BTC","stream_type":"SNAPSHOT"}')
        if len(fake.connections) == 1:
            await asyncio.sleep(0.2)
            ws.transport.abort()  # a cut: the broker reconnects

    await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
    async with (
        FakeUpstream(play) as fake,
        broker_process(url, fake.url, "origin-b", tmp_path) as broker,
    ):
        await wait_for(lambda: len(fake.connections) >= 2, 15, message="a reconnect")
        # shrink to nothing: make-before-break opens one more, fresh connection
        await LeaseStore(redis_client, "t").release("c")
        await wait_for(lambda: len(fake.connections) >= 3, 15, message="fresh connection")
        assert broker.alive
    headers = [c.headers for c in fake.connections]
    print(
        f"\n[figures] upstream request headers: connections={len(headers)}, "
        f"with_origin={sum(1 for h in headers if 'origin' in h)}, "
        f"names={sorted(headers[0])}, user_agent={headers[0].get('user-agent')!r}"
    )
    for h in headers:
        assert "origin" not in h, h
        assert "sec-websocket-key" in h  # a real websocket handshake, as recorded
        assert not any(redis_server.url.split("//")[1].split("/")[0] in v for v in h.values())
