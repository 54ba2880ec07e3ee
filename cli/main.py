"""Entry point of ``upbit-broker``: one typer app; each command group lives in its own module.

Each module exposes ``register(app)``; this file only wires them together. Exit codes: 0 ok,
1 a failed check or operation, 2 usage errors (typer's own).
"""

from __future__ import annotations

import inspect

import typer

from cli import broker_cmds, consumer_cmds, demo, gateway_cmds, ops, simulate

app = typer.Typer(
    name="upbit-broker",
    help="Share one Upbit market-data WebSocket between many processes through Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


for module in (broker_cmds, ops, consumer_cmds, simulate, gateway_cmds, demo):
    module.register(app)
_reflow_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
