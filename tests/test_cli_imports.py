"""The CLI starts light: ``cli.main`` imports no command module, a command imports only its
own, and ``--help`` lists every command as its module words it without importing any."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import typer

from cli.main import COMMANDS, app, summary
from tests.support.imports import modules_loaded_by

#: what only the service commands need (demo imports them all)
HEAVY = ("broker.service", "simulator", "gateway", "websockets")


def heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))


def run_quietly(*args: str) -> str:
    """Code for :func:`modules_loaded_by`: run ``upbit-broker ARGS`` with its output dropped."""
    return (
        "import contextlib, io\n"
        "from cli.main import app\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    app({list(args)!r})\n"
    )


def test_importing_the_cli_loads_no_command_module() -> None:
    loaded = modules_loaded_by("import cli.main")
    assert heavy(loaded) == []
    assert sorted(m for m in loaded if m in COMMANDS.values() or m == "consumers") == []


def test_status_help_loads_only_what_status_needs() -> None:
    loaded = modules_loaded_by(run_quietly("status", "--help"))
    assert "cli.ops" in loaded  # the command was found (its help printed)
    assert heavy(loaded) == []
    assert "consumers" not in loaded  # resubscribe imports it when it runs
    assert "cli.demo" not in loaded and "cli.consumer_cmds" not in loaded


def test_the_command_list_loads_no_command_module() -> None:
    loaded = modules_loaded_by(run_quietly("--help"))
    assert "cli.main" in loaded
    assert sorted(m for m in loaded if m in COMMANDS.values()) == []
    assert heavy(loaded) == []


def test_the_table_names_what_each_module_registers() -> None:
    registered: dict[str, str] = {}
    for module_name in dict.fromkeys(COMMANDS.values()):
        module_app = typer.Typer()
        importlib.import_module(module_name).register(module_app)
        for info in module_app.registered_commands:
            assert info.callback is not None
            name = info.name or info.callback.__name__
            assert info.callback.__name__ == name  # summary() finds it by that name
            registered[name] = module_name
    assert registered == COMMANDS
    assert list(registered) == list(COMMANDS)  # --help's order: the modules' own


def test_the_listing_is_the_one_the_loaded_commands_give(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    group: Any = typer.main.get_command(app)

    def listing() -> str:
        group.get_help(typer.Context(group, info_name="upbit-broker"))
        return capsys.readouterr().out

    before = listing()  # every command a stub read from its module's source
    for name in COMMANDS:
        assert group.commands[name].help == summary(name), name
    assert set(group.lazy.built) == set(COMMANDS)
    after = listing()  # every command the real one
    assert before == after
    for name in COMMANDS:
        assert f" {name} " in after
