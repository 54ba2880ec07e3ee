"""broker.resp (raw RESP for the publisher) against real redis-server processes: every address
form (redis://, rediss://, unix://, AUTH with and without a user, database numbers), error
replies, broken connections, and the publisher's two roads writing the same thing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.keys import Keys
from broker.publisher import Publisher, Target, make_target
from broker.resp import RespAddress, RespConnection, encode_command, publish_prefix
from broker.testing import RedisServer, free_port, wait_for
from broker.upbit.types import StreamKey


@pytest.fixture
def server_factory() -> Iterator[Any]:
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(extra_args=extra)
        server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


async def _roundtrip(address: RespAddress) -> list[Any]:
    conn = await RespConnection.connect(address)
    try:
        return await conn.execute(
            encode_command(b"SET", b"k", b"v") + encode_command(b"GET", b"k"), 2
        )
    finally:
        await conn.aclose()


def test_encoding_is_resp() -> None:
    assert encode_command(b"PUBLISH", "ch", 5) == b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$1\r\n5\r\n"
    assert publish_prefix(b"ch") + b"$1\r\nx\r\n" == encode_command(b"PUBLISH", b"ch", b"x")


async def test_plain_tcp_with_database(redis_server: RedisServer) -> None:
    address = RespAddress.from_url(f"redis://127.0.0.1:{redis_server.port}/3")
    assert address.db == 3 and address.path is None and address.tls is None
    assert await _roundtrip(address) == [b"OK", b"v"]
    check = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/3")
    try:
        assert await check.get("k") == b"v"
    finally:
        await check.aclose()
    other = aioredis.Redis.from_url(redis_server.url)  # db 0 holds nothing
    try:
        assert await other.get("k") is None
    finally:
        await other.aclose()


async def test_password_and_acl_user(redis_server: RedisServer) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        # Set at run time: the test server's start-up check is a PING without AUTH.
        await admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
        await admin.config_set("requirepass", "s3cret")
    finally:
        await admin.aclose()
    port = redis_server.port
    assert await _roundtrip(RespAddress.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")) == [
        b"OK",
        b"v",
    ]
    assert await _roundtrip(RespAddress.from_url(f"redis://alice:pw@127.0.0.1:{port}/1")) == [
        b"OK",
        b"v",
    ]
    with pytest.raises(AuthenticationError):
        await RespConnection.connect(RespAddress.from_url(f"redis://:wrong@127.0.0.1:{port}"))
    # No password at all: the connection opens, every command is refused (a reply, not a raise).
    conn = await RespConnection.connect(RespAddress.from_url(f"redis://127.0.0.1:{port}"))
    try:
        [reply] = await conn.execute(encode_command(b"GET", b"k"), 1)
        assert isinstance(reply, Exception) and "NOAUTH" in str(reply)
    finally:
        await conn.aclose()


async def test_unix_socket(server_factory: Any) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="upbit-resp-"), "redis.sock")
    server_factory("--unixsocket", path, "--unixsocketperm", "700")
    address = RespAddress.from_url(f"unix://{path}?db=2")
    assert address.path == path and address.db == 2
    assert await _roundtrip(address) == [b"OK", b"v"]
    client = aioredis.Redis.from_url(f"unix://{path}?db=2")
    try:
        from_client = RespAddress.from_client(client)
        assert from_client is not None and from_client.path == path and from_client.db == 2
    finally:
        await client.aclose()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls(server_factory: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    tls_port = free_port()
    server_factory(
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert)),
        *("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)),
        *("--tls-auth-clients", "no"),
    )
    url = f"rediss://127.0.0.1:{tls_port}/1?ssl_ca_certs={cert}"
    address = RespAddress.from_url(url)
    assert isinstance(address.tls, ssl.SSLContext)
    assert await _roundtrip(address) == [b"OK", b"v"]
    # An untrusted certificate is refused, as redis-py would refuse it.
    with pytest.raises(RedisConnectionError):
        await RespConnection.connect(RespAddress.from_url(f"rediss://127.0.0.1:{tls_port}/0"))
    insecure = RespAddress.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none")
    assert await _roundtrip(insecure) == [b"OK", b"v"]
    # TLS bytes cannot be read beside the transport: replies keep their own wake-ups.
    answered: list[Any] = []
    conn = await RespConnection.connect(
        address, on_answered=lambda token, errors: answered.append(token)
    )
    try:
        assert not conn.poll_replies()
        conn.send(encode_command(b"PING"), 1, token="t")
        await wait_for(lambda: answered == ["t"], 5, message="the reply read by the transport")
    finally:
        await conn.aclose()


async def test_from_client_and_fallbacks(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    try:
        address = RespAddress.from_client(client)
        assert address is not None and address.path is None and address.tls is None
        assert Publisher(client).transport == "resp"
        assert Publisher(client, raw_resp=False).transport == "redis-py"
    finally:
        await client.aclose()
    fake = fakeredis.FakeAsyncRedis()
    try:
        assert RespAddress.from_client(fake) is None
        assert Publisher(fake).transport == "redis-py"
    finally:
        await fake.aclose()
    with pytest.raises(ValueError):
        RespAddress.from_url("http://127.0.0.1:6379")


async def test_error_replies_are_values_and_counted(redis_client: aioredis.Redis) -> None:
    address = RespAddress.from_client(redis_client)
    assert address is not None
    conn = await RespConnection.connect(address)
    try:
        await redis_client.set("s", "text")
        buffer = encode_command(b"INCR", b"s") + encode_command(b"INCR", b"n")
        first, second = await conn.execute(buffer, 2)
        assert isinstance(first, Exception) and second == 1
        assert await conn.count_errors(buffer, 2) == 1
    finally:
        await conn.aclose()


async def test_broken_connection_raises_and_closes(redis_server: RedisServer) -> None:
    conn = await RespConnection.connect(RespAddress.from_url(redis_server.url))
    redis_server.kill()
    with pytest.raises(RedisConnectionError):
        await conn.execute(encode_command(b"PING"), 1)
    assert conn.closed
    with pytest.raises(RedisConnectionError):
        await RespConnection.connect(RespAddress.from_url(redis_server.url))


async def test_cancelled_execute_closes_the_connection(redis_url: str) -> None:
    conn = await RespConnection.connect(RespAddress.from_url(redis_url))
    # BLPOP never answers within the test: cancel it half way.
    task = asyncio.create_task(conn.execute(encode_command(b"BLPOP", b"nothing", b"0"), 1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.closed  # its next reply would have belonged to the cancelled command


class _Subscriber:
    """Collects (channel, message) of every message on the given channels."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.got: list[tuple[bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self, *channels: bytes) -> None:
        await self.pubsub.subscribe(*channels)

        async def pump() -> None:
            while True:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    self.got.append((msg["channel"], msg["data"]))

        self._task = asyncio.create_task(pump())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]


