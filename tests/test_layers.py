"""The protocol core is pure: importing it pulls in no asyncio, websockets or redis."""

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
