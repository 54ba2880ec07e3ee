"""The upstream connection adapter (:mod:`broker.upstream_connection`) against real servers.

Two kinds of peer, over real sockets: websockets' own server (a correct peer: handshake,
pings, close handshake, fragments, TLS) and :class:`RawPeer`, a websocket server written by
hand for what a correct server never does (answer nothing, swallow pings, send frames in the
same write as its handshake answer, refuse with a 429). The last tests run the broker process
through it: a clean close from Upbit is a reconnect, and ``wss://`` trusts what the system's
trust store (``SSL_CERT_FILE``) trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.uri import parse_uri
from websockets.utils import accept_key

from broker.testing import RedisServer, broker_process, clean_env, wait_for, write_lease
from broker.testing import read_status as redis_status
from broker.testing.processes import FAST_BROKER_ENV
from broker.upstream_connection import UpstreamConnection, open_connection
from tests.support.processes import FakeConnection, FakeUpstream
from tests.support.tls import make_certificates

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[ServerConnection], Awaitable[None]]


def options(**overrides: Any) -> dict[str, Any]:
    """open_connection's arguments as the broker passes them, short timeouts."""
    return {
        "user_agent": "upbit-broker",
        "max_size": 16 * 2**20,
        "open_timeout": 5.0,
        "ping_interval": None,
        "ping_timeout": None,
        "close_timeout": 2.0,
        **overrides,
    }


class Received:
    """What ``on_messages`` was handed: every call's list, and an event per message."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []

    def __call__(self, messages: list[bytes]) -> None:
        self.calls.append(list(messages))

    @property
    def messages(self) -> list[bytes]:
        return [m for call in self.calls for m in call]


@contextlib.asynccontextmanager
async def websockets_server(
    handler: Handler, *, tls: ssl.SSLContext | None = None, **kwargs: Any
) -> AsyncIterator[str]:
    """websockets' server on a free port; yields its URL."""
    async with serve(
        handler, "127.0.0.1", 0, ping_interval=None, compression=None, ssl=tls, **kwargs
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/websocket/v1"


async def ended(conn: UpstreamConnection, within: float = 5.0) -> BaseException:
    """What ``wait_closed`` raised (it must within ``within`` seconds)."""
    async with asyncio.timeout(within):
        try:
            await conn.wait_closed()
        except Exception as exc:  # (the test looks at whatever it was)
            return exc
    raise AssertionError("wait_closed returned")  # pragma: no cover


# -- a websocket server by hand ---------------------------------------------------------------


def server_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False, extensions=[])


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (masked) frame from the client: its opcode and unmasked payload."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4)
    payload = await reader.readexactly(length)
    return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawPeer:
    """A TCP server that answers the upgrade itself (``status`` 101: a valid handshake; None:
    no answer at all), appends ``after_handshake`` to the answer in the same write, then hands
    the streams to the test on :attr:`peers`."""

    def __init__(self, status: int | None = 101, after_handshake: bytes = b"") -> None:
        self.status = status
        self.after_handshake = after_handshake
        self.requests: list[bytes] = []
        self.peers: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/websocket/v1"

    async def __aenter__(self) -> RawPeer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.transport.abort()
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if self.status is None:
            return  # never answer
        if self.status != 101:
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.status)
            return
        key = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n%s" % (accept_key(key).encode(), self.after_handshake)
        )
        await self.peers.put((reader, writer))


# -- the opening handshake --------------------------------------------------------------------


async def test_the_handshake_names_the_broker_and_asks_for_no_origin_nor_compression() -> None:
    requests: list[Request] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        requests.append(ws.request)
        await ws.wait_closed()

    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options())
        await wait_for(lambda: requests, 5, message="the request")
        await conn.close()
    headers = requests[0].headers
    assert requests[0].path == "/websocket/v1"
    assert headers["User-Agent"] == "upbit-broker"
    assert "Origin" not in headers
    assert "Sec-WebSocket-Extensions" not in headers  # no permessage-deflate


