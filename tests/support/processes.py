"""Real processes for reliability and security scenarios: brokers, consumers, the simulator.

Everything here runs what production runs (``upbit-broker run``, ``upbit-broker simulate``, a
:class:`~consumers.BrokerClient` in its own interpreter) as a subprocess, with its output in a
file under the test's directory, so a test can SIGKILL or SIGSTOP it, read what it said and
grep it. The context managers are async: waiting for a process never blocks the event loop,
so an in-process simulator or fake upstream keeps serving it meanwhile.

    async with (
        running_simulator(rate=300) as sim,                      # tests.support.sim
        broker_process(redis_url, sim.url, "b1", tmp_path) as broker,
        consumer_process(redis_url, "c1", {"trade": ["KRW-BTC"]}, tmp_path) as c,
    ):
        log = record_data_sends(sim)      # every data frame the simulator sends
        sim.drop(); ... c.messages(), c.gaps(), c.last_stats()
        audit_consumer(log, c, {("trade", "KRW-BTC")}, gap_windows(c), ...)

Also here: :class:`AuthRedis` (a redis-server with ``requirepass``/ACL users, or TLS only,
which the shared :class:`~tests.support.redis_server.RedisServer` cannot probe),
:class:`MonitorTap` (every command Redis executes, checked against the key contract),
:func:`run_cli` (one CLI command, its exit code and output), :func:`churn_process` (tasks
flipping leases) and :class:`FakeUpstream`, a scripted websocket server standing in for the
simulator where it cannot misbehave on purpose (bad frames) or show what we check (headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.upbit.router import FrameKind, route_frame
from simulator.sends import frame_key
from tests.support.redis_server import RedisServer
from tests.support.wait import scaled, wait_for

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

#: The broker settings every process scenario starts from (seconds; env ``UPBIT_BROKER_*``).
FAST_BROKER_ENV: dict[str, str] = {
    "UPBIT_BROKER_NAMESPACE": "t",
    "UPBIT_BROKER_LEASE_TTL": "3",
    "UPBIT_BROKER_LEADER_TTL": "1.5",
    "UPBIT_BROKER_STATUS_INTERVAL": "0.2",
    "UPBIT_BROKER_COALESCE_DELAY": "0.02",
    "UPBIT_BROKER_RECONCILE_INTERVAL": "0.5",
    "UPBIT_BROKER_BACKOFF_INITIAL": "0.1",
    "UPBIT_BROKER_BACKOFF_MAX": "1.0",
    "UPBIT_BROKER_BACKOFF_RESET_AFTER": "0.5",
}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``UPBIT_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None, *, stdout: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``args`` in the project root; stderr (and stdout) appended to ``log``.

    A plain function, not a coroutine: Popen and open() return at once, and keeping them out
    of ``async def`` keeps the event-loop lint about what really blocks meaningful.
    """
    with open(log, "ab") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=env or clean_env(),
            stdout=out if stdout else subprocess.DEVNULL,
            stderr=out,
        )


