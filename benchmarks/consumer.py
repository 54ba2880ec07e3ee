"""A benchmark consumer process: count (and optionally time) every frame it receives.

Run by the benchmarks as ``python -m benchmarks.consumer MODE ...``, never imported by the
broker. Modes:

* ``hiredis``: a plain Redis subscriber on a blocking socket, replies parsed by
  ``hiredis.Reader`` (the leanest Python subscriber: it leaves the CPU to the broker);
* ``hiredis-sharded``: the same on a Redis Cluster's sharded pub/sub: ``--channels-file``
  lines are ``PORT CHANNEL``, one socket per master port, one ``SSUBSCRIBE`` per channel (a
  sharded subscription names channels of one slot), ``smessage`` replies;
* ``redis-py``: the same with redis-py's ``PubSub.listen()`` (what most applications use);
* ``redis-py-async``: redis-py's asyncio ``PubSub.listen()`` on the default event loop (the
  bare asyncio loop the consumer library is compared with);
* ``library``: this project's consumer library, ``BrokerClient.messages()`` on the same loop
  (it writes its own lease for the channels it is given, and heartbeats it, as any consumer
  does: that is part of what it costs);
* ``library-durable``: the same with ``durable=True``: it reads the history (``XREAD``) instead
  of the channels (issue 13's durable vs pub/sub latency);
* ``ws``: a bare websockets client on the simulator (the no-broker latency baseline, and the
  raw receive ceiling);
* ``floor``: the least a broker built of the same parts does with what it receives, on uvloop
  as the broker runs: the broker's own upstream adapter (``broker.upstream_connection``) on
  the simulator, every frame routed (``broker.upbit.router.route_frame``), and one write a
  socket read to Redis (``--port``) of ``PUBLISH {prefix}:{type}:{code} frame`` for each data
  frame (``--channel-prefix``, ``floor`` by default), replies read and discarded. No leases, no
  cache, no publisher bookkeeping: what receiving, routing and publishing alone cost on this
  machine (the whole-market benchmark's floor), and the least latency such a process adds (the
  latency benchmark's ``floor`` path, timed by a subscriber on those channels);
* ``wsraw``: ``--clients N`` WebSocket clients in one process, on raw blocking sockets under one
  ``selectors`` loop (no asyncio, no websockets library): the handshake by hand, server frames
  (unmasked, unfragmented, as Upbit, the simulator and the gateway send them) split by their
  headers. The leanest client Python allows, so that hundreds of gateway clients can run on a
  small machine without being the bottleneck. Client ``i`` sends line ``i`` (modulo their
  number) of ``--request-file``.

Control is line-based: the process prints ``ready`` once subscribed; on stdin ``count`` it
prints ``{"frames": N, "t": unix_time}``; on ``stop`` (or EOF) it writes its result JSON to
``--out`` and exits. With ``--record`` it keeps ``(receive time_ns, frame_key)`` of every data
frame (``simulator.sends.frame_key``: 64 bits of BLAKE2b over the exact bytes), taken once per
socket read, which is when the bytes reached this process.

Events (``{ns}:events``) are kept with the receive time of the first data frame after each, so
the recovery benchmark can tell when data flowed again after a ``connected`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from array import array
from typing import Any
from urllib.parse import urlsplit

_blake2b = hashlib.blake2b
MODES = (
    "hiredis",
    "hiredis-sharded",
    "redis-py",
    "redis-py-async",
    "library",
    "library-durable",
    "ws",
    "floor",
    "wsraw",
)


class Recorder:
    """Counts, optional (time, key) pairs, events with the first data frame after each."""

    def __init__(self, record: bool, events_channel: bytes | None) -> None:
        self.frames = 0
        self.record = record
        self.times = array("q")
        self.keys = array("Q")
        self.events_channel = events_channel
        self.events: list[list[Any]] = []  # [recv_ns, event, first data frame ns or None]
        self._await_data = False
        self.first_ns = 0
        self.last_ns = 0

    def data(self, payload: bytes, t_ns: int) -> None:
        self.frames += 1
        if not self.first_ns:
            self.first_ns = t_ns
        self.last_ns = t_ns
        if self._await_data:
            self.events[-1][2] = t_ns
            self._await_data = False
        if self.record:
            self.times.append(t_ns)
            self.keys.append(int.from_bytes(_blake2b(payload, digest_size=8).digest(), "big"))

    def event(self, payload: bytes, t_ns: int) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"raw": payload.decode("utf-8", "replace")}
        self.events.append([t_ns, body, None])
        self._await_data = True

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "events": self.events,
            "recv": list(zip(self.times, self.keys, strict=True)) if self.record else [],
            **extra,
        }


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def _control_line(buf: bytearray) -> str | None:
    if b"\n" not in buf:
        return None
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode().strip()


def _answer(rec: Recorder) -> None:
    sys.stdout.write(json.dumps({"frames": rec.frames, "t": time.time()}) + "\n")
    sys.stdout.flush()


def _finish(rec: Recorder, out: str, **extra: Any) -> None:
    with open(out, "w") as f:
        json.dump(rec.result(**extra), f)
    sys.stdout.write("done\n")
    sys.stdout.flush()


def run_hiredis(args: argparse.Namespace, channels: list[bytes]) -> None:
    import hiredis

    events = args.events.encode() if args.events else None
    rec = Recorder(args.record, events)
    sock = socket.create_connection((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    reader = hiredis.Reader()
    wanted = [*channels, *([events] if events else [])]
    for start in range(0, len(wanted), 500):
        sock.sendall(_resp(b"SUBSCRIBE", *wanted[start : start + 500]))
    confirmed = 0
    while confirmed < len(wanted):
        reader.feed(sock.recv(1 << 16))
        while (reply := reader.gets()) is not False:
            if isinstance(reply, list) and reply and reply[0] == b"subscribe":
                confirmed += 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "redis")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    control = bytearray()
    recv = sock.recv
    feed = reader.feed
    gets = reader.gets
    data = rec.data
    while True:
        for key, _ in sel.select():
            if key.data == "redis":
                chunk = recv(4 << 20)
                if not chunk:
                    _finish(rec, args.out, error="redis closed the connection")
                    return
                t = time.time_ns()
                feed(chunk)
                while (reply := gets()) is not False:
                    if reply[1] == events:
                        rec.event(reply[2], t)
                    else:
                        data(reply[2], t)
            elif _stdin_ended(rec, args.out, control):
                return


def run_hiredis_sharded(args: argparse.Namespace, lines: list[bytes]) -> None:
    """:func:`run_hiredis` over one socket per master of a cluster (``PORT CHANNEL`` lines)."""
    import hiredis

    rec = Recorder(args.record, None)
    by_port: dict[int, list[bytes]] = {}
    for line in lines:
        port, _, channel = line.partition(b" ")
        by_port.setdefault(int(port), []).append(channel)
    sel = selectors.DefaultSelector()
    for port, channels in by_port.items():
        sock = socket.create_connection((args.host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader = hiredis.Reader()
        sock.sendall(b"".join(_resp(b"SSUBSCRIBE", channel) for channel in channels))
        confirmed = 0
        while confirmed < len(channels):
            reader.feed(sock.recv(1 << 16))
            while (reply := reader.gets()) is not False:
                if isinstance(reply, list) and reply and reply[0] == b"ssubscribe":
                    confirmed += 1
                elif not isinstance(reply, list):
                    raise SystemExit(f"SSUBSCRIBE on {port} refused: {reply!r}")
        sel.register(sock, selectors.EVENT_READ, reader)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    control = bytearray()
    data = rec.data
    while True:
        for key, _ in sel.select():
            reader = key.data
            if reader is not None:
                chunk = key.fileobj.recv(4 << 20)  # type: ignore[union-attr]
                if not chunk:
                    _finish(rec, args.out, error="redis closed the connection")
                    return
                t = time.time_ns()
                reader.feed(chunk)
                while (reply := reader.gets()) is not False:
                    data(reply[2], t)
            elif _stdin_ended(rec, args.out, control):
                return


def _stdin_ended(rec: Recorder, out: str, control: bytearray) -> bool:
    """Read stdin (ready in a ``selectors`` loop) into ``control`` and obey its lines: ``count``
    answers, ``stop`` (or EOF) writes the result; True once it did (the process ends)."""
    chunk = os.read(sys.stdin.fileno(), 4096)
    if not chunk:
        _finish(rec, out)
        return True
    control += chunk
    while (line := _control_line(control)) is not None:
        if line == "count":
            _answer(rec)
        elif line == "stop":
            _finish(rec, out)
            return True
    return False


def _stdin_thread(rec: Recorder, out: str, done: threading.Event, **extra: Any) -> None:
    for line in sys.stdin:
        if line.strip() == "count":
            _answer(rec)
        elif line.strip() == "stop":
            break
    _finish(rec, out, **extra)
    done.set()
    os._exit(0)


def run_redis_py(args: argparse.Namespace, channels: list[bytes]) -> None:
    import redis

    events = args.events.encode() if args.events else None
    rec = Recorder(args.record, events)
    client = redis.Redis(host=args.host, port=args.port, socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    wanted = [*channels, *([events] if events else [])]
    for start in range(0, len(wanted), 500):
        pubsub.subscribe(*wanted[start : start + 500])
    # Drain the confirmations so "ready" means every channel is live.
    confirmed = 0
    while confirmed < len(wanted):
        msg = pubsub.parse_response(block=True)
        if msg and msg[0] == b"subscribe":
            confirmed += 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    done = threading.Event()
    threading.Thread(target=_stdin_thread, args=(rec, args.out, done), daemon=True).start()
    for msg in pubsub.listen():
        t = time.time_ns()
        if msg["type"] != "message":
            continue
        if msg["channel"] == events:
            rec.event(msg["data"], t)
        else:
            rec.data(msg["data"], t)


def _stdin_reader(rec: Recorder, stop: asyncio.Event) -> Any:
    """The stdin handler of the asyncio modes: ``count`` answers, ``stop`` or EOF sets ``stop``."""
    control = bytearray()

    def on_stdin() -> None:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            stop.set()
            return
        control.extend(chunk)
        while (line := _control_line(control)) is not None:
            if line == "count":
                _answer(rec)
            elif line == "stop":
                stop.set()

    return on_stdin


async def _serve(rec: Recorder, pump: Any) -> None:
    """Print ``ready``, run ``pump()`` until ``stop`` (or until it ends), then stop it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop.add_reader(sys.stdin.fileno(), _stdin_reader(rec, stop))
    task = asyncio.create_task(pump())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopper.cancel()
    loop.remove_reader(sys.stdin.fileno())


