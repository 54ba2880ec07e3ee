"""Test-only helpers around the process harness of :mod:`broker.testing`.

The processes themselves (``simulator_process``, ``broker_process``, ``consumer_process``,
``run_cli``, ``RedisServer``) are the package's public testing API; what stays here checks
this project's own guarantees:

    async with (
        running_simulator(rate=300) as sim,                      # tests.support.sim
        broker_process(redis_url, sim.url, "b1", tmp_path) as broker,          # broker.testing
        consumer_process(redis_url, "c1", {"trade": ["KRW-BTC"]}, tmp_path) as c,
    ):
        log = record_data_sends(sim)      # every data frame the simulator sends
        sim.drop(); ... c.messages(), c.gaps(), c.last_stats()
        audit_consumer(log, c, {("trade", "KRW-BTC")}, gap_windows(c), ...)

:func:`audit_consumer` (every frame a consumer got, against the simulator's send log),
:func:`unannounced_connections` (new upstream connections a consumer was told no gap for),
:func:`stopped_counts` (the frame counts a broker process logs as it stops),
:class:`MonitorTap` (every command Redis executes, checked against the key contract),
:func:`churn_process` (tasks flipping leases) and :class:`FakeUpstream`, a scripted websocket
server standing in for the simulator where it cannot misbehave on purpose (bad frames) or show
what we check (headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.testing import ConsumerProcess, clean_env, wait_for
from broker.upbit.router import FrameKind, route_frame
from simulator.sends import frame_key

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def upstream_of(state: dict[str, Any]) -> dict[str, set[str]] | None:
    """The one upstream connection's set in a ``/_sim/state`` (None: not exactly one)."""
    conns = state["connections"]
    if len(conns) != 1:
        return None
    return {t: set(codes) for t, codes in conns[0]["subscriptions"].items()}


# -- lease churn ----------------------------------------------------------------------------

# N asyncio tasks, each with its own Redis connection and LeaseStore, add and remove codes at
# random for ``duration`` seconds; each ends holding its last set (long TTL) or nothing.
CHURN_SCRIPT = r"""
import asyncio, json, os, random, sys, time
import redis.asyncio as aioredis
from broker.leases import LeaseStore
from broker.upbit.types import SubscriptionSet

async def worker(cfg, index, counts):
    rng = random.Random(cfg["seed"] * 1000 + index)
    client_id = f"{cfg['prefix']}-{index}"
    redis = aioredis.Redis.from_url(cfg["redis_url"])
    store = LeaseStore(redis, cfg["namespace"])
    mine = set()
    deadline = time.monotonic() + cfg["duration"]
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(cfg["min_pause"], cfg["max_pause"]))
            # hold at most max_held streams: the union keeps changing instead of saturating
            if mine and (len(mine) >= cfg["max_held"] or rng.random() < 0.4):
                mine.discard(rng.choice(sorted(mine)))
            else:
                mine.add((rng.choice(cfg["types"]), rng.choice(cfg["codes"])))
            if mine:
                subs = {}
                for t, c in mine:
                    subs.setdefault(t, []).append(c)
                await store.write(client_id, SubscriptionSet.of(subs), ttl_ms=cfg["ttl_ms"],
                                  host="churn", pid=os.getpid())
                counts["writes"] += 1
            else:
                await store.release(client_id)
                counts["releases"] += 1
    finally:
        await redis.aclose()

async def main():
    cfg = json.loads(sys.argv[1])
    counts = {"writes": 0, "releases": 0}
    await asyncio.gather(*(worker(cfg, cfg["first"] + i, counts) for i in range(cfg["tasks"])))
    print(json.dumps(counts), flush=True)

asyncio.run(main())
"""