async def _astop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; waits in a thread so in-process servers (the
    simulator, a fake upstream) keep answering the process while it shuts down."""
    await asyncio.to_thread(_stop, proc, timeout)


def workdir(prefix: str = "upbit-rel-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- the simulator --------------------------------------------------------------------------


@dataclass
class SimProcess:
    """``upbit-broker simulate`` in a subprocess, driven through its operator endpoints."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def http_url(self) -> str:
        return self.url.replace("ws://", "http://").split("/websocket")[0]

    @property
    def port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    def get(self, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.get("/_sim/state")
        return state

    async def astate(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.state)

    def drop(self) -> int:
        return int(self.get("/_sim/drop")["dropped"])

    def stall(self, seconds: float) -> None:
        self.get(f"/_sim/stall?seconds={seconds}")

    def mute(self, codes: list[str], seconds: float) -> None:
        self.get(f"/_sim/mute?codes={','.join(codes)}&seconds={seconds}")

    def connections(self) -> list[dict[str, Any]]:
        conns: list[dict[str, Any]] = self.state()["connections"]
        return conns

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = self.state()["totals"]
        return totals


def upstream_of(state: dict[str, Any]) -> dict[str, set[str]] | None:
    """The one upstream connection's set in a ``/_sim/state`` (None: not exactly one)."""
    conns = state["connections"]
    if len(conns) != 1:
        return None
    return {t: set(codes) for t, codes in conns[0]["subscriptions"].items()}


@asynccontextmanager
async def simulator_process(
    directory: Path | None = None, *, port: int = 0, **options: Any
) -> AsyncIterator[SimProcess]:
    """Start ``upbit-broker simulate`` (``options`` are its flags: ``rate=200``,
    ``messages_per_minute=3``, ``connect_rate=1`` ...) and wait until it serves."""
    directory = directory or workdir()
    log = directory / f"sim-{time.monotonic_ns()}.log"
    args = [PYTHON, "-m", "cli.main", "simulate", "--port", str(port), "--log-level", "WARNING"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    proc = _spawn(args, log)
    try:
        url = await wait_for(
            lambda: _serving_url(log, proc), timeout=20, message="simulator serving"
        )
        yield SimProcess(proc, url, log)
    finally:
        await _astop(proc)


def _serving_url(log: Path, proc: subprocess.Popen[bytes]) -> str | None:
    if proc.poll() is not None:
        raise AssertionError(f"simulator exited: {log.read_text(errors='replace')}")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("serving "):
            return line.split()[1]
    return None


# -- brokers --------------------------------------------------------------------------------


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    broker_id: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash (no lock release, no goodbye)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> int:
        await _astop(self.proc)
        return int(self.proc.returncode)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@asynccontextmanager
async def broker_process(
    redis_url: str,
    upstream_url: str,
    broker_id: str,
    directory: Path | None = None,
    *,
    log_level: str = "info",
    **settings: Any,
) -> AsyncIterator[BrokerProcess]:
    """``upbit-broker run`` with :data:`FAST_BROKER_ENV` plus ``settings`` (``stall_timeout=1``
    becomes ``UPBIT_BROKER_STALL_TIMEOUT=1``); stdout and stderr go to one log file."""
    directory = directory or workdir()
    env = clean_env(**FAST_BROKER_ENV)
    env.update(
        {
            "UPBIT_BROKER_REDIS_URL": redis_url,
            "UPBIT_BROKER_UPSTREAM_URL": upstream_url,
            "UPBIT_BROKER_BROKER_ID": broker_id,
        }
    )
    for name, value in settings.items():
        env[f"UPBIT_BROKER_{name.upper()}"] = str(value)
    log = directory / f"broker-{broker_id}.log"
    proc = _spawn([PYTHON, "-m", "cli.main", "run", "--log-level", log_level], log, env)
    handle = BrokerProcess(proc, broker_id, log)
    try:
        yield handle
    finally:
        await _astop(proc)


# -- consumers ------------------------------------------------------------------------------

# A BrokerClient process: leases what its JSON argument says and writes one JSON line per
# event to its output file: "ready", every message (channel, receive time, exact bytes), every
# gap, and the client's stats every 0.2 s. SIGTERM closes the client (releasing the lease).
CONSUMER_SCRIPT = r"""
import asyncio, dataclasses, json, signal, sys, time
from consumers import BrokerClient, Gap

def now_ms():
    return time.time_ns() // 1_000_000

async def main():
    cfg = json.loads(sys.argv[1])
    out = open(cfg["out"], "a", buffering=1)
    def emit(**obj):
        out.write(json.dumps(obj) + "\n")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with BrokerClient(
        redis_url=cfg["redis_url"], client_id=cfg["client_id"], namespace=cfg["namespace"],
        lease_ttl=cfg["lease_ttl"], connect_timeout=cfg.get("connect_timeout", 5.0),
        ping_interval=cfg.get("ping_interval", 1.0),
    ) as client:
        for type_, codes in cfg["subs"].items():
            await client.subscribe(type_, codes)
        emit(k="ready", t=now_ms(), pid=__import__("os").getpid())

        async def pump():
            async for item in client.messages():
                if isinstance(item, Gap):
                    emit(k="gap", t=now_ms(), **item.to_dict())
                else:
                    emit(k="m", t=now_ms(), ch=item.channel, raw=item.raw.decode())

        async def stats():
            while True:
                emit(k="stats", t=now_ms(), **dataclasses.asdict(client.stats))
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(pump()), asyncio.create_task(stats())]
        if cfg.get("snapshot"):
            type_, codes = cfg["snapshot"]
            frames = await client.snapshot_frames(type_, codes, timeout=10)
            emit(k="snapshot", t=now_ms(), frames={c: f.decode() for c, f in frames.items()})
        await stop.wait()
        emit(k="stats", t=now_ms(), **dataclasses.asdict(client.stats))
        for task in tasks:
            task.cancel()
    emit(k="bye", t=now_ms())

asyncio.run(main())
"""


@dataclass
class ConsumerProcess:
    proc: subprocess.Popen[bytes]
    client_id: str
    out: Path
    err: Path
    _cache: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def records(self) -> list[dict[str, Any]]:
        """Every complete line written so far (read incrementally)."""
        with open(self.out, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self._cache.append(json.loads(line))
        self._offset += end
        return self._cache

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["k"] == "m" and (channel in (None, r["ch"]))]

    def gaps(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["k"] == "gap"]

    def last_stats(self) -> dict[str, Any]:
        stats = [r for r in self.records() if r["k"] == "stats"]
        return stats[-1] if stats else {}

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> int:
        await _astop(self.proc)
        return int(self.proc.returncode)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer {self.client_id} exited: {self.stderr()}")
            return any(r["k"] == "ready" for r in self.records())

        await wait_for(ready, timeout, interval=0.05, message=f"consumer {self.client_id} ready")

    def ready_ms(self) -> int:
        return next(int(r["t"]) for r in self.records() if r["k"] == "ready")

    @property
    def pid(self) -> int:
        return self.proc.pid


@asynccontextmanager
async def consumer_process(
    redis_url: str,
    client_id: str,
    subs: dict[str, list[str]],
    directory: Path | None = None,
    *,
    namespace: str = "t",
    lease_ttl: float = 3.0,
    wait_ready: bool = True,
    **extra: Any,
) -> AsyncIterator[ConsumerProcess]:
    """A :class:`BrokerClient` in its own process, recording what it receives."""
    directory = directory or workdir()
    out = directory / f"consumer-{client_id}.jsonl"
    err = directory / f"consumer-{client_id}.err"
    cfg = {
        "redis_url": redis_url,
        "client_id": client_id,
        "namespace": namespace,
        "lease_ttl": lease_ttl,
        "subs": subs,
        "out": str(out),
        **extra,
    }
    out.touch()
    proc = _spawn([PYTHON, "-c", CONSUMER_SCRIPT, json.dumps(cfg)], err, stdout=False)
    handle = ConsumerProcess(proc, client_id, out, err)
    try:
        if wait_ready:
            await handle.wait_ready()
        yield handle
    finally:
        await _astop(proc)


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


def gap_windows(
    consumer: ConsumerProcess, broker_events: list[dict[str, Any]] | None = None
) -> list[tuple[int, int]]:
    """Every gap ``consumer`` recorded, plus ``broker_events`` seen by an observer."""
    windows = [(int(g["since_ms"]), int(g["until_ms"])) for g in consumer.gaps()]
    for event in broker_events or ():
        if event.get("event") == "gap":
            windows.append((int(event["since_ms"]), int(event["until_ms"])))
    return windows


async def redis_status(redis: Any, namespace: str = "t") -> dict[str, str]:
    raw: dict[Any, Any] = await redis.hgetall(f"{namespace}:status")
    return {_s(k): _s(v) for k, v in raw.items()}


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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
        rf"|lease:{_NAME}|reply:{_NAME}|last:{_STREAM}|{_STREAM}:{_CODE})"
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


# -- the CLI --------------------------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> CliResult:  # fmt: skip
    """``upbit-broker ARGS`` in a subprocess with a clean environment (plus ``env``)."""
    proc = subprocess.run(
        [PYTHON, "-m", "cli.main", *args],
        cwd=ROOT,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


async def arun_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> CliResult:
    """:func:`run_cli` without blocking the event loop (in-process servers keep serving)."""
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout)


# -- redis with credentials or TLS ----------------------------------------------------------


class AuthRedis(RedisServer):
    """A redis-server whose readiness probe copes with ``requirepass`` and TLS.

    Args:
        extra_args: redis-server arguments (``--requirepass``, ``--user`` ...).
        tls: ``(cert, key, ca)`` paths: listen with TLS only, on ``port``.
    """

    def __init__(
        self, extra_args: tuple[str, ...] = (), *, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        self.tls = tls
        if tls is not None:
            cert, key, ca = tls
            extra_args = (
                *extra_args,
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            )  # fmt: skip
        super().__init__(extra_args=extra_args)

    def url_for(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if password is not None:
            auth = f"{user or ''}:{password}@"
        url = f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"
        if self.tls:
            url += f"?ssl_ca_certs={self.tls[2]}"
        return url

    @property
    def url(self) -> str:
        return self.url_for()

    def start(self) -> None:
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir]
        args += (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        self.proc = subprocess.Popen(
            [*args, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if self._probe():
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def _probe(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            if not self.tls:
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            ctx = ssl.create_default_context(cafile=str(self.tls[2]))
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))


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
    "FAST_BROKER_ENV",
    "AuthRedis",
    "BrokerProcess",
    "CliResult",
    "ConsumerProcess",
    "FakeUpstream",
    "SimProcess",
    "arun_cli",
    "broker_process",
    "churn_process",
    "clean_env",
    "consumer_process",
    "run_cli",
    "simulator_process",
    "upstream_of",
    "workdir",
]