async def _publish_with(raw: bool, url: str, targets: list[Target]) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, socket_timeout=None)
    subscriber = _Subscriber(client)
    await client.flushall()
    await subscriber.start(*(t.channel for t in targets))
    publisher = Publisher(client, raw_resp=raw)
    assert publisher.transport == ("resp" if raw else "redis-py")
    a, b, c = targets
    frames = [(a, b"a1"), (b, b"b1"), (a, b"a2"), (c, b"c1"), (a, b"a3"), (b, b"b2")]
    for target, frame in frames:
        publisher.enqueue(target, frame)
    try:
        await publisher.flush()
        await wait_for(lambda: len(subscriber.got) == len(frames), 5, message="all frames")
        cache = {key: await client.hgetall(key) for key in sorted({t.cache_key for t in targets})}
    finally:
        await publisher.aclose()
        await subscriber.stop()
        await client.aclose()
    return {
        "messages": subscriber.got,
        "cache": cache,
        "stats": (publisher.stats.published, publisher.stats.batches),
        "by_type": publisher.published_by_type,
        "seen": sorted(publisher.last_seen),
    }


async def test_both_roads_publish_the_same(redis_url: str) -> None:
    keys = Keys("t")
    targets = [
        make_target(keys, StreamKey("ticker", "KRW-BTC")),
        make_target(keys, StreamKey("ticker", "KRW-ETH")),
        make_target(keys, StreamKey("trade", "KRW-BTC")),
    ]
    raw = await _publish_with(True, redis_url, targets)
    pipeline = await _publish_with(False, redis_url, targets)
    assert raw == pipeline
    assert [m for _, m in raw["messages"]] == [b"a1", b"b1", b"a2", b"c1", b"a3", b"b2"]
    # The last-value cache holds the newest frame of each code.
    assert raw["cache"] == {
        b"t:last:ticker": {b"KRW-BTC": b"a3", b"KRW-ETH": b"b2"},
        b"t:last:trade": {b"KRW-BTC": b"c1"},
    }
    assert raw["stats"] == (6, 1)
    assert raw["by_type"] == {"ticker": 5, "trade": 1}


