"""Shared pieces of the CLI: options, settings, logging, signals and error -> exit code (cli layer).

Every command takes ``--redis-url`` and ``--namespace`` (also from ``UPBIT_BROKER_REDIS_URL`` and
``UPBIT_BROKER_NAMESPACE``) and builds one :class:`~broker.settings.BrokerSettings` from them
plus the other ``UPBIT_BROKER_*`` variables. Errors a person makes (an unreachable Redis, a bad
URL, an invalid code, an unknown data type) end the command with ONE line on stderr and a
non-zero exit code, never a traceback (``--verbose`` logs it). Exit codes: 0 ok, 1 a failed
check or operation, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import MISSING, fields
from enum import Enum
from typing import Annotated, Any, NoReturn

import typer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.errors import BrokerError, ConfigError, InvalidCodeError, describe
from broker.redis_client import RedisUrlError, redis_client
from broker.settings import BrokerSettings, redact_url
from cli import logs

logger = logging.getLogger("cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def settings_default(settings: type[Any], name: str) -> Any:
    """The default of the settings dataclass field ``name`` (an enum as its value): what the
    command runs with when neither the flag nor its variable is set, so ``--help`` shows it."""
    [field] = [f for f in fields(settings) if f.name == name]
    assert field.default is not MISSING, name
    return field.default.value if isinstance(field.default, Enum) else field.default


#: the settings' own default, so every command's ``--redis-url`` shows the one ``run`` uses
DEFAULT_REDIS_URL: str = settings_default(BrokerSettings, "redis_url")

RedisUrlOption = Annotated[
    str,
    typer.Option(
        "--redis-url",
        envvar="UPBIT_BROKER_REDIS_URL",
        # "\[": rich markup would take "[user:password@]" for a style tag and drop it
        help=(
            "Redis URL: redis://\\[user:password@]host:port/db, rediss://, unix://, "
            "redis+sentinel://h1:26379,h2/mymaster/0."
        ),
        show_envvar=True,
    ),
]
SubscribeUrlOption = Annotated[
    str,
    typer.Option(
        "--subscribe-url",
        envvar="UPBIT_BROKER_SUBSCRIBE_URL",
        help=(
            "Subscribe here instead of on --redis-url, which keeps the lease: a replica "
            "(redis://replica:6379/0), or one the sentinels know "
            "(redis+sentinel://h1:26379/mymaster/0?role=replica). Empty: --redis-url."
        ),
        show_envvar=True,
    ),
]
NamespaceOption = Annotated[
    str,
    typer.Option(
        "--namespace",
        envvar="UPBIT_BROKER_NAMESPACE",
        help="Key and channel prefix, the same for the broker and everything it serves.",
        show_envvar=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log progress (and tracebacks) to stderr.")
]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- the options of the service commands (run, gateway): each flag also a variable ------------


def env_option(envvar: str, help: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` also read from the variable ``envvar`` (which ``--help`` names)."""
    return typer.Option(envvar=envvar, show_envvar=True, help=help, **kwargs)


def event_loop_option(prefix: str) -> Any:
    """``--event-loop`` (also ``{prefix}EVENT_LOOP``), for :func:`run_loop`."""
    return env_option(prefix + "EVENT_LOOP", "auto (uvloop when installed), uvloop or asyncio.")


def log_level_option(prefix: str) -> Any:
    """``--log-level`` (also ``{prefix}LOG_LEVEL``); :func:`check_log_flags` checks it."""
    return env_option(prefix + "LOG_LEVEL", "debug, info, warning, error or critical.")


def log_format_option(prefix: str) -> Any:
    """``--log-format`` (also ``{prefix}LOG_FORMAT``); :func:`check_log_flags` checks it."""
    return env_option(prefix + "LOG_FORMAT", "text or json.")


def check_log_flags(level: str, fmt: str) -> None:
    """A service's ``--log-level`` and ``--log-format``: a bad one ends the command (exit 2)."""
    if fmt not in ("text", "json"):
        fail(f"--log-format must be text or json, got {fmt!r}", EXIT_USAGE)
    if level.upper() not in LOG_LEVELS:
        fail(f"unknown --log-level {level!r}", EXIT_USAGE)