def churn_process(
    redis_url: str, *, first: int, tasks: int, codes: list[str], duration: float, seed: int,
    types: list[str] | None = None, namespace: str = "t", prefix: str = "churn",
    ttl_ms: int = 120_000, min_pause: float = 0.2, max_pause: float = 1.2, max_held: int = 2,
) -> subprocess.Popen[str]:  # fmt: skip
    cfg = {
        "redis_url": redis_url,
        "namespace": namespace,
        "first": first,
        "tasks": tasks,
        "codes": codes,
        "types": types or ["ticker", "trade"],
        "duration": duration,
        "seed": seed,
        "prefix": prefix,
        "ttl_ms": ttl_ms,
        "min_pause": min_pause,
        "max_pause": max_pause,
        "max_held": max_held,
    }
    return subprocess.Popen(
        [PYTHON, "-c", CHURN_SCRIPT, json.dumps(cfg)],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- what the simulator sent, and what consumers got -----------------------------------------


class DataSendLog:
    """A drop-in for the simulator's send log that keeps DATA frames only, with their stream.

    Install it on an in-process :class:`~simulator.Simulator` before the broker connects
    (:func:`record_data_sends`); every data frame the simulator writes to any connection is
    then ``(time_ns, frame_key, type, code, stream_type)``. UP frames, LIST_SUBSCRIPTIONS
    answers and error frames are left out: no consumer ever receives those.
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, int, str, str, str]] = []

    def add(self, frame: bytes) -> None:
        route = route_frame(frame)
        if route.kind is FrameKind.DATA:
            self.records.append(
                (time.time_ns(), frame_key(frame), route.type, route.code, route.stream_type)
            )

    def __len__(self) -> int:
        return len(self.records)

    def entries(self, clear: bool = False) -> list[tuple[int, int]]:
        out = [(t, k) for t, k, *_ in self.records]
        if clear:
            self.records = []
        return out


def record_data_sends(sim: Any) -> DataSendLog:
    log = DataSendLog()
    sim.send_log = log
    return log


@dataclass
class Audit:
    """One consumer's delivery, checked frame by frame against what the simulator sent."""

    client_id: str
    expected: int = 0  # data frames sent upstream for its streams while it was subscribed
    received: int = 0  # data frames it recorded
    lost_in_gaps: int = 0  # expected, not received, sent inside a reported gap
    lost_silently: int = 0  # expected, not received, and no gap says so: a real loss
    duplicates: int = 0  # REALTIME frames received more than once
    foreign: int = 0  # frames received that the simulator never sent
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.client_id}: expected={self.expected} received={self.received} "
            f"lost_in_gaps={self.lost_in_gaps} lost_silently={self.lost_silently} "
            f"duplicates={self.duplicates} foreign={self.foreign}"
        )


def audit_consumer(
    log: DataSendLog,
    consumer: ConsumerProcess,
    streams: set[tuple[str, str]],
    windows: list[tuple[int, int]],
    *,
    start_ms: int,
    end_ms: int,
    slack_ms: int = 150,
) -> Audit:
    """Compare the frames the simulator sent for ``streams`` between ``start_ms`` and
    ``end_ms`` with what ``consumer`` recorded. A frame that never arrived is a loss *in a gap*
    when it was sent inside one of ``windows`` (``(since_ms, until_ms)`` of every gap the
    consumer was told about, broker or local), widened by ``slack_ms``; otherwise it is lost
    silently."""
    audit = Audit(consumer.client_id)
    got: dict[int, int] = {}
    realtime: dict[int, int] = {}
    for record in consumer.messages():
        raw = record["raw"].encode()
        key = frame_key(raw)
        got[key] = got.get(key, 0) + 1
        if route_frame(raw).stream_type == "REALTIME":
            realtime[key] = realtime.get(key, 0) + 1
    audit.received = sum(got.values())
    audit.duplicates = sum(n - 1 for n in realtime.values() if n > 1)
    sent_keys = set()
    for t_ns, key, type_, code, _ in log.records:
        sent_keys.add(key)
        t_ms = t_ns // 1_000_000
        if (type_, code) not in streams or not start_ms <= t_ms <= end_ms:
            continue
        audit.expected += 1
        if key in got:
            continue
        if any(since - slack_ms <= t_ms <= until + slack_ms for since, until in windows):
            audit.lost_in_gaps += 1
        else:
            audit.lost_silently += 1
            if len(audit.examples) < 5:
                audit.examples.append(f"{type_}:{code} sent at {t_ms}")
    audit.foreign = sum(1 for key in got if key not in sent_keys)
    return audit