async def test_publisher_survives_a_redis_restart(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)
    target = make_target(Keys("t"), StreamKey("ticker", "KRW-BTC"))
    publisher = Publisher(client)
    try:
        publisher.enqueue(target, b"one")
        await publisher.flush()
        assert publisher.stats.published == 1
        redis_server.restart()  # the raw connection is now dead
        publisher.enqueue(target, b"two")
        await publisher.flush()
        assert publisher.stats.redis_errors == 1 and publisher.stats.published == 1
        publisher.enqueue(target, b"three")
        await publisher.flush()  # reconnects
        assert publisher.stats.published == 2
        assert await client.hget("t:last:ticker", "KRW-BTC") == b"three"
    finally:
        await publisher.aclose()
        await client.aclose()


async def test_send_reports_each_buffer_once_answered_in_order(redis_url: str) -> None:
    answered: list[tuple[Any, int]] = []
    conn = await RespConnection.connect(
        RespAddress.from_url(redis_url),
        on_answered=lambda token, errors: answered.append((token, errors)),
    )
    try:
        await conn.execute(encode_command(b"SET", b"s", b"text"), 1)
        conn.send(encode_command(b"INCR", b"n") * 3, 3, token="a")
        conn.send(encode_command(b"INCR", b"s") + encode_command(b"INCR", b"n"), 2, token="b")
        assert answered == []  # nothing waited for: the replies are still on their way
        assert conn.unanswered_since is not None
        await conn.drain()
        assert answered == [("a", 0), ("b", 1)]
        assert conn.unanswered_since is None
        assert await conn.execute(encode_command(b"GET", b"n"), 1) == [b"4"]
    finally:
        await conn.aclose()


async def _confirmed_by_redis(client: aioredis.Redis, key: str, value: int) -> None:
    """Wait until Redis has run the INCRs of a buffer (its replies are then on their way)."""

    async def done() -> bool:
        return int(await client.get(key) or 0) >= value

    await wait_for(done, 5, message=f"{key} reached {value}")


