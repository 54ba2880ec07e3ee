"""Entry point of ``upbit-broker``: one typer app; each command group lives in its own module.

Each module exposes ``register(app)``; this file only wires them together. Exit codes: 0 ok,
1 a failed check or operation, 2 usage errors (typer's own).
"""

from __future__ import annotations

import typer

from cli import broker_cmds, consumer_cmds, demo, ops, simulate

app = typer.Typer(
    name="upbit-broker",
    help="Share one Upbit market-data WebSocket between many processes through Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (broker_cmds, ops, consumer_cmds, simulate, demo):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
