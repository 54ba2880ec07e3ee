"""Broker settings: one immutable object, built in one place (pure).

``BrokerSettings.from_env`` reads ``UPBIT_BROKER_*`` variables; the CLI overlays its flags.
Library code never reads ``os.environ`` itself: it is handed a settings object.

Every numeric setting is a finite number within the bounds of :data:`SETTING_BOUNDS` (and the
relations of :data:`SETTING_RELATIONS`); anything else is a :class:`ConfigError` naming the
setting, its variable and its range, whether it came from a flag, a variable or Python. The
consumer library's options have their own table, :data:`CLIENT_BOUNDS`, checked the same way
(:func:`check_number`). :func:`bounds_table` renders both as the Markdown the docs quote.
"""

from __future__ import annotations

import math
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from broker.core.history import parse_history_caps
from broker.errors import ConfigError
from broker.keys import DEFAULT_NAMESPACE, validate_name
from broker.upbit.types import Format

UPBIT_URL = "wss://api.upbit.com/websocket/v1"
ENV_PREFIX = "UPBIT_BROKER_"


def default_broker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: never print a password."""
    url = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
    # redis-py also takes credentials as query parameters (?password=...), and a Sentinel URL
    # the sentinels' (?sentinel_password=..., broker.redis_url).
    return re.sub(
        r"([?&](?:sentinel_)?(?:password|pass|pwd)=)[^&#]*", r"\1***", url, flags=re.IGNORECASE
    )


#: the schemes a Redis URL may have: redis-py's, a master found through Sentinel, a Redis
#: Cluster (``broker.redis_url``)
REDIS_URL_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)
#: the schemes, for error messages
REDIS_URL_SCHEMES_TEXT = ", ".join(REDIS_URL_SCHEMES[:-1]) + " or " + REDIS_URL_SCHEMES[-1]


# -- bounds ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bound:
    """The closed range ``[low, high]`` a numeric setting must lie in, and why."""

    low: float
    high: float
    unit: str = "s"
    integer: bool = False
    why: str = ""

    def describe(self) -> str:
        """``a number from 1 to 600 s`` / ``an integer from 0 to 65535``."""
        kind = "an integer" if self.integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        return f"{kind} from {_number_text(self.low)} to {_number_text(self.high)}{unit}"


#: BrokerSettings' numeric fields. Every one is listed (a test checks), so docs and code agree.
SETTING_BOUNDS: dict[str, Bound] = {
    "lease_ttl": Bound(
        0.1,
        86_400,
        why="consumers renew every TTL/3; the union is held this long after Redis lost its data",
    ),
    "leader_ttl": Bound(
        1, 600, why="renewed every TTL/3; a standby takes over within it after the leader dies"
    ),
    "rate_per_second": Bound(1, 5, "messages/s", True, "Upbit allows 5 per connection"),
    "rate_per_minute": Bound(1, 100, "messages/min", True, "Upbit allows 100 per connection"),
    "coalesce_delay": Bound(0, 5, why="0: resubscribe at once; it delays every lease change"),
    "stall_timeout": Bound(
        1, 600, why="reconnect after this long without a frame; NaN or infinity would turn this off"
    ),
    "ping_interval": Bound(0.5, 50, why="keepalive well under Upbit's ~60 s idle cut"),
    "backoff_initial": Bound(0.05, 60, why="first reconnect delay (jitter: half to all of it)"),
    "backoff_max": Bound(
        1, 600, why="at least 1 s: under Upbit's 5 connects/s per IP, whatever keeps failing"
    ),
    "backoff_reset_after": Bound(
        0.5,
        3600,
        why="a connection that dies sooner keeps backing off: no reconnect loop faster than 2/s",
    ),
    "reconcile_interval": Bound(0.1, 60, why="full lease sweep; 0 would spin a core"),
    "status_interval": Bound(
        0.1,
        60,
        why="status write; 0 would spin a core, `check` calls a status stale after 3 intervals",
    ),
    "max_pending_frames": Bound(
        100, 10_000_000, "frames", True, "memory held when Redis is slower than upstream"
    ),
    "max_lease_streams": Bound(1, 100_000, "streams", True, "largest lease served"),
    "max_union_streams": Bound(
        1,
        1_000_000,
        "streams",
        True,
        "streams upstream at most; newest leases past it are refused (whole market ~855 codes)",
    ),
    "max_request_bytes": Bound(
        4_096,
        16 * 2**20,
        "bytes",
        True,
        "largest subscribe request (Upbit's own limit is unknown); a 1009 close lowers it",
    ),
    "history_max_age": Bound(
        10, 7 * 86_400, why="history older than this is trimmed; caps by type still apply"
    ),
    "markets_refresh": Bound(
        10, 86_400, why="re-read Upbit's market list (new listings, delistings)"
    ),
    "quiet_after": Bound(
        1, 86_400, why="a quiet stream costs one full resubscribe at most this often"
    ),
    "metrics_port": Bound(0, 65_535, "", True, "0: no metrics server"),
}

#: ``(smaller, larger)``: the first setting must not exceed the second.
SETTING_RELATIONS: tuple[tuple[str, str], ...] = (
    ("backoff_initial", "backoff_max"),
    ("rate_per_second", "rate_per_minute"),
)

#: The consumer library's numeric options (``consumers.BrokerClient``).
CLIENT_BOUNDS: dict[str, Bound] = {
    "lease_ttl": Bound(
        0.1, 86_400, why="heartbeat every TTL/3; a dead consumer's streams outlive it by this much"
    ),
    "queue_size": Bound(1, 10_000_000, "messages", True, "per in-process queue"),
    "connect_timeout": Bound(
        0.1, 300, why="connect, and each Redis command (lease writes: twice this)"
    ),
    "ping_interval": Bound(0.1, 3600, why="pub/sub PING after this long without traffic"),
}


def check_number(name: str, value: object, bound: Bound, label: str | None = None) -> Any:
    """``value`` (a number, or text as read from a flag or variable) as an ``int`` or
    ``float`` within ``bound``.

    Raises:
        ConfigError: not a number (booleans are not), not finite, not an integer where one is
            needed, or out of range; one line naming ``label`` (default ``name``).
    """
    number: int | float | None = None
    if isinstance(value, str):
        try:
            number = int(value) if bound.integer else float(value)
        except ValueError:  # int() also refuses "1.5", "nan" and 5,000-digit numbers
            number = None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value):
        number = int(value) if bound.integer and value.is_integer() else value
    if (
        number is None
        or (bound.integer and not isinstance(number, int))
        or not bound.low <= number <= bound.high  # False for NaN; infinity is out of range
    ):
        raise ConfigError(f"{label or name} must be {bound.describe()}, got {_shown(value)}")
    return number if bound.integer else float(number)


def setting_label(name: str, flag: str | None = None) -> str:
    """How an error names a setting: ``leader_ttl (--leader-ttl, UPBIT_BROKER_LEADER_TTL)``."""
    names = [flag] if flag else []
    return f"{name} ({', '.join([*names, ENV_PREFIX + name.upper()])})"


def check_setting(name: str, value: object, flag: str | None = None) -> Any:
    """:func:`check_number` against :data:`SETTING_BOUNDS` ``[name]``."""
    return check_number(name, value, SETTING_BOUNDS[name], setting_label(name, flag))


def bounds_table(bounds: Mapping[str, Bound], env_prefix: str = ENV_PREFIX) -> str:
    """The Markdown table of ``bounds`` (what docs/design.md and the README quote)."""
    rows = ["| setting | range | why |", "|---|---|---|"]
    for name, b in bounds.items():
        var = f"`{env_prefix}{name.upper()}`" if env_prefix else f"`{name}`"
        unit = f" {b.unit}" if b.unit else ""
        span = f"{_number_text(b.low)} to {_number_text(b.high)}{unit}"
        rows.append(f"| {var} | {span}{' (integer)' if b.integer else ''} | {b.why} |")
    return "\n".join(rows)


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _shown(value: object) -> str:
    text = repr(value)  # repr: one line, whatever the value holds
    return text if len(text) <= 40 else text[:37] + "..."


# -- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything a broker process needs; every field has an env var ``UPBIT_BROKER_<NAME>``.

    Numeric fields are checked against :data:`SETTING_BOUNDS` and :data:`SETTING_RELATIONS`.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    upstream_url: str = UPBIT_URL
    namespace: str = DEFAULT_NAMESPACE
    broker_id: str = field(default_factory=default_broker_id)
    #: default TTL consumers give their leases (the broker reads each lease's own TTL)
    lease_ttl: float = 10.0
    #: leader lock TTL; a standby takes over within this after the leader dies
    leader_ttl: float = 5.0
    #: upstream frame format: DEFAULT (full names) or SIMPLE (abbreviated, smaller)
    upstream_format: Format = Format.DEFAULT
    #: messages per second / minute we allow ourselves (Upbit: 5/s, 100/min per connection)
    rate_per_second: int = 4
    rate_per_minute: int = 90
    #: wait this long after a lease change for more changes before resubscribing
    coalesce_delay: float = 0.05
    #: no frame at all (data or {"status":"UP"}) for this long while connected -> reconnect
    stall_timeout: float = 30.0
    #: websocket protocol ping interval (keepalive well under Upbit's ~60 s idle cut)
    ping_interval: float = 20.0
    #: reconnect backoff: first delay, cap, and how long a connection must live to reset it
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    backoff_reset_after: float = 30.0
    #: periodic lease reconcile sweep (expiry is also detected at the earliest deadline)
    reconcile_interval: float = 1.0
    #: status hash refresh interval
    status_interval: float = 1.0
    #: frames held between receive and publish before the oldest are dropped (and counted)
    max_pending_frames: int = 100_000
    #: largest number of streams one lease may ask for; a larger lease is skipped
    max_lease_streams: int = 5_000
    #: the union's bounds: streams, and bytes of the subscribe request (broker.core.admission)
    max_union_streams: int = 10_000
    max_request_bytes: int = 262_144
    #: Upbit's market list (``GET /v1/market/all``); unknown codes are kept out of the union.
    #: "" derives it from ``upstream_url`` (same host, http(s)); "off" trusts every code.
    markets_url: str = ""
    #: re-read the market list this often
    markets_refresh: float = 600.0
    #: the history (``{ns}:hist:{stream}:{code}``, capped Redis Streams): entries kept per
    #: stream and code, by type (``candle`` covers every candle unit); ``off``: no history;
    #: a type at 0 or left out is not kept (``broker.core.history.parse_history_caps``)
    history: str = "trade=10000,candle=1000,ticker=100,orderbook=100"
    #: history entries older than this are trimmed (each stream of the union, every minute),
    #: and the history of a stream no lease wants any more expires after it
    history_max_age: float = 3600.0
    #: after a gap, fetch the missed trades and candles over Upbit's REST API into the history
    backfill: bool = True
    #: Upbit's REST API base; "" derives it from ``upstream_url`` (same host, http(s)); "off"
    rest_url: str = ""
    #: verify resubscribes with LIST_SUBSCRIPTIONS
    verify_subscriptions: bool = True
    #: keep the latest frame per stream in Redis (``{ns}:last:{stream}``)
    last_value_cache: bool = True
    #: seconds without any published frame for a code before status lists it as quiet
    quiet_after: float = 60.0
    #: Prometheus metrics port (0 = off)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")
        validate_name(self.broker_id, "broker id")
        if not self.upstream_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"upstream url must be ws:// or wss://, got {self.upstream_url!r}")
        if self.markets_url not in ("", "off") and not self.markets_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"markets url must be http://, https://, empty or off, got {self.markets_url!r}"
            )
        if self.rest_url not in ("", "off") and not self.rest_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"rest url must be http://, https://, empty or off, got {self.rest_url!r}"
            )
        parse_history_caps(self.history)  # a ConfigError naming the bad part
        if not self.redis_url.startswith(REDIS_URL_SCHEMES):
            raise ConfigError(
                f"redis url must start with {REDIS_URL_SCHEMES_TEXT}, "
                f"got {redact_url(self.redis_url)!r}"
            )
        for name in SETTING_BOUNDS:
            # frozen: the checked value (7 -> 7.0, "5" -> 5.0) replaces what was given
            object.__setattr__(self, name, check_setting(name, getattr(self, name)))
        for smaller, larger in SETTING_RELATIONS:
            low, high = getattr(self, smaller), getattr(self, larger)
            if low > high:
                raise ConfigError(
                    f"{setting_label(smaller)} must not exceed {setting_label(larger)}, "
                    f"got {low:g} > {high:g}"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BrokerSettings:
        """Defaults, then ``UPBIT_BROKER_*`` variables, then ``overrides`` (CLI flags; ``None``
        values are ignored so unset flags fall through to the environment)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def market_list_url(self) -> str | None:
        """Where to read Upbit's market list (None: "off", every code is trusted)."""
        if self.markets_url == "off":
            return None
        if self.markets_url:
            return self.markets_url
        scheme, _, rest = self.upstream_url.partition("://")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        return f"{'https' if scheme == 'wss' else 'http'}://{host}/v1/market/all"

    def rest_base_url(self) -> str | None:
        """Upbit's REST API base, ``https://api.upbit.com`` (None: "off", no back-fill)."""
        if self.rest_url == "off":
            return None
        if self.rest_url:
            return self.rest_url.rstrip("/")
        scheme, _, rest = self.upstream_url.partition("://")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        return f"{'https' if scheme == 'wss' else 'http'}://{host}"

    def history_caps(self) -> dict[str, int]:
        """Entries kept per stream and code, by type (``candle`` for every candle unit)."""
        return parse_history_caps(self.history)

    def with_(self, **changes: Any) -> BrokerSettings:
        return replace(self, **changes)

    def env_var_names(self) -> list[str]:
        return [ENV_PREFIX + f.name.upper() for f in fields(self)]


def _convert(name: str, type_: Any, raw: str) -> Any:
    if name in SETTING_BOUNDS:
        return check_setting(name, raw)
    t = str(type_)
    try:
        if t == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == "Format":
            return Format(raw.upper())
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: cannot read {raw!r} as {t}") from None
    return raw


ENV_VARS: tuple[str, ...] = tuple(ENV_PREFIX + f.name.upper() for f in fields(BrokerSettings))
