"""The leader lock against a real redis-server: exclusivity, renew, release, expiry, validity,
and the per-process token that fences two processes with one broker id."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.errors import ConfigError
from broker.leader import (
    VALIDITY_RATIO,
    LeaderLock,
    LockHolder,
    lock_value,
    new_token,
    parse_lock_value,
)
from broker.testing import RedisServer, wait_for

NS = "t"


async def test_only_one_acquires(redis_client: aioredis.Redis) -> None:
    a = LeaderLock(redis_client, NS, "broker-a")
    b = LeaderLock(redis_client, NS, "broker-b")
    assert await a.holder() is None
    assert await a.try_acquire() is True
    assert await b.try_acquire() is False
    assert await a.holder() == "broker-a"
    assert a.is_valid() and not b.is_valid()

    assert await b.renew() is False
    assert not b.is_valid()
    assert await a.renew() is True
    assert a.is_valid()
    assert 4_000 < await redis_client.pttl(f"{NS}:leader") <= 5_000


async def test_acquire_is_idempotent_for_the_holder(redis_client: aioredis.Redis) -> None:
    a = LeaderLock(redis_client, NS, "broker-a", ttl_ms=2_000)
    assert await a.try_acquire() is True
    await redis_client.pexpire(f"{NS}:leader", 100)
    # a retried acquire whose first reply was lost must not refuse a lock we already hold
    assert await a.try_acquire() is True
    assert await redis_client.pttl(f"{NS}:leader") > 1_000


async def test_release_by_non_holder_does_nothing(redis_client: aioredis.Redis) -> None:
    a = LeaderLock(redis_client, NS, "broker-a")
    b = LeaderLock(redis_client, NS, "broker-b")
    assert await a.try_acquire()
    assert await b.release() is False
    assert await a.holder() == "broker-a"
    assert a.is_valid()

    assert await a.release() is True
    assert not a.is_valid()
    assert await a.holder() is None
    assert await b.try_acquire() is True
    assert await a.holder() == "broker-b"


async def test_expiry_lets_the_other_acquire(redis_client: aioredis.Redis) -> None:
    a = LeaderLock(redis_client, NS, "broker-a", ttl_ms=200)
    b = LeaderLock(redis_client, NS, "broker-b", ttl_ms=200)
    assert await a.try_acquire()
    await wait_for(b.try_acquire, timeout=3.0, message="b to take the expired lock")
    assert await b.holder() == "broker-b"
    assert await a.renew() is False
    assert not a.is_valid()


class FakeClock:
    def __init__(self, *readings: float) -> None:
        self.readings: Iterator[float] = iter(readings)
        self.last = 0.0

    def __call__(self) -> float:
        self.last = next(self.readings, self.last)
        return self.last


async def test_validity_counts_from_before_the_round_trip(redis_client: aioredis.Redis) -> None:
    clock = FakeClock(100.0, 250.0)  # the second reading would be "after" the round trip
    a = LeaderLock(redis_client, NS, "broker-a", ttl_ms=5_000, clock=clock)
    assert a.valid_until == 0.0 and not a.is_valid(now=0.0)
    assert await a.try_acquire()
    assert a.valid_until == pytest.approx(100.0 + 5.0 * VALIDITY_RATIO)
    assert a.valid_until < 100.0 + 5.0  # strictly before the key can expire in Redis
    assert a.is_valid(now=a.valid_until - 0.001)
    assert not a.is_valid(now=a.valid_until)
    assert a.is_valid() is False  # the clock now reads 250


@pytest.fixture
async def fragile_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """No retries, so a dead server fails the call at once instead of after the backoff."""
    client = aioredis.Redis.from_url(
        redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5
    )
    try:
        yield client
    finally:
        await client.aclose()


async def test_unreachable_redis_lets_validity_run_out(
    fragile_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    clock = FakeClock(10.0)
    a = LeaderLock(fragile_client, NS, "broker-a", ttl_ms=1_000, clock=clock)
    assert await a.try_acquire()
    redis_server.kill()
    with pytest.raises(RedisConnectionError):
        await a.renew()
    # the renew did not extend validity, nor end it early: it runs out on the old deadline
    assert a.valid_until == pytest.approx(10.0 + 1.0 * VALIDITY_RATIO)
    assert a.is_valid(now=10.5)
    assert not a.is_valid(now=10.0 + 1.0 * VALIDITY_RATIO)


async def test_rejects_bad_arguments(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ConfigError):
        LeaderLock(redis_client, NS, "bad id")
    with pytest.raises(ConfigError):
        LeaderLock(redis_client, "bad ns", "a")
    with pytest.raises(ConfigError):
        LeaderLock(redis_client, NS, "a", ttl_ms=0)


# -- the token: the broker id is a label, never the fence (issue 12, item 5) -----------------


async def test_two_processes_with_one_broker_id_never_both_hold_the_lock(
    redis_client: aioredis.Redis,
) -> None:
    # two processes started with the same --broker-id (a fixed id in an orchestrator)
    a = LeaderLock(redis_client, NS, "twin")
    b = LeaderLock(redis_client, NS, "twin")
    assert a.token != b.token
    assert await a.try_acquire() is True
    assert await b.try_acquire() is False
    assert not b.is_valid()
    assert await b.renew() is False
    assert await b.release() is False  # compare-and-delete: a's lock stays
    assert await a.holder() == await b.holder() == "twin"  # the readable label
    held = await b.read()
    assert held == LockHolder("twin", a.token)
    assert a.is_mine(held) and not b.is_mine(held) and not a.is_mine(None)
    assert await redis_client.get(f"{NS}:leader") == f"twin {a.token}".encode()
    assert await a.renew() is True and a.is_valid()

    assert await a.release() is True
    assert await b.try_acquire() is True
    assert b.is_mine(await a.read())
    assert await a.renew() is False and not a.is_valid()


async def test_a_restarted_process_waits_for_its_predecessors_lock(
    redis_client: aioredis.Redis,
) -> None:
    """A process killed without releasing, restarted with the same id: the new process is
    another contender until the old lock expires (the old one may still be alive, paused)."""
    old = LeaderLock(redis_client, NS, "fixed", ttl_ms=300)
    assert await old.try_acquire()
    new = LeaderLock(redis_client, NS, "fixed", ttl_ms=300)
    assert await new.try_acquire() is False
    await wait_for(new.try_acquire, timeout=3.0, message="the old lock to expire")
    assert await old.renew() is False


async def test_a_lock_written_without_a_token_is_nobodys_here(
    redis_client: aioredis.Redis,
) -> None:
    """A bare id, as brokers before tokens wrote it: readable, and never taken for ours."""
    await redis_client.set(f"{NS}:leader", "old-broker", px=5_000)
    a = LeaderLock(redis_client, NS, "old-broker")
    assert await a.holder() == "old-broker"
    assert await a.read() == LockHolder("old-broker", "")
    assert await a.try_acquire() is False
    assert await a.release() is False
    assert await redis_client.get(f"{NS}:leader") == b"old-broker"


def test_lock_values_and_tokens() -> None:
    assert parse_lock_value(b"b-1 0123abcd") == LockHolder("b-1", "0123abcd")
    assert parse_lock_value(lock_value("b-1", "ff")) == ("b-1", "ff")
    assert parse_lock_value("b-1") == LockHolder("b-1", "")
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000 and all(len(t) == 16 and t.isalnum() for t in tokens)


async def test_rejects_a_token_that_could_break_the_value(redis_client: aioredis.Redis) -> None:
    for token in ("", "a b", "x\ny", "é"):
        with pytest.raises(ConfigError):
            LeaderLock(redis_client, NS, "a", token=token)
    assert LeaderLock(redis_client, NS, "a", token="fixed01").value == "a fixed01"
