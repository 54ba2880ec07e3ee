"""``upbit-broker simulate`` as a real subprocess: prints its URL, serves, stops on SIGINT."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

from broker.testing import scaled
from tests.support.sim import client, http_get, read_until, subscribe


def _command() -> list[str]:
    script = Path(sys.executable).with_name("upbit-broker")
    if script.exists():
        return [str(script)]
    found = shutil.which("upbit-broker")
    return [found] if found else [sys.executable, "-m", "cli.main"]


async def test_cli_serves_until_interrupted() -> None:
    env = {**os.environ, "UPBIT_SIM_SEED": "5", "UPBIT_SIM_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        *_command(), "simulate", "--port", "0", "--rate", "300",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(scaled(20)):
            line = (await proc.stdout.readline()).decode()
            while line and not line.startswith("serving "):
                line = (await proc.stdout.readline()).decode()
            operator = (await proc.stdout.readline()).decode()
        assert line.startswith("serving ws://127.0.0.1:"), line
        assert "seed 5" in line  # read from UPBIT_SIM_SEED
        url = line.split()[1]
        assert url.endswith("/websocket/v1")
        base = url.removesuffix("/websocket/v1").replace("ws://", "http://")
        assert operator.startswith("operator: ") and f"{base}/_sim/state" in operator

        async with client(url) as ws:
            await subscribe(ws, {"type": "trade", "codes": ["KRW-BTC"]})
            frames = await read_until(ws, lambda f: len(f) >= 2)
        assert frames[0]["code"] == "KRW-BTC"
        status, state = await http_get(base, "/_sim/state")
        assert status == 200 and state["seed"] == 5
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(scaled(10)):
            code = await proc.wait()
    assert code == 0, (await proc.stderr.read()).decode() if proc.stderr else code
