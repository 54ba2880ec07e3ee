"""Numeric flags: a finite number within bounds, or the command ends in one line (cli layer).

typer's own number types take ``nan`` and ``inf`` and answer anything unreadable with a
multi-line usage box; these parsers (``typer.Option(parser=...)``) check every numeric flag,
and the variable that may stand for it, against a :class:`~broker.settings.Bound` instead:
``error: leader_ttl (--leader-ttl, UPBIT_BROKER_LEADER_TTL) must be a number from 1 to 600 s,
got 'nan'`` on stderr, exit 2. The broker's settings use ``broker.settings.SETTING_BOUNDS``
(the same check runs again when the settings are built); the commands' own flags and the
simulator's use the tables below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from broker.errors import ConfigError
from broker.settings import Bound, check_number, check_setting

#: The flags commands parse themselves (0 means "no limit" where a flag says so).
COMMAND_BOUNDS: dict[str, Bound] = {
    "count": Bound(0, 1_000_000_000, "messages", True, "0: no limit"),
    "duration": Bound(0, 30 * 86_400, why="0: until Ctrl-C"),
    "timeout": Bound(0.1, 300, why="how long to wait for the leader"),
    "rate": Bound(0, 1_000_000, "events/s", why="simulated market events, all codes"),
}

#: ``upbit-broker simulate``'s numeric flags (each also an ``UPBIT_SIM_*`` variable).
SIMULATOR_BOUNDS: dict[str, Bound] = {
    "port": Bound(0, 65_535, "", True, "0: pick a free one"),
    "rate": COMMAND_BOUNDS["rate"],
    "markets": Bound(0, 100_000, "codes", True, "extra synthetic KRW codes"),
    "seed": Bound(0, 2**32 - 1, "", True, "a repeatable market"),
    "idle_timeout": Bound(0.1, 86_400, why="Upbit's is about 60 s (documented: 120 s)"),
    "messages_per_second": Bound(1, 10_000, "messages/s", True, "Upbit: 5"),
    "messages_per_minute": Bound(1, 600_000, "messages/min", True, "Upbit: 100"),
    "connect_rate": Bound(1, 10_000, "connects/s", True, "Upbit: 5 per IP"),
    "up_interval": Bound(0.1, 86_400, why="Upbit: 10 s"),
}


def _parser(check: Callable[[object], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value is None:  # an optional flag left out
            return None
        try:
            return check(value)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return parse


def setting(name: str, flag: str) -> Callable[[Any], Any]:
    """The parser of ``run``'s flag for the broker setting ``name``."""
    return _parser(lambda value: check_setting(name, value, flag))


def number(flag: str, bound: Bound, envvar: str | None = None) -> Callable[[Any], Any]:
    """The parser of a command's own numeric ``flag`` (and its variable, if any)."""
    label = f"{flag} ({envvar})" if envvar else flag
    return _parser(lambda value: check_number(flag, value, bound, label))
