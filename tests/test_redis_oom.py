"""Redis at maxmemory with ``noeviction`` (issue 12, item 9), against a real redis-server.

The compose file sets ``maxmemory`` and ``noeviction`` on purpose. Before the fix, a Redis
filled to its limit kept frames flowing, but ``check`` said "status is stale" (the status write,
a MULTI with an HSET, was refused and logged only at DEBUG), the last-value cache froze silently
(12-18 s old) and a standby could not take over after the leader died (SET NX refused): nobody
led. Here: a filler client fills Redis, a leader and a standby broker process, a consumer
process; the cause is named (``check``, ``status``, a WARNING, the status fields), the cache's
staleness is visible (and snapshots are not served from it), the standby takes over while
Redis is full, and everything recovers without a restart once memory frees.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from broker import publisher as publisher_module
from broker.contract import SnapshotCommand, Status, encode_command
from broker.core.oom import (
    OOM_CLEAR_AFTER_MS,
    MemoryInfo,
    OomWatch,
    inherited_cache_stale_since,
)
from broker.keys import Keys
from broker.leader import LeaderLock
from broker.publisher import Publisher, Target, make_target
from broker.redis_oom import AllowOomScript, is_oom, read_memory
from broker.testing import (
    RedisServer,
    arun_cli,
    broker_process,
    consumer_process,
    read_status,
    wait_for,
    write_lease,
)
from broker.testing.fake_redis import FakeRedisServer, unavailable
from broker.upbit.types import StreamKey
from cli.ops import StatusRead, check_status
from tests.support.broker_env import fast_settings, started_broker
from tests.support.sim import http_get, running_simulator

NS = "t"
KEYS = Keys(NS)
CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP"]
#: low on purpose: the filler reaches it in a few dozen writes
MAXMEMORY = 16 * 1024 * 1024
#: the filler's values
CHUNK = 256 * 1024
#: once full, maxmemory is set this far under what Redis uses, so that the buffers of the
#: clients going up and down never bring it back under the limit by chance
MARGIN = 2 * 1024 * 1024


def maxmemory_args(limit: int = MAXMEMORY) -> tuple[str, ...]:
    return ("--maxmemory", str(limit), "--maxmemory-policy", "noeviction")


async def fill(admin: aioredis.Redis, chunk: int = CHUNK) -> int:
    """SET ``filler:N`` until Redis refuses for memory, then pull maxmemory under what it uses
    (by :data:`MARGIN`): a Redis that stays full. Returns how many keys were written."""
    written = 0
    while True:
        try:
            await admin.set(f"filler:{written}", b"x" * chunk)
        except OutOfMemoryError:
            break
        written += 1
    used = int((await admin.info("memory"))["used_memory"])
    await admin.config_set("maxmemory", max(1024 * 1024, used - MARGIN))
    with pytest.raises(OutOfMemoryError):
        await admin.set("probe", "x")
    return written


async def free(admin: aioredis.Redis, keys: int, limit: int = MAXMEMORY) -> None:
    """Memory frees: the filler's keys go (DEL is allowed at maxmemory) and the limit is back."""
    if keys:
        await admin.delete(*(f"filler:{i}" for i in range(keys)))
    await admin.config_set("maxmemory", limit)
    await admin.set("probe", "x")  # accepted again


def env(redis_url: str) -> dict[str, str]:
    return {"UPBIT_BROKER_REDIS_URL": redis_url, "UPBIT_BROKER_NAMESPACE": NS}


def frame_ms(raw: bytes | str | None) -> int:
    """A ticker frame's own ``timestamp`` (0: none)."""
    if raw is None:
        return 0
    return int(json.loads(raw).get("timestamp", 0))


def newest_received_ms(messages: list[dict[str, Any]], code: str) -> int:
    channel = f"{NS}:ticker:{code}"
    return max((frame_ms(m["raw"]) for m in messages if m["ch"] == channel), default=0)


