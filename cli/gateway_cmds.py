"""``upbit-broker gateway``: the Upbit-compatible gateway until SIGTERM or Ctrl-C (cli layer, thin).

Builds a :class:`~gateway.config.GatewaySettings` from the flags, each also an environment
variable (``UPBIT_GATEWAY_*``; the Redis URL and namespace are the broker's own
``UPBIT_BROKER_REDIS_URL`` and ``UPBIT_BROKER_NAMESPACE``), prints where it serves and runs.
The settings without a flag (``rest_lease_seconds``, ``up_interval`` ...) are read from their
``UPBIT_GATEWAY_<NAME>`` variables. The first SIGTERM or Ctrl-C closes the clients (1001) and
releases their leases; a second one exits at once.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from broker.errors import ConfigError
from broker.keys import DEFAULT_NAMESPACE
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
    listen_error,
    log_format_option,
    log_level_option,
    run_loop,
    settings_default,
    with_signals,
)
from cli.logs import configure_logging
from gateway.config import GATEWAY_BOUNDS, GATEWAY_ENV_PREFIX, ON_GAP, GatewaySettings

ENV = GATEWAY_ENV_PREFIX


def _default(name: str) -> Any:
    """A setting's default, so that ``--help`` shows the real value."""
    return settings_default(GatewaySettings, name)


def _option(name: str, help: str, **kwargs: Any) -> Any:
    """The flag of the setting ``name``, also ``UPBIT_GATEWAY_NAME``; a numeric one is checked
    against its bound (one line, exit 2)."""
    if name in GATEWAY_BOUNDS:
        flag = "--" + name.replace("_", "-")
        kwargs["parser"] = bounds.number(flag, GATEWAY_BOUNDS[name], ENV + name.upper())
    return env_option(ENV + name.upper(), help, **kwargs)


class ServeError(Exception):
    """The gateway cannot start (one line for the person)."""


async def _serve(settings: GatewaySettings, stop: asyncio.Event) -> int:
    from gateway.server import Gateway

    gateway = Gateway(settings)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.aclose()
        if isinstance(exc, ConnectionError):  # Redis (Gateway.start names it)
            raise ServeError(str(exc)) from exc
        raise ServeError(listen_error(exc, settings.host, settings.port)) from exc
    except BaseException:
        await gateway.aclose()
        raise
    try:
        typer.echo(f"serving {gateway.url} (gateway {settings.gateway_id})")
        typer.echo(f"rest: {gateway.http_url}/v1/ticker?markets=KRW-BTC")
        await stop.wait()
        typer.echo("stopping")
    finally:
        await gateway.aclose()
    return EXIT_OK


def register(app: typer.Typer) -> None:
    """Add the ``gateway`` command to ``app``."""

    @app.command("gateway")
    def gateway(
        host: Annotated[str, _option("host", "Listen address.")] = _default("host"),
        port: Annotated[int, _option("port", "Listen port (0: pick a free one).")] = _default(
            "port"
        ),
        redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
        namespace: NamespaceOption = DEFAULT_NAMESPACE,
        tls_cert: Annotated[
            str, _option("tls_cert", "Certificate (PEM) for wss:// and https:// (with --tls-key).")
        ] = _default("tls_cert"),
        tls_key: Annotated[str, _option("tls_key", "Private key (PEM) of --tls-cert.")] = (
            _default("tls_key")
        ),
        emulate_limits: Annotated[
            bool,
            _option(
                "emulate_limits",
                "Impose Upbit's limits (5 messages/s and 100/min per connection, "
                "5 connects/s per IP), for testing bots.",
            ),
        ] = _default("emulate_limits"),
        on_gap: Annotated[
            str,
            _option(
                "on_gap",
                "When the broker announces a gap: 'snapshot' re-sends fresh SNAPSHOTs "
                "of each client's streams, 'close' closes its connection with 1012.",
            ),
        ] = _default("on_gap"),
        gateway_id: Annotated[
            str | None,
            _option(
                "gateway_id",
                "Names this process in its clients' lease ids (ID.N).",
                show_default="gw-HOSTNAME-PID-RANDOM",
            ),
        ] = None,
        upstream_rest_url: Annotated[
            str,
            _option(
                "upstream_rest_url",
                "Upbit's REST API, for the quotation paths the gateway forwards.",
            ),
        ] = _default("upstream_rest_url"),
        lease_ttl: Annotated[
            float,
            _option(
                "lease_ttl", "Each client's lease TTL, seconds (renewed in batches every TTL/3)."
            ),
        ] = _default("lease_ttl"),
        client_queue: Annotated[
            int,
            _option(
                "client_queue",
                "Frames queued for one client before it is closed (1008) as too slow.",
            ),
        ] = _default("client_queue"),
        max_clients: Annotated[
            int, _option("max_clients", "Client connections at once (more are refused with 503).")
        ] = _default("max_clients"),
        idle_timeout: Annotated[
            float,
            _option(
                "idle_timeout",
                "Drop a client silent both ways this long, as Upbit does (0: never).",
            ),
        ] = _default("idle_timeout"),
        event_loop: Annotated[str, event_loop_option(ENV)] = "auto",
        log_level: Annotated[str, log_level_option(ENV)] = "info",
        log_format: Annotated[str, log_format_option(ENV)] = "text",
    ) -> None:
        """Serve Upbit's WebSocket and REST on one port; every client connection is a lease.

        Point a bot written for Upbit at ws://HOST:PORT/websocket/v1 instead of
        wss://api.upbit.com/websocket/v1: it shares the broker's one upstream connection. Needs
        Redis and a running broker (upbit-broker run); run as many gateways as you like.
        """
        if on_gap not in ON_GAP:
            fail(f"--on-gap must be one of {', '.join(ON_GAP)}, got {on_gap!r}", EXIT_USAGE)
        check_log_flags(log_level, log_format)
        try:
            settings = GatewaySettings.from_env(
                None,
                host=host,
                port=port,
                redis_url=redis_url,
                namespace=namespace,
                tls_cert=tls_cert,
                tls_key=tls_key,
                emulate_limits=emulate_limits,
                on_gap=on_gap,
                gateway_id=gateway_id,
                upstream_rest_url=upstream_rest_url,
                lease_ttl=lease_ttl,
                client_queue=client_queue,
                max_clients=max_clients,
                idle_timeout=idle_timeout,
            )
        except (ConfigError, ValueError) as exc:
            fail(str(exc), EXIT_USAGE)
        configure_logging(log_level, log_format)
        try:
            code = run_loop(
                with_signals(lambda stop: _serve(settings, stop), soft=True), event_loop
            )
        except ServeError as exc:
            fail(str(exc))
        if code:
            raise typer.Exit(code)


__all__ = ["register"]