async def delivered_past(
    log: DataSendLog,
    consumer: ConsumerProcess,
    streams: set[tuple[str, str]],
    end_ms: int,
    within: float = 30.0,
) -> None:
    """Wait until ``consumer`` has recorded a frame of ``streams`` that the simulator sent after
    ``end_ms``: then every frame sent up to ``end_ms`` has been received or lost, never still on
    its way, since frames reach a pub/sub consumer in the order the simulator sent them (one
    upstream socket, one publishing connection, one subscriber connection). A fixed sleep
    instead lets a consumer that lags on a loaded machine count as a silent loss."""

    def past() -> bool:
        later = set()
        for t_ns, key, type_, code, _ in reversed(log.records):
            if t_ns // 1_000_000 <= end_ms:
                break
            if (type_, code) in streams:
                later.add(key)
        for m in reversed(consumer.messages()):
            if int(m["t"]) <= end_ms:  # received by then: sent by then (one clock, this host)
                return False
            if frame_key(m["raw"].encode()) in later:
                return True
        return False

    await wait_for(past, within, interval=0.1, message=f"{consumer.client_id} past {end_ms}")


def gap_windows(
    consumer: ConsumerProcess, broker_events: list[dict[str, Any]] | None = None
) -> list[tuple[int, int]]:
    """Every gap ``consumer`` recorded, plus ``broker_events`` seen by an observer."""
    windows = [(int(g["since_ms"]), int(g["until_ms"])) for g in consumer.gaps()]
    for event in broker_events or ():
        if event.get("event") == "gap":
            windows.append((int(event["since_ms"]), int(event["until_ms"])))
    return windows


def unannounced_connections(
    consumer: ConsumerProcess, connected: list[dict[str, Any]], *, slack_ms: int = 150
) -> list[dict[str, Any]]:
    """The ``connected`` events (``{"epoch", "ts_ms", ...}`` from an :class:`EventTap`) that
    follow data ``consumer`` received, and that it got no gap for: a gap of that epoch from no
    later than its last frame before the connection (``slack_ms`` for two processes' clocks)
    to the connection itself. Such a connection follows a break (a reconnect, a takeover, a
    restart) in which frames may have been missed, whether or not the simulator sent any
    meanwhile: Upbit does not stop trading while no broker listens, so the send log alone
    cannot tell a gap nobody announced."""
    received = sorted(int(m["t"]) for m in consumer.messages())
    gaps = consumer.gaps()
    missing: list[dict[str, Any]] = []
    for event in sorted(connected, key=lambda e: int(e["epoch"])):
        ts = int(event["ts_ms"])
        before = [t for t in received if t < ts]
        if not before:
            continue  # nothing flowed before it: nothing to miss
        if not any(
            g.get("epoch") == event["epoch"]
            and int(g["since_ms"]) <= before[-1] + slack_ms
            and int(g["until_ms"]) >= ts
            for g in gaps
        ):
            missing.append(event)
    return missing


_STOPPED = re.compile(
    r"broker (?P<id>\S+) stopping: frames_in=(?P<frames_in>\d+) "
    r"frames_published=(?P<published>\d+) frames_dropped=(?P<dropped>\d+) "
    r"frames_dropped_by_reason=(?P<by_reason>\{[^}]*\})"
)


