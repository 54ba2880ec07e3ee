"""Layers: the protocol core is pure; Redis clients are built in one place."""

from __future__ import annotations

import subprocess
import sys


def test_protocol_core_imports_no_io() -> None:
    code = (
        "import sys, broker.upbit.types, broker.upbit.requests, broker.upbit.router, "
        "broker.upbit.codes, broker.upbit.ratelimit, broker.keys\n"
        "import importlib, pkgutil, broker.upbit\n"
        "for m in pkgutil.iter_modules(broker.upbit.__path__):\n"
        "    importlib.import_module('broker.upbit.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncio', 'websockets', 'redis', 'simulator', 'consumers', 'cli'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"protocol core imported I/O modules: {out}"


def test_one_place_builds_redis_clients() -> None:
    """Every production Redis client comes from broker.redis_client (asyncio Retry, no socket
    timeout): a second construction site is how the sync-Retry warning crept in before."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    construction = re.compile(
        r"Redis\.from_url\(|ConnectionPool\.from_url\(|aioredis\.Redis\(|from redis\.retry import"
    )
    offenders = []
    for folder in ("broker", "consumers", "cli", "simulator", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "redis_client.py" or path.name == "bench_hotpath.py":
                continue  # the factory itself; bench_hotpath packs pipelines, never connects
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if construction.search(line):
                    offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == [], "build Redis clients with broker.redis_client:\n" + "\n".join(offenders)