class CommandError(Exception):
    """A failure that is reported as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def build_settings(redis_url: str, namespace: str, **overrides: Any) -> BrokerSettings:
    """Defaults, then ``UPBIT_BROKER_*`` variables, then the command's flags.

    Settings that cannot work end the command: one line, exit code 2.
    """
    try:
        return BrokerSettings.from_env(redis_url=redis_url, namespace=namespace, **overrides)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def configure_logging(verbose: bool = False) -> None:
    """Warnings (or everything, with ``--verbose``) to stderr, one line each."""
    logs.configure_logging("debug" if verbose else "warning")
    if verbose:
        # redis-py is chatty at DEBUG; our own modules are what helps here
        logging.getLogger("redis").setLevel(logging.INFO)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def error_line(exc: BaseException, redis_url: str | None = None) -> tuple[str, int]:
    """The one line and exit code for an exception that ends a command (re-raises others)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    url = redact_url(redis_url) if redis_url else "redis"
    if isinstance(exc, CommandError):
        return str(exc), exc.code
    if isinstance(exc, InvalidCodeError | ConfigError):
        return describe(exc, with_type=False), EXIT_USAGE
    if isinstance(exc, BrokerError):  # the consumer library's RedisUnavailableError too
        return describe(exc, with_type=False), EXIT_FAILED
    if isinstance(exc, RedisError | OSError | TimeoutError):
        return f"redis at {url} failed: {describe(exc, with_type=False)}", EXIT_FAILED
    if isinstance(exc, ValueError):  # the library's "unknown data type", "no codes" ...
        return describe(exc, with_type=False), EXIT_USAGE
    raise exc


def run(
    main: Callable[[asyncio.Event], Awaitable[int]],
    *,
    redis_url: str | None = None,
    stop_on_signal: bool = False,
) -> NoReturn:
    """Run ``main(stop)`` in a new event loop and exit with its code.

    With ``stop_on_signal`` the first SIGINT/SIGTERM only sets ``stop`` (the command drains and
    returns by itself) and a second one cancels at once; otherwise the first one cancels.
    Known errors become one line on stderr.
    """
    try:
        code = asyncio.run(with_signals(main, soft=stop_on_signal))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except typer.Exit:
        raise
    except BrokenPipeError:  # ... | head: the reader left, which is not an error
        _quiet_stdout()
        code = EXIT_OK
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        try:
            line, code = error_line(exc, redis_url)
        except BaseException:
            raise exc from None
        logger.debug("command failed", exc_info=exc)
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


async def with_signals(main: Callable[[asyncio.Event], Awaitable[int]], *, soft: bool) -> int:
    """Run ``main(stop)`` with Ctrl-C handled the one way of every command; returns its code.

    SIGINT and SIGTERM only set an event or cancel, never raise in a random place. With
    ``soft`` the first one sets ``stop`` (``main`` drains and returns by itself) and a second
    one cancels ``main`` at once; without it the first one cancels. A cancelled ``main`` gives
    :data:`EXIT_INTERRUPTED` (130). ``run`` uses it; ``run`` (the broker) and ``simulate``,
    which run their own loop, call it directly.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals = 0
    interrupted = False

    def on_signal() -> None:
        nonlocal signals, interrupted
        signals += 1
        if soft and signals == 1:
            stop.set()
        else:
            interrupted = True
            task.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        return await main(stop)
    except asyncio.CancelledError:
        if interrupted:
            return EXIT_INTERRUPTED
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def open_redis(
    settings: BrokerSettings, connect_timeout: float = 3.0
) -> AsyncIterator[Redis]:
    """A Redis client that answered PING, or a :class:`CommandError` with one line.

    Not the consumer library's ``RedisUnavailableError``: importing ``consumers`` loads its
    client and websockets, which the commands that only read Redis do without."""
    url = settings.redis_url
    try:
        # commands bound each call with with_timeout() (broker.redis_client says why)
        client = redis_client(url, name="upbit-broker-cli", connect_timeout=connect_timeout)
    except RedisUrlError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        try:
            async with asyncio.timeout(connect_timeout * 2):
                await client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise CommandError(
                f"cannot reach redis at {redact_url(url)}: {describe(exc, with_type=False)}"
            ) from exc
        yield client
    finally:
        await client.aclose()


def listen_error(exc: OSError, host: str, port: int) -> str:
    """One line for a server command (``gateway``, ``simulate``) that cannot listen."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use on {host} (pick another with --port, 0 picks a free one)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"not allowed to listen on {host}:{port} (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: no such address on this machine"
    return f"cannot listen on {host}:{port}: {exc.strerror or describe(exc, with_type=False)}"


def _quiet_stdout() -> None:
    # stdout is a closed pipe: point it at /dev/null so the interpreter's last flush is silent
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def split_codes(codes: list[str]) -> list[str]:
    """``["KRW-BTC,KRW-ETH", "KRW-XRP"]`` -> three codes (commas or separate arguments)."""
    out: list[str] = []
    for item in codes:
        out.extend(c.strip() for c in item.split(",") if c.strip())
    return out


def run_loop(main: Coroutine[Any, Any, int], choice: str) -> int:
    """Run on uvloop when asked for (or, with ``auto``, when installed): each loop wake-up
    costs less there, and at low rates the broker's CPU is mostly wake-ups."""
    if choice not in ("auto", "uvloop", "asyncio"):
        main.close()
        typer.echo(f"error: --event-loop must be auto, uvloop or asyncio, got {choice!r}", err=True)
        raise typer.Exit(2)
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                typer.echo("error: --event-loop uvloop but uvloop is not installed", err=True)
                raise typer.Exit(2) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
