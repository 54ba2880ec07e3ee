"""Isolation: one lease set cannot take everyone offline (issue 12, items 1 and 2).

A real redis-server, the real simulator over real sockets, the broker in this event loop. Each
test has an innocent lease (the victim) whose streams must keep flowing while another lease asks
for what cannot be served: codes Upbit does not know, more than the union's bounds, a request
Upbit closes with 1009, a request Upbit answers with an error frame. Before the fix each of them
made the broker resend the same request for as long as the lease lived (or reconnect in a loop
with it), and ``status.upstream`` claimed the set was held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.contract import Status
from broker.core.control import MAX_RESENDS
from broker.service import Broker
from broker.testing import arun_cli, wait_for, write_lease
from tests.support.broker_env import EventTap, fast_settings, sim_connections, started_broker
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

VICTIM = {"ticker": ["KRW-BTC", "KRW-ETH"]}
#: how long nothing must happen after the broker settled (an observation window: a broker that
#: resends forever does so ~1.5 times a second, so 3 s shows it)
QUIET_WINDOW = 3.0


def upstream(status: Status, stream: str = "ticker") -> set[str]:
    """What Upbit confirmed (LIST_SUBSCRIPTIONS) for ``stream``."""
    return set(status.upstream.get(stream, []))


class Flow:
    """Counts frames on some channels in the background."""

    def __init__(self, redis: aioredis.Redis, channels: list[str]) -> None:
        self.redis, self.channels = redis, channels
        self.times: list[float] = []

    async def __aenter__(self) -> Flow:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(*self.channels)

        async def pump() -> None:
            while True:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    self.times.append(time.monotonic())

        self._task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def flowing(self, within: float = 10.0) -> None:
        """Frames arrive (again) after now."""
        since = time.monotonic()
        await wait_for(lambda: any(t > since for t in self.times), within, message="frames")


async def quiet_window(broker: Broker, seconds: float = QUIET_WINDOW) -> tuple[Status, Status]:
    """The status before and after ``seconds`` of observation (nothing may be resent)."""
    before = broker.status()
    await asyncio.sleep(seconds)  # an observation window, not a synchronisation
    return before, broker.status()


def lease_states(tap: EventTap, client_id: str) -> list[str]:
    return [e["state"] for e in tap.of("lease") if e["client_id"] == client_id]


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


# -- item 2: codes Upbit does not know ------------------------------------------------------------


@pytest.mark.parametrize("markets", ["from-rest", "off"])
async def test_an_unknown_code_is_kept_out_reported_and_never_resent(
    redis_url: str, admin: aioredis.Redis, markets: str
) -> None:
    """With the market list (REST ``/v1/market/all``) the code never reaches upstream; without
    it (``markets_url=off``) Upbit ignores it, LIST_SUBSCRIPTIONS never lists it, and the
    broker gives up after ``MAX_RESENDS`` resends instead of resending forever."""
    overrides = {"markets_url": "off"} if markets == "off" else {}
    async with (
        running_simulator(seed=3, rate=100) as sim,
        started_broker(fast_settings(redis_url, sim.url, **overrides)) as broker,
        EventTap(admin) as tap,
        Flow(admin, [f"t:ticker:{code}" for code in VICTIM["ticker"]]) as flow,
    ):
        await write_lease(admin, "victim", VICTIM, ttl_ms=60_000)
        await wait_for(lambda: upstream(broker.status()) == {"KRW-BTC", "KRW-ETH"}, 10)
        await write_lease(admin, "typo", {"ticker": ["KRW-NOPE", "KRW-XRP"]}, ttl_ms=60_000)
        want = {"KRW-BTC", "KRW-ETH", "KRW-XRP"}
        status = await wait_for(
            lambda: (
                (s := broker.status()).unknown_codes == ["ticker:KRW-NOPE"]
                and upstream(s) == want
                and s.upstream_unconfirmed == 0
                and s
            ),
            15,
            message="unknown code reported, the rest confirmed upstream",
        )
        await wait_for(lambda: "partial" in lease_states(tap, "typo"), 5, message="holder told")
        [told] = [e for e in tap.of("lease") if e["client_id"] == "typo"]
        before, after = await quiet_window(broker)
        # the operator's resubscribe is answered (before: "no broker answered")
        result = await arun_cli(
            "resubscribe", "--timeout", "10", "--namespace", "t", "--redis-url", redis_url
        )
        await flow.flowing()
        held = set(sim_connections(sim)[0]["subscriptions"]["ticker"])

    resends = after.resubscribes - before.resubscribes
    print(
        f"\n[figures] unknown code ({markets}): markets={status.markets}, "
        f"resubscribes={status.resubscribes}, verify_mismatches={status.verify_mismatches}, "
        f"resends in {QUIET_WINDOW:.0f}s after settling={resends}, told={told['why'][:60]!r}"
    )
    assert told["rejected"] == {"ticker": ["KRW-NOPE"]}
    assert resends == 0, "the broker kept resending a set Upbit never confirms"
    assert held == want
    if markets == "off":
        assert status.markets == 0 and status.verify_mismatches >= 1
        assert status.resubscribes <= 2 + 1 + MAX_RESENDS  # victim, typo, then the resends
    else:
        assert status.markets > 0 and status.verify_mismatches == 0
    assert result.code == 0, result.stderr


# -- item 1: the union's bounds -------------------------------------------------------------------


async def test_a_lease_past_the_union_cap_is_refused_and_served_when_room_frees(
    redis_url: str, admin: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=4, rate=100, markets=20) as sim,
        started_broker(fast_settings(redis_url, sim.url, max_union_streams=4)) as broker,
        EventTap(admin) as tap,
        Flow(admin, [f"t:ticker:{code}" for code in VICTIM["ticker"]]) as flow,
    ):
        await write_lease(admin, "victim", VICTIM, ttl_ms=60_000)
        await wait_for(lambda: upstream(broker.status()) == set(VICTIM["ticker"]), 10)
        hog = {"ticker": ["KRW-SIM0001", "KRW-SIM0002", "KRW-SIM0003"]}
        await write_lease(admin, "hog", hog, ttl_ms=60_000)
        status = await wait_for(
            lambda: (s := broker.status()).refused_leases == 1 and s, 10, message="refused"
        )
        await wait_for(lambda: "refused" in lease_states(tap, "hog"), 5, message="hog told")
        await flow.flowing()  # the victim keeps flowing
        assert upstream(broker.status()) == set(VICTIM["ticker"])
        leases = await arun_cli("leases", "--namespace", "t", "--redis-url", redis_url)
        # room frees: the victim leaves, the hog is served
        await admin.delete("t:lease:victim")
        await admin.publish("t:control", "release victim")
        await wait_for(lambda: upstream(broker.status()) == set(hog["ticker"]), 10)
        await wait_for(lambda: "ok" in lease_states(tap, "hog"), 5, message="hog told ok")
        connections = len(sim_connections(sim))

    print(
        f"\n[figures] union cap 4 streams: victim 2 served, hog 3 refused "
        f"({status.refused['hog'][:70]!r}), hog served after the victim left; "
        f"{connections} upstream connection"
    )
    assert "max_union_streams" in status.refused["hog"]
    assert "refused" in leases.stdout and "hog" in leases.stdout, leases.stdout
    assert connections == 1


@pytest.mark.slow
async def test_a_request_upbit_closes_with_1009_is_not_sent_again(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """The simulator takes requests of at most 2 KiB (Upbit's own limit is unknown); a lease
    that makes the request bigger is refused after one 1009, and everyone else flows."""
    big = {"ticker": [f"KRW-SIM{i:04d}" for i in range(1, 151)]}
    async with (
        running_simulator(seed=5, rate=100, markets=150, max_request_bytes=2048) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
        EventTap(admin) as tap,
        Flow(admin, [f"t:ticker:{code}" for code in VICTIM["ticker"]]) as flow,
    ):
        await write_lease(admin, "victim", VICTIM, ttl_ms=60_000)
        await wait_for(lambda: upstream(broker.status()) == set(VICTIM["ticker"]), 10)
        await write_lease(admin, "big", big, ttl_ms=60_000)
        status = await wait_for(
            lambda: (
                (s := broker.status()).upstream_refusals == 1
                and s.refused_leases == 1
                and upstream(s) == set(VICTIM["ticker"])
                and s
            ),
            15,
            message="refused after one 1009, the victim confirmed again",
        )
        await flow.flowing()
        await wait_for(lambda: "refused" in lease_states(tap, "big"), 5, message="big told")
        before, after = await quiet_window(broker)
        connections = sim.state()["totals"]

    print(
        f"\n[figures] 1009 at 2048 bytes: refusals={after.upstream_refusals}, "
        f"request cap learned={status.request_bytes_cap}, reconnects={after.reconnects}, "
        f"sim counters={connections}"
    )
    assert after.upstream_refusals == 1 and after.reconnects == before.reconnects
    assert status.request_bytes_cap < 2048 + 1024
    assert "1009" in status.refused["big"]


@pytest.mark.slow
async def test_a_request_upbit_refuses_with_an_error_frame_quarantines_its_lease(
    redis_url: str, admin: aioredis.Redis
) -> None:
    async with (
        running_simulator(seed=6, rate=100, refuse_codes=["KRW-XRP"]) as sim,
        started_broker(fast_settings(redis_url, sim.url)) as broker,
        EventTap(admin) as tap,
        Flow(admin, [f"t:ticker:{code}" for code in VICTIM["ticker"]]) as flow,
    ):
        await write_lease(admin, "victim", VICTIM, ttl_ms=60_000)
        await wait_for(lambda: upstream(broker.status()) == set(VICTIM["ticker"]), 10)
        await write_lease(admin, "hostile", {"ticker": ["KRW-XRP"]}, ttl_ms=60_000)
        status = await wait_for(
            lambda: (
                (s := broker.status()).upstream_refusals == 1
                and "hostile" in s.refused
                and upstream(s) == set(VICTIM["ticker"])
                and s
            ),
            15,
            message="quarantined after one error frame, the victim confirmed again",
        )
        await flow.flowing()
        await wait_for(lambda: "refused" in lease_states(tap, "hostile"), 5, message="told")
        before, after = await quiet_window(broker)
        state: dict[str, Any] = sim.state()

    print(
        f"\n[figures] error frame: refusals={after.upstream_refusals}, "
        f"why={status.refused['hostile'][:80]!r}, reconnects {before.reconnects}->"
        f"{after.reconnects}, sim connections={len(state['connections'])}"
    )
    assert "INVALID_PARAM" in status.refused["hostile"]
    assert after.upstream_refusals == 1 and after.reconnects == before.reconnects