async def _run_redis_py_async(args: argparse.Namespace, channels: list[bytes]) -> None:
    from broker.redis_client import redis_client  # redis.asyncio.Redis: no retries, no pings

    events = args.events.encode() if args.events else None
    rec = Recorder(args.record, events)
    client = redis_client(f"redis://{args.host}:{args.port}/0")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    wanted = [*channels, *([events] if events else [])]
    for start in range(0, len(wanted), 500):
        await pubsub.subscribe(*wanted[start : start + 500])
    confirmed = 0
    while confirmed < len(wanted):
        msg = await pubsub.parse_response(block=True)
        if msg and msg[0] == b"subscribe":
            confirmed += 1

    async def pump() -> None:
        data = rec.data
        async for msg in pubsub.listen():
            t = time.time_ns()
            if msg["type"] != "message":
                continue
            if msg["channel"] == events:
                rec.event(msg["data"], t)
            else:
                data(msg["data"], t)

    await _serve(rec, pump)
    await pubsub.aclose()
    await client.aclose()
    _finish(rec, args.out)


def _source_digest(directory: str) -> str:
    """12 hex digits of SHA-256 over the package's sources as this process loaded them: which
    consumer library was measured, even when the tree changes during a run."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


async def _run_library(args: argparse.Namespace, channels: list[bytes]) -> None:
    import consumers
    from consumers.client import BrokerClient

    library = os.path.dirname(consumers.__file__)  # this tree, or --broker-root's
    digest = _source_digest(library)  # now: the sources just imported

    rec = Recorder(args.record, None)
    # channels are {namespace}:{stream}:{code}; the library subscribes by stream and codes
    by_stream: dict[str, list[str]] = {}
    namespace = ""
    for channel in channels:
        namespace, stream, code = channel.decode().split(":")
        by_stream.setdefault(stream, []).append(code)
    kinds = {"gap": 0, "lease": 0}
    async with BrokerClient(
        f"redis://{args.host}:{args.port}/0",
        client_id=f"bench-library-{os.getpid()}",
        namespace=namespace,
        **({"durable": True} if args.mode == "library-durable" else {}),
    ) as client:
        for stream, codes in by_stream.items():
            await client.subscribe(stream, codes)

        async def pump() -> None:
            data = rec.data
            async for item in client.messages():
                t = time.time_ns()
                if item.kind == "data":
                    data(item.raw, t)
                else:
                    kinds[item.kind] += 1

        await _serve(rec, pump)
        stats = client.stats
        extra = {
            "gaps": kinds["gap"],
            "lease_notices": kinds["lease"],
            "dropped": stats.dropped,
            "library_from": library,
            "library_digest": digest,
        }
    _finish(rec, args.out, **extra)


async def _run_ws(args: argparse.Namespace, request: str) -> None:
    from websockets.asyncio.client import connect

    rec = Recorder(args.record, None)
    async with connect(
        args.url, max_size=None, max_queue=None, compression=None, ping_interval=None
    ) as ws:
        await ws.send(request)

        async def pump() -> None:
            data = rec.data
            async for frame in ws:
                t = time.time_ns()
                data(frame if isinstance(frame, bytes) else frame.encode(), t)

        await _serve(rec, pump)
    _finish(rec, args.out)


class _Replies(asyncio.Protocol):
    """Redis's side of the floor's connection: replies read and dropped (a PUBLISH answers
    ``:N``, nothing to check); a lost connection noted."""

    def __init__(self) -> None:
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = repr(exc) if exc is not None else "redis closed the connection"


async def _run_floor(args: argparse.Namespace, request: str) -> None:
    from broker import resp
    from broker.upbit.router import FrameKind, route_frame
    from broker.upstream_connection import open_connection

    rec = Recorder(args.record, None)
    loop = asyncio.get_running_loop()
    redis, replies = await loop.create_connection(_Replies, args.host, args.port)
    # the broker's own connection settings (broker.upstream.Upstream._connect)
    ws = await open_connection(
        args.url,
        user_agent="upbit-broker-floor",
        max_size=16 * 2**20,
        open_timeout=10,
        ping_interval=20,
        ping_timeout=20,
        close_timeout=2,
    )
    prefixes: dict[tuple[str, str, float], bytes] = {}  # as the broker's table of targets
    prefix_name = args.channel_prefix
    data_kind = FrameKind.DATA
    data = rec.data
    write = redis.write

    def on_messages(frames: list[bytes]) -> None:
        t = time.time_ns()
        parts: list[bytes] = []
        add = parts.append
        for frame in frames:
            data(frame, t)
            r = route_frame(frame)
            if r.kind is data_kind:
                key = (r.type, r.code, r.level)
                prefix = prefixes.get(key)
                if prefix is None:
                    channel = f"{prefix_name}:{r.type}:{r.code}".encode()
                    prefix = prefixes[key] = resp.publish_prefix(channel)
                add(prefix)
                add(b"$%d\r\n" % len(frame))
                add(frame)
                add(b"\r\n")
        if parts:
            write(b"".join(parts))  # one write a read, as the broker's publisher

    ended: list[str] = []

    async def pump() -> None:
        try:
            await ws.wait_closed()
        except Exception as exc:  # (CancelledError, on stop, is no Exception)
            ended.append(repr(exc))

    ws.start(on_messages)
    await ws.send(request)
    await _serve(rec, pump)
    await ws.close()
    redis.close()
    errors = [*ended, *([replies.lost] if replies.lost else [])]
    _finish(rec, args.out, loop=type(loop).__module__, **({"error": errors} if errors else {}))


def _run_on_uvloop(main: Any) -> None:
    """``main`` on uvloop when installed (as ``upbit-broker run`` with ``--event-loop auto``)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


