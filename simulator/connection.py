"""One client connection of the simulator: the websockets I/O around a pure Session.

Simulator layer, I/O adapter. Three loops per connection: the reader feeds client messages to
:class:`~simulator.session.Session` and acts on its outcome; the sender drains the outbox
that the hub fills (``await connection.send`` per frame, binary frames as Upbit sends); the
watchdog drops idle connections.

Idle rule (Upbit's exact rule is UNCONFIRMED; docs say 120 s, probes saw ~60 s): the timer
restarts whenever the client sends anything at all (any bytes reach the socket: a request, a
text PING, a protocol ping or pong) and whenever the simulator writes a frame to the
connection (data, UP, error, LIST answer). A connection that neither received nor sent for
``idle_timeout`` is aborted without a close frame, so the client sees code 1006. So a
subscribed busy connection never idles out, and a quiet one survives on protocol pings alone.
The timer does not run during a stall; it restarts when the stall ends.

Stall: input is held unread (so pings get no pong) and nothing is written, not even UP frames;
events of the stall are discarded, not queued. Held input is processed when the stall ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from broker.upbit.types import Format
from simulator.session import Listed, Pinged, Refused, Session, Subscribed

if TYPE_CHECKING:
    from simulator.server import Simulator

logger = logging.getLogger(__name__)

#: High-water mark of a connection's write buffer (also passed to ``serve(write_limit=...)``).
WRITE_LIMIT = 2**16
#: Frames written at once (and between two yields to the event loop).
BATCH = 512


def frame_header(length: int) -> bytes:
    """RFC 6455 header of an unfragmented binary frame from a server (never masked)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return b"\x82\x7e" + length.to_bytes(2, "big")
    return b"\x82\x7f" + length.to_bytes(8, "big")