async def test_polled_replies_are_read_by_the_next_write_without_a_wake_up(
    redis_client: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With poll_replies on, the transport does not read while buffers are in flight: the
    replies Redis sent wait until the next send() reads them (in the same call, in order)."""
    import broker.resp as resp_module

    monkeypatch.setattr(resp_module, "REPLY_POLL_INTERVAL", 30.0)  # (the timer stays out)
    answered: list[tuple[Any, int]] = []
    conn = await RespConnection.connect(
        RespAddress.from_url(redis_url),
        on_answered=lambda token, errors: answered.append((token, errors)),
    )
    try:
        assert conn.poll_replies()
        conn.send(encode_command(b"INCR", b"n") * 2, 2, token="a")
        await _confirmed_by_redis(redis_client, "n", 2)
        await asyncio.sleep(0.05)  # (loop turns in which a reading transport would read)
        assert answered == [] and conn.unanswered_since is not None
        conn.send(encode_command(b"INCR", b"n") + encode_command(b"INCR", b"s"), 2, token="b")
        assert answered[:1] == [("a", 0)]  # read within send(), once b was written
        await conn.drain()  # an awaited reply: the transport reads again
        assert answered == [("a", 0), ("b", 0)]
        assert conn.unanswered_since is None
        assert await conn.execute(encode_command(b"GET", b"n"), 1) == [b"3"]
    finally:
        await conn.aclose()


async def test_polled_replies_are_read_when_no_further_write_comes(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """The last buffer's replies are read by the timer, and the connection is then watched by
    its transport again: a connection killed while idle is reported at once."""
    answered: list[tuple[Any, int]] = []
    lost: list[tuple[Exception, list[Any]]] = []
    conn = await RespConnection.connect(
        RespAddress.from_url(redis_url),
        on_answered=lambda token, errors: answered.append((token, errors)),
        on_lost=lambda why, tokens: lost.append((why, tokens)),
    )
    try:
        assert conn.poll_replies()
        await conn.execute(encode_command(b"CLIENT", b"SETNAME", b"polled"), 1)
        conn.send(encode_command(b"INCR", b"n") + encode_command(b"HSET", b"n", b"f", b"v"), 2, 1)
        conn.send(encode_command(b"INCR", b"n"), 1, token=2)
        await wait_for(lambda: len(answered) == 2, 5, message="replies read")
        assert answered == [(1, 1), (2, 0)]  # (HSET on a string: one error reply)
        assert conn.unanswered_since is None
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await wait_for(lambda: bool(lost), 5, message="the idle connection's loss reported")
        assert conn.closed and lost[0][1] == []
    finally:
        await conn.aclose()


async def test_a_connection_broken_while_polled_reports_its_unanswered_buffers(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone while the transport does not read: the next send() finds the end of the
    connection; every unanswered buffer is reported lost, once, and nothing is answered."""
    import broker.resp as resp_module

    monkeypatch.setattr(resp_module, "REPLY_POLL_INTERVAL", 30.0)
    lost: list[list[Any]] = []
    answered: list[Any] = []
    conn = await RespConnection.connect(
        RespAddress.from_url(redis_server.url),
        on_answered=lambda token, errors: answered.append(token),
        on_lost=lambda why, tokens: lost.append(tokens),
    )
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        assert conn.poll_replies()
        os.kill(pid, signal.SIGSTOP)  # the buffer is taken but never answered
        conn.send(encode_command(b"PING"), 1, token="a")
        redis_server.kill()  # (SIGKILL works on a stopped process)
        await asyncio.sleep(0.05)  # a reading transport would have noticed; this one not
        assert not lost and not conn.closed
        with contextlib.suppress(RedisConnectionError):  # (closed by its own write, or not)
            conn.send(encode_command(b"PING"), 1, token="b")
        await wait_for(lambda: bool(lost), 5, message="loss reported")
        assert lost in ([["a"]], [["a", "b"]]) and answered == []
        assert conn.closed
        with pytest.raises(RedisConnectionError):
            conn.send(encode_command(b"PING"), 1, token="c")
    finally:
        await conn.aclose()


async def test_a_publisher_counts_its_last_burst_without_a_further_burst(
    redis_url: str,
) -> None:
    """The publisher polls its replies: a single burst is still confirmed (published,
    last_publish_ms) with no burst after it."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    target = make_target(Keys("t"), StreamKey("trade", "KRW-BTC"), {"trade": 100})
    publisher = Publisher(client, history_caps={"trade": 100})
    task = await _run_publisher(publisher)
    try:
        publisher.enqueue_burst([(target, b"one")])  # no connection yet: the task connects
        await wait_for(lambda: publisher.stats.published == 1, 5, message="first burst")
        assert publisher._conn is not None and publisher._conn._poll_sock is not None
        publisher.enqueue_burst([(target, b"two"), (target, b"three")])
        await wait_for(lambda: publisher.stats.published == 3, 5, message="last burst read")
        assert publisher.stats.history_written == 3 and publisher.stats.last_publish_ms > 0
        assert await client.hget("t:last:trade", "KRW-BTC") == b"three"
    finally:
        await _stop_task(task)
        await client.aclose()


async def _run_publisher(publisher: Publisher) -> asyncio.Task[None]:
    return asyncio.create_task(publisher.run(lambda: True))


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_redis_that_stops_answering_is_dropped_counted_and_reconnected(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: writes still succeed (kernel buffers) but no reply comes. The watchdog drops
    the connection after PIPELINE_TIMEOUT, counts the error; after SIGCONT the next burst
    reconnects and publishes."""
    import broker.publisher as publisher_module

    monkeypatch.setattr(publisher_module, "PIPELINE_TIMEOUT", 0.5)
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)
    target = make_target(Keys("t"), StreamKey("ticker", "KRW-BTC"))
    publisher = Publisher(client)
    task = await _run_publisher(publisher)
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        publisher.enqueue(target, b"one")
        await wait_for(lambda: publisher.stats.published == 1, 5, message="first frame")
        os.kill(pid, signal.SIGSTOP)
        try:
            publisher.enqueue(target, b"two")
            await wait_for(lambda: publisher.stats.redis_errors >= 1, 10, message="noticed")
            assert publisher.stats.published == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        errors = publisher.stats.redis_errors

        async def three_published() -> bool:
            publisher.enqueue(target, b"three")
            await asyncio.sleep(0)  # let the burst go out
            return await client.hget("t:last:ticker", "KRW-BTC") == b"three"

        await wait_for(three_published, 10, message="reconnected")
        assert publisher.stats.redis_errors == errors  # the new connection is healthy
    finally:
        await _stop_task(task)
        await client.aclose()