async def test_a_429_on_the_upgrade_is_a_refused_handshake() -> None:
    def refuse(conn: ServerConnection, request: Request) -> Any:
        return conn.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")

    async def handler(ws: ServerConnection) -> None:  # pragma: no cover - refused before
        await ws.wait_closed()

    async with websockets_server(handler, process_request=refuse) as url:
        with pytest.raises(InvalidStatus) as refused:
            await open_connection(url, **options())
    assert refused.value.response.status_code == 429


async def test_a_bare_429_without_a_body_is_refused_too() -> None:
    async with RawPeer(status=429) as peer:
        with pytest.raises(InvalidStatus) as refused:
            await open_connection(peer.url, **options())
    assert refused.value.response.status_code == 429


async def test_a_server_that_never_answers_times_out() -> None:
    async with RawPeer(status=None) as peer:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await open_connection(peer.url, **options(open_timeout=0.3))
        took = time.monotonic() - started
    assert peer.requests and 0.25 <= took < 3, took


async def test_nothing_listening_is_an_os_error() -> None:
    async with RawPeer() as peer:
        url = peer.url
    with pytest.raises(OSError):
        await open_connection(url, **options())


# -- receiving --------------------------------------------------------------------------------


async def test_messages_arrive_in_order_as_bytes_reassembled_and_per_read() -> None:
    frames = [b'{"n":%d}' % i for i in range(50)]

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # "go"
        await ws.send("text is handed over as its bytes: é")
        await ws.send([b"frag", b"mented"])  # one message in three frames
        await ws.wait_closed()

    received = Received()
    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options())
        conn.start(received)
        await conn.send("go")
        await wait_for(lambda: len(received.messages) == 2, 5, message="two messages")
        await conn.close()
    assert received.messages == ["text is handed over as its bytes: é".encode(), b"fragmented"]
    assert all(type(m) is bytes for m in received.messages)

    # Fifty frames in one write: handed over in (nearly) one call, not fifty.
    burst = b"".join(server_frame(Opcode.BINARY, f) for f in frames)
    async with RawPeer() as peer:
        conn = await open_connection(peer.url, **options())
        conn.start(received := Received())
        _, writer = await peer.peers.get()
        writer.write(burst)
        await wait_for(lambda: len(received.messages) == 50, 5, message="the burst")
        conn.abort()
    assert received.messages == frames
    assert len(received.calls) <= 3, [len(c) for c in received.calls]


async def test_frames_sent_with_the_handshake_answer_wait_for_start() -> None:
    early = server_frame(Opcode.BINARY, b"first") + server_frame(Opcode.TEXT, b"second")
    async with RawPeer(after_handshake=early) as peer:
        conn = await open_connection(peer.url, **options())
        await peer.peers.get()
        received = Received()
        conn.start(received)
        await wait_for(lambda: len(received.messages) == 2, 5, message="held messages")
        conn.abort()
    assert received.messages == [b"first", b"second"]


async def test_what_on_messages_raises_ends_the_connection() -> None:
    class ErrorFrame(Exception):
        pass

    def on_messages(messages: list[bytes]) -> None:
        for message in messages:
            seen.append(message)
            if message == b"error":
                raise ErrorFrame(message)

    seen: list[bytes] = []
    burst = b"".join(server_frame(Opcode.BINARY, m) for m in (b"a", b"error", b"after"))
    async with RawPeer() as peer:
        conn = await open_connection(peer.url, **options())
        conn.start(on_messages)
        reader, writer = await peer.peers.get()
        writer.write(burst)
        exc = await ended(conn)
        assert await reader.read() == b""  # the server sees the connection cut
    assert isinstance(exc, ErrorFrame)
    assert seen == [b"a", b"error"]  # nothing after it is handed over


async def test_a_message_over_max_size_fails_the_connection_with_1009() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"x" * 2000)
        await ws.wait_closed()

    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options(max_size=1000))
        conn.start(Received())
        exc = await ended(conn)
    assert isinstance(exc, ConnectionClosed) and exc.sent is not None
    assert exc.sent.code == 1009


