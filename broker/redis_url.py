"""Redis Sentinel and Redis Cluster URLs, parsed without I/O (pure: the standard library and
``redact_url``).

redis-py reads ``redis://``, ``rediss://`` and ``unix://`` URLs itself, but has no URL for a
master found through Sentinel. This module adds one, the convention Prefect and docket document
(and the ``Redis-Sentinel-Url`` package before them), so one string configures every process:

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]
    rediss+sentinel://...      TLS to the sentinels and to the master

- **Sentinels** are ``host[:port]`` pairs separated by commas, asked in that order; the port
  defaults to 26379 (Sentinel's). An IPv6 host is written in brackets (``[::1]:26379``).
- **service** is the name the sentinels monitor (``sentinel monitor <service> ...``), required.
- **db** is the database number (default 0), in the path or as ``?db=``, not both.
- **user:password** authenticate to the *master* (``AUTH``), as in a ``redis://`` URL. The
  sentinels get ``?sentinel_username=...&sentinel_password=...`` (without them, no AUTH is
  sent to a sentinel). Separate on purpose: sentinels commonly run without ``requirepass``
  while the master has one, and Redis refuses an AUTH to a server without a password.
- **role**: ``?role=master`` (the default) or ``?role=replica``: a replica of that master the
  sentinels know (``SENTINEL replicas``; redis-py's ``Sentinel.slave_for``), the master when
  none is usable. Only a *subscribe* URL may name a replica (``BrokerClient(subscribe_url=...)``,
  design.md "Fan-out from replicas"): a replica takes no writes, so every other client refuses it.
- **options**: every other query option is a redis-py URL option (``ssl_ca_certs``,
  ``ssl_cert_reqs``, ``protocol`` ...) for the master's connections; on ``rediss+sentinel``
  the ``ssl_*`` options serve the sentinels' TLS as well (one CA for the whole topology).

A Redis Cluster is named by some of its nodes (any node tells the whole topology):

    redis+cluster://[user:password@]host[:port][,host[:port]...][/][?options]
    rediss+cluster://...       TLS to every node

- **nodes** are ``host[:port]`` pairs (port 6379 by default), tried in order until one answers
  ``CLUSTER SLOTS``; naming every master spares a start-up the wait for a dead one.
- no database: a cluster has only database 0 (``/0`` is accepted, any other is an error).
- **user:password** and **options** as in a ``redis://`` URL, for every node.
- The scheme itself is what tells upbit-broker it talks to a cluster: keys get one hash tag
  (``broker.keys``), frames go out with SPUBLISH to the master owning each channel, consumers
  SSUBSCRIBE (design.md "Redis Cluster").

A malformed URL (no sentinel, no service name, a bad port or database) is a
:class:`RedisUrlError` naming it with the password redacted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode

from broker.errors import ConfigError
from broker.settings import redact_url

#: the Sentinel schemes (plain and TLS)
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
#: the port a sentinel listens on unless the URL says otherwise
SENTINEL_PORT = 26379
#: the query options that belong to the sentinels, not to the master
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
#: ``?role=``: the node of the service to connect to
ROLES = ("master", "replica")
#: the Cluster schemes (plain and TLS)
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
#: the port of a cluster node unless the URL says otherwise
CLUSTER_PORT = 6379


class RedisUrlError(ConfigError, ValueError):
    """A Redis URL that cannot be parsed (e.g. a port that is not a number)."""


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a master through Sentinel (only the scheme is looked at)."""
    return url[:19].lower().startswith(SENTINEL_SCHEMES)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (only the scheme is looked at)."""
    return url[:18].lower().startswith(CLUSTER_SCHEMES)


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    #: the sentinels, in the order they are asked
    sentinels: tuple[tuple[str, int], ...]
    #: the name the sentinels monitor the master under
    service: str
    db: int = 0
    #: the master's credentials
    username: str | None = None
    password: str | None = None
    #: the sentinels' credentials (``sentinel_username`` / ``sentinel_password``)
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: ``rediss+sentinel``: TLS to sentinels and master
    tls: bool = False
    #: the other query options, for redis-py, in the order given
    options: tuple[tuple[str, str], ...] = ()
    #: ``?role=``: "master", or "replica" (a replica the sentinels know; subscribe URLs only)
    role: str = "master"

    def redis_url(self, host: str = "localhost", port: int = 6379) -> str:
        """The ``redis://`` (``rediss://``) URL of the master at ``host:port``: its credentials,
        database and options, for redis-py's own URL parsing (``parse_url``), so an option means
        here what it means in a ``redis://`` URL."""
        return _node_url(self.tls, self.username, self.password, self.options, host, port, self.db)

    def describe(self) -> str:
        """The URL without credentials (for logs)."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        role = "" if self.role == "master" else f"?role={self.role}"
        return f"{scheme}://{hosts}/{self.service}/{self.db}{role}"


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``redis+sentinel://[user:password@]h1[:port][,h2[:port]]/service[/db][?options]``.

    Raises:
        RedisUrlError: not a Sentinel URL, no sentinel, an empty host, a bad port, no service
            name, a bad database number, or a path with more than service and database.
    """

    def bad(why: str) -> RedisUrlError:
        return RedisUrlError(f"bad redis url {redact_url(url)}: {why}")

    if not is_sentinel_url(url):
        raise bad("not a redis+sentinel:// or rediss+sentinel:// url")
    tls, username, password, hosts, slash, path, query = _split(url)
    sentinels = tuple(_host_port(part, bad) for part in hosts.split(",")) if hosts else ()
    if not sentinels:
        raise bad("no sentinel host (redis+sentinel://host:26379,.../service)")
    segments = [unquote(s) for s in path.split("/")] if slash else []
    while segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise bad("no service name (redis+sentinel://hosts/SERVICE[/db])")
    if len(segments) > 2:
        raise bad("the path is /service[/db], got more")
    service = segments[0]
    if any(c.isspace() for c in service):
        raise bad(f"the service name {service!r} contains white space")
    options: list[tuple[str, str]] = []
    sentinel_auth: dict[str, str] = {}
    role = "master"
    db_text = segments[1] if len(segments) == 2 else None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _SENTINEL_OPTIONS:
            sentinel_auth[name] = value
        elif name == "db":
            if db_text is not None and db_text != value:
                raise bad(f"two database numbers ({db_text} in the path, {value} in ?db=)")
            db_text = value
        elif name == "role":
            if value not in ROLES:
                raise bad(f"role must be master or replica, got {value!r}")
            role = value
        else:
            options.append((name, value))
    db = 0
    if db_text is not None:
        if not (db_text.isascii() and db_text.isdecimal()):
            raise bad(f"the database must be a number from 0, got {db_text!r}")
        db = int(db_text)
    return SentinelUrl(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_username=sentinel_auth.get("sentinel_username") or None,
        sentinel_password=sentinel_auth.get("sentinel_password") or None,
        tls=tls,
        options=tuple(options),
        role=role,
    )


