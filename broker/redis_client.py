"""Every Redis client of upbit-broker is built here (I/O adapter).

One place decides how the project talks to Redis, so the rules below cannot drift apart again
between the broker, the consumer library, the CLI and the demo:

- **No socket timeout.** With one, redis-py sends and reads through ``asyncio.wait_for``, which
  on Python 3.11 can swallow a task's cancellation (a cancelled loop keeps running, ``close()``
  hangs, Ctrl-C is lost). Every caller bounds its own calls with ``asyncio.timeout`` instead;
  only the connect has a timeout here.
- **The asyncio ``Retry``.** redis-py 8.2 warns when an asyncio client is given the synchronous
  ``redis.retry.Retry``; the asyncio one lives in ``redis.asyncio.retry``.
- **A malformed URL** is a :class:`RedisUrlError` naming the URL with its password redacted.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from broker.errors import ConfigError
from broker.settings import redact_url

#: What ``CLIENT SETNAME`` accepts (longer names are cut, not refused).
_MAX_NAME = 128


class RedisUrlError(ConfigError, ValueError):
    """A Redis URL that redis-py cannot parse (e.g. a port that is not a number)."""


def _options(
    *,
    name: str | None,
    connect_timeout: float | None,
    retries: int,
    health_check_interval: float,
) -> dict[str, Any]:
    backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0) if retries else NoBackoff()
    options: dict[str, Any] = {
        "socket_timeout": None,  # see the module docstring: callers bound each call
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(backoff, retries),
        "health_check_interval": health_check_interval,
    }
    if name:
        options["client_name"] = name[:_MAX_NAME]
    return options


def redis_client(
    url: str,
    *,
    name: str | None = None,
    connect_timeout: float | None = 5.0,
    retries: int = 0,
    health_check_interval: float = 0,
) -> Redis:
    """A ``redis.asyncio.Redis`` for ``url`` (``redis://``, ``rediss://``, ``unix://``).

    Args:
        name: ``CLIENT SETNAME`` of its connections (shown by ``CLIENT LIST``).
        connect_timeout: seconds a connect may take (None: the OS's).
        retries: how often a command is retried on a connection or timeout error, with
            jittered exponential backoff (0: an error surfaces at once).
        health_check_interval: seconds after which an idle connection is PINGed before use.

    Raises:
        RedisUrlError: ``url`` cannot be parsed.
    """
    options = _options(
        name=name,
        connect_timeout=connect_timeout,
        retries=retries,
        health_check_interval=health_check_interval,
    )
    try:
        return Redis.from_url(url, **options)
    except ValueError as exc:
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None


def connection_pool(
    url: str,
    *,
    name: str | None = None,
    connect_timeout: float | None = 5.0,
    protocol: int = 2,
) -> ConnectionPool:
    """A bare pool for code that drives its own connections (the pub/sub subscriber).

    No retries: a failed connection must surface to the caller, never be replaced silently.

    Raises:
        RedisUrlError: ``url`` cannot be parsed.
    """
    options = _options(
        name=name, connect_timeout=connect_timeout, retries=0, health_check_interval=0
    )
    try:
        return ConnectionPool.from_url(url, protocol=protocol, **options)
    except ValueError as exc:
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None


__all__ = ["RedisUrlError", "connection_pool", "redis_client"]
