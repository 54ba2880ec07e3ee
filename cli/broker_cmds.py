"""``upbit-broker run``: the broker process (leader or standby)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Annotated, Any

import typer

from broker.errors import BrokerError, ConfigError
from broker.settings import BrokerSettings
from broker.upbit.types import Format
from cli.logs import configure_logging

ENV = "UPBIT_BROKER_"


def _settings(**flags: Any) -> BrokerSettings:
    try:
        return BrokerSettings.from_env(None, **flags)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


async def _serve(settings: BrokerSettings) -> None:
    from broker.service import Broker

    broker = Broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    presses = 0

    def on_signal() -> None:
        # First signal: drain and stop. Second: exit at once.
        nonlocal presses
        presses += 1
        if presses > 1:
            sys.exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    metrics = None
    if settings.metrics_port:
        from broker.metrics import start_metrics_server

        metrics = start_metrics_server(broker, settings.metrics_port)
    try:
        await broker.serve(stop)
    finally:
        if metrics is not None:
            metrics.shutdown()


def _run_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run on uvloop when asked for (or, with ``auto``, when installed): each loop wake-up
    costs less there, and at low rates the broker's CPU is mostly wake-ups."""
    if choice not in ("auto", "uvloop", "asyncio"):
        typer.echo(f"error: --event-loop must be auto, uvloop or asyncio, got {choice!r}", err=True)
        raise typer.Exit(2)
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                typer.echo("error: --event-loop uvloop but uvloop is not installed", err=True)
                raise typer.Exit(2) from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        redis_url: Annotated[
            str | None,
            typer.Option(envvar=ENV + "REDIS_URL", help="Redis URL (redis://, rediss://)"),
        ] = None,
        upstream_url: Annotated[
            str | None, typer.Option(envvar=ENV + "UPSTREAM_URL", help="Upbit websocket URL")
        ] = None,
        namespace: Annotated[
            str | None, typer.Option(envvar=ENV + "NAMESPACE", help="key/channel prefix")
        ] = None,
        lease_ttl: Annotated[
            float | None, typer.Option(envvar=ENV + "LEASE_TTL", help="default lease TTL, s")
        ] = None,
        leader_ttl: Annotated[
            float | None, typer.Option(envvar=ENV + "LEADER_TTL", help="leader lock TTL, s")
        ] = None,
        upstream_format: Annotated[
            str | None, typer.Option(envvar=ENV + "UPSTREAM_FORMAT", help="DEFAULT or SIMPLE")
        ] = None,
        broker_id: Annotated[
            str | None, typer.Option(envvar=ENV + "BROKER_ID", help="this broker's id")
        ] = None,
        stall_timeout: Annotated[
            float | None,
            typer.Option(envvar=ENV + "STALL_TIMEOUT", help="reconnect after s silent"),
        ] = None,
        metrics_port: Annotated[
            int | None, typer.Option(envvar=ENV + "METRICS_PORT", help="Prometheus port (0 = off)")
        ] = None,
        event_loop: Annotated[
            str,
            typer.Option(
                envvar=ENV + "EVENT_LOOP", help="auto (uvloop when installed), uvloop or asyncio"
            ),
        ] = "auto",
        log_level: Annotated[str, typer.Option(envvar=ENV + "LOG_LEVEL")] = "info",
        log_format: Annotated[
            str, typer.Option(envvar=ENV + "LOG_FORMAT", help="text or json")
        ] = "text",
    ) -> None:
        """Run a broker: the leader owns the Upbit connection, a second one waits as standby."""
        fmt = None
        if upstream_format is not None:
            try:
                fmt = Format(upstream_format.upper())
            except ValueError:
                typer.echo(f"error: unknown format {upstream_format!r}", err=True)
                raise typer.Exit(2) from None
            if fmt.is_list:
                typer.echo(
                    "error: the broker republishes frames one by one: use DEFAULT or SIMPLE",
                    err=True,
                )
                raise typer.Exit(2)
        settings = _settings(
            redis_url=redis_url,
            upstream_url=upstream_url,
            namespace=namespace,
            lease_ttl=lease_ttl,
            leader_ttl=leader_ttl,
            upstream_format=fmt,
            broker_id=broker_id,
            stall_timeout=stall_timeout,
            metrics_port=metrics_port,
        )
        if log_format not in ("text", "json"):
            typer.echo(f"error: --log-format must be text or json, got {log_format!r}", err=True)
            raise typer.Exit(2)
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            typer.echo(f"error: unknown --log-level {log_level!r}", err=True)
            raise typer.Exit(2)
        configure_logging(log_level, log_format)
        try:
            _run_loop(_serve(settings), event_loop)
        except BrokerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