# -- the hot path against websockets' own parser ----------------------------------------------


class FakeTransport:
    """Enough of a transport for :class:`UpstreamConnection` driven by hand."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def random_stream(rng: random.Random) -> bytes:
    """Server frames as they may come: whole messages of every length class (7-, 16- and
    64-bit), pings and pongs between them, fragmented messages with control frames inside,
    and sometimes an ending: a close frame, or a frame the protocol must refuse."""
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        size = rng.choice([0, 1, 125, 126, 127, 1000, 65535, 65536, 70_000])
        payload = bytes(rng.getrandbits(8) for _ in range(min(size, 64))) * (size // 64 + 1)
        payload = payload[:size]
        if kind < 0.6:
            frames.append(server_frame(rng.choice([Opcode.BINARY, Opcode.TEXT]), payload))
        elif kind < 0.75:
            frames.append(server_frame(rng.choice([Opcode.PING, Opcode.PONG]), payload[:20]))
        else:  # a fragmented message, a ping inside it
            cuts = sorted(rng.sample(range(size + 1), 2)) if size else [0, 0]
            parts = [payload[: cuts[0]], payload[cuts[0] : cuts[1]], payload[cuts[1] :]]
            frames.append(server_frame(Opcode.BINARY, parts[0], fin=False))
            frames.append(server_frame(Opcode.PING, b"in between"))
            frames.append(server_frame(Opcode.CONT, parts[1], fin=False))
            frames.append(server_frame(Opcode.CONT, parts[2], fin=True))
    ending = rng.random()
    if ending < 0.15:
        frames.append(server_frame(Opcode.CLOSE, b"\x03\xe9going away"))  # 1001
        frames.append(server_frame(Opcode.BINARY, b"after the close"))
    elif ending < 0.2:
        frames.append(bytes([0xC2, 3]) + b"rsv")  # RSV1 set: no extension was agreed
    elif ending < 0.25:
        frames.append(bytes([0x82, 0x83, 1, 2, 3, 4]) + b"abc")  # masked by the server
    elif ending < 0.3:
        frames.append(server_frame(Opcode.BINARY, b"x", fin=False))
        frames.append(server_frame(Opcode.TEXT, b"not a continuation"))
    elif ending < 0.35:
        frames.append(bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big"))  # over max_size
    return b"".join(frames)


def read_like_websockets(stream: bytes, max_size: int) -> tuple[list[bytes], Any]:
    """The oracle: websockets' own protocol given the whole stream at once."""
    protocol = ClientProtocol(parse_uri("ws://upbit/websocket/v1"), state=OPEN, max_size=max_size)
    protocol.receive_data(stream)
    messages: list[bytes] = []
    fragments: list[bytes] = []
    for frame in protocol.events_received():
        assert isinstance(frame, Frame)
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            fragments.append(bytes(frame.data))
            if frame.fin:
                messages.append(b"".join(fragments))
                fragments = []
    return messages, protocol


async def test_the_hot_path_reads_what_websockets_reads_however_the_bytes_are_cut() -> None:
    """Whole data frames are cut out of the bytes without the protocol's parser: for any
    stream and any way TCP cuts it, the messages, the order, and how the protocol ends
    (state, close frames) are what websockets' own parser makes of it."""
    rng = random.Random(16)
    max_size = 1 << 20
    cases = 0
    for _ in range(150):
        stream = random_stream(rng)
        want, oracle = read_like_websockets(stream, max_size)
        protocol = ClientProtocol(parse_uri("ws://upbit/websocket/v1"), max_size=max_size)
        conn = UpstreamConnection(
            protocol, max_size=max_size, ping_interval=None, ping_timeout=None, close_timeout=1
        )
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        protocol.send_request(protocol.connect())
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
            % accept_key(protocol.key).encode()
        )
        whole = answer + stream
        got: list[bytes] = []
        conn.start(got.extend)
        # cut the bytes at random places (single bytes included), the answer's end too
        pos = 0
        while pos < len(whole):
            step = rng.choice([1, 2, 3, 7, 100, 4096, 65536, len(whole)])
            conn.data_received(whole[pos : pos + step])
            pos += step
        cases += 1
        assert got == want, f"case {cases}: {len(got)} messages, want {len(want)}"
        assert protocol.state is oracle.state
        assert protocol.close_rcvd == oracle.close_rcvd
        assert protocol.close_sent == oracle.close_sent
        assert type(protocol.parser_exc) is type(oracle.parser_exc)
        conn.connection_lost(None)
    print(f"\n[figures] hot path vs websockets' parser: {cases} random streams, random cuts")


