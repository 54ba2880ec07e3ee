"""The simulator depends on the pure protocol core only, never on the broker service."""

from __future__ import annotations

from pathlib import Path

from tests.support.imports import imported_names, modules_loaded_by

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_PROJECT = ("broker.upbit", "simulator")


def test_simulator_sources_import_only_the_protocol_core() -> None:
    for path in sorted((ROOT / "simulator").glob("*.py")):
        for name in imported_names(path):
            if name.split(".")[0] in ("broker", "simulator", "consumers", "cli"):
                assert name.startswith(ALLOWED_PROJECT), f"{path.name} imports {name}"


def test_importing_the_simulator_loads_no_service_module() -> None:
    loaded = modules_loaded_by("import simulator, simulator.server")
    out = ",".join(
        sorted(
            m
            for m in loaded
            if m.split(".")[0] in ("consumers", "cli", "redis")
            or (m.startswith("broker.") and not m.startswith(("broker.upbit", "broker.errors")))
        )
    )
    assert out == "", f"the simulator pulled in: {out}"
