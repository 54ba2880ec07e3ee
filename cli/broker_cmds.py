"""``upbit-broker run``: the broker process (leader or standby)."""

from __future__ import annotations

import asyncio
from dataclasses import MISSING, fields
from typing import Annotated, Any

import typer

from broker.errors import BrokerError, ConfigError
from broker.settings import BrokerSettings
from broker.upbit.types import Format
from cli import bounds
from cli.common import EXIT_OK, run_loop, with_signals
from cli.logs import configure_logging

ENV = "UPBIT_BROKER_"


def _settings(**flags: Any) -> BrokerSettings:
    try:
        return BrokerSettings.from_env(None, **flags)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


async def _serve(settings: BrokerSettings) -> int:
    """Run a broker until Ctrl-C: the first drains and stops, a second exits at once (130)."""
    return await with_signals(lambda stop: _serve_until(settings, stop), soft=True)


async def _serve_until(settings: BrokerSettings, stop: asyncio.Event) -> int:
    from broker.service import Broker

    broker = Broker(settings)
    metrics = None
    if settings.metrics_port:
        from broker.metrics import start_metrics_server

        metrics = start_metrics_server(broker, settings.metrics_port)
    try:
        await broker.serve(stop)
    finally:
        if metrics is not None:
            metrics.shutdown()
    return EXIT_OK


_FIELDS = {f.name: f for f in fields(BrokerSettings)}


def _default(name: str) -> Any:
    """A :class:`BrokerSettings` field's default: what ``run`` uses when neither the flag nor
    its ``UPBIT_BROKER_*`` variable is set (so ``--help`` shows the real value)."""
    value = _FIELDS[name].default
    assert value is not MISSING, name
    return value.value if isinstance(value, Format) else value


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        redis_url: Annotated[
            str,
            typer.Option(
                envvar=ENV + "REDIS_URL", show_envvar=True, help="Redis URL (redis://, rediss://)."
            ),
        ] = _default("redis_url"),
        upstream_url: Annotated[
            str,
            typer.Option(
                envvar=ENV + "UPSTREAM_URL", show_envvar=True, help="Upbit websocket URL."
            ),
        ] = _default("upstream_url"),
        namespace: Annotated[
            str,
            typer.Option(envvar=ENV + "NAMESPACE", show_envvar=True, help="Key/channel prefix."),
        ] = _default("namespace"),
        lease_ttl: Annotated[
            float,
            typer.Option(
                envvar=ENV + "LEASE_TTL",
                show_envvar=True,
                help="Default lease TTL, seconds.",
                parser=bounds.setting("lease_ttl", "--lease-ttl"),
            ),
        ] = _default("lease_ttl"),
        leader_ttl: Annotated[
            float,
            typer.Option(
                envvar=ENV + "LEADER_TTL",
                show_envvar=True,
                help="Leader lock TTL, seconds.",
                parser=bounds.setting("leader_ttl", "--leader-ttl"),
            ),
        ] = _default("leader_ttl"),
        upstream_format: Annotated[
            str,
            typer.Option(
                envvar=ENV + "UPSTREAM_FORMAT", show_envvar=True, help="DEFAULT or SIMPLE."
            ),
        ] = _default("upstream_format"),
        broker_id: Annotated[
            str | None,
            typer.Option(
                envvar=ENV + "BROKER_ID",
                show_envvar=True,
                help="This broker's id.",
                show_default="HOSTNAME-PID-RANDOM",
            ),
        ] = None,
        stall_timeout: Annotated[
            float,
            typer.Option(
                envvar=ENV + "STALL_TIMEOUT",
                show_envvar=True,
                help="Reconnect after this many seconds without any frame.",
                parser=bounds.setting("stall_timeout", "--stall-timeout"),
            ),
        ] = _default("stall_timeout"),
        metrics_port: Annotated[
            int,
            typer.Option(
                envvar=ENV + "METRICS_PORT",
                show_envvar=True,
                help="Prometheus port (0 = off).",
                parser=bounds.setting("metrics_port", "--metrics-port"),
            ),
        ] = _default("metrics_port"),
        history: Annotated[
            str,
            typer.Option(
                envvar=ENV + "HISTORY",
                show_envvar=True,
                help="History entries kept per stream, by type; 'off': none.",
            ),
        ] = _default("history"),
        event_loop: Annotated[
            str,
            typer.Option(
                envvar=ENV + "EVENT_LOOP",
                show_envvar=True,
                help="auto (uvloop when installed), uvloop or asyncio.",
            ),
        ] = "auto",
        log_level: Annotated[
            str,
            typer.Option(
                envvar=ENV + "LOG_LEVEL",
                show_envvar=True,
                help="debug, info, warning, error or critical.",
            ),
        ] = "info",
        log_format: Annotated[
            str, typer.Option(envvar=ENV + "LOG_FORMAT", show_envvar=True, help="text or json.")
        ] = "text",
    ) -> None:
        """Run a broker: the leader owns the Upbit connection, a second one waits as standby.

        A flag wins over its variable, a variable over the default. The settings without a flag
        (status_interval, rate_per_second, backoff_max ...) are read from their UPBIT_BROKER_NAME
        variables too; broker/settings.py lists them all with their defaults.
        """
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
            history=history,
        )
        if log_format not in ("text", "json"):
            typer.echo(f"error: --log-format must be text or json, got {log_format!r}", err=True)
            raise typer.Exit(2)
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            typer.echo(f"error: unknown --log-level {log_level!r}", err=True)
            raise typer.Exit(2)
        configure_logging(log_level, log_format)
        try:
            code = run_loop(_serve(settings), event_loop)
        except BrokerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if code:
            raise typer.Exit(code)
