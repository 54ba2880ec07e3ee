"""upbit-broker's programs as real processes: the simulator, brokers, the CLI.

Each runs what production runs (``upbit-broker simulate``, ``upbit-broker run``, a
:class:`~consumers.BrokerClient` in its own interpreter, any ``upbit-broker`` command) as a
subprocess whose output goes to a file under ``directory``, so a test can SIGKILL or SIGSTOP
it, read what it said and grep it. The context managers are async and stop the process on
every path (SIGTERM, then SIGKILL); waiting for one never blocks the event loop, so an
in-process server keeps answering it meanwhile. Consumer processes are in
:mod:`broker.testing.consumer`.

    async with (
        RedisServer() as redis,                                   # broker.testing.redis
        simulator_process(tmp_path, rate=300) as sim,
        broker_process(redis.url, sim.url, "b1", tmp_path) as broker,
        consumer_process(redis.url, "c1", {"trade": ["KRW-BTC"]}, tmp_path) as consumer,
    ):
        await sim.drop()                       # the simulator cuts the broker's connection
        ... consumer.messages(), consumer.gaps(), broker.output() ...

Brokers start from :data:`FAST_BROKER_ENV` (namespace ``t``, short TTLs and backoffs) in an
environment without any ``UPBIT_*`` variable of the caller (:func:`clean_env`). This module
imports nothing of ``consumers``, ``cli`` or ``simulator``: they run in the child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.testing.wait import scaled, wait_for

#: ``python -m cli.main``: the ``upbit-broker`` command in this interpreter.
CLI = (sys.executable, "-m", "cli.main")

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
    """This process's environment without any ``UPBIT_*`` variable, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def workdir(prefix: str = "upbit-test-") -> Path:
    """A new temporary directory (for logs), left in place for a post-mortem."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def spawn(
    args: Sequence[str],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    cwd: str | Path | None = None,
    stdout: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``args`` with no stdin; stderr (and, with ``stdout``, stdout) appended to ``log``
    (``None``: discarded). ``env`` defaults to :func:`clean_env`.

    A plain function, not a coroutine: Popen and open() return at once, and keeping them out
    of ``async def`` keeps the event-loop lint about what really blocks meaningful.
    """
    if log is None:
        return subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=out if stdout else subprocess.DEVNULL,
            stderr=out,
        )


# -- /proc readings -------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``, Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """Resident and peak resident memory in bytes: ``{"rss", "peak_rss"}`` (Linux)."""
    out = {"rss": 0, "peak_rss": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1]) * 1024
    return out


# -- one child process ----------------------------------------------------------------------