# -- wsraw: many raw-socket WebSocket clients in one process --------------------------------------


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """``payload`` as one masked frame, text by default (a client must mask; any mask does)."""
    mask = os.urandom(4)
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + body


def _upgrade(url: str) -> socket.socket:
    """A socket connected to ``url``'s server that has sent the WebSocket upgrade request."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


def _upgraded(sock: socket.socket, url: str) -> bytes:
    """Read the upgrade's answer (101, or raise); returns the bytes read beyond its headers."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"{url}: closed during the handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError(f"{url}: {status.decode(errors='replace')}")
    sock.settimeout(None)
    sock.setblocking(False)
    return rest


class RawClient:
    """One raw WebSocket client: its socket, unparsed bytes, frame count."""

    __slots__ = ("buf", "closed", "frames", "sock")

    def __init__(self, sock: socket.socket, rest: bytes) -> None:
        self.sock = sock
        self.buf = rest
        self.frames = 0
        self.closed: int | None = None  # the close code the server sent, or -1: cut


def _split(client: RawClient, rec: Recorder, t: int) -> None:
    """Count (and record) every whole frame in ``client.buf``; keep the tail."""
    buf = client.buf
    n = len(buf)
    pos = 0
    view = memoryview(buf)
    data = rec.data
    while n - pos >= 2:
        b1 = buf[pos + 1] & 0x7F
        if b1 < 126:
            start = pos + 2
            length = b1
        elif b1 == 126:
            if n - pos < 4:
                break
            start = pos + 4
            length = int.from_bytes(buf[pos + 2 : start], "big")
        else:
            if n - pos < 10:
                break
            start = pos + 10
            length = int.from_bytes(buf[pos + 2 : start], "big")
        end = start + length
        if end > n:
            break
        opcode = buf[pos] & 0x0F
        if opcode == 1 or opcode == 2:
            client.frames += 1
            data(view[start:end], t)
        elif opcode == 8:
            client.closed = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
        elif opcode == 9:  # a ping: the pong carries its payload back
            client.sock.send(_masked(bytes(view[start:end]), 0xA))
        pos = end
    client.buf = buf[pos:] if pos else buf