async def test_a_slow_redis_pauses_writes_and_loses_nothing(redis_server: RedisServer) -> None:
    """Redis stopped while ~19 MB of frames arrive: the socket buffers fill, the transport
    pauses, frames wait in the publisher; once Redis runs again every frame is delivered, in
    order, with no error and no drop."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)
    keys = Keys("t")
    target = make_target(keys, StreamKey("ticker", "KRW-BTC"))
    subscriber = _Subscriber(client)
    await subscriber.start(target.channel)
    publisher = Publisher(client, last_value_cache=False)
    task = await _run_publisher(publisher)
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    frames = [b"%06d" % i + b"x" * (64 * 1024) for i in range(300)]
    try:
        publisher.enqueue(target, b"warm-up")
        await wait_for(lambda: publisher.stats.published == 1, 5, message="connected")
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(0, len(frames), 10):
                for frame in frames[i : i + 10]:
                    publisher.enqueue(target, frame)
                await asyncio.sleep(0)  # one burst per iteration
            await wait_for(
                lambda: bool(publisher._conn and publisher._conn.writing_paused),
                10,
                message="writes paused",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(
            lambda: len(subscriber.got) == len(frames) + 1, 30, message="every frame delivered"
        )
        assert [m for _, m in subscriber.got[1:]] == frames
        # (replies are read by the next write or the poll timer, a little after delivery)
        await wait_for(
            lambda: publisher.stats.published == len(frames) + 1, 5, message="every reply read"
        )
        assert publisher.stats.redis_errors == 0
        assert publisher.stats.dropped_overflow == 0
    finally:
        await _stop_task(task)
        await subscriber.stop()
        await client.aclose()


async def test_every_frame_is_accounted_when_redis_dies_under_a_paused_publisher(
    redis_server: RedisServer,
) -> None:
    """Redis stopped until writes pause, then killed: each frame ends up published or counted
    in dropped_redis (none vanishes), and after a restart the publisher reconnects."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)
    target = make_target(Keys("t"), StreamKey("ticker", "KRW-BTC"))
    publisher = Publisher(client, last_value_cache=False)
    task = await _run_publisher(publisher)
    assert redis_server.proc is not None
    frames = [b"%06d" % i + b"x" * (64 * 1024) for i in range(300)]
    try:
        publisher.enqueue(target, b"warm-up")
        await wait_for(lambda: publisher.stats.published == 1, 5, message="connected")
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        for i in range(0, len(frames), 10):
            for frame in frames[i : i + 10]:
                publisher.enqueue(target, frame)
            await asyncio.sleep(0)  # one burst per iteration
        await wait_for(
            lambda: bool(publisher._conn and publisher._conn.writing_paused), 10, message="paused"
        )
        redis_server.kill()  # SIGKILL ends a stopped process too

        def accounted() -> bool:
            s = publisher.stats
            return s.published + s.dropped_redis == len(frames) + 1 and not publisher.pending

        await wait_for(accounted, 10, message="every frame published or counted")
        assert publisher.stats.redis_errors >= 1
        assert publisher.stats.dropped_overflow == 0
        redis_server.start()

        async def published_again() -> bool:
            publisher.enqueue(target, b"after")
            await asyncio.sleep(0)
            return publisher.stats.published > 1

        await wait_for(published_again, 10, message="reconnected after the restart")
    finally:
        await _stop_task(task)
        await client.aclose()


async def test_a_flush_that_times_out_is_counted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.publisher as publisher_module

    monkeypatch.setattr(publisher_module, "PIPELINE_TIMEOUT", 0.5)
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)
    target = make_target(Keys("t"), StreamKey("ticker", "KRW-BTC"))
    publisher = Publisher(client)
    assert redis_server.proc is not None
    try:
        publisher.enqueue(target, b"one")
        await publisher.flush()
        assert publisher.stats.published == 1
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            publisher.enqueue(target, b"two")
            publisher.enqueue(target, b"three")
            await publisher.flush()  # gives up after PIPELINE_TIMEOUT
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert publisher.stats.redis_errors == 1
        assert publisher.stats.dropped_redis == 2
        assert publisher.stats.published == 1
    finally:
        await publisher.aclose()
        await client.aclose()
