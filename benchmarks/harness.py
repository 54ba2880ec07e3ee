"""Processes of a benchmark run: redis-server, simulator, brokers and consumers, each its own
process on free ports, with their CPU time and memory read from ``/proc``.

Benchmark layer (not shipped). The processes come from the package's testing harness
(:mod:`broker.testing`, the one the tests use); what is here is the benchmarks' own: their
defaults (namespace ``bench``, the broker command of ``--broker-root``), the consumer processes
of :mod:`benchmarks.consumer`, and machine-wide CPU readings. Every process is started by a
context manager and stopped on every path; nothing here waits without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker import testing
from broker.keys import Keys
from broker.testing import BrokerProcess, ManagedProcess, SimulatorProcess
from broker.testing.processes import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAMESPACE = "bench"
#: types every load benchmark leases, per code (a realistic mix of frame sizes)
LOAD_TYPES = ("ticker", "trade", "orderbook")


# -- /proc readings -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the figures came from."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("upbit-broker", "redis", "hiredis", "websockets", "msgspec", "cryptofeed"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout
        versions["redis-server"] = out.split("v=")[1].split()[0]
    git, dirty = git_state()
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "git": git,
        "dirty": dirty,
        "versions": versions,
    }


def git_state() -> tuple[str, list[str]]:
    """(short commit, ``+dirty`` when the broker or the consumer library has uncommitted
    changes; which of the two). Read at the start and the end of a run: another engineer's
    edit of the tree in between shows as a difference."""
    git = ""
    dirty: list[str] = []
    with contextlib.suppress(Exception):
        git = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "broker", "consumers"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        dirty = sorted({line[3:].split("/")[0] for line in status.splitlines() if line.strip()})
        if dirty:
            git += "+dirty"
    return git, dirty


# -- processes ------------------------------------------------------------------------------------


@asynccontextmanager
async def simulator(
    *,
    rate: float,
    markets: int,
    seed: int = 1,
    record_sends: bool = False,
    up_interval: float = 3600.0,
    connect_rate: int = 5,
) -> AsyncIterator[SimulatorProcess]:
    """A simulator process on a free port. UP frames are off by default (one an hour), so
    every frame it sends to a broker is data or a LIST_SUBSCRIPTIONS answer."""
    with tempfile.TemporaryDirectory(prefix="upbit-bench-sim-") as tmp:
        async with testing.simulator_process(
            Path(tmp),
            rate=rate,
            markets=markets,
            seed=seed,
            up_interval=up_interval,
            connect_rate=connect_rate,
            compression=False,
            record_sends=record_sends,
        ) as sim:
            yield sim


#: How brokers are started; ``configure_broker`` changes it for a whole run.
BROKER_COMMAND: dict[str, Any] = {"root": None, "publisher": "resp"}


def configure_broker(root: str | None = None, publisher: str = "resp") -> None:
    """Run brokers from another checkout (``root``: before/after comparisons) and/or with the
    redis-py pipeline publisher instead of raw RESP."""
    BROKER_COMMAND.update(root=root, publisher=publisher)


def _broker_command() -> tuple[list[str], Path]:
    root = BROKER_COMMAND["root"]
    if BROKER_COMMAND["publisher"] == "redis-py":
        return [sys.executable, "-m", "benchmarks.broker_redis_py", "run"], ROOT
    # another checkout: cwd first on sys.path, so that checkout's packages win
    return [*testing.processes.CLI, "run"], Path(root) if root is not None else ROOT


@asynccontextmanager
async def broker(
    redis_url: str, upstream_url: str, broker_id: str = "bench-1", **settings: Any
) -> AsyncIterator[BrokerProcess]:
    """``upbit-broker run`` in its own process, in this environment plus namespace ``bench``
    and log level ``warning``; ``settings`` become ``UPBIT_BROKER_*``. Its log (stdout and
    stderr) is ``proc.log`` while it runs."""
    command, cwd = _broker_command()
    env = dict(os.environ)
    env.update(UPBIT_BROKER_NAMESPACE=NAMESPACE, UPBIT_BROKER_LOG_LEVEL="warning")
    with tempfile.TemporaryDirectory(prefix=f"upbit-bench-{broker_id}-") as tmp:
        async with testing.broker_process(
            redis_url,
            upstream_url,
            broker_id,
            Path(tmp),
            log_level=None,  # from the environment: an older checkout may lack the flag
            env=env,
            command=command,
            cwd=cwd,
            **settings,
        ) as proc:
            yield proc


class ConsumerProc(ManagedProcess):
    """A :mod:`benchmarks.consumer` process driven over its stdin/stdout."""

    def __init__(self, popen: subprocess.Popen[Any], out: str) -> None:
        super().__init__(popen, "consumer")
        self.out = out
        self.result: dict[str, Any] | None = None

    def _line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the consumer did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the consumer exited ({self.proc.poll()})")
        return line.strip()

    def wait_ready(self, timeout: float = 30.0) -> None:
        line = self._line(timeout)
        if line != "ready":
            raise RuntimeError(f"consumer said {line!r}")

    def count(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(json.loads(self._line())["frames"])

    def finish(self) -> dict[str, Any]:
        """Ask for the result file and read it."""
        if self.result is not None:
            return self.result
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        line = self._line(60)
        if line != "done":
            raise RuntimeError(f"consumer said {line!r}")
        self.proc.wait(10)
        with open(self.out) as f:
            self.result = json.load(f)
        return self.result


@contextmanager
def consumers(
    n: int,
    mode: str,
    *,
    port: int = 0,
    channels: Iterable[str] = (),
    events: str | None = None,
    url: str = "",
    request: str = "",
    record: bool = False,
    channel_prefix: str | None = None,
) -> Iterator[list[ConsumerProc]]:
    """``n`` consumer processes, each subscribed (or connected) before this yields. The
    websocket modes (``ws``, ``floor``) take ``url`` and ``request``; ``floor`` also publishes
    to the Redis on ``port`` (on ``{channel_prefix}:{type}:{code}``, ``floor:...`` by default)."""
    tmp = tempfile.mkdtemp(prefix="upbit-bench-consumers-")
    channels_file = os.path.join(tmp, "channels")
    with open(channels_file, "w") as f:
        f.write("\n".join(channels))
    request_file = os.path.join(tmp, "request")
    with open(request_file, "w") as f:
        f.write(request)
    procs: list[ConsumerProc] = []
    try:
        for i in range(n):
            out = os.path.join(tmp, f"out{i}.json")
            if mode in ("ws", "floor"):
                args = ["--url", url, "--request-file", request_file]
                if mode == "floor":
                    args += ["--port", str(port)]
                    if channel_prefix is not None:
                        args += ["--channel-prefix", channel_prefix]
            else:
                args = ["--port", str(port), "--channels-file", channels_file]
                if events:
                    args += ["--events", events]
            procs.append(start_consumer(mode, out, args, record=record))
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.terminate(5.0)
        shutil.rmtree(tmp, ignore_errors=True)


def start_consumer(mode: str, out: str, args: list[str], *, record: bool) -> ConsumerProc:
    """One ``benchmarks.consumer`` process in ``mode``, its result in ``out`` (``args``: the
    mode's own options; ``record``: it keeps every frame's receive time)."""
    cmd = [sys.executable, "-m", "benchmarks.consumer", mode, "--out", out, *args]
    if record:
        cmd.append("--record")
    popen = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        **_consumer_place(mode),
    )
    return ConsumerProc(popen, out)


def _consumer_place(mode: str) -> dict[str, Any]:
    """Where a consumer process runs: here, except the consumer library under
    ``--broker-root``, which then comes from that checkout (its cwd is first on sys.path; this
    tree's ``benchmarks`` package stays reachable through PYTHONPATH)."""
    root = BROKER_COMMAND["root"]
    if not mode.startswith("library") or root is None:
        return {"cwd": ROOT}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {"cwd": Path(root), "env": env}


@contextmanager
def redis_server() -> Iterator[testing.RedisServer]:
    """A redis-server on a free port for the whole run."""
    with testing.RedisServer() as server:
        yield server


# -- leases and channels --------------------------------------------------------------------------


def load_streams(codes: Iterable[str], types: Iterable[str] = LOAD_TYPES) -> dict[str, list[str]]:
    codes = list(codes)
    return {t: list(codes) for t in types}


def channels_of(streams: dict[str, list[str]]) -> list[str]:
    keys = Keys(NAMESPACE)
    return [keys.channel(t, c) for t, codes in streams.items() for c in codes]


async def write_lease(
    client: aioredis.Redis, client_id: str, streams: dict[str, list[str]], ttl_ms: int = 600_000
) -> None:
    await testing.write_lease(client, client_id, streams, ttl_ms, NAMESPACE, host="bench")


def universe_codes(total: int, seed: int = 1) -> tuple[int, list[str]]:
    """(``--markets`` value, codes) for a simulator whose universe is exactly ``total`` codes
    (the real codes first, then synthetic ``KRW-SIM....``)."""
    from simulator.universe import build_universe

    real = len(build_universe(0, seed))
    markets = max(0, total - real)
    return markets, [x.code for x in build_universe(markets, seed)][:total]


def frames_per_event(
    markets: int, seed: int, types: Iterable[str] = LOAD_TYPES, n: int = 20_000
) -> float:
    """Frames one market event yields for a connection subscribed to ``types`` of every code
    (depth 30), measured on the simulator's own market model with the same seed."""
    from simulator.market import Market
    from simulator.universe import build_universe

    types = set(types)
    market = Market(
        list(build_universe(markets, seed)), seed=seed, trade_share=0.5, now_ms=1_700_000_000_000
    )
    frames = 0
    for _, is_trade, lo in market.step(n, 1_700_000_000_000):
        if is_trade:
            frames += ("trade" in types) + ("ticker" in types) + ("orderbook" in types)
        elif lo < 30 and "orderbook" in types:
            frames += 1
    return frames / n


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has used (``/proc/stat``, all cpus)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_ns(pid: int) -> int | None:
    """CPU time of ``pid``'s live threads in ns (``/proc/PID/task/*/schedstat``), or None where
    the kernel has no schedstat. ``/proc/PID/stat`` counts 10-ms ticks, which quantises a
    process using a few % of a core over a short window; schedstat counts nanoseconds. (A
    thread that exits inside a window takes its time with it here, not in ``/proc/PID/stat``:
    the readers below keep both.)"""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total if tasks else None


@dataclass
class CpuWindow:
    """CPU seconds of several processes (and of the whole machine) between two instants.

    ``machine`` counts every process, ours and anyone else's: on a shared machine the gap
    between it and the sum of ours is load the benchmark did not make. ``end`` returns the
    ``/proc/PID/stat`` figures (10-ms ticks); ``precise`` then holds the same from schedstat
    (ns), where the kernel has it."""

    procs: dict[str, int]
    start: dict[str, float]
    t0: float
    machine0: float = 0.0
    start_ns: dict[str, int | None] | None = None

    @classmethod
    def begin(cls, procs: dict[str, int]) -> CpuWindow:
        start_ns = {n: cpu_ns(p) for n, p in procs.items()}
        start = {n: _safe_cpu(p) for n, p in procs.items()}
        return cls(procs, start, time.monotonic(), machine_busy_seconds(), start_ns)

    def end(self) -> tuple[float, dict[str, float]]:
        elapsed = time.monotonic() - self.t0
        used = {n: _safe_cpu(p) - self.start[n] for n, p in self.procs.items()}
        self.machine_cores = (machine_busy_seconds() - self.machine0) / elapsed
        #: CPU seconds by schedstat (None for a process the kernel gives no schedstat for)
        self.precise: dict[str, float | None] = {}
        for n, p in self.procs.items():
            before, after = (self.start_ns or {}).get(n), cpu_ns(p)
            self.precise[n] = (after - before) / 1e9 if before is not None and after else None
        return elapsed, used


#: How long a measured window may wait for the rest of the machine to calm down (0: never).
QUIET = {"max_wait": 0.0, "threshold": 0.25}


async def quiet_moment(pids: Iterable[int]) -> float:
    """On a shared machine, wait (at most ``QUIET["max_wait"]`` s) until processes other than
    ``pids`` use under ``QUIET["threshold"]`` cores; returns what they used last (cores)."""
    pids = list(pids)
    deadline = time.monotonic() + QUIET["max_wait"]
    while True:
        window = CpuWindow.begin({str(p): p for p in pids})
        await asyncio.sleep(0.5)
        elapsed, cpu = window.end()
        others = max(0.0, window.machine_cores - sum(cpu.values()) / elapsed)
        if others < QUIET["threshold"] or time.monotonic() >= deadline:
            return round(others, 3)


def others_in(window: CpuWindow, elapsed: float, cpu: dict[str, float]) -> float:
    """Cores used during ``window`` by processes not in it."""
    return round(max(0.0, window.machine_cores - sum(cpu.values()) / elapsed), 3)


def _safe_cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0
