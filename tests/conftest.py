"""Shared fixtures: a real redis-server per test on a free port, and its client; one with the
documented least-privilege ACL users (``acl_redis``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def acl_redis() -> AsyncIterator[RedisServer]:
    """A redis-server with the broker and consumer ACL users of ``test_security_auth``."""
    from tests.test_security_auth import ACL_BROKER, ACL_CONSUMER, acl_args

    server = RedisServer(acl_args(ACL_BROKER, ACL_CONSUMER))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.stop()