def received_for_ms(messages: list[dict[str, Any]]) -> int:
    """How long ``messages`` span, by their receive times."""
    return int(messages[-1]["t"] - messages[0]["t"]) if messages else 0


def rate_per_s(messages: list[dict[str, Any]]) -> float:
    span = received_for_ms(messages)
    return (len(messages) - 1) * 1000 / span if span else 0.0


def log_count(path: Path | None, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path is not None else 0


async def status_field(admin: aioredis.Redis, name: str) -> str:
    return (await read_status(admin, NS)).get(name, "")


async def oom_since(admin: aioredis.Redis) -> int:
    """The status's ``redis_oom_since_ms`` (0: none, or a status without the field)."""
    return int(await status_field(admin, "redis_oom_since_ms") or 0)


async def episode_over(admin: aioredis.Redis) -> bool:
    return await status_field(admin, "redis_oom_since_ms") == "0"


async def stale_since(admin: aioredis.Redis) -> int:
    """The status's ``cache_stale_since_ms`` (0: current, or a status without the field)."""
    return int(await status_field(admin, "cache_stale_since_ms") or 0)


async def cache_current(admin: aioredis.Redis) -> bool:
    return await status_field(admin, "cache_stale_since_ms") == "0"


async def behind_by(measure: Callable[[], Awaitable[int]], at_least_ms: int) -> int:
    """``measure()`` when it is at least ``at_least_ms`` (else 0: keep waiting)."""
    value = await measure()
    return value if value >= at_least_ms else 0


async def current_within(measure: Callable[[], Awaitable[int]], under_ms: int) -> list[int]:
    """``[measure()]`` when it is under ``under_ms`` (else ``[]``: keep waiting)."""
    value = await measure()
    return [value] if value < under_ms else []


# -- the scenario -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_redis_at_maxmemory_is_named_survived_and_recovered_from(tmp_path: Path) -> None:
    async with RedisServer(maxmemory_args()) as redis:
        admin = aioredis.Redis.from_url(redis.url)
        try:
            await _scenario(admin, redis.url, tmp_path)
        finally:
            await admin.aclose()


async def _scenario(admin: aioredis.Redis, url: str, tmp_path: Path) -> None:
    figures: dict[str, Any] = {}
    async with (
        running_simulator(seed=91, rate=200, markets=8) as sim,
        broker_process(url, sim.url, "b1", tmp_path) as b1,
    ):

        async def leads(broker_id: str) -> bool:
            st = await read_status(admin, NS)
            return st.get("leader") == broker_id and st.get("connected") == "1"

        await wait_for(lambda: leads("b1"), 20, message="b1 leads")
        async with (
            broker_process(url, sim.url, "b2", tmp_path) as b2,
            consumer_process(url, "c1", {"ticker": CODES}, tmp_path) as consumer,
        ):
            await wait_for(
                lambda: received_for_ms(consumer.messages()) > 2_000,
                20,
                message="the consumer gets frames for 2 s",
            )
            figures["frames_before_oom"] = f"{rate_per_s(consumer.messages()):.0f}/s"
            await wait_for(
                lambda: admin.hlen(KEYS.last_values("ticker")), 10, message="the cache fills"
            )
            await wait_for(lambda: "standby" in b2.output(), 20, message="b2 waits as standby")

            # -- Redis fills up -----------------------------------------------------------------
            filled_at = time.monotonic()
            fillers = await fill(admin)
            memory = await admin.info("memory")
            figures["fill"] = (
                f"{fillers} x {CHUNK // 1024} KB, used {memory['used_memory']}, "
                f"maxmemory {memory['maxmemory']}"
            )

            # The cause is named: in the status (kept fresh), by a WARNING, by `check`.
            await wait_for(lambda: oom_since(admin), 10, message="the status names the OOM")
            figures["named_after_s"] = round(time.monotonic() - filled_at, 2)
            check = await arun_cli("check", env=env(url))
            assert check.code == 1, check.output
            assert "redis is out of memory (maxmemory" in check.output, check.output
            assert "policy noeviction): it refuses writes since" in check.output, check.output
            assert "status is stale" not in check.output, check.output
            figures["check"] = check.output.strip()
            status = await arun_cli("status", "--json", env=env(url))
            info = json.loads(status.stdout)
            assert info["redis_out_of_memory"] is True and info["stale"] is False
            assert info["leader"] == "b1" and info["redis_oom_refusals"] > 0
            assert info["redis_maxmemory_policy"] == "noeviction"
            await wait_for(
                lambda: log_count(b1.log, "redis is out of memory (maxmemory"),
                5,
                message="b1 logs the OOM at WARNING",
            )

            # Data keeps flowing; the cache is frozen, and says so.
            received = len(consumer.messages())
            await wait_for(
                lambda: len(consumer.messages()) > received + 50, 10, message="frames flow"
            )
            stale_since = int(info["cache_stale_since_ms"])
            assert stale_since > 0
            code = CODES[0]

            async def cache_behind() -> int:
                cached = frame_ms(await admin.hget(KEYS.last_values("ticker"), code))
                return newest_received_ms(consumer.messages(), code) - cached

            lag = await wait_for(
                lambda: behind_by(cache_behind, 1_000), 10, message="the cache falls behind"
            )
            figures["cache_behind_ms_during_oom"] = lag
            during = consumer.messages()[received:]
            figures["frames_during_oom"] = f"{len(during)} ({rate_per_s(during):.0f}/s)"

            # -- the leader dies while Redis is full: the standby leads -------------------------
            b1.kill()
            killed_at = time.monotonic()
            await wait_for(lambda: leads("b2"), 15, message="b2 leads while redis is full")
            figures["takeover_s"] = round(time.monotonic() - killed_at, 2)
            lock = await admin.get(KEYS.leader)
            assert isinstance(lock, bytes) and lock.startswith(b"b2 "), lock
            received = len(consumer.messages())
            await wait_for(
                lambda: len(consumer.messages()) > received + 20,
                10,
                message="frames flow from b2",
            )
            await wait_for(
                lambda: log_count(b2.log, "redis is out of memory (maxmemory"),
                5,
                message="b2 names the OOM too",
            )
            assert int(await status_field(admin, "redis_oom_since_ms")) > 0
            assert int(await status_field(admin, "cache_stale_since_ms")) > 0

            # -- memory frees: everything recovers without a restart ----------------------------
            await free(admin, fillers)
            freed_at = time.monotonic()

            async def recovered() -> bool:
                st = await read_status(admin, NS)
                return st.get("redis_oom_since_ms") == "0" and st.get("cache_stale_since_ms") == "0"

            await wait_for(recovered, 10, message="the status clears")
            figures["recovered_after_s"] = round(time.monotonic() - freed_at, 2)
            current = await wait_for(
                lambda: current_within(cache_behind, 1_000), 10, message="the cache is current"
            )
            figures["cache_behind_ms_after"] = current[0]
            assert log_count(b2.log, "redis accepts writes again") == 1
            assert log_count(b2.log, "redis is out of memory (maxmemory") == 1
            check = await arun_cli("check", env=env(url))
            assert check.code == 0, check.output
            assert check.output.startswith("ok: leader b2 connected"), check.output
            figures["check_after"] = check.output.strip()
            gaps = [(g["reason"], g.get("broker")) for g in consumer.gaps()]
            # The takeover, and the frames the history refused while b2 led a full Redis (a
            # durable consumer lacks them): one gap, announced when Redis took them again.
            # b1's refused history is inside the takeover gap: its last whole write starts it.
            assert gaps == [("takeover", "b2"), ("redis", "b2")], gaps
            figures["consumer_gaps"] = gaps
            figures["refused"] = await status_field(admin, "redis_oom_refusals")
    print(f"\n[figures] redis at maxmemory: {figures}")


# -- snapshots are not served from a stale cache ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_snapshot_is_not_served_from_a_cache_redis_stopped_taking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis refused the cache's writes, then memory freed while the streams were quiet (no
    frame since, so nothing rewrote the cache yet): the cache lacks frames consumers received,
    the status says since when, and a snapshot is fetched upstream instead of served from it."""
    caplog.set_level(logging.WARNING)
    async with RedisServer(maxmemory_args()) as redis:
        admin = aioredis.Redis.from_url(redis.url)
        try:
            async with (
                running_simulator(seed=92, rate=200, markets=8) as sim,
                started_broker(fast_settings(redis.url, sim.url)) as broker,
            ):
                await write_lease(admin, "c", {"ticker": CODES}, ttl_ms=60_000)
                await wait_for(
                    lambda: admin.hlen(KEYS.last_values("ticker")), 10, message="the cache fills"
                )
                fillers = await fill(admin)
                await wait_for(lambda: stale_since(admin), 10, message="the status: cache stale")
                pub = broker.counters.publish
                published = pub.published
                await wait_for(lambda: pub.published > published + 20, 10, message="frames flow")
                # Quiet streams (the simulator sends nothing for them), then memory frees.
                await http_get(sim, f"/_sim/mute?codes={','.join(CODES)}&seconds=6")
                await free(admin, fillers)
                await wait_for(lambda: episode_over(admin), 10, message="the OOM episode ends")
                assert await stale_since(admin) > 0
                first = await snapshot(admin, "s1", CODES[0], timeout_ms=1_000)
                assert first["source"].get(CODES[0]) != "cache", first
                # Frames again: the cache is rewritten, current, and serves snapshots.
                await wait_for(lambda: cache_current(admin), 15, message="the cache is current")
                second = await snapshot(admin, "s2", CODES[0], timeout_ms=1_000)
                assert second["source"] == {CODES[0]: "cache"}, second
                warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
                named = [w for w in warnings if w.startswith("redis is out of memory")]
                assert len(named) == 1, warnings
        finally:
            await admin.aclose()
    print(
        f"\n[figures] stale cache: snapshot while stale: source={first['source']} "
        f"missing={first['missing']}; after the rewrite: source={second['source']}"
    )


async def snapshot(
    admin: aioredis.Redis, request_id: str, code: str, timeout_ms: int
) -> Mapping[str, Any]:
    command = SnapshotCommand(id=request_id, type="ticker", codes=[code], timeout_ms=timeout_ms)
    async with admin.pipeline(transaction=False) as pipe:
        pipe.rpush(KEYS.requests, encode_command(command))
        pipe.publish(KEYS.control, "request")
        await pipe.execute()
    answer = await admin.blpop([KEYS.reply(request_id)], timeout=10)
    assert answer is not None, "no reply"
    reply: dict[str, Any] = json.loads(answer[1])
    return reply


# -- what Redis 7.0 allows at maxmemory, and the pieces that rely on it (fast) ------------------


async def test_allow_oom_scripts_and_the_leader_lock_run_at_maxmemory() -> None:
    async with RedisServer(maxmemory_args(4 * 1024 * 1024)) as redis:
        admin = aioredis.Redis.from_url(redis.url)
        try:
            await fill(admin, chunk=512 * 1024)
            with pytest.raises(OutOfMemoryError):  # what stopped the standby before
                await admin.set(KEYS.leader, "b2 x", nx=True, px=5000)
            assert await admin.publish("c", "m") == 0  # PUBLISH, PEXPIRE, DEL are allowed
            assert await admin.eval("return redis.call('PEXPIRE', KEYS[1], 1000)", 1, "x") == 0
            await admin.script_flush()  # EVALSHA -> NOSCRIPT -> SCRIPT LOAD, at maxmemory
            for whole in (False, True):
                script = AllowOomScript(
                    admin, "return redis.call('SET', KEYS[1], ARGV[1])", whole=whole
                )
                assert await script(keys=["k"], args=["v"]) == b"OK"
                assert script.flags_supported
            lock = LeaderLock(admin, NS, "b2", 5000)
            assert await lock.try_acquire()
            assert await lock.renew()
            assert await lock.release()
            # A MULTI queueing an HSET (the old status write) is refused, a script is not.
            with pytest.raises(OutOfMemoryError) as refused:
                async with admin.pipeline(transaction=True) as pipe:
                    pipe.hset(KEYS.status, "a", "1")
                    await pipe.execute()
            assert is_oom(refused.value)
            memory = await read_memory(admin)
            assert memory is not None and memory.refuses_writes
            assert memory.describe().startswith("maxmemory ")
        finally:
            await admin.aclose()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_the_cache_goes_stale_at_maxmemory_and_is_rewritten_once_memory_frees(
    raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that published only while Redis refused the cache (``KRW-BTC``'s ``a3``) is in
    the cache once memory frees, without a frame of its own since: the rewrite carries it."""
    monkeypatch.setattr(publisher_module, "CACHE_PROBE_INTERVAL", 0.0)  # probe at every burst
    a = make_target(KEYS, StreamKey("ticker", "KRW-BTC"))
    b = make_target(KEYS, StreamKey("ticker", "KRW-ETH"))
    cache_key = KEYS.last_values("ticker")

    async def burst(*frames: tuple[Target, bytes]) -> None:
        for target, frame in frames:
            publisher.enqueue(target, frame)
        await publisher.flush()

    async with RedisServer(maxmemory_args(4 * 1024 * 1024)) as redis:
        client = aioredis.Redis.from_url(redis.url)
        publisher = Publisher(client, raw_resp=raw)
        stats = publisher.stats
        try:
            await burst((a, b"a1"), (b, b"b1"))
            fillers = await fill(client, chunk=512 * 1024)
            await burst((a, b"a2"))
            assert stats.cache_stale_since_ms > 0 and stats.oom_refusals == 1
            await burst((a, b"a3"))  # a probe, refused again
            assert stats.published == 4 and stats.oom_refusals == 2  # PUBLISH goes on
            assert await client.hgetall(cache_key) == {b"KRW-BTC": b"a1", b"KRW-ETH": b"b1"}
            await free(client, fillers)
            await burst((b, b"b2"))  # the probe is accepted: the next burst rewrites
            assert stats.cache_stale_since_ms > 0
            await burst((b, b"b3"))
            assert stats.cache_stale_since_ms == 0
            assert await client.hgetall(cache_key) == {b"KRW-BTC": b"a3", b"KRW-ETH": b"b3"}
            assert stats.reply_errors == stats.oom_refusals == 2
        finally:
            await publisher.aclose()
            await client.aclose()


