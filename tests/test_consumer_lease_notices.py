"""``BrokerClient`` hands the application the broker's word about its own lease (``LeaseNotice``).

Against a real redis-server, the simulator and a broker: a lease the broker cannot serve is
reported as ``invalid`` through ``messages()`` and ``on_lease``; a lease that vanished without a
release is reported ``expired``, the client puts it back at once and hears ``ok``. Then the
pure parts: the event's parsing, and a notice is never discarded by a full queue.
"""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from broker.testing import RedisServer, wait_for
from consumers import BrokerClient, LeaseNotice, StreamMessage
from consumers.items import parse_event
from consumers.queue import DropOldestQueue
from tests.support.broker_env import fast_settings, started_broker
from tests.support.processes import sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(60)

NS = "t"


async def test_a_lease_the_broker_cannot_serve_is_reported_invalid(
    redis_server: RedisServer,
) -> None:
    notices: list[LeaseNotice] = []
    async with running_simulator(seed=41, rate=20) as sim:
        settings = fast_settings(redis_server.url, sim.url, max_lease_streams=1)
        async with (
            started_broker(settings),
            BrokerClient(
                redis_url=redis_server.url,
                namespace=NS,
                client_id="greedy",
                on_lease=notices.append,
            ) as client,
        ):
            await client.subscribe("ticker", ["KRW-BTC", "KRW-ETH"])  # 2 streams, the broker: 1
            item = await client.next_message(timeout=10)
            assert isinstance(item, LeaseNotice) and item.kind == "lease"
            assert (item.client_id, item.state) == ("greedy", "invalid")
            assert item.why == "lease asks for 2 streams, more than 1"
            assert item.broker == settings.broker_id and item.ts_ms > 0
            await wait_for(lambda: notices == [item], 5, message="on_lease")
            assert client.lease_notice == item and client.stats.lease_notices == 1
            assert sim_upstream(sim) in ({}, None)  # nothing of it is served


async def test_an_expired_lease_is_reported_and_put_back_at_once(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=42, rate=20) as sim,
        started_broker(fast_settings(redis_server.url, sim.url)),
        BrokerClient(
            redis_url=redis_server.url, namespace=NS, client_id="paused", lease_ttl=30
        ) as client,
    ):
        await client.subscribe("trade", ["KRW-BTC"])
        item = await client.next_message(timeout=10)
        assert isinstance(item, StreamMessage)
        # as if this process had been paused past its TTL: the hash is gone, nobody released
        await redis_client.delete(f"{NS}:lease:paused")
        notices: list[LeaseNotice] = []

        async def next_notice() -> bool:
            got = await client.next_message(timeout=0.5)
            if isinstance(got, LeaseNotice):
                notices.append(got)
            return len(notices) == 2

        await wait_for(next_notice, 15, interval=0, message="expired, then ok")
        assert [n.state for n in notices] == ["expired", "ok"]
        assert "not renewed" in notices[0].why
        # re-asserted long before its next heartbeat (TTL/3 = 10 s)
        assert await redis_client.exists(f"{NS}:lease:paused") == 1
        await wait_for(lambda: (sim_upstream(sim) or {}).get("trade") == {"KRW-BTC"}, 10)


async def test_other_clients_notices_are_not_ours(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with BrokerClient(redis_url=redis_url, namespace=NS, client_id="me") as client:
        await client.subscribe("ticker", ["KRW-BTC"])
        other = {"event": "lease", "client_id": "someone", "state": "invalid", "why": "x"}
        mine = {"event": "lease", "client_id": "me", "state": "partial", "why": "y", "broker": "b"}
        # events are accepted only from the leader the status names (design.md)
        await redis_client.hset(f"{NS}:status", mapping={"leader": "b"})
        await redis_client.publish(f"{NS}:events", json.dumps(other))
        await redis_client.publish(f"{NS}:events", json.dumps(mine))
        item = await client.next_message(timeout=5)
        assert isinstance(item, LeaseNotice) and (item.client_id, item.state) == ("me", "partial")
        assert client.stats.lease_notices == 1


def test_parse_a_lease_event() -> None:
    raw = {
        "event": "lease",
        "client_id": "c1",
        "state": "partial",
        "why": "serving 1 stream, rejected 1 entry: invalid market code 'krw-eth' in ticker",
        "rejected": {"ticker": ["krw-eth"]},
        "rejected_count": 1,
        "broker": "b1",
        "ts_ms": 1234,
        "future_field": True,
    }
    notice = parse_event(json.dumps(raw).encode())
    assert notice == LeaseNotice(
        state="partial",
        client_id="c1",
        why=raw["why"],  # type: ignore[arg-type]
        rejected={"ticker": ["krw-eth"]},
        rejected_count=1,
        broker="b1",
        ts_ms=1234,
    )
    assert notice.to_dict() == {k: v for k, v in raw.items() if k != "future_field"}
    bare = parse_event(b'{"event":"lease","client_id":"c1","state":"expired"}')
    assert bare == LeaseNotice(state="expired", client_id="c1")
    with pytest.raises(ValueError, match="missing required field `client_id`"):
        parse_event(b'{"event":"lease","state":"expired"}')


def test_a_full_queue_never_discards_a_lease_notice() -> None:
    queue = DropOldestQueue(maxsize=2)
    notice = LeaseNotice(state="invalid", client_id="c1", why="x")

    def message(n: int) -> StreamMessage:
        raw = json.dumps({"type": "ticker", "code": "KRW-BTC", "timestamp": n}).encode()
        channel = "t:ticker:KRW-BTC"
        return StreamMessage(
            channel=channel, type="ticker", stream="ticker", code="KRW-BTC", level=0.0,
            raw=raw, received_ms=n,
        )  # fmt: skip

    queue.put(message(1))
    queue.put(notice)
    for n in range(2, 6):
        queue.put(message(n))
    out = [queue.get_nowait() for _ in range(len(queue))]
    assert out[0] is notice  # it was older than what was discarded behind it
    assert [getattr(i, "kind", None) for i in out] == ["lease", "gap", "data", "data"]
