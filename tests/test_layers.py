"""Layers: the protocol core is pure; Redis clients are built in one place."""

from __future__ import annotations

from tests.support.imports import IO_AND_OUTER_LAYERS, imported_names, modules_loaded_by


def test_protocol_core_imports_no_io() -> None:
    loaded = modules_loaded_by(
        "import broker.upbit.types, broker.upbit.requests, broker.upbit.router, "
        "broker.upbit.codes, broker.upbit.ratelimit, broker.keys\n"
        "import importlib, pkgutil, broker.upbit\n"
        "for m in pkgutil.iter_modules(broker.upbit.__path__):\n"
        "    importlib.import_module('broker.upbit.' + m.name)"
    )
    out = ",".join(sorted(m for m in loaded if m.split(".")[0] in IO_AND_OUTER_LAYERS))
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


def test_protocol_core_and_simulator_import_nothing_else_of_broker() -> None:
    """``broker/upbit/`` and ``simulator/`` stand on their own: the protocol's errors live in
    ``broker/upbit/errors.py``, so importing every module of both loads no ``broker`` module
    outside ``broker.upbit`` (``broker/__init__`` itself excepted: it is import-light)."""
    loaded = modules_loaded_by(
        "import importlib, pkgutil, broker.upbit, simulator\n"
        "for pkg in (broker.upbit, simulator):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)"
    )
    out = ",".join(
        sorted(m for m in loaded if m.startswith("broker.") and m.split(".")[1] != "upbit")
    )
    assert out == "", f"the protocol core or the simulator imported: {out}"


def test_no_source_of_the_core_or_simulator_names_the_rest_of_broker() -> None:
    """The same rule on the sources, so an import inside a function cannot slip past."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted(
        [*(root / "broker" / "upbit").glob("*.py"), *(root / "simulator").glob("*.py")]
    ):
        offenders += [
            f"{path.relative_to(root)}: {name}"
            for name in imported_names(path)
            if name == "broker"
            or (name.startswith("broker.") and not name.startswith("broker.upbit"))
        ]
    assert offenders == []


def test_protocol_errors_keep_the_one_root() -> None:
    """``broker.errors`` re-exports the protocol's errors (the same classes), so
    ``except BrokerError`` catches a refused request and a lost lease alike."""
    from broker import errors
    from broker.upbit import errors as protocol

    for name in protocol.__all__:
        assert getattr(errors, name) is getattr(protocol, name), name
        assert issubclass(getattr(protocol, name), errors.BrokerError), name
    for own in (errors.LeaseError, errors.SnapshotError, errors.NotLeaderError, errors.ConfigError):
        assert issubclass(own, protocol.BrokerError)


def test_benchmarks_and_production_code_never_import_the_tests() -> None:
    """Benchmarks share the harness through ``broker.testing``, never ``tests``; production code
    never imports ``broker.testing`` (only the demo, a developer's tool, and tests do)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("benchmarks", "broker", "consumers", "cli", "simulator"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            for name in imported_names(path):
                if name.split(".")[0] == "tests":
                    offenders.append(f"{rel}: {name}")
                testing = name == "broker.testing" or name.startswith("broker.testing.")
                exempt = folder == "benchmarks" or rel.parts[:2] == ("broker", "testing")
                if testing and not exempt and str(rel) != "cli/demo.py":
                    offenders.append(f"{rel}: {name}")
    assert offenders == []


def test_the_leader_core_imports_no_io() -> None:
    """``broker/core/`` is pure: no source of it imports asyncio, redis, websockets or an I/O
    module of the broker, and importing all of it loads none of them."""
    from pathlib import Path

    io_libraries = ("asyncio", "redis", "websockets", "hiredis")
    io_modules = (
        "broker.service",
        "broker.upstream",
        "broker.publisher",
        "broker.leader",
        "broker.redis_client",
        "broker.resp",
        "broker.leases",
        "broker.leader_phase",
        "broker.metrics",
        "broker.testing",
    )
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted((root / "broker" / "core").glob("*.py")):
        offenders += [
            f"{path.relative_to(root)}: {name}"
            for name in imported_names(path)
            if name.split(".")[0] in io_libraries
            or any(name == m or name.startswith(m + ".") for m in io_modules)
        ]
    assert offenders == []

    loaded = modules_loaded_by(
        "import importlib, pkgutil, broker.core\n"
        "for m in pkgutil.iter_modules(broker.core.__path__):\n"
        "    importlib.import_module('broker.core.' + m.name)"
    )
    core = {m for m in loaded if m.split(".")[0] in io_libraries}
    assert core == set(), sorted(core)