async def publish_until_current(publisher: Publisher, *frames: tuple[Target, bytes]) -> bytes:
    """Publish ``frames`` one burst each until the cache's mark clears; the last one published
    (each ``flush`` also waits for a purge of the cache it started)."""
    for target, frame in frames:
        publisher.enqueue(target, frame)
        await publisher.flush()
        if not publisher.stats.cache_stale_since_ms:
            return frame
    raise AssertionError(f"the cache is still stale after {len(frames)} bursts")


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_a_stale_mark_outlives_its_phase_until_the_cache_is_purged(
    raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The phase ends with the cache stale (``KRW-BTC``'s ``a2`` refused); the next phase
    (a new publisher, the same counters) never sees ``KRW-BTC``. Before the fix its first
    accepted burst cleared the mark with ``a1`` still in the cache, and snapshots were served
    from it; now the mark clears once the cache is purged and holds only current frames."""
    monkeypatch.setattr(publisher_module, "CACHE_PROBE_INTERVAL", 0.0)
    a = make_target(KEYS, StreamKey("ticker", "KRW-BTC"))
    b = make_target(KEYS, StreamKey("ticker", "KRW-ETH"))
    book = make_target(KEYS, StreamKey("orderbook", "KRW-BTC"))
    cache_key = KEYS.last_values("ticker")
    async with RedisServer(maxmemory_args(4 * 1024 * 1024)) as redis:
        client = aioredis.Redis.from_url(redis.url)
        first = Publisher(client, raw_resp=raw)
        stats = first.stats
        try:
            for target, frame in ((a, b"a1"), (b, b"b1"), (book, b"o1")):
                first.enqueue(target, frame)
            await first.flush()
            fillers = await fill(client, chunk=512 * 1024)
            first.enqueue(a, b"a2")
            await first.flush()
            assert stats.cache_stale_since_ms > 0 and stats.published == 4
        finally:
            await first.aclose()  # the phase ends while the cache is stale
        second = Publisher(client, raw_resp=raw, stats=stats)
        try:
            await free(client, fillers)
            last = await publish_until_current(second, *((b, b"b%d" % i) for i in range(2, 6)))
            # KRW-BTC's a1 (and the orderbook hash no stream of this phase writes) are gone:
            # a snapshot of them is fetched upstream, not served a frame replaced long ago.
            assert await client.hgetall(cache_key) == {b"KRW-ETH": last}
            assert not await client.exists(KEYS.last_values("orderbook"))
        finally:
            await second.aclose()
            await client.aclose()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-resp", "redis-py"])
async def test_a_new_leader_inherits_the_stale_mark_of_the_previous_ones_status(
    raw: bool,
) -> None:
    """A new leader process finds the cache as the previous leader left it (``a1``, though it
    published ``a2`` with Redis refusing the write); the previous status says so."""
    b = make_target(KEYS, StreamKey("ticker", "KRW-ETH"))
    cache_key = KEYS.last_values("ticker")
    async with RedisServer() as redis:
        client = aioredis.Redis.from_url(redis.url)
        current = Publisher(client, raw_resp=raw)  # the previous status: a current cache
        publisher = Publisher(client, raw_resp=raw)
        try:
            await client.hset(cache_key, mapping={"KRW-BTC": "a1"})
            await client.hset(KEYS.status, mapping={"cache_stale_since_ms": 0})
            await current.inherit_stale_mark(KEYS.status)
            assert current.stats.cache_stale_since_ms == 0
            await client.hset(KEYS.status, mapping={"cache_stale_since_ms": 1_234})
            await publisher.inherit_stale_mark(KEYS.status)
            assert publisher.stats.cache_stale_since_ms == 1_234
            last = await publish_until_current(publisher, (b, b"b1"), (b, b"b2"), (b, b"b3"))
            assert await client.hgetall(cache_key) == {b"KRW-ETH": last}
        finally:
            await current.aclose()
            await publisher.aclose()
            await client.aclose()


def test_the_stale_mark_a_previous_status_hands_on() -> None:
    assert inherited_cache_stale_since(None, None) == 0
    assert inherited_cache_stale_since(b"0", b"0") == 0
    assert inherited_cache_stale_since(b"12", b"0") == 12
    assert inherited_cache_stale_since(b"0", "34") == 34  # refusing writes: maybe refused
    assert inherited_cache_stale_since(b"x", None) == 0


@pytest.mark.skipif(unavailable() is not None, reason="fakeredis with Lua is not installed")
async def test_allow_oom_scripts_fall_back_where_script_flags_are_unknown() -> None:
    async with FakeRedisServer() as server:  # like Redis 5 and 6: no shebang, no INFO memory
        client = aioredis.Redis.from_url(server.url)
        try:
            for whole in (False, True):
                script = AllowOomScript(
                    client, "return redis.call('SET', KEYS[1], ARGV[1])", whole=whole
                )
                assert await script(keys=["k"], args=["v"]) == b"OK"
                assert not script.flags_supported
            assert await LeaderLock(client, NS, "b1", 5000).try_acquire()
            assert await read_memory(client) is None
        finally:
            await client.aclose()


def test_is_oom_knows_both_roads() -> None:
    assert is_oom(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert is_oom("OOM command not allowed when used memory > 'maxmemory'.")
    assert not is_oom("NOPERM this user has no permissions to access the 'x' channel")


def test_the_oom_watch_names_each_episode_once() -> None:
    full = MemoryInfo(used=17_000_000, maxmemory=16_000_000, policy="noeviction")
    under = MemoryInfo(used=3_000_000, maxmemory=16_000_000, policy="noeviction")
    watch = OomWatch()
    assert watch.observe(1_000, 0, under) is None and not watch.out_of_memory
    began = watch.observe(2_000, 5, full)
    assert began is not None and began.startswith(
        "redis is out of memory (maxmemory 16000000, used 17000000, policy noeviction)"
    )
    assert watch.since_ms == 2_000 and watch.episodes == 1
    assert watch.observe(2_200, 9, full) is None  # the same episode
    assert watch.observe(2_400, 9, under) is None  # not yet: refusals a moment ago
    ended = watch.observe(2_200 + OOM_CLEAR_AFTER_MS, 9, under)
    assert ended is not None and "accepts writes again" in ended and "(9 writes refused)" in ended
    assert watch.since_ms == 0 and watch.refusals == 9
    # INFO alone (no refusal counted: nothing was written) opens one; other policies do not.
    assert watch.observe(10_000, 9, full) is not None and watch.episodes == 2
    lru = MemoryInfo(used=17_000_000, maxmemory=16_000_000, policy="allkeys-lru")
    assert not lru.refuses_writes and full.refuses_writes
    # Refusals without INFO (an ACL without +info) still open and close episodes.
    blind = OomWatch()
    assert blind.observe(1_000, 3, None) is not None
    assert blind.observe(1_000 + OOM_CLEAR_AFTER_MS, 3, None) is not None
    assert MemoryInfo.parse({"used_memory": 1}) is None


NOW = 1_796_400_000_000


def read_at(age_ms: int, **fields: Any) -> StatusRead:
    base: dict[str, Any] = {"leader": "b1", "connected": True, "epoch": 3}
    status = Status(updated_ms=NOW - age_ms, status_interval_ms=1000, **{**base, **fields})
    return StatusRead(status, NOW)


FULL = MemoryInfo(used=9, maxmemory=8, policy="noeviction")
FINE = MemoryInfo(used=1, maxmemory=8, policy="noeviction")
EPISODE = {
    "redis_oom_since_ms": NOW - 1_000,
    "redis_oom_refusals": 2,
    "cache_stale_since_ms": NOW - 2_000,
    "redis_used_memory": 9,
    "redis_maxmemory": 8,
    "redis_maxmemory_policy": "noeviction",
}
MEMORY = "redis is out of memory (maxmemory 8, used 9, policy noeviction): it refuses writes"


@pytest.mark.parametrize(
    ("read", "memory", "healthy", "line"),
    [
        (read_at(100), FINE, True, "ok: leader b1 connected, epoch 3, status 100 ms old"),
        (read_at(100), None, True, "ok: leader b1 connected, epoch 3, status 100 ms old"),
        (
            read_at(100, **EPISODE),
            None,  # the operator ACL has no +info: the leader's own figures
            False,
            f"{MEMORY} since 1.0 s (2 refused), last-value cache stale for 2.0 s; "
            "leader b1 connected, epoch 3, status 100 ms old",
        ),
        (
            read_at(9_000),
            FULL,
            False,
            f"{MEMORY}; leader b1: status is stale (9000 ms old, limit 3000 ms)",
        ),
        (
            read_at(9_000, **EPISODE),
            None,
            False,
            "redis was out of memory (maxmemory 8, used 9, policy noeviction) when leader b1 "
            "last wrote its status; leader b1: status is stale (9000 ms old, limit 3000 ms)",
        ),
        (
            read_at(9_000, **EPISODE),
            FINE,
            False,
            "leader b1: status is stale (9000 ms old, limit 3000 ms)",
        ),
        (None, FULL, False, f"{MEMORY}; no broker status: no leader is running"),
    ],
)
def test_check_names_the_memory_first(
    read: StatusRead | None, memory: MemoryInfo | None, healthy: bool, line: str
) -> None:
    assert check_status(read, 1.0, memory) == (healthy, line)
