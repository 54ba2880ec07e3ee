"""Broker settings: one immutable object, built in one place (pure).

``BrokerSettings.from_env`` reads ``UPBIT_BROKER_*`` variables; the CLI overlays its flags.
Library code never reads ``os.environ`` itself: it is handed a settings object.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

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
    # redis-py also takes credentials as query parameters (?password=...).
    return re.sub(r"([?&](?:password|pass|pwd)=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything a broker process needs; every field has an env var ``UPBIT_BROKER_<NAME>``."""

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
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"redis url must start with redis://, rediss:// or unix://, "
                f"got {redact_url(self.redis_url)!r}"
            )
        for name in ("lease_ttl", "leader_ttl", "stall_timeout", "ping_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not 1 <= self.rate_per_second <= 5 or not 1 <= self.rate_per_minute <= 100:
            raise ConfigError("rate budget must stay within Upbit's 5/s and 100/min")

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

    def with_(self, **changes: Any) -> BrokerSettings:
        return replace(self, **changes)

    def env_var_names(self) -> list[str]:
        return [ENV_PREFIX + f.name.upper() for f in fields(self)]


def _convert(name: str, type_: Any, raw: str) -> Any:
    t = str(type_)
    try:
        if t == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "Format":
            return Format(raw.upper())
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: cannot read {raw!r} as {t}") from None
    return raw


ENV_VARS: tuple[str, ...] = tuple(ENV_PREFIX + f.name.upper() for f in fields(BrokerSettings))