# -- pings, pongs, closing --------------------------------------------------------------------


async def test_server_pings_are_answered() -> None:
    latencies: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        pong = await ws.ping()
        latencies.append(await asyncio.wait_for(pong, 5))
        await ws.close()

    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options())
        conn.start(Received())
        exc = await ended(conn)
    assert len(latencies) == 1 and isinstance(exc, ConnectionClosedOK)


async def test_keepalive_pings_keep_a_quiet_connection_and_measure_latency() -> None:
    pings: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            opcode, payload = await read_client_frame(reader)
            if opcode == Opcode.PING:
                pings.append(payload)
                writer.write(server_frame(Opcode.PONG, payload))

    async with RawPeer() as peer:  # a quiet server: it only answers pings
        conn = await open_connection(peer.url, **options(ping_interval=0.05, ping_timeout=0.5))
        conn.start(Received())
        answering = asyncio.create_task(answer(*await peer.peers.get()))
        await wait_for(lambda: len(pings) >= 5, 5, message="five keepalive pings")
        alive = not conn._ended.done()
        latency = conn.latency
        conn.abort()
        answering.cancel()
    assert alive and 0 < latency < 0.5
    assert len(set(pings)) == len(pings)  # each ping its own payload


async def test_a_ping_without_a_pong_fails_the_connection_with_1011() -> None:
    async with RawPeer() as peer:  # it reads nothing and answers nothing
        conn = await open_connection(peer.url, **options(ping_interval=0.1, ping_timeout=0.3))
        started = time.monotonic()
        conn.start(Received())
        reader, _ = await peer.peers.get()
        exc = await ended(conn)
        took = time.monotonic() - started
        frames = [await read_client_frame(reader) for _ in range(2)]
    assert isinstance(exc, ConnectionClosed) and exc.rcvd is None
    assert exc.sent is not None and exc.sent.code == 1011
    assert 0.35 <= took < 3, took
    assert [opcode for opcode, _ in frames] == [Opcode.PING, Opcode.CLOSE]


async def test_a_close_from_the_server_completes_the_handshake() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"bye soon")
        await ws.close(1001, "going away")

    received = Received()
    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options())
        conn.start(received)
        exc = await ended(conn)
    assert received.messages == [b"bye soon"]
    assert isinstance(exc, ConnectionClosedOK) and exc.rcvd is not None
    assert (exc.rcvd.code, exc.rcvd.reason, exc.rcvd_then_sent) == (1001, "going away", True)


async def test_our_close_is_a_1000_handshake_and_sending_after_it_raises() -> None:
    codes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()
        codes.append(ws.close_code)

    async with websockets_server(handler) as url:
        conn = await open_connection(url, **options())
        conn.start(Received())
        started = time.monotonic()
        await conn.close()
        took = time.monotonic() - started
        with pytest.raises(ConnectionClosedOK):
            await conn.send("too late")
        await wait_for(lambda: codes, 5, message="the server saw the close")
    assert codes == [1000] and took < 1.0, (codes, took)


async def test_a_cut_is_a_close_without_a_frame() -> None:
    async with RawPeer() as peer:
        conn = await open_connection(peer.url, **options())
        conn.start(Received())
        _, writer = await peer.peers.get()
        writer.transport.abort()
        exc = await ended(conn)
    assert isinstance(exc, ConnectionClosed) and exc.rcvd is None and exc.sent is None


# -- TLS --------------------------------------------------------------------------------------


