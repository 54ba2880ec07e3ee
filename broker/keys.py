"""Every Redis key and channel name upbit-broker uses, in one place (pure).

This is the contract with consumers in any language (README, "Redis schema"):

    {ns}:lease:{client_id}         HASH    one consumer's lease; PEXPIRE = its TTL
    {ns}:leases                    ZSET    client_id -> lease deadline (ms, Redis server clock)
    {ns}:control                   CHANNEL wake-ups for the leader: "lease <id>", "release <id>",
                                           "request"
    {ns}:requests                  LIST    JSON commands for the leader (snapshot, resubscribe)
    {ns}:reply:{request_id}        LIST    the leader's one JSON answer to a command
    {ns}:leader                    STRING  "{broker_id} {token}" of the lock holder; PX TTL
    {ns}:epoch                     STRING  upstream connection counter (INCR per connection)
    {ns}:status                    HASH    the leader's state, refreshed every second
    {ns}:last:{stream}             HASH    code -> the latest frame of that stream (exact bytes)
    {ns}:events                    CHANNEL JSON events: gap, connected, leader, lease
    {ns}:{stream}:{code}           CHANNEL every frame of one stream, exact upstream bytes
    {ns}:hist:{stream}:{code}      STREAM  the same frames, replayable: one entry per frame, the
                                           exact bytes in field ``f``; capped (XADD MAXLEN ~);
                                           frames fetched over REST after a gap (backfill) also
                                           carry ``origin`` = ``rest``

On a Redis Cluster (a ``redis+cluster://`` URL) the first nine names above carry the namespace
as a hash tag, ``{upbit}:leases``, ``{upbit}:lease:ID``, ``{upbit}:leader`` ...: Redis hashes only
the text between the braces, so they share one slot, one master, and the lease scripts (which
touch a lease hash and the index together) stay atomic. The frames' channels and caches keep
the plain namespace, ``upbit:ticker:KRW-BTC``, ``upbit:last:ticker``, so their slots spread
over the masters: that is the cluster's scale. The history streams share a tag of their own,
``{upbit:hist}:ticker:KRW-BTC``: a durable consumer reads all its streams with one ``XREAD``,
which a cluster runs only over keys of one slot. (``Keys(ns, hash_tag=True)``; every
process derives it from its Redis URL with :func:`keys_for`, so the broker and its consumers
cannot disagree.)

``{stream}`` is the data type (``ticker``, ``trade``, ``orderbook``, ``candle.1m`` ...), or
``orderbook@{level}`` for an orderbook grouped by a non-zero ``level``.
Only validated names reach these functions: market codes through ``broker.upbit.codes``,
namespaces and client ids through :func:`validate_name`. The lease scripts
(``broker/lease.lua``, ``broker/lease_release.lua``) repeat two of these rules in Lua, for
consumers that run them by hand: the client id alphabet, and ``{ns}:control`` named after the
index key ``{ns}:leases``.
"""

from __future__ import annotations

import math
import re

from broker.errors import ConfigError
from broker.upbit.codes import format_level, validate_code
from broker.upbit.types import PUBLIC_TYPES, DataType

DEFAULT_NAMESPACE = "upbit"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(value: str, what: str = "name") -> str:
    """Namespaces and client ids: letters, digits, ``.``, ``_``, ``-``; at most 128 chars."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ConfigError(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


def stream_name(type_: str, level: float = 0.0) -> str:
    """``ticker``; ``orderbook``; ``orderbook@10000`` for a grouped orderbook."""
    if type_ not in PUBLIC_TYPES:
        raise ConfigError(f"unknown data type {type_!r}")
    if level and type_ == DataType.ORDERBOOK:
        return f"{type_}@{format_level(level)}"
    return type_


def parse_stream_name(name: str) -> tuple[str, float]:
    """Inverse of :func:`stream_name`: ``orderbook@10000`` -> ``("orderbook", 10000.0)``."""
    type_, at, level = name.partition("@")
    if type_ not in PUBLIC_TYPES or (at and type_ != DataType.ORDERBOOK):
        raise ConfigError(f"unknown data type {name!r}")
    if not at:
        return type_, 0.0
    try:
        value = float(level)
    except ValueError:
        raise ConfigError(f"bad orderbook level in {name!r}") from None
    if not math.isfinite(value) or value < 0 or level != level.strip():
        raise ConfigError(f"bad orderbook level in {name!r}")
    return type_, value


#: the field of a history entry that holds the frame (exact upstream bytes)
HISTORY_FRAME_FIELD = "f"
#: a history entry appended by the backfill (fetched over REST after a gap) carries this field
#: with value :data:`HISTORY_ORIGIN_REST`; live frames do not carry it
HISTORY_ORIGIN_FIELD = "origin"
HISTORY_ORIGIN_REST = "rest"


class Keys:
    """Key and channel names of one namespace."""

    __slots__ = (
        "_coordination",
        "control",
        "epoch",
        "events",
        "hash_tag",
        "leader",
        "leases",
        "namespace",
        "requests",
        "status",
    )

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, hash_tag: bool = False) -> None:
        """``hash_tag``: on a Redis Cluster, the coordination keys share one slot (above)."""
        self.namespace = validate_name(namespace, "namespace")
        self.hash_tag = hash_tag
        ns = self._coordination = f"{{{self.namespace}}}" if hash_tag else self.namespace
        self.leases = f"{ns}:leases"
        self.control = f"{ns}:control"
        self.requests = f"{ns}:requests"
        self.leader = f"{ns}:leader"
        self.epoch = f"{ns}:epoch"
        self.status = f"{ns}:status"
        self.events = f"{ns}:events"

    def lease(self, client_id: str) -> str:
        return f"{self._coordination}:lease:{validate_name(client_id, 'client id')}"

    def lease_pattern(self) -> str:
        """A SCAN pattern for every lease hash of this namespace."""
        return f"{self._coordination}:lease:*"

    def reply(self, request_id: str) -> str:
        return f"{self._coordination}:reply:{validate_name(request_id, 'request id')}"

    def last_values(self, type_: str, level: float = 0.0) -> str:
        return f"{self.namespace}:last:{stream_name(type_, level)}"

    def channel(self, type_: str, code: str, level: float = 0.0) -> str:
        return f"{self.namespace}:{stream_name(type_, level)}:{validate_code(code)}"

    def history(self, type_: str, code: str, level: float = 0.0) -> str:
        """The capped Redis Stream holding every frame of one stream (``XREAD``/``XRANGE``);
        on a cluster ``{ns:hist}:{stream}:{code}``: every stream of the namespace in one slot."""
        prefix = f"{{{self.namespace}:hist}}" if self.hash_tag else f"{self.namespace}:hist"
        return f"{prefix}:{stream_name(type_, level)}:{validate_code(code)}"

    def channel_pattern_all(self) -> str:
        """A PSUBSCRIBE pattern for every data channel of this namespace (tools only)."""
        return f"{self.namespace}:*:*-*"


def keys_for(namespace: str, redis_url: str) -> Keys:
    """The keys of ``namespace`` on the Redis ``redis_url`` names: hash-tagged on a cluster."""
    from broker.redis_url import is_cluster_url  # (it imports broker.settings, which needs us)

    return Keys(namespace, hash_tag=is_cluster_url(redis_url))
