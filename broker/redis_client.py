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
- **Sentinel.** A ``redis+sentinel://`` URL (``broker.redis_url``) gives a client of the master
  the sentinels name: redis-py's ``Sentinel(...).master_for(...)``, whose pool asks the
  sentinels at every new connection and drops idle connections to a master that was replaced.
  The sentinels' own clients get no socket timeout either and no retries (master discovery
  moves on to the next sentinel); they are closed with the pool, so closing the client closes
  everything it opened.
- **Cluster.** A ``redis+cluster://`` URL gives redis-py's ``RedisCluster`` (typed as a
  ``Redis`` here: the commands upbit-broker sends through redis-py are the same, and routed by
  key), with the options of a ``redis://`` URL for every node, no retries of its own beyond the
  redirections it follows (``MOVED``, ``ASK``, a topology refresh), and its topology refreshed
  at most four times a second however many errors arrive. Pub/sub on it is the caller's
  business (``consumers.sharded_subscriber`` SSUBSCRIBEs per shard over raw RESP). One
  difference is mended here: redis-py raises a cluster it cannot reach, or a slot no master
  serves (mid-failover), as ``RedisClusterException``, which is no ``RedisError``; every
  caller in this project handles ``RedisError``, so :class:`ClusterClient` raises those as
  :class:`ClusterUnavailable`, a ``ConnectionError``: Redis is unreachable for now.
- **A replica through Sentinel** (``?role=replica``) only for :func:`connection_pool`, the
  subscriber's: redis-py's ``Sentinel.slave_for`` pool, which connects to the replicas the
  sentinels list (``SENTINEL replicas``, those not down), in turn, and to the master when none
  answers. :func:`redis_client` refuses it: its clients write (leases, the lock, frames), and a
  replica refuses writes.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from broker.redis_url import (
    RedisUrlError,
    is_cluster_url,
    is_sentinel_url,
    names_replica,
    parse_cluster_url,
    parse_sentinel_url,
)
from broker.settings import redact_url

#: What ``CLIENT SETNAME`` accepts (longer names are cut, not refused).
_MAX_NAME = 128


class ClosingSentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which also disconnects the sentinels' clients when it is
    disconnected: they belong to this pool alone here (one ``Sentinel`` per client), and
    redis-py closes a client's pool, never its ``Sentinel``."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.connection_pool.disconnect(inuse_connections)


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
    """A ``redis.asyncio.Redis`` for ``url`` (``redis://``, ``rediss://``, ``unix://``, or a
    master through Sentinel: ``redis+sentinel://``, ``rediss+sentinel://``).

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
    if is_sentinel_url(url):
        if names_replica(url):
            raise RedisUrlError(
                f"bad redis url {redact_url(url)}: role=replica is for a subscribe url only "
                "(a replica takes no writes)"
            )
        return Redis.from_pool(_sentinel_pool(url, options))
    if is_cluster_url(url):
        return cast(Redis, _cluster_client(url, options))
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

    A Sentinel URL with ``?role=replica`` gives connections to a replica the sentinels know
    (the master when none answers); the caller checks the node's replication link.

    No retries: a failed connection must surface to the caller, never be replaced silently.

    Raises:
        RedisUrlError: ``url`` cannot be parsed.
    """
    options = _options(
        name=name, connect_timeout=connect_timeout, retries=0, health_check_interval=0
    )
    if is_sentinel_url(url):
        return _sentinel_pool(url, {**options, "protocol": protocol})
    try:
        return ConnectionPool.from_url(url, protocol=protocol, **options)
    except ValueError as exc:
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None


class ClusterUnavailable(RedisConnectionError):
    """The cluster cannot serve the command now (no node reachable, a slot without a master):
    what redis-py raises as ``RedisClusterException``, as the ``ConnectionError`` it is here."""


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc


class ClusterClient(RedisCluster):
    """redis-py's cluster client whose errors are all ``RedisError`` (see the module doc)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise ValueError("shard_hint is not supported on a cluster")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster (its keys are then hash-tagged)."""
    return isinstance(client, RedisCluster)


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """redis-py's cluster client for a ``redis+cluster://`` URL.

    Raises:
        RedisUrlError: ``url`` cannot be parsed (by ``broker.redis_url``, or its options by
            redis-py).
    """
    parsed = parse_cluster_url(url)
    host, port = parsed.nodes[0]
    try:
        from_url: dict[str, Any] = dict(parse_url(parsed.node_url(host, port)))
    except ValueError as exc:
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None
    for name in ("host", "port", "db"):
        from_url.pop(name, None)
    if from_url.pop("connection_class", None) is SSLConnection:
        from_url["ssl"] = True
    kwargs = {**options, **from_url}
    retry = kwargs.pop("retry")
    kwargs.pop("retry_on_timeout", None)
    try:
        return ClusterClient(
            startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
            # the redirections and a topology refresh are retried; a dead node is not waited
            # on longer than the caller's own retries allow
            retry=retry,
            topology_refresh_min_interval=0.25,
            **kwargs,
        )
    except (TypeError, ValueError) as exc:  # an option redis-py's cluster client does not take
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None


def _sentinel_pool(url: str, options: dict[str, Any]) -> ClosingSentinelPool:
    """A pool of connections to the master the sentinels of ``url`` name.

    Raises:
        RedisUrlError: ``url`` cannot be parsed (by ``broker.redis_url``, or its options by
            redis-py).
    """
    parsed = parse_sentinel_url(url)
    try:
        # redis-py reads the master's credentials, database and options, as in a redis:// URL
        # (and as there, what the URL says wins over the caller's options)
        from_url: dict[str, Any] = dict(parse_url(parsed.redis_url()))
    except ValueError as exc:
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None
    from_url.pop("host", None)
    from_url.pop("port", None)
    tls = from_url.pop("connection_class", None) is SSLConnection
    kwargs = {**options, **from_url}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": None,  # as everywhere: the callers bound each call
        "socket_connect_timeout": kwargs.get("socket_connect_timeout"),
        "username": parsed.sentinel_username,
        "password": parsed.sentinel_password,
    }
    if tls:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    connection_class = SentinelManagedSSLConnection if tls else SentinelManagedConnection
    try:
        sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs)
        return ClosingSentinelPool(  # type: ignore[no-untyped-call]
            parsed.service,
            sentinel,
            connection_class=connection_class,
            # ?role=replica: rotate_slaves (the replicas not down, the master last)
            is_master=parsed.role == "master",
            **kwargs,
        )
    except (TypeError, ValueError) as exc:  # an option redis-py's connections do not take
        raise RedisUrlError(f"bad redis url {redact_url(url)}: {exc}") from None


__all__ = [
    "ClosingSentinelPool",
    "ClusterClient",
    "ClusterUnavailable",
    "RedisUrlError",
    "connection_pool",
    "is_cluster_client",
    "redis_client",
]
