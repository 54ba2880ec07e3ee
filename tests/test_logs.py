"""``upbit-broker run --log-format json`` as a process: every stderr line is one JSON object, and
the events an operator looks for (leadership, a resubscribe on a lease change, a lease expiry,
a reconnect after the connection is cut) are each ONE line that carries its facts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from broker.testing import scaled, wait_for, write_lease
from tests.support.sim import running_simulator

ROOT = Path(__file__).resolve().parents[1]
NS = "t"
BACKOFF_MAX = 1.0
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}

Record = dict[str, Any]


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "upbit-broker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


class LoggedBroker:
    """A broker process whose stderr is collected line by line in the background."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def records(self) -> list[Record]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsable": line})
        return out

    def matching(self, pred: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self.records() if "msg" in r and pred(r)]

    async def wait_count(
        self, pred: Callable[[Record], bool], count: int, what: str, within: float = 10
    ) -> list[Record]:
        """Wait until ``count`` lines satisfy ``pred``; returns them."""
        return cast(
            list[Record],
            await wait_for(
                lambda: m if len(m := self.matching(pred)) >= count else None,
                within,
                message=f"{what} (log so far: {self.lines[-5:]})",
            ),
        )

    def join(self) -> None:
        self._reader.join(scaled(5))


@contextmanager
def broker_process(redis_url: str, upstream_url: str, broker_id: str) -> Iterator[LoggedBroker]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    env.update(
        {
            "UPBIT_BROKER_REDIS_URL": redis_url,
            "UPBIT_BROKER_UPSTREAM_URL": upstream_url,
            "UPBIT_BROKER_NAMESPACE": NS,
            "UPBIT_BROKER_BROKER_ID": broker_id,
            "UPBIT_BROKER_LEADER_TTL": "1.5",
            "UPBIT_BROKER_STATUS_INTERVAL": "0.2",
            "UPBIT_BROKER_COALESCE_DELAY": "0.02",
            "UPBIT_BROKER_RECONCILE_INTERVAL": "0.5",
            "UPBIT_BROKER_BACKOFF_INITIAL": "0.2",
            "UPBIT_BROKER_BACKOFF_MAX": str(BACKOFF_MAX),
        }
    )
    proc = subprocess.Popen(
        [*entry_point(), "run", "--log-format", "json", "--log-level", "info"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    broker = LoggedBroker(proc)
    try:
        yield broker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        broker.join()
        if proc.stderr is not None:
            proc.stderr.close()


def msg(pattern: str, logger: str | None = None) -> Callable[[Record], bool]:
    """A predicate: the whole ``msg`` matches ``pattern`` (and the logger, if given)."""
    rx = re.compile(pattern)
    return lambda r: rx.fullmatch(r["msg"]) is not None and logger in (None, r.get("logger"))


async def test_json_log_lines_carry_the_facts(
    redis_client: aioredis.Redis, redis_server: Any
) -> None:
    # A password in the URL (the default user accepts any): it must never reach the log.
    redis_url = f"redis://default:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    async with running_simulator(seed=9, rate=200) as sim:
        with broker_process(redis_url, sim.url, "logged") as broker:
            # Leadership, then the first connection.
            await broker.wait_count(msg(r"upstream connected: epoch=1 url=.*"), 1, "connected")

            # A lease change: the union is recomputed and resent.
            await write_lease(redis_client, "keeper", {"ticker": ["KRW-BTC"]}, 60_000, NS)
            await broker.wait_count(msg(r"union changed: 1 streams from 1 leases"), 1, "union 1")

            # A lease that is never renewed expires.
            await write_lease(redis_client, "brief", {"trade": ["KRW-ETH"]}, 800, NS)
            await broker.wait_count(msg(r"union changed: 2 streams from 2 leases"), 1, "union 2")
            await broker.wait_count(msg(r"leases expired: brief"), 1, "expiry")
            await broker.wait_count(msg(r"union changed: 1 streams from 1 leases"), 2, "shrunk")

            # The connection is cut (no close frame): one warning, a gap, a new epoch.
            assert sim.drop() == 1
            await broker.wait_count(msg(r"upstream connected: epoch=2 url=.*"), 1, "reconnected")
        records = broker.records()

    # Every line is one JSON object with the four fields.
    assert records, "the broker logged nothing"
    for record in records:
        assert "unparsable" not in record, record
        assert TS.fullmatch(record["ts"]), record
        assert record["level"] in LEVELS, record
        assert isinstance(record["logger"], str) and record["logger"], record
        assert isinstance(record["msg"], str) and record["msg"], record
        assert "exc" not in record, record  # nothing here is worth a traceback
        assert "s3cret-pw" not in json.dumps(record), record

    def one(pattern: str, logger: str) -> Record:
        found = [r for r in records if msg(pattern, logger)(r)]
        assert len(found) == 1, (pattern, found)
        return found[0]

    start = one(r"broker logged starting: redis=(\S+) upstream=(\S+) namespace=t", "broker.service")
    assert "redis://default:***@127.0.0.1" in start["msg"]
    leader = one(r"broker logged is leader of namespace t", "broker.service")
    assert leader["level"] == "info"

    # The reconnect: one warning with the reason and the delay, then the gap and the new epoch.
    lost = one(
        r"upstream lost \((.+)\); reconnecting in (\d+\.\d+)s \(attempt \d+\)", "broker.upstream"
    )
    assert lost["level"] == "warning"
    assert lost["event"] == "reconnect" and lost["attempt"] >= 0  # structured facts too
    reason, delay = re.fullmatch(
        r"upstream lost \((.+)\); reconnecting in (.+)s \(attempt \d+\)", lost["msg"]
    ).groups()  # type: ignore[union-attr]
    assert reason == "connection closed (1006)"
    assert 0 < float(delay) <= BACKOFF_MAX
    one(r"gap event: epoch=2 reason=reconnect span_ms=\d+", "broker.service")
    one(r"upstream connected: epoch=2 url=ws://127\.0\.0\.1:\d+/websocket/v1", "broker.service")

    # The resubscribes: each lease change is one line with the counts.
    changes = [r["msg"] for r in records if r["msg"].startswith("union changed:")]
    assert changes == [
        "union changed: 1 streams from 1 leases",
        "union changed: 2 streams from 2 leases",
        "union changed: 1 streams from 1 leases",
    ]
    assert one(r"leases expired: brief", "broker.service")["level"] == "info"

    # Stopping is logged too, and is the last word.
    assert records[-1]["msg"] == "broker logged stepped down", records[-3:]