def run_wsraw(args: argparse.Namespace, requests: list[str]) -> None:
    rec = Recorder(args.record, None)
    # Every upgrade request first, then every answer: the server handshakes them together.
    socks = [_upgrade(args.url) for _ in range(args.clients)]
    clients = [RawClient(sock, _upgraded(sock, args.url)) for sock in socks]
    for i, client in enumerate(clients):
        client.sock.sendall(_masked(requests[i % len(requests)].encode()))
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    control = bytearray()

    def finish() -> None:
        per_client = [c.frames for c in clients]
        closes: dict[str, int] = {}
        for c in clients:
            if c.closed is not None:
                closes[str(c.closed)] = closes.get(str(c.closed), 0) + 1
        _finish(rec, args.out, clients=len(clients), per_client=per_client, closes=closes)

    while True:
        for key, _ in sel.select():
            client = key.data
            if client is None:
                chunk = os.read(sys.stdin.fileno(), 4096)
                if not chunk:
                    finish()
                    return
                control += chunk
                while (line := _control_line(control)) is not None:
                    if line == "count":
                        _answer(rec)
                    elif line == "stop":
                        finish()
                        return
                continue
            try:
                chunk = client.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(client.sock)
                client.sock.close()
                if client.closed is None:
                    client.closed = -1
                continue
            t = time.time_ns()
            client.buf = client.buf + chunk if client.buf else chunk
            _split(client, rec, t)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark consumer")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--channels-file", help="one channel per line (redis modes)")
    parser.add_argument("--events", help="also subscribe to this events channel")
    parser.add_argument("--url", help="websocket URL (ws, floor and wsraw modes)")
    parser.add_argument(
        "--request-file",
        help="the subscribe request to send (ws, floor); one request per line (wsraw mode)",
    )
    parser.add_argument("--clients", type=int, default=1, help="connections (wsraw mode)")
    parser.add_argument(
        "--channel-prefix",
        default="floor",
        help="the floor's channels are PREFIX:{type}:{code} (floor mode)",
    )
    parser.add_argument("--record", action="store_true", help="keep (time, key) per frame")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    if args.mode == "ws":
        with open(args.request_file) as f:
            request = f.read()
        asyncio.run(_run_ws(args, request))
        return
    if args.mode == "floor":
        with open(args.request_file) as f:
            request = f.read()
        _run_on_uvloop(_run_floor(args, request))
        return
    if args.mode == "wsraw":
        with open(args.request_file) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        run_wsraw(args, lines)
        return
    with open(args.channels_file, "rb") as f:
        channels = [line.strip() for line in f if line.strip()]
    if args.mode == "hiredis":
        run_hiredis(args, channels)
    elif args.mode == "hiredis-sharded":
        run_hiredis_sharded(args, channels)
    elif args.mode == "redis-py":
        run_redis_py(args, channels)
    elif args.mode == "redis-py-async":
        asyncio.run(_run_redis_py_async(args, channels))
    else:
        asyncio.run(_run_library(args, channels))


if __name__ == "__main__":
    main()