async def test_wss_checks_the_server_certificate(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "certs")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(files.cert, files.key)

    async def handler(ws: ServerConnection) -> None:
        await ws.send(await ws.recv())
        await ws.wait_closed()

    received = Received()
    async with websockets_server(handler, tls=server_tls) as url:
        trusting = ssl.create_default_context(cafile=str(files.ca))
        conn = await open_connection(url, **options(ssl_context=trusting))
        conn.start(received)
        await conn.send("over tls")
        await wait_for(lambda: received.messages == [b"over tls"], 5, message="the echo")
        await conn.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an OSError: a failed connect
            await open_connection(url, **options())  # the system's trust store only


# -- the broker through it --------------------------------------------------------------------


class TlsFakeUpstream(FakeUpstream):
    """:class:`FakeUpstream` behind TLS (``wss://``)."""

    def __init__(self, play: Any, tls: ssl.SSLContext) -> None:
        super().__init__(play)
        self.tls = tls

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/websocket/v1"

    async def __aenter__(self) -> TlsFakeUpstream:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            max_size=None,
            ping_interval=None,
            compression=None,
            ssl=self.tls,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self


def good(seq: int) -> bytes:
    return (
        b'{"type":"ticker","code":"KRW-BTC","trade_price":1.0,"seq":%d,'
        b'"timestamp":1730000000000,"stream_type":"REALTIME"}' % seq
    )


async def test_a_clean_close_from_upbit_is_a_reconnect(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Upbit (or a load balancer before it) may close with 1000 or 1001 "going away": the
    broker reconnects and carries on, as after any other close."""

    async def play(ws: Any, conn: FakeConnection) -> None:
        await ws.send(good(len(fake.connections)))
        if len(fake.connections) == 1:
            await ws.close(1001, "going away")

    await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
    async with (
        FakeUpstream(play) as fake,
        broker_process(redis_server.url, fake.url, "close-b", tmp_path) as broker,
    ):
        await wait_for(lambda: len(fake.connections) >= 2, 15, message="reconnected")

        async def recovered() -> dict[str, str] | None:
            st = await redis_status(redis_client)
            confirmed = json.loads(st.get("upstream", "{}")) == {"ticker": ["KRW-BTC"]}
            return st if st.get("connected") == "1" and confirmed else None

        status = await wait_for(recovered, 10, message="connected again, the set confirmed")
        assert status is not None and broker.alive
    print(
        f"\n[figures] clean close 1001: upstream_connections={len(fake.connections)}, "
        f"reconnects={status['reconnects']}, epoch={status['epoch']}, "
        f"last_error={status['last_error']!r}"
    )
    assert len(fake.connections) == 2 and status["reconnects"] == "1"
    assert "1001" in status["last_error"]


async def test_the_broker_speaks_wss_with_the_system_trust_store(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    files = make_certificates(tmp_path / "certs")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(files.cert, files.key)
    sent = [good(i) for i in range(1, 6)]

    async def play(ws: Any, conn: FakeConnection) -> None:
        for frame in sent:
            await ws.send(frame)

    received: list[bytes] = []
    tap = redis_client.pubsub()
    await tap.subscribe("t:ticker:KRW-BTC")

    async def pump() -> None:
        async for msg in tap.listen():
            if msg["type"] == "message":
                received.append(msg["data"])

    pumper = asyncio.create_task(pump())
    env = clean_env(**FAST_BROKER_ENV, SSL_CERT_FILE=str(files.ca))
    try:
        await write_lease(redis_client, "c", {"ticker": ["KRW-BTC"]}, ttl_ms=60_000)
        async with (
            TlsFakeUpstream(play, server_tls) as fake,
            broker_process(redis_server.url, fake.url, "wss-b", tmp_path, env=env) as broker,
        ):
            await wait_for(lambda: received == sent, 15, message="frames over wss")
            assert broker.alive and len(fake.connections) == 1
    finally:
        pumper.cancel()
        await asyncio.gather(pumper, return_exceptions=True)
        await tap.aclose()