class SimConnection(ServerConnection):
    """A websockets server connection that notes when bytes arrive and can hold them unread."""

    last_rx: float = 0.0
    _held: list[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        # Only an open connection stalls: operator HTTP requests and handshakes still work.
        if self._held is not None and self.protocol.state is State.OPEN:
            self._held.append(data)
            return
        super().data_received(data)

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        for data in held or ():
            if self.protocol.state is State.CLOSED:
                break
            super().data_received(data)

    def abort(self) -> None:
        """Cut the TCP connection: no close frame, the client sees 1006."""
        self.transport.abort()


class Peer:
    """Per-connection state of the I/O side: session, outbox, counters."""

    def __init__(self, sim: Simulator, ws: SimConnection, peer_id: int) -> None:
        self.sim = sim
        self.ws = ws
        self.id = peer_id
        self.session = Session(
            sim.listings, sim.config.message_rate, refuse_codes=sim.config.refuse_codes
        )
        self.outbox: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()  # set whenever the sender emptied the outbox
        self.frames_sent = 0
        self.last_tx = ws.loop.time()
        self.closing = False  # refused or aborted: nothing more is queued
        self.opened_ms = 0
        remote = ws.remote_address
        self.peer = f"{remote[0]}:{remote[1]}" if remote else "?"

    @property
    def format(self) -> Format:
        return self.session.format

    def push(self, frame: bytes) -> None:
        if self.closing:
            return
        if len(self.outbox) >= self.sim.config.max_outbox:
            # A client that cannot keep up is cut off rather than buffered without bound.
            self.sim.totals["overflow_drops"] += 1
            logger.warning("connection %d: outbox full, dropping it", self.id)
            self.abort()
            return
        self.outbox.append(frame)

    def abort(self) -> None:
        """Cut the connection without a close frame; whatever is queued is discarded."""
        self.closing = True
        self.outbox.clear()
        self.ws.abort()

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises ConnectionClosed."""
        tasks = {
            asyncio.create_task(self._sender(), name=f"sim-send-{self.id}"),
            asyncio.create_task(self._watchdog(), name=f"sim-idle-{self.id}"),
        }
        try:
            refusal = await self._reader()
            if refusal is not None:
                await self._close_after_error(refusal)
        finally:
            self.closing = True
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _reader(self) -> Refused | None:
        sim = self.sim
        loop = self.ws.loop
        try:
            async for message in self.ws:
                sim.totals["requests"] += 1
                outcome = self.session.receive(message, loop.time())
                if isinstance(outcome, Subscribed):
                    sim.subscribed(self, outcome.snapshots)
                elif isinstance(outcome, Listed):
                    self.push(outcome.frame)
                elif isinstance(outcome, Pinged):
                    pass  # the UP clock reads session.pinged
                else:
                    return outcome
                self.wake.set()
        except ConnectionClosed:
            pass
        return None

    async def _close_after_error(self, refusal: Refused) -> None:
        sim = self.sim
        sim.totals["errors"] += 1
        if refusal.rate_limited:
            sim.totals["rate_limited_messages"] += 1
        sim.hub.detach(self)
        # What was queued before the bad message still goes out; the error is the last frame.
        self.outbox.append(refusal.frame)
        self.drained.clear()
        self.closing = True
        self.wake.set()
        # Upbit closes 150-800 ms after the error frame.
        await asyncio.sleep(sim.config.error_close_delay)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(sim.config.close_timeout):
                await self.drained.wait()
        await self.ws.close(1000)

    async def _sender(self) -> None:
        sim = self.sim
        ws = self.ws
        outbox = self.outbox
        popleft = outbox.popleft
        transport = ws.transport
        log = sim.send_log
        # Without permessage-deflate a frame is just a header and the payload, so a burst
        # goes out framed by us in one write; with it, websockets frames (and compresses).
        framed = not ws.protocol.extensions
        only = (ws,)
        try:
            while True:
                if transport.is_closing() or ws.state is not State.OPEN:
                    outbox.clear()  # aborted or closing: no more data frames
                if not outbox or sim.stalled:
                    if not outbox:
                        self.drained.set()
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                if transport.get_write_buffer_size() >= WRITE_LIMIT:
                    frame = popleft()
                    if log is not None:
                        log.add(frame)
                    await ws.send(frame)  # the client lags: send() waits for the drain
                    self._count(1)
                    continue
                n = min(len(outbox), BATCH)
                if framed:
                    parts: list[bytes] = []
                    for _ in range(n):
                        frame = popleft()
                        if log is not None:
                            log.add(frame)
                        parts.append(frame_header(len(frame)))
                        parts.append(frame)
                    transport.write(b"".join(parts))
                else:
                    for _ in range(n):
                        frame = popleft()
                        if log is not None:
                            log.add(frame)
                        broadcast(only, frame)
                self._count(n)
                await asyncio.sleep(0)  # let the clocks and the other connections run
        except ConnectionClosed:
            return

    def _count(self, sent: int) -> None:
        self.frames_sent += sent
        self.sim.totals["frames_sent"] += sent
        self.last_tx = self.ws.loop.time()

    async def _watchdog(self) -> None:
        sim = self.sim
        loop = self.ws.loop
        timeout = sim.config.idle_timeout
        while True:
            if sim.stalled:
                await sim.wait_unstalled()
                continue
            last = max(self.ws.last_rx, self.last_tx, sim.stall_ended)
            remaining = last + timeout - loop.time()
            if remaining <= 0:
                logger.info("connection %d: idle for %.1f s, dropping it", self.id, timeout)
                sim.totals["idle_drops"] += 1
                self.abort()
                return
            await asyncio.sleep(remaining)

    def describe(self) -> dict[str, object]:
        """This connection as ``/_sim/state`` shows it."""
        return {
            "id": self.id,
            "peer": self.peer,
            "subscriptions": self.session.subscription_set().by_type(),
            "format": self.session.format.value,
            "frames_sent": self.frames_sent,
            "requests": self.session.requests,
            "ping": self.session.pinged,
            "queued": len(self.outbox),
            "opened_ms": self.opened_ms,
        }


__all__ = ["Peer", "SimConnection"]