def stopped_counts(output: str) -> dict[str, Any] | None:
    """The frame counts a broker process logged as it stopped (``Broker`` logs one line):
    ``{"frames_in", "frames_published", "frames_dropped", "frames_dropped_by_reason"}``; None
    when its output has no such line (killed, or still running)."""
    found = _STOPPED.search(output)
    if found is None:
        return None
    return {
        "frames_in": int(found["frames_in"]),
        "frames_published": int(found["published"]),
        "frames_dropped": int(found["dropped"]),
        "frames_dropped_by_reason": json.loads(found["by_reason"]),
    }


def sim_upstream(sim: Any) -> dict[str, set[str]] | None:
    """An in-process simulator's one connection's set (None: not exactly one connection)."""
    return upstream_of(sim.state())


def union_of(*subs: dict[str, list[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for one in subs:
        for type_, codes in one.items():
            out.setdefault(type_, set()).update(codes)
    return out


# -- every command Redis executes ----------------------------------------------------------

_MONITOR_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_CODE = r"[A-Z]{2,6}-[A-Z0-9]{1,16}"
_STREAM = (
    r"(?:ticker|trade|orderbook(?:@[0-9][0-9.eE+-]{0,31})?"
    r"|candle\.(?:1s|1m|3m|5m|10m|15m|30m|60m|240m))"
)


def contract_key_re(namespace: str = "t") -> re.Pattern[str]:
    """Every key and channel name the contract allows in ``namespace`` (design.md)."""
    ns = re.escape(namespace)
    return re.compile(
        rf"{ns}:(?:leases|control|requests|leader|epoch|status|events"
        rf"|lease:{_NAME}|reply:{_NAME}|last:{_STREAM}|hist:{_STREAM}:{_CODE}|{_STREAM}:{_CODE})"
    )


CODE_RE = re.compile(_CODE)

#: command -> positions of key/channel arguments ("all": every argument)
_KEY_ARGS: dict[str, Any] = {
    "PUBLISH": [1], "SUBSCRIBE": "all", "UNSUBSCRIBE": "all", "HSET": [1], "HMGET": [1],
    "HGETALL": [1], "HGET": [1], "GET": [1], "SET": [1], "INCR": [1], "PEXPIRE": [1],
    "LPOP": [1], "RPUSH": [1], "BLPOP": "all-but-last", "LREM": [1], "ZRANGE": [1],
    "ZRANGEBYSCORE": [1], "ZREM": [1], "ZADD": [1], "DEL": "all", "EXISTS": "all",
    "EXPIRE": [1], "HDEL": [1],
}  # fmt: skip


def _unescape(token: bytes) -> str:
    return token.decode("unicode_escape", "replace")


class MonitorTap:
    """Records every command Redis executes (``MONITOR`` on a raw connection).

    ``audit(skip_addresses)`` checks the key and channel arguments of every recorded command
    against :func:`contract_key_re`, and the fields of every last-value-cache HSET against the
    code shape, ignoring the connections in ``skip_addresses`` (the test's own writers).
    """

    def __init__(self, host: str, port: int, password: str | None = None) -> None:
        self.host, self.port, self.password = host, port, password
        self.commands: list[tuple[str, list[str]]] = []  # (client address, [command, args...])
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MonitorTap:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**26)
        if self.password is not None:
            writer.write(f"AUTH {self.password}\r\n".encode())
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        if self.password is not None:
            await reader.readline()
        assert (await reader.readline()).startswith(b"+OK")
        self._writer = writer

        async def pump() -> None:
            while line := await reader.readline():
                head, _, rest = line.partition(b"]")
                address = head.rsplit(b" ", 1)[-1].decode()
                args = [_unescape(t) for t in _MONITOR_TOKEN.findall(rest)]
                if args:
                    self.commands.append((address, args))

        self._task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()

    def audit(self, skip_addresses: set[str], namespace: str = "t") -> list[str]:
        """Key/channel arguments outside the contract, as ``"COMMAND arg"`` strings."""
        allowed = contract_key_re(namespace)
        bad: list[str] = []
        for address, args in self.commands:
            if address in skip_addresses:
                continue
            name = args[0].upper()
            keys: list[str] = []
            if name in ("EVALSHA", "EVAL") and len(args) > 2 and args[2].isdigit():
                keys = args[3 : 3 + int(args[2])]
            elif name == "SCAN" and "MATCH" in (a.upper() for a in args):
                pattern = args[[a.upper() for a in args].index("MATCH") + 1]
                if pattern != f"{namespace}:lease:*":
                    bad.append(f"SCAN MATCH {pattern!r}")
            else:
                spec = _KEY_ARGS.get(name)
                if spec == "all":
                    keys = args[1:]
                elif spec == "all-but-last":
                    keys = args[1:-1]
                elif spec:
                    keys = [args[i] for i in spec if i < len(args)]
            bad += [f"{name} {k!r}" for k in keys if not allowed.fullmatch(k)]
            if name == "HSET" and len(args) > 1 and args[1].startswith(f"{namespace}:last:"):
                bad += [
                    f"HSET {args[1]} field {f!r}" for f in args[2::2] if not CODE_RE.fullmatch(f)
                ]
        return bad


# -- a scripted fake upstream ---------------------------------------------------------------


@dataclass
class FakeConnection:
    headers: dict[str, str]
    received: list[str | bytes] = field(default_factory=list)


class FakeUpstream:
    """A websocket server that answers the broker like Upbit would, plus scripted frames.

    It records every connection's request headers and messages, answers LIST_SUBSCRIPTIONS
    with the last subscribe request's set, and after the first subscribe calls
    ``play(ws, conn)`` (a coroutine) which sends whatever frames the test wants.
    """

    def __init__(self, play: Callable[[Any, FakeConnection], Awaitable[None]]) -> None:
        self.play = play
        self.connections: list[FakeConnection] = []
        self.played = asyncio.Event()
        self._server: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket/v1"

    async def __aenter__(self) -> FakeUpstream:
        from websockets.asyncio.server import serve

        self._server = await serve(
            self._handler, "127.0.0.1", 0, max_size=None, ping_interval=None, compression=None
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        conn = FakeConnection(headers={k.lower(): v for k, v in ws.request.headers.raw_items()})
        self.connections.append(conn)
        last_subs: list[dict[str, Any]] = []
        player: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                conn.received.append(message)
                text = message if isinstance(message, str) else message.decode()
                if text.strip() == "PING":
                    await ws.send(b'{"status":"UP"}')
                    continue
                request = json.loads(text)
                objects = [o for o in request if isinstance(o, dict)]
                if any(o.get("method") == "LIST_SUBSCRIPTIONS" for o in objects):
                    ticket = next((o["ticket"] for o in objects if "ticket" in o), "")
                    reply = {"method": "LIST_SUBSCRIPTIONS", "result": last_subs, "ticket": ticket}
                    await ws.send(json.dumps(reply).encode())
                    continue
                last_subs = [
                    {"type": o["type"], "codes": o["codes"]}
                    for o in objects
                    if "type" in o and not o.get("is_only_snapshot")
                ]
                if player is None:
                    player = asyncio.create_task(self._play(ws, conn))
        except ConnectionClosed:
            pass
        finally:
            if player is not None:
                player.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await player

    async def _play(self, ws: Any, conn: FakeConnection) -> None:
        await self.play(ws, conn)
        self.played.set()


__all__ = [
    "PYTHON",
    "ROOT",
    "Audit",
    "DataSendLog",
    "FakeConnection",
    "FakeUpstream",
    "MonitorTap",
    "audit_consumer",
    "churn_process",
    "contract_key_re",
    "gap_windows",
    "record_data_sends",
    "sim_upstream",
    "stopped_counts",
    "unannounced_connections",
    "union_of",
    "upstream_of",
]
