"""``upbit-broker simulate``: run the Upbit simulator until Ctrl-C (CLI layer, thin).

Builds a :class:`~simulator.SimulatorConfig` from flags (each also read from an
``UPBIT_SIM_*`` environment variable), prints where it serves, and waits. Ctrl-C as every
command (``cli.common.with_signals``): the first stops it, a second interrupts at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cli import bounds
from cli.common import EXIT_OK, LOG_LEVELS, fail, listen_error, with_signals
from simulator import Simulator, SimulatorConfig

_DEFAULTS = SimulatorConfig()


def _number(name: str) -> Callable[[Any], Any]:
    """The parser of the numeric flag ``--NAME`` (also ``UPBIT_SIM_NAME``): one line, exit 2."""
    flag = "--" + name.replace("_", "-")
    return bounds.number(flag, bounds.SIMULATOR_BOUNDS[name], "UPBIT_SIM_" + name.upper())


class ListenError(Exception):
    """The simulator cannot listen where it was asked to (one line for the person)."""


async def _serve(config: SimulatorConfig, stop: asyncio.Event) -> int:
    sim = Simulator(config)
    try:
        await sim.start()
    except OSError as exc:  # cannot listen: the one error a person makes here
        await sim.aclose()
        raise ListenError(listen_error(exc, config.host, config.port)) from exc
    try:
        base = sim.http_url
        typer.echo(
            f"serving {sim.url} (seed {sim.seed}, {len(sim.codes)} codes, rate {config.rate}/s)"
        )
        typer.echo(
            f"operator: {base}/_sim/state  {base}/_sim/drop  {base}/_sim/stall?seconds=S  "
            f"{base}/_sim/mute?codes=A,B&seconds=S  {base}/_sim/sends?clear=1"
        )
        typer.echo(f"rest: {base}/v1/market/all  {base}/v1/ticker?markets=KRW-BTC")
        await stop.wait()
        typer.echo("stopping")
    finally:
        await sim.aclose()
    return EXIT_OK


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app``."""

    @app.command("simulate")
    def simulate(
        host: Annotated[str, typer.Option(envvar="UPBIT_SIM_HOST", help="Listen address.")] = (
            _DEFAULTS.host
        ),
        port: Annotated[
            int,
            typer.Option(
                envvar="UPBIT_SIM_PORT", parser=_number("port"), help="Listen port (0: pick one)."
            ),
        ] = _DEFAULTS.port,
        rate: Annotated[
            float,
            typer.Option(
                envvar="UPBIT_SIM_RATE",
                parser=_number("rate"),
                help="Market events per second, all codes.",
            ),
        ] = _DEFAULTS.rate,
        markets: Annotated[
            int,
            typer.Option(
                envvar="UPBIT_SIM_MARKETS",
                parser=_number("markets"),
                help="Extra synthetic KRW codes.",
            ),
        ] = _DEFAULTS.markets,
        seed: Annotated[
            int | None,
            typer.Option(
                envvar="UPBIT_SIM_SEED", parser=_number("seed"), help="Repeatable market."
            ),
        ] = None,
        idle_timeout: Annotated[
            float,
            typer.Option(
                envvar="UPBIT_SIM_IDLE_TIMEOUT",
                parser=_number("idle_timeout"),
                help="Seconds before an idle drop.",
            ),
        ] = _DEFAULTS.idle_timeout,
        messages_per_second: Annotated[
            int,
            typer.Option(
                envvar="UPBIT_SIM_MESSAGES_PER_SECOND",
                parser=_number("messages_per_second"),
                help="Per connection.",
            ),
        ] = _DEFAULTS.message_rate[0],
        messages_per_minute: Annotated[
            int,
            typer.Option(
                envvar="UPBIT_SIM_MESSAGES_PER_MINUTE",
                parser=_number("messages_per_minute"),
                help="Per connection.",
            ),
        ] = _DEFAULTS.message_rate[1],
        connect_rate: Annotated[
            int,
            typer.Option(
                envvar="UPBIT_SIM_CONNECT_RATE",
                parser=_number("connect_rate"),
                help="Upgrades per second per IP.",
            ),
        ] = _DEFAULTS.connect_rate,
        up_interval: Annotated[
            float,
            typer.Option(
                envvar="UPBIT_SIM_UP_INTERVAL",
                parser=_number("up_interval"),
                help="Seconds between UP frames.",
            ),
        ] = _DEFAULTS.up_interval,
        exponent_numbers: Annotated[
            bool,
            typer.Option(envvar="UPBIT_SIM_EXPONENT_NUMBERS", help="Spell 1.16539E8 like Java."),
        ] = False,
        record_sends: Annotated[
            bool, typer.Option(envvar="UPBIT_SIM_RECORD_SENDS", help="Keep a send log.")
        ] = False,
        compression: Annotated[
            bool, typer.Option(envvar="UPBIT_SIM_COMPRESSION", help="Offer permessage-deflate.")
        ] = True,
        log_level: Annotated[str, typer.Option(envvar="UPBIT_SIM_LOG_LEVEL")] = "INFO",
    ) -> None:
        """Serve a faithful Upbit quotation WebSocket (and operator endpoints) until Ctrl-C."""
        try:
            config = SimulatorConfig(
                host=host,
                port=port,
                rate=rate,
                markets=markets,
                seed=seed,
                idle_timeout=idle_timeout,
                message_rate=(messages_per_second, messages_per_minute),
                connect_rate=connect_rate,
                up_interval=up_interval,
                exponent_numbers=exponent_numbers,
                record_sends=record_sends,
                compression=compression,
            )
        except ValueError as exc:
            fail(str(exc), 2)
        if log_level.upper() not in LOG_LEVELS:
            fail(f"unknown --log-level {log_level!r}", 2)
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        try:
            code = asyncio.run(with_signals(lambda stop: _serve(config, stop), soft=True))
        except ListenError as exc:
            fail(str(exc))
        if code:
            raise typer.Exit(code)
