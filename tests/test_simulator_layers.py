"""The simulator depends on the pure protocol core only, never on the broker service."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_PROJECT = ("broker.upbit", "simulator")


def test_simulator_sources_import_only_the_protocol_core() -> None:
    for path in sorted((ROOT / "simulator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("broker", "simulator", "consumers", "cli"):
                    assert name.startswith(ALLOWED_PROJECT), f"{path.name} imports {name}"


def test_importing_the_simulator_loads_no_service_module() -> None:
    code = (
        "import sys, simulator, simulator.server\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('consumers', 'cli', 'redis')"
        " or (m.startswith('broker.') and not m.startswith(('broker.upbit', 'broker.errors'))))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert out == "", f"the simulator pulled in: {out}"
