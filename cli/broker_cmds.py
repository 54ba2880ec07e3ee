"""``upbit-broker run``: the broker process (leader or standby)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from broker.errors import BrokerError, ConfigError
from broker.keys import DEFAULT_NAMESPACE
from broker.settings import SETTING_BOUNDS, BrokerSettings
from broker.upbit.types import Format
from cli import bounds
from cli.common import (
    DEFAULT_REDIS_URL,
    EXIT_OK,
    EXIT_USAGE,
    NamespaceOption,
    RedisUrlOption,
    check_log_flags,
    env_option,
    event_loop_option,
    fail,
    log_format_option,
    log_level_option,
    run_loop,
    settings_default,
    with_signals,
)
from cli.logs import configure_logging

ENV = "UPBIT_BROKER_"


def _settings(**flags: Any) -> BrokerSettings:
    try:
        return BrokerSettings.from_env(None, **flags)
    except (ConfigError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)


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


def _default(name: str) -> Any:
    """A :class:`BrokerSettings` field's default: what ``run`` uses when neither the flag nor
    its ``UPBIT_BROKER_*`` variable is set (so ``--help`` shows the real value)."""
    return settings_default(BrokerSettings, name)


def _option(name: str, help: str, **kwargs: Any) -> Any:
    """The flag of the setting ``name``, also ``UPBIT_BROKER_NAME``; a numeric one is checked
    against its bound (one line, exit 2)."""
    if name in SETTING_BOUNDS:
        kwargs["parser"] = bounds.setting(name, "--" + name.replace("_", "-"))
    return env_option(ENV + name.upper(), help, **kwargs)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
        upstream_url: Annotated[str, _option("upstream_url", "Upbit websocket URL.")] = (
            _default("upstream_url")
        ),
        namespace: NamespaceOption = DEFAULT_NAMESPACE,
        lease_ttl: Annotated[float, _option("lease_ttl", "Default lease TTL, seconds.")] = (
            _default("lease_ttl")
        ),
        leader_ttl: Annotated[float, _option("leader_ttl", "Leader lock TTL, seconds.")] = (
            _default("leader_ttl")
        ),
        upstream_format: Annotated[str, _option("upstream_format", "DEFAULT or SIMPLE.")] = (
            _default("upstream_format")
        ),
        broker_id: Annotated[
            str | None,
            _option("broker_id", "This broker's id.", show_default="HOSTNAME-PID-RANDOM"),
        ] = None,
        stall_timeout: Annotated[
            float,
            _option("stall_timeout", "Reconnect after this many seconds without any frame."),
        ] = _default("stall_timeout"),
        metrics_port: Annotated[int, _option("metrics_port", "Prometheus port (0 = off).")] = (
            _default("metrics_port")
        ),
        history: Annotated[
            str, _option("history", "History entries kept per stream, by type; 'off': none.")
        ] = _default("history"),
        event_loop: Annotated[str, event_loop_option(ENV)] = "auto",
        log_level: Annotated[str, log_level_option(ENV)] = "info",
        log_format: Annotated[str, log_format_option(ENV)] = "text",
    ) -> None:
        """Run a broker: the leader owns the Upbit connection, a second one waits as standby.

        A flag wins over its variable, a variable over the default. The settings without a flag
        (status_interval, rate_per_second, backoff_max ...) are read from their UPBIT_BROKER_NAME
        variables too; broker/settings.py lists them all with their defaults.
        """
        try:
            fmt = Format(upstream_format.upper())
        except ValueError:
            fail(f"unknown format {upstream_format!r}", EXIT_USAGE)
        if fmt.is_list:
            fail("the broker republishes frames one by one: use DEFAULT or SIMPLE", EXIT_USAGE)
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
        check_log_flags(log_level, log_format)
        configure_logging(log_level, log_format)
        try:
            code = run_loop(_serve(settings), event_loop)
        except BrokerError as exc:
            fail(str(exc))
        if code:
            raise typer.Exit(code)
