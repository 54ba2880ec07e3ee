"""A :class:`~consumers.BrokerClient` in its own process, recording every frame and gap it gets.

    async with consumer_process(redis_url, "c1", {"trade": ["KRW-BTC"]}, tmp_path) as c:
        ... c.messages(), c.gaps(), c.last_stats() ...
        c.kill()                               # a crash: its lease expires after its TTL

Testing layer, like :mod:`broker.testing.processes`: the client runs from a script in the child
process, so this module imports nothing of ``consumers``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from broker.testing.processes import ManagedProcess, spawn, workdir
from broker.testing.wait import wait_for

# A BrokerClient process: leases what its JSON argument says and writes one JSON line per
# event to its output file: "ready", every message (channel, receive time, exact bytes), every
# gap, and the client's stats every 0.2 s. SIGTERM closes the client (releasing the lease).
# A script, not a module of this package: broker.testing imports nothing of consumers.
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
        ping_interval=cfg.get("ping_interval", 1.0), **cfg.get("client", {}),
    ) as client:
        for type_, codes in cfg["subs"].items():
            await client.subscribe(type_, codes)
        emit(k="ready", t=now_ms(), pid=__import__("os").getpid())

        delay = cfg.get("read_delay", 0.0)  # seconds per message: a slow application

        async def pump():
            async for item in client.messages():
                if isinstance(item, Gap):
                    emit(k="gap", t=now_ms(), **item.to_dict())
                elif item.kind == "data":
                    offset = getattr(item, "offset", None)
                    record = dict(k="m", t=now_ms(), ch=item.channel, raw=item.raw.decode())
                    if offset is not None:
                        record["off"] = offset if isinstance(offset, str) else offset.decode()
                    if getattr(item, "backfilled", False):
                        record["bf"] = True
                    emit(**record)
                    if delay:
                        await asyncio.sleep(delay)
                else:  # a lease notice (or any later kind): recorded, never fatal
                    emit(k=item.kind, t=now_ms(), text=repr(item))

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


class ConsumerProcess(ManagedProcess):
    """A :class:`~consumers.BrokerClient` in its own process, recording what it receives.

    :meth:`records` are its JSON lines: ``{"k": "ready"|"m"|"gap"|"stats"|"snapshot"|"bye",
    "t": receive time in ms, ...}``; a message has ``ch`` (channel) and ``raw`` (exact text),
    and, from a durable client, ``off`` (its history offset; ``bf``: back-filled).
    """

    def __init__(self, proc: subprocess.Popen[bytes], client_id: str, out: Path, err: Path) -> None:
        super().__init__(proc, f"consumer {client_id}", err)
        self.client_id = client_id
        self.out = out
        self.err = err
        self._cache: list[dict[str, Any]] = []
        self._offset = 0

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
        """Every message received (on ``channel``, or on any)."""
        return [r for r in self.records() if r["k"] == "m" and (channel in (None, r["ch"]))]

    def gaps(self) -> list[dict[str, Any]]:
        """Every gap the client reported (``since_ms``, ``until_ms``, ``reason`` ...), not
        counting the broker's follow-ups of them (:meth:`follow_ups`)."""
        return [r for r in self.records() if r["k"] == "gap" and "state" not in r]

    def follow_ups(self) -> list[dict[str, Any]]:
        """The broker's follow-ups of its gaps, after the back-fill (``state``: filled ...)."""
        return [r for r in self.records() if r["k"] == "gap" and "state" in r]

    def last_stats(self) -> dict[str, Any]:
        """The client's latest :class:`~consumers.ClientStats`, as a dict ({} before any)."""
        stats = [r for r in self.records() if r["k"] == "stats"]
        return stats[-1] if stats else {}

    def stderr(self) -> str:
        return self.output()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until it has subscribed (its lease is written).

        Raises:
            RuntimeError: it exited first (the message holds its stderr).
            WaitTimeout: not ready within ``timeout`` seconds (scaled).
        """

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"consumer {self.client_id} exited: {self.stderr()}")
            return any(r["k"] == "ready" for r in self.records())

        await wait_for(ready, timeout, interval=0.05, message=f"consumer {self.client_id} ready")

    def ready_ms(self) -> int:
        """When it became ready (its wall clock, ms)."""
        return next(int(r["t"]) for r in self.records() if r["k"] == "ready")


@asynccontextmanager
async def consumer_process(
    redis_url: str,
    client_id: str,
    subs: Mapping[str, Sequence[str]],
    directory: Path | None = None,
    *,
    namespace: str = "t",
    lease_ttl: float = 3.0,
    wait_ready: bool = True,
    **extra: Any,
) -> AsyncIterator[ConsumerProcess]:
    """A :class:`~consumers.BrokerClient` process leasing ``subs`` (``{"trade": ["KRW-BTC"]}``).

    Args:
        wait_ready: yield only once it has subscribed.
        extra: more client options: ``connect_timeout``, ``ping_interval``, ``snapshot``
            (``[type, codes]``: ask for a snapshot once subscribed), ``client`` (more
            ``BrokerClient`` keyword arguments, e.g. ``{"durable": True}``) and ``read_delay``
            (seconds the application takes per message: a slow reader).
    """
    directory = directory or workdir()
    out = directory / f"consumer-{client_id}.jsonl"
    err = directory / f"consumer-{client_id}.err"
    cfg = {
        "redis_url": redis_url,
        "client_id": client_id,
        "namespace": namespace,
        "lease_ttl": lease_ttl,
        "subs": {t: list(codes) for t, codes in subs.items()},
        "out": str(out),
        **extra,
    }
    out.touch()
    proc = spawn([sys.executable, "-c", CONSUMER_SCRIPT, json.dumps(cfg)], err, stdout=False)
    handle = ConsumerProcess(proc, client_id, out, err)
    try:
        if wait_ready:
            await handle.wait_ready()
        yield handle
    finally:
        await handle.stop()


__all__ = ["CONSUMER_SCRIPT", "ConsumerProcess", "consumer_process"]
