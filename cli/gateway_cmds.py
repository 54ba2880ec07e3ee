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
import errno
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Annotated, Any, NoReturn

import typer

from broker.errors import ConfigError, describe
from cli import bounds
from cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, run_loop, with_signals
from cli.logs import configure_logging
from gateway.config import GATEWAY_BOUNDS, GATEWAY_ENV_PREFIX, ON_GAP, GatewaySettings

ENV = GATEWAY_ENV_PREFIX
_FIELDS = {f.name: f for f in fields(GatewaySettings)}


def _default(name: str) -> Any:
    """A setting's default, so that ``--help`` shows the real value."""
    value = _FIELDS[name].default
    assert value is not MISSING, name
    return value


def _number(name: str) -> Callable[[Any], Any]:
    """The parser of the numeric flag ``--NAME`` (also ``UPBIT_GATEWAY_NAME``): one line, exit 2."""
    flag = "--" + name.replace("_", "-")
    return bounds.number(flag, GATEWAY_BOUNDS[name], ENV + name.upper())


class ServeError(Exception):
    """The gateway cannot start (one line for the person)."""


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


async def _serve(settings: GatewaySettings, stop: asyncio.Event) -> int:
    from gateway.server import Gateway

    gateway = Gateway(settings)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.aclose()
        if isinstance(exc, ConnectionError):  # Redis (Gateway.start names it)
            raise ServeError(str(exc)) from exc
        raise ServeError(_listen_error(exc, settings.host, settings.port)) from exc
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


def _listen_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use on {host} (pick another with --port, 0 picks a free one)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"not allowed to listen on {host}:{port} (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port}: {describe(exc, with_type=False)}"


def register(app: typer.Typer) -> None:
    """Add the ``gateway`` command to ``app``."""

    @app.command("gateway")
    def gateway(
        host: Annotated[
            str, typer.Option(envvar=ENV + "HOST", show_envvar=True, help="Listen address.")
        ] = _default("host"),
        port: Annotated[
            int,
            typer.Option(
                envvar=ENV + "PORT",
                show_envvar=True,
                parser=_number("port"),
                help="Listen port (0: pick a free one).",
            ),
        ] = _default("port"),
        redis_url: Annotated[
            str,
            typer.Option(
                envvar="UPBIT_BROKER_REDIS_URL",
                show_envvar=True,
                help="Redis URL, shared with the broker (redis://, rediss://, unix://).",
            ),
        ] = _default("redis_url"),
        namespace: Annotated[
            str,
            typer.Option(
                envvar="UPBIT_BROKER_NAMESPACE",
                show_envvar=True,
                help="Key prefix shared with the broker.",
            ),
        ] = _default("namespace"),
        tls_cert: Annotated[
            str,
            typer.Option(
                envvar=ENV + "TLS_CERT",
                show_envvar=True,
                help="Certificate (PEM) for wss:// and https:// (with --tls-key).",
            ),
        ] = _default("tls_cert"),
        tls_key: Annotated[
            str,
            typer.Option(
                envvar=ENV + "TLS_KEY", show_envvar=True, help="Private key (PEM) of --tls-cert."
            ),
        ] = _default("tls_key"),
        emulate_limits: Annotated[
            bool,
            typer.Option(
                "--emulate-limits/--no-emulate-limits",
                envvar=ENV + "EMULATE_LIMITS",
                show_envvar=True,
                help="Impose Upbit's limits (5 messages/s and 100/min per connection, "
                "5 connects/s per IP), for testing bots.",
            ),
        ] = _default("emulate_limits"),
        on_gap: Annotated[
            str,
            typer.Option(
                envvar=ENV + "ON_GAP",
                show_envvar=True,
                help="When the broker announces a gap: 'snapshot' re-sends fresh SNAPSHOTs "
                "of each client's streams, 'close' closes its connection with 1012.",
            ),
        ] = _default("on_gap"),
        gateway_id: Annotated[
            str | None,
            typer.Option(
                envvar=ENV + "GATEWAY_ID",
                show_envvar=True,
                help="Names this process in its clients' lease ids (ID.N).",
                show_default="gw-HOSTNAME-PID-RANDOM",
            ),
        ] = None,
        upstream_rest_url: Annotated[
            str,
            typer.Option(
                envvar=ENV + "UPSTREAM_REST_URL",
                show_envvar=True,
                help="Upbit's REST API, for the quotation paths the gateway forwards.",
            ),
        ] = _default("upstream_rest_url"),
        lease_ttl: Annotated[
            float,
            typer.Option(
                envvar=ENV + "LEASE_TTL",
                show_envvar=True,
                parser=_number("lease_ttl"),
                help="Each client's lease TTL, seconds (renewed in batches every TTL/3).",
            ),
        ] = _default("lease_ttl"),
        client_queue: Annotated[
            int,
            typer.Option(
                envvar=ENV + "CLIENT_QUEUE",
                show_envvar=True,
                parser=_number("client_queue"),
                help="Frames queued for one client before it is closed (1008) as too slow.",
            ),
        ] = _default("client_queue"),
        max_clients: Annotated[
            int,
            typer.Option(
                envvar=ENV + "MAX_CLIENTS",
                show_envvar=True,
                parser=_number("max_clients"),
                help="Client connections at once (more are refused with 503).",
            ),
        ] = _default("max_clients"),
        idle_timeout: Annotated[
            float,
            typer.Option(
                envvar=ENV + "IDLE_TIMEOUT",
                show_envvar=True,
                parser=_number("idle_timeout"),
                help="Drop a client silent both ways this long, as Upbit does (0: never).",
            ),
        ] = _default("idle_timeout"),
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
        """Serve Upbit's WebSocket and REST on one port; every client connection is a lease.

        Point a bot written for Upbit at ws://HOST:PORT/websocket/v1 instead of
        wss://api.upbit.com/websocket/v1: it shares the broker's one upstream connection. Needs
        Redis and a running broker (upbit-broker run); run as many gateways as you like.
        """
        if on_gap not in ON_GAP:
            _fail(f"--on-gap must be one of {', '.join(ON_GAP)}, got {on_gap!r}", EXIT_USAGE)
        if log_format not in ("text", "json"):
            _fail(f"--log-format must be text or json, got {log_format!r}", EXIT_USAGE)
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            _fail(f"unknown --log-level {log_level!r}", EXIT_USAGE)
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
            _fail(str(exc), EXIT_USAGE)
        configure_logging(log_level, log_format)
        try:
            code = run_loop(
                with_signals(lambda stop: _serve(settings, stop), soft=True), event_loop
            )
        except ServeError as exc:
            _fail(str(exc))
        if code:
            raise typer.Exit(code)


__all__ = ["register"]
