"""Entry point of ``upbit-broker``: one typer app; each command group lives in its own module.

Each module exposes ``register(app)``; this file only says which module holds which command
(:data:`COMMANDS`). A module is imported when one of its commands is looked up (to run, or for
its own ``--help``), never at start-up: ``demo`` alone imports the broker's service, the
simulator, the gateway and websockets, and ``status`` needs none of them. ``upbit-broker
--help`` lists every command with its docstring read from its module's source, so it imports
no command module either. Exit codes: 0 ok, 1 a failed check or operation, 2 usage errors
(typer's own).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from typer._click import Command, Context, HelpFormatter

#: Every command, in the order ``--help`` lists them, and the module whose ``register(app)``
#: adds it (each command is a function of the same name there, whose docstring is its help).
COMMANDS: dict[str, str] = {
    "run": "cli.broker_cmds",
    "status": "cli.ops",
    "leases": "cli.ops",
    "resubscribe": "cli.ops",
    "check": "cli.ops",
    "tail": "cli.consumer_cmds",
    "snapshot": "cli.consumer_cmds",
    "top": "cli.consumer_cmds",
    "simulate": "cli.simulate",
    "gateway": "cli.gateway_cmds",
    "demo": "cli.demo",
}


def reflow(text: str) -> str:
    """Each paragraph of ``text`` on one line (a paragraph starting with ``\\b`` is kept as is).

    typer's rich help keeps a docstring's single line breaks, so a paragraph wrapped at the
    source's width would break mid-sentence at the terminal's; joined, rich wraps it to fit.
    """
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


def _reflow_help(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        text = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if text:
            info.help = reflow(text)


def load(module_name: str) -> dict[str, Command]:
    """Import ``module_name`` and build the click command of everything it registers."""
    module_app = typer.Typer()
    importlib.import_module(module_name).register(module_app)
    _reflow_help(module_app)
    return dict(typer.main.get_group(module_app).commands)


def summary(name: str) -> str:
    """The help of the command ``name`` as its module's source words it (its function's
    docstring, reflowed), read without importing the module."""
    return _docstrings(COMMANDS[name]).get(name, "")


@functools.cache
def _docstrings(module_name: str) -> dict[str, str]:
    spec = importlib.util.find_spec(module_name)
    # getattr, not isinstance(loader, importlib.abc.InspectLoader): importing importlib.abc
    # costs about 10 ms, a tenth of what ``--help`` imports
    get_source = getattr(spec.loader, "get_source", None) if spec is not None else None
    source = get_source(module_name) if get_source is not None else None
    return {
        node.name: reflow(ast.get_docstring(node) or "")
        for node in ast.walk(ast.parse(source or ""))
        if isinstance(node, ast.FunctionDef)
    }


class LazyCommands(MutableMapping[str, "Command"]):
    """A group's commands by name, each module imported (:func:`load`) at the first lookup of
    one of its commands; iterating lists the names without importing anything."""

    def __init__(self, built: MutableMapping[str, Command]) -> None:
        self.built: dict[str, Command] = dict(built)
        self._names = [*COMMANDS, *(n for n in built if n not in COMMANDS)]

    def __getitem__(self, name: str) -> Command:
        if name not in self.built and name in COMMANDS and name in self._names:
            self.built.update(load(COMMANDS[name]))
        return self.built[name]

    def __setitem__(self, name: str, command: Command) -> None:
        if name not in self._names:
            self._names.append(name)
        self.built[name] = command

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self.built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


class LazyGroup(TyperGroup):
    """The ``upbit-broker`` group over :class:`LazyCommands`.

    Its own help lists a command not imported yet by :func:`summary` (the first paragraph is
    all the listing shows); a command that runs, or whose ``--help`` is asked, is the real one.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.lazy = LazyCommands(self.commands)
        self.commands = self.lazy
        self._listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        return list(self.lazy)  # TyperGroup's reads every value, which would import them all

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if self._listing and cmd_name in COMMANDS and cmd_name not in self.lazy.built:
            return TyperCommand(cmd_name, help=summary(cmd_name))
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="upbit-broker",
    help="Share one Upbit market-data WebSocket between many processes through Redis.",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    # No options of its own: the callback only makes typer build the group (LazyGroup) although
    # no command is registered on ``app`` itself.
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