class ManagedProcess:
    """A child process we started: kill or stop it, read its log, its CPU time and memory."""

    def __init__(self, proc: subprocess.Popen[Any], name: str, log: Path | None = None) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything it wrote to its log so far ("" without a log)."""
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def kill(self) -> None:
        """SIGKILL: a crash (no lock release, no goodbye)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` (scaled) seconds; returns the exit code.

        Blocks: from a running event loop use :meth:`stop`.
        """
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return int(self.proc.returncode)

    async def stop(self, timeout: float = 10.0) -> int:
        """:meth:`terminate` in a thread, so in-process servers keep answering the process
        while it shuts down; returns its exit code."""
        return await asyncio.to_thread(self.terminate, timeout)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far (0 once it has exited)."""
        try:
            return cpu_seconds(self.pid) if self.alive else 0.0
        except OSError:
            return 0.0

    def memory(self) -> dict[str, int]:
        """Resident and peak resident memory in bytes (zeros once it has exited)."""
        try:
            return memory(self.pid) if self.alive else {"rss": 0, "peak_rss": 0}
        except OSError:
            return {"rss": 0, "peak_rss": 0}


# -- the simulator --------------------------------------------------------------------------


async def http_get(base: str, path: str, within: float = 5.0) -> tuple[int, Any]:
    """GET ``base + path`` (``http://host:port``) over a plain socket: ``(status, body)``.

    The body is decoded JSON, or text when it is not JSON.

    Raises:
        TimeoutError: no complete answer within ``scaled(within)`` seconds.
        OSError: the connection failed.
    """
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    async with asyncio.timeout(scaled(within)):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode("utf-8", "replace")  # e.g. websockets' own 426 text


class SimulatorProcess(ManagedProcess):
    """``upbit-broker simulate`` in a subprocess, driven through its operator endpoints."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        super().__init__(proc, "simulator", log)
        self.url = url  # ws://127.0.0.1:PORT/websocket/v1

    @property
    def http_url(self) -> str:
        return self.url.replace("ws://", "http://").split("/websocket")[0]

    @property
    def port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    async def get(self, path: str, within: float = 5.0) -> Any:
        """GET an operator or REST endpoint; its JSON body.

        Raises:
            RuntimeError: the answer was not 200.
        """
        status, body = await http_get(self.http_url, path, within)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {str(body)[:200]!r}")
        return body

    async def state(self) -> dict[str, Any]:
        """``/_sim/state``: connections (with their subscriptions), totals, the seed ..."""
        state: dict[str, Any] = await self.get("/_sim/state")
        return state

    async def connections(self) -> list[dict[str, Any]]:
        conns: list[dict[str, Any]] = (await self.state())["connections"]
        return conns

    async def connection(self) -> dict[str, Any] | None:
        """The first open connection (a broker's, usually the only one), or None."""
        conns = await self.connections()
        return conns[0] if conns else None

    async def totals(self) -> dict[str, int]:
        totals: dict[str, int] = (await self.state())["totals"]
        return totals

    async def drop(self) -> int:
        """Cut every connection (as a network failure would); how many were cut."""
        return int((await self.get("/_sim/drop"))["dropped"])

    async def stall(self, seconds: float) -> None:
        """Keep every connection open but send nothing for ``seconds``."""
        await self.get(f"/_sim/stall?seconds={seconds}")

    async def mute(self, codes: Sequence[str], seconds: float) -> None:
        """Send nothing for ``codes`` for ``seconds``; the others keep flowing."""
        await self.get(f"/_sim/mute?codes={','.join(codes)}&seconds={seconds}")


def _options(options: Mapping[str, Any]) -> list[str]:
    """``rate=200`` -> ``--rate 200``; ``compression=False`` -> ``--no-compression``."""
    args: list[str] = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


@asynccontextmanager
async def simulator_process(
    directory: Path | None = None,
    *,
    port: int = 0,
    log_level: str = "WARNING",
    ready_timeout: float = 20.0,
    **options: Any,
) -> AsyncIterator[SimulatorProcess]:
    """``upbit-broker simulate``, serving once this yields.

    Args:
        directory: where its log goes (default: a new temporary directory).
        port: its port (0: a free one; :attr:`SimulatorProcess.url` says which).
        options: its flags: ``rate=200``, ``seed=1``, ``markets=100``, ``messages_per_minute=3``,
            ``connect_rate=1``, ``record_sends=True``, ``compression=False`` ...

    Raises:
        RuntimeError: it exited before serving.
        WaitTimeout: it did not serve within ``ready_timeout`` seconds (scaled).
    """
    directory = directory or workdir()
    log = directory / f"sim-{time.monotonic_ns()}.log"
    args = [*CLI, "simulate", "--port", str(port), "--log-level", log_level, *_options(options)]
    proc = spawn(args, log)
    try:
        url = await wait_for(
            lambda: _serving_url(log, proc), ready_timeout, message="simulator serving"
        )
        yield SimulatorProcess(proc, url, log)
    finally:
        await ManagedProcess(proc, "simulator").stop()


def _serving_url(log: Path, proc: subprocess.Popen[bytes]) -> str:
    """The URL its "serving URL ..." line names ("" before it)."""
    if proc.poll() is not None:
        raise RuntimeError(f"simulator exited: {log.read_text(errors='replace')}")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("serving "):
            return line.split()[1]
    return ""


# -- brokers --------------------------------------------------------------------------------


class BrokerProcess(ManagedProcess):
    """``upbit-broker run`` in a subprocess; its stdout and stderr are in :attr:`log`."""

    def __init__(self, proc: subprocess.Popen[bytes], broker_id: str, log: Path) -> None:
        super().__init__(proc, f"broker {broker_id}", log)
        self.broker_id = broker_id


def broker_env(
    redis_url: str,
    upstream_url: str,
    broker_id: str,
    base: Mapping[str, str] | None = None,
    **settings: Any,
) -> dict[str, str]:
    """``base`` (default: :func:`clean_env` with :data:`FAST_BROKER_ENV`) plus the URLs, the id
    and ``settings`` as ``UPBIT_BROKER_*`` variables (``stall_timeout=1`` ->
    ``UPBIT_BROKER_STALL_TIMEOUT=1``)."""
    env = dict(base) if base is not None else clean_env(**FAST_BROKER_ENV)
    env["UPBIT_BROKER_REDIS_URL"] = redis_url
    env["UPBIT_BROKER_UPSTREAM_URL"] = upstream_url
    env["UPBIT_BROKER_BROKER_ID"] = broker_id
    for name, value in settings.items():
        env[f"UPBIT_BROKER_{name.upper()}"] = str(value)
    return env


@asynccontextmanager
async def broker_process(
    redis_url: str,
    upstream_url: str,
    broker_id: str = "broker-1",
    directory: Path | None = None,
    *,
    log_level: str | None = "info",
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    cwd: str | Path | None = None,
    **settings: Any,
) -> AsyncIterator[BrokerProcess]:
    """``upbit-broker run`` as ``broker_id``; stopped (SIGTERM, then SIGKILL) on exit.

    It yields at once: wait for what the test needs (the leader in ``{ns}:status``, the
    subscription at the simulator). Its log is ``directory/broker-{broker_id}.log``.

    Args:
        settings: broker settings as ``UPBIT_BROKER_*`` variables (``stall_timeout=1``).
        log_level: its ``--log-level`` (None: leave it to the environment).
        env: the base environment (default: :func:`clean_env` with :data:`FAST_BROKER_ENV`).
        command: the program and ``run`` (default: ``python -m cli.main run``), e.g. another
            entry point; ``cwd`` is where it starts (another checkout: its packages win).
    """
    directory = directory or workdir()
    log = directory / f"broker-{broker_id}.log"
    args = list(command) if command is not None else [*CLI, "run"]
    if log_level is not None:
        args += ["--log-level", log_level]
    environment = broker_env(redis_url, upstream_url, broker_id, env, **settings)
    handle = BrokerProcess(spawn(args, log, environment, cwd=cwd), broker_id, log)
    try:
        yield handle
    finally:
        await handle.stop()


# -- the CLI --------------------------------------------------------------------------------


@dataclass
class CliResult:
    """What one ``upbit-broker`` command did: its exit code and output."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    cwd: str | Path | None = None,
) -> CliResult:
    """``upbit-broker ARGS`` in a subprocess with :func:`clean_env` plus ``env``.

    Raises:
        subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds (scaled).
    """
    proc = subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


async def arun_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    cwd: str | Path | None = None,
) -> CliResult:
    """:func:`run_cli` without blocking the event loop (in-process servers keep serving)."""
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout, cwd=cwd)


__all__ = [
    "CLI",
    "FAST_BROKER_ENV",
    "BrokerProcess",
    "CliResult",
    "ManagedProcess",
    "SimulatorProcess",
    "arun_cli",
    "broker_env",
    "broker_process",
    "clean_env",
    "cpu_seconds",
    "http_get",
    "memory",
    "run_cli",
    "simulator_process",
    "spawn",
    "workdir",
]
