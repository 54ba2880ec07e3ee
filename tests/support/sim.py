"""The Upbit simulator for tests: start one in-process on a free port, talk to it.

    async with running_simulator(rate=500, seed=1) as sim:
        ... sim.url ...                       # ws://127.0.0.1:PORT/websocket/v1
        state = await fetch_state(sim)        # GET /_sim/state over real HTTP
        await http_get(sim, "/_sim/drop")     # any operator or REST endpoint

WebSocket helpers: ``async with client(sim) as ws`` connects; ``subscribe(ws, {"type":
"trade", "codes": [...]}, fmt="SIMPLE")`` sends a request; ``read_until(ws, predicate)`` and
``read_for(ws, seconds)`` collect decoded frames (asserting they came as binary frames, as
Upbit sends them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from broker import testing
from broker.testing import scaled
from simulator import Simulator


@asynccontextmanager
async def running_simulator(**config: Any) -> AsyncIterator[Simulator]:
    """A started :class:`Simulator` on 127.0.0.1 and a free port, closed on exit."""
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", 0)
    async with Simulator(**config) as sim:
        yield sim


async def http_get(target: Simulator | str, path: str, within: float = 5.0) -> tuple[int, Any]:
    """GET ``path`` from the simulator (or a base ``http://host:port`` URL): (status, body).

    The body is decoded JSON, or text when it is not JSON (:func:`broker.testing.http_get`).
    """
    base = target.http_url if isinstance(target, Simulator) else target
    return await testing.http_get(base, path, within)


async def fetch_state(target: Simulator | str) -> dict[str, Any]:
    """``GET /_sim/state`` over real HTTP."""
    status, body = await http_get(target, "/_sim/state")
    if status != 200:
        raise AssertionError(f"/_sim/state answered {status}: {body!r}")
    assert isinstance(body, dict)
    return body


def client(target: Simulator | str, **kwargs: Any) -> connect:
    """``connect(sim.url)`` (or a ``ws://`` URL) for tests: an unbounded receive queue.

    With websockets' default ``max_queue=16``, a test that stops reading while frames still
    flow pauses the socket, never sees the close handshake's answer and waits out the close
    timeout (10 s) on exit.
    """
    kwargs.setdefault("max_queue", None)
    return connect(target.url if isinstance(target, Simulator) else target, **kwargs)


async def subscribe(
    ws: ClientConnection, *objects: dict[str, Any], fmt: str | None = None, ticket: str = "test"
) -> None:
    """Send ``[{ticket}, *objects, {format}]`` as a text frame."""
    body: list[dict[str, Any]] = [{"ticket": ticket}, *objects]
    if fmt is not None:
        body.append({"format": fmt})
    await ws.send(json.dumps(body))


async def recv_frame(ws: ClientConnection, within: float = 5.0) -> Any:
    """The next frame, decoded; it must be a binary frame."""
    return await _recv(ws, scaled(within))


async def _recv(ws: ClientConnection, seconds: float) -> Any:
    async with asyncio.timeout(seconds):
        raw = await ws.recv()
    assert isinstance(raw, bytes), f"expected a binary frame, got text {raw!r}"
    return msgspec.json.decode(raw)


async def read_until(
    ws: ClientConnection, done: Callable[[list[Any]], bool], within: float = 5.0
) -> list[Any]:
    """Decoded frames, read until ``done(frames_so_far)``; fails after ``within`` seconds."""
    frames: list[Any] = []
    deadline = time.monotonic() + scaled(within)
    while not done(frames):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"condition not met within {within}s; {len(frames)} frames")
        try:
            frames.append(await _recv(ws, left))
        except TimeoutError:
            continue
    return frames


async def read_for(ws: ClientConnection, seconds: float) -> list[Any]:
    """Every frame that arrives in the next ``seconds`` (an observation window)."""
    frames: list[Any] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frames.append(await _recv(ws, left))
        except TimeoutError:
            break
    return frames


__all__ = [
    "client",
    "fetch_state",
    "http_get",
    "read_for",
    "read_until",
    "recv_frame",
    "running_simulator",
    "subscribe",
]
