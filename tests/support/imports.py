"""What a piece of code imports: by its sources (AST) and at run time (a fresh interpreter).

The layer tests (``test_layers``, ``test_simulator_layers``, ``test_contract``,
``test_consumer_queue``) state their rules as filters over these two readings.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: top-level packages a pure layer (the protocol core, the contract) must never load
IO_AND_OUTER_LAYERS = ("asyncio", "websockets", "redis", "simulator", "consumers", "cli")


def modules_loaded_by(imports: str) -> set[str]:
    """Every module in ``sys.modules`` after running ``imports`` in a fresh interpreter
    started at the repository root."""
    code = f"import sys\n{imports}\nprint(','.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    return set(filter(None, out.split(",")))


def imported_names(path: Path) -> Iterator[str]:
    """Every absolute module name the source at ``path`` imports, anywhere in it (a function's
    body included)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