def names_replica(url: str) -> bool:
    """Whether ``url`` is a Sentinel URL with ``?role=replica`` (a malformed URL: False, its
    error is for the parser to report)."""
    if not is_sentinel_url(url):
        return False
    try:
        return parse_sentinel_url(url).role == "replica"
    except RedisUrlError:
        return False


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL."""

    #: the nodes asked for the topology, in order
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    #: ``rediss+cluster``: TLS to every node
    tls: bool = False
    #: the query options, for redis-py, in the order given
    options: tuple[tuple[str, str], ...] = ()

    def node_url(self, host: str, port: int) -> str:
        """The ``redis://`` (``rediss://``) URL of one node: the credentials and options, for
        redis-py's own URL parsing (an option means here what it means in a ``redis://`` URL).
        """
        return _node_url(self.tls, self.username, self.password, self.options, host, port, 0)

    def describe(self) -> str:
        """The URL without credentials (for logs)."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{hosts}"


def parse_cluster_url(url: str) -> ClusterUrl:
    """``redis+cluster://[user:password@]h1[:port][,h2[:port]...][/][?options]``.

    Raises:
        RedisUrlError: not a Cluster URL, no node, an empty host, a bad port, a database other
            than 0, a ``role`` option (replicas are not read here).
    """

    def bad(why: str) -> RedisUrlError:
        return RedisUrlError(f"bad redis url {redact_url(url)}: {why}")

    if not is_cluster_url(url):
        raise bad("not a redis+cluster:// or rediss+cluster:// url")
    tls, username, password, hosts, _, path, query = _split(url)
    nodes = (
        tuple(_host_port(p, bad, CLUSTER_PORT, "node") for p in hosts.split(",")) if hosts else ()
    )
    if not nodes:
        raise bad("no node (redis+cluster://host:6379,host:6380,...)")
    db_texts = [unquote(path).strip("/")] if path.strip("/") else []
    options: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "db":
            db_texts.append(value)
        elif name == "role":
            raise bad("role= is for Sentinel urls; a cluster url names its nodes")
        else:
            options.append((name, value))
    for text in db_texts:
        if text != "0":
            raise bad(f"a cluster has only database 0, got {text!r}")
    return ClusterUrl(
        nodes=nodes, username=username, password=password, tls=tls, options=tuple(options)
    )


def _split(url: str) -> tuple[bool, str | None, str | None, str, str, str, str]:
    """A ``scheme://[user:password@]hosts[/path][?query][#fragment]`` URL's parts: TLS (the
    scheme starts with ``rediss``), user and password (percent-decoded; None when absent), the
    hosts as written, ``/`` when there is a path, the path and the query."""
    scheme, _, rest = url.partition("://")
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return scheme.lower().startswith("rediss"), username, password, hosts, slash, path, query


def _node_url(
    tls: bool,
    username: str | None,
    password: str | None,
    options: tuple[tuple[str, str], ...],
    host: str,
    port: int,
    db: int,
) -> str:
    """The ``redis://`` (``rediss://``) URL of one server, for redis-py's own URL parsing."""
    scheme = "rediss" if tls else "redis"
    auth = ""
    if username is not None or password is not None:
        auth = quote(username or "", safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    netloc = f"[{host}]" if ":" in host else host
    query = f"?{urlencode(options)}" if options else ""
    return f"{scheme}://{auth}{netloc}:{port}/{db}{query}"


def _host_port(
    part: str,
    bad: Callable[[str], RedisUrlError],
    default_port: int = SENTINEL_PORT,
    what: str = "sentinel",
) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    text = unquote(part)
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket:
            raise bad(f"unclosed [ in {what} {text!r}")
        port_text = tail[1:] if tail.startswith(":") else None
        if tail and port_text is None:
            raise bad(f"bad {what} {text!r}")
    else:
        host, colon, port_text_or = text.partition(":")
        port_text = port_text_or if colon else None
    if not host:
        raise bad(f"a {what} without a host ({part!r})")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdecimal()) or not 0 < int(port_text) < 65536:
        raise bad(f"the port of {what} {host} must be from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


__all__ = [
    "CLUSTER_PORT",
    "CLUSTER_SCHEMES",
    "ROLES",
    "SENTINEL_PORT",
    "SENTINEL_SCHEMES",
    "ClusterUrl",
    "RedisUrlError",
    "SentinelUrl",
    "is_cluster_url",
    "is_sentinel_url",
    "names_replica",
    "parse_cluster_url",
    "parse_sentinel_url",
]
