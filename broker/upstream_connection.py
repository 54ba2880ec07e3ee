"""One websocket connection to Upbit, read in callbacks (I/O adapter over websockets' sans-I/O
protocol).

websockets' asyncio connection parses frames in ``data_received`` and hands each message over
through a queue and a future; reading it costs the reader a task wake-up and an ``await`` per
message: about 22 us a frame at 1,000 frames/s measured here, most of the broker's cost at
Upbit's real rate (issue 16). This connection drives the same sans-I/O
:class:`websockets.client.ClientProtocol` from an :class:`asyncio.Protocol` instead: every
chunk the socket delivers is parsed where it arrives and its data messages handed, as one
list, to the ``on_messages`` callback, inside the same callback: one wake-up per socket read,
no await per frame (the style of :mod:`broker.control_channel`). Whole unfragmented data
frames, nearly every frame Upbit sends, are cut out of the bytes here (``_frames``: the
protocol's generator parser cost about 5 us a frame more); the protocol reads the handshake
answer and every other frame (pings, pongs, closes, fragments, anything it must refuse).

The rest is what websockets' asyncio client did for the broker, kept:

- the opening handshake: ``User-Agent`` set, no ``Origin`` header (Upbit puts clients that
  send one on a far stricter limit), no extension (no compression), ``max_size``; TLS for
  ``wss://`` (the system's trust store, ``SSL_CERT_FILE`` honoured); a refusal (HTTP 429, any
  answer but 101) raises the handshake's own :class:`~websockets.exceptions.InvalidHandshake`;
  the whole of it bounded by ``open_timeout`` (:class:`TimeoutError`);
- server pings answered (by the protocol), our keepalive ping every ``ping_interval`` seconds
  (counted from the last pong, less its latency) and the connection failed with 1011 when its
  pong takes longer than ``ping_timeout``: websockets' semantics;
- the close handshake both ways, bounded by ``close_timeout`` before the TCP connection is cut;
- how it ended: :meth:`UpstreamConnection.wait_closed` raises
  :class:`~websockets.exceptions.ConnectionClosed` (``rcvd``: the server's close frame, None
  when there was none: a cut, a timeout), or whatever ``on_messages`` raised (the broker
  raises on an Upbit error frame: the connection ends there).

Not kept: HTTP proxies from the environment and redirects (Upbit needs neither).

Text messages are handed over as their bytes, not decoded: the router validates UTF-8 with the
JSON (a bad text frame is one malformed frame, where websockets failed the connection with
1007).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED, CONNECTING, OPEN, Event
from websockets.uri import parse_uri

#: what a connection hands over: the data messages of one read, in order
MessagesCallback = Callable[[list[bytes]], None]

_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_PONG = Opcode.PONG
#: the first byte of a whole (FIN), unfragmented, extension-free binary or text frame
_WHOLE_MESSAGE = (0x80 | Opcode.BINARY, 0x80 | Opcode.TEXT)
#: the longest handshake answer head read before the protocol is given it anyway (it refuses)
_MAX_HEAD = 65536
#: the keepalive ping's close code when its pong is late (websockets': internal error)
_KEEPALIVE_CLOSE = 1011


async def open_connection(
    url: str,
    *,
    user_agent: str,
    max_size: int,
    open_timeout: float,
    ping_interval: float | None,
    ping_timeout: float | None,
    close_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> UpstreamConnection:
    """Open the TCP (TLS for ``wss://``) connection and do the opening handshake.

    The connection delivers nothing and sends no keepalive ping before
    :meth:`UpstreamConnection.start`.

    Raises:
        websockets.exceptions.InvalidURI: ``url`` is no websocket URL.
        websockets.exceptions.InvalidHandshake: the server refused the upgrade (an HTTP 429,
            any status but 101) or answered something that is no handshake.
        OSError: the TCP connection or the TLS handshake failed.
        TimeoutError: all of it took longer than ``open_timeout``.
    """
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size)  # no origin, no extensions
    connection = UpstreamConnection(
        protocol,
        max_size=max_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
    )
    loop = asyncio.get_running_loop()
    tls: ssl.SSLContext | None = None
    if uri.secure:
        tls = ssl_context if ssl_context is not None else ssl.create_default_context()
    try:
        async with asyncio.timeout(open_timeout):
            await loop.create_connection(
                lambda: connection,
                uri.host,
                uri.port,
                ssl=tls,
                server_hostname=uri.host if tls is not None else None,
            )
            await connection._handshake(user_agent)
    except BaseException as exc:
        connection.abort()
        if isinstance(exc, TimeoutError):
            raise TimeoutError("timed out during opening handshake") from exc
        raise
    return connection


class UpstreamConnection(asyncio.Protocol):
    """The connection: made by :func:`open_connection`, read once :meth:`start`-ed."""

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        max_size: int,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
    ) -> None:
        self._protocol = protocol
        self._max_size = max_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._on_messages: MessagesCallback | None = None
        self._answered: asyncio.Future[None] = loop.create_future()  # the handshake's answer
        #: how the connection ended: a ConnectionClosed or what on_messages raised
        self._ended: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()  # connection_lost was called
        self._failure: BaseException | None = None
        self._held: list[bytes] = []  # messages that arrived before start()
        self._head: bytearray | None = bytearray()  # the handshake's answer, until handed over
        #: frames are cut out in data_received (the protocol is OPEN and has read whole frames)
        self._framing = False
        self._rest = bytearray()  # the start of a frame not whole yet
        self._need = 0  # how many bytes _rest needs before it is worth another look
        self._fragments: list[bytes] | None = None  # a fragmented message being reassembled
        self._ping: bytes | None = None  # the keepalive ping awaiting its pong
        self._ping_sent = 0.0
        self._ping_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.latency = 0.0
        """Seconds between the last keepalive ping and its pong (0 before the first)."""

    # -- what the broker calls --------------------------------------------------------------

    def start(self, on_messages: MessagesCallback) -> None:
        """Hand every data message to ``on_messages`` from now on (those that arrived since the
        handshake first), and start the keepalive."""
        self._on_messages = on_messages
        held, self._held = self._held, []
        if held:
            self._deliver(held)
        if self._transport is not None and not self._ended.done():
            self._transport.resume_reading()
            self._schedule_ping(self._ping_interval)

    async def wait_closed(self) -> None:
        """Wait for the connection to end, and raise why it did (never returns).

        Raises:
            websockets.exceptions.ConnectionClosed: it closed, or was cut.
            Exception: what ``on_messages`` raised (the connection is aborted then).
        """
        await asyncio.shield(self._ended)
        raise AssertionError("the end of a connection is always an exception")  # pragma: no cover

    async def send(self, message: str | bytes) -> None:
        """Send a text message (``str``, or its UTF-8 ``bytes``) without waiting for it to be
        written: what the broker sends is small and seldom.

        Raises:
            websockets.exceptions.ConnectionClosed: the connection is closing or closed.
        """
        protocol = self._protocol
        if protocol.state is not OPEN or self._ended.done():
            await self.wait_closed()
        protocol.send_text(message.encode() if isinstance(message, str) else message)
        self._write_out()

    async def close(self) -> None:
        """The close handshake (1000), waited for at most ``close_timeout`` seconds, then the
        TCP connection cut if the server has not closed it. Never raises."""
        if self._protocol.state is OPEN and self._transport is not None:
            self._protocol.send_close(1000)
            self._write_out()
            self._expect_close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(self._lost)
        self.abort()

    def abort(self) -> None:
        """Cut the TCP connection now (no close handshake)."""
        if self._transport is not None:
            self._transport.abort()

    # -- the opening handshake -------------------------------------------------------------

    async def _handshake(self, user_agent: str) -> None:
        protocol = self._protocol
        request = protocol.connect()
        request.headers["User-Agent"] = user_agent
        protocol.send_request(request)
        self._write_out()
        await asyncio.shield(self._answered)
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        if protocol.state is CONNECTING:  # (past it, the server may have closed already)
            raise InvalidHandshake("the connection closed during the opening handshake")

    def _handle_handshake(self, events: list[Event]) -> list[Event]:
        """Settle the handshake with its answer (the first event); the events after it."""
        if not events or self._answered.done():
            return events
        if isinstance(events[0], Response):
            self._answered.set_result(None)
            if self._protocol.handshake_exc is None and self._transport is not None:
                self._transport.pause_reading()  # nothing is read before start()
            return events[1:]
        return events

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._framing:
            self._frames(data)
        elif self._head is not None:
            self._answer(data)
        else:  # a refusal's body, or a connection closing: the protocol's
            messages: list[bytes] = []
            self._feed(data, messages)
            self._hand_over(messages)

    def _answer(self, data: bytes) -> None:
        """The handshake's answer, collected up to its blank line and given to the protocol
        alone: frames sent right behind it are read here (:meth:`_frames`)."""
        head = self._head
        assert head is not None
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= _MAX_HEAD:
            return
        cut = end + 4 if end >= 0 else len(head)  # (too long: the protocol refuses it)
        answer, rest = bytes(head[:cut]), bytes(head[cut:])
        self._head = None
        messages: list[bytes] = []
        self._feed(answer, messages)
        if self._protocol.state is OPEN:
            self._framing = True
            if rest:
                self._frames(rest)
        elif rest:
            self._feed(rest, messages)  # a refusal's body (or nothing it reads)
        self._hand_over(messages)

    def _frames(self, data: bytes) -> None:
        """The hot path: every whole, unmasked, unfragmented text or binary frame within
        ``max_size`` is cut out of the bytes right here, exactly as the protocol would read
        it; every other frame (ping, pong, close, a fragment, anything invalid) goes to the
        protocol whole, and a frame it must refuse (masked, too big) with everything after
        it. websockets' generator parser costs about 5 us a frame in the broker at 1,000
        frames/s; this loop well under one."""
        rest = self._rest
        if rest:
            rest += data
            if len(rest) < self._need:
                return  # (a large frame arriving in pieces: no copy per piece)
            data = bytes(rest)
            rest.clear()
        protocol = self._protocol
        messages: list[bytes] = []
        append = messages.append
        max_size = self._max_size
        fast = protocol.current_size is None  # no fragmented message in progress
        size = len(data)
        pos = 0
        need = 0
        while True:
            if size - pos < 2:
                need = 2
                break
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            if length < 126:
                start = pos + 2
            else:
                start = pos + (4 if length == 126 else 10)
                if start > size:
                    need = start - pos
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            if second & 0x80 or length > max_size:  # masked, or too big: refused
                self._feed(data[pos:], messages)
                pos = size
                break
            end = start + length
            if end > size:
                need = end - pos
                break
            if fast and first in _WHOLE_MESSAGE:
                append(data[start:end])
            else:
                self._feed(data[pos:end], messages)
                if not self._framing:  # it closed (or failed): it reads the rest
                    if end < size:
                        self._feed(data[end:], messages)
                    pos = size
                    break
                fast = protocol.current_size is None
            pos = end
        if pos < size:
            rest += data[pos:]
            self._need = need
        if messages:
            self._hand_over(messages)

    def _feed(self, data: bytes, messages: list[bytes]) -> None:
        """Give ``data`` to the protocol, send what it answers, act on what it read (the
        handshake's answer, pongs, fragments: whole messages are added to ``messages``)."""
        protocol = self._protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        writes = protocol.data_to_send()
        if writes:  # a pong, the echo of a close frame, our EOF
            self._write(writes)
            if protocol.close_expected():
                self._expect_close()
        if not self._answered.done():
            events = self._handle_handshake(events)
        for frame in cast("list[Frame]", events):  # (after the handshake, only frames)
            opcode = frame.opcode
            if (opcode is _BINARY or opcode is _TEXT) and frame.fin:
                messages.append(bytes(frame.data))
            else:
                self._other_frame(frame, messages)
        if protocol.state is not OPEN:
            self._framing = False

    def _hand_over(self, messages: list[bytes]) -> None:
        if not messages:
            return
        if self._on_messages is None:
            self._held.extend(messages)
        else:
            self._deliver(messages)

    def _deliver(self, messages: list[bytes]) -> None:
        on_messages = self._on_messages
        assert on_messages is not None
        if self._ended.done():
            return  # the connection already failed: nothing after that counts
        try:
            on_messages(messages)
        except Exception as exc:
            self._end(exc)
            self.abort()

    def _other_frame(self, frame: Frame, messages: list[bytes]) -> None:
        """Everything but a whole data message: fragments, pongs (pings and closes are
        answered by the protocol itself)."""
        opcode = frame.opcode
        data = bytes(frame.data)
        if opcode is _BINARY or opcode is _TEXT:  # the first fragment (fin unset)
            self._fragments = [data]
        elif opcode is _CONT:
            if self._fragments is not None:  # (the protocol checks the order)
                self._fragments.append(data)
                if frame.fin:
                    messages.append(b"".join(self._fragments))
                    self._fragments = None
        elif opcode is _PONG and data == self._ping:
            self._pong()

    def eof_received(self) -> bool:
        protocol = self._protocol
        if self._head:  # an answer that ends with the connection (no blank line)
            head, self._head = bytes(self._head), None
            self._feed(head, [])
        protocol.receive_eof()
        events = protocol.events_received()
        if not self._answered.done():
            self._handle_handshake(events)  # an HTTP answer without Content-Length ends here
        self._write_out()
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        protocol = self._protocol
        protocol.receive_eof()  # idempotent: the state is CLOSED after it
        for timer in (self._ping_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._close_timer = None
        if not self._answered.done():
            self._answered.set_result(None)  # handshake_exc says why (or the state does)
        if protocol.state is CLOSED:
            closed = protocol.close_exc
            closed.__cause__ = exc if self._failure is None else self._failure
            self._end(closed)
        else:  # pragma: no cover - receive_eof always closes the protocol
            self._end(ConnectionClosed(None, None))
        if not self._lost.done():
            self._lost.set_result(None)

    # -- keepalive -------------------------------------------------------------------------

    def _schedule_ping(self, delay: float | None) -> None:
        if delay is None or self._ended.done():
            return
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        self._ping_timer = self._loop.call_later(max(0.0, delay), self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if self._protocol.state is not OPEN:
            return
        self._ping = os.urandom(4)
        self._ping_sent = self._loop.time()
        self._protocol.send_ping(self._ping)
        self._write_out()
        if self._ping_timeout is not None:
            self._ping_timer = self._loop.call_later(self._ping_timeout, self._ping_late)

    def _pong(self) -> None:
        self.latency = self._loop.time() - self._ping_sent
        self._ping = None
        if self._ping_interval is not None:
            # websockets' rule: the next ping ping_interval after this one, at the earliest now
            self._schedule_ping(self._ping_interval - self.latency)

    def _ping_late(self) -> None:
        """No pong within ``ping_timeout``: fail the connection (1011), as websockets does."""
        self._ping_timer = None
        self._failure = TimeoutError("keepalive ping timeout")
        if self._protocol.state is OPEN:
            self._protocol.fail(_KEEPALIVE_CLOSE, "keepalive ping timeout")
            self._write_out()
        self.abort()  # the server is not answering: no close handshake to wait for

    # -- writing ---------------------------------------------------------------------------

    def _write_out(self) -> None:
        self._write(self._protocol.data_to_send())

    def _write(self, writes: list[bytes]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # (dropped: there is no one to send it to)
        for data in writes:
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop may raise RuntimeError here
                    transport.write_eof()
            else:
                transport.close()  # TLS: no half-close

    def _expect_close(self) -> None:
        """A close frame went out: the server has ``close_timeout`` to close the TCP
        connection before it is cut."""
        if self._close_timer is None and self._protocol.state is not CONNECTING:
            self._close_timer = self._loop.call_later(self._close_timeout, self.abort)

    def _end(self, exc: BaseException) -> None:
        if not self._ended.done():
            self._ended.set_exception(exc)
            self._ended.exception()  # retrieved: no "never retrieved" warning if unawaited


__all__ = ["MessagesCallback", "UpstreamConnection", "open_connection"]
