"""Gateway settings: one immutable object (pure).

Every field is also an environment variable: the Redis side shares the broker's names
(``UPBIT_BROKER_REDIS_URL``, ``UPBIT_BROKER_NAMESPACE``), the gateway's own options are
``UPBIT_GATEWAY_<NAME>``. The CLI (``upbit-broker gateway``) overlays its flags.
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
from broker.settings import (
    ENV_PREFIX,
    REDIS_URL_SCHEMES,
    REDIS_URL_SCHEMES_TEXT,
    Bound,
    check_number,
    redact_url,
)

GATEWAY_ENV_PREFIX = "UPBIT_GATEWAY_"
#: what the gateway does when the broker announces a gap on a client's streams
ON_GAP = ("snapshot", "close")

#: the gateway's numeric settings and their bounds (checked like the broker's)
GATEWAY_BOUNDS: dict[str, Bound] = {
    "port": Bound(0, 65_535, "", True, "0: any free port"),
    "lease_ttl": Bound(1, 3_600, why="each client's lease; renewed in batches every TTL/3"),
    "rest_lease_seconds": Bound(
        1, 3_600, why="codes asked over REST stay leased this long after the last request"
    ),
    "rest_wait": Bound(
        0.1,
        30,
        why="a REST poll of a code not cached yet waits this long for its first frame, "
        "then is forwarded to Upbit",
    ),
    "rest_forward_wait": Bound(
        0,
        60,
        why="a forwarded REST request waits this long for room in the shared upstream "
        "budget, then is answered 429",
    ),
    "rest_per_second": Bound(
        1,
        10,
        "requests",
        True,
        "REST requests a second per group this process sends Upbit "
        "(Upbit: 10 per IP; share them among gateways and brokers behind one IP)",
    ),
    "rest_market_cache": Bound(10, 86_400, why="Upbit's /v1/market/all answer is kept this long"),
    "max_clients": Bound(1, 1_000_000, "connections", True, "client connections at once"),
    "client_queue": Bound(
        16, 1_000_000, "frames", True, "frames queued per client before it is cut (1008)"
    ),
    "idle_timeout": Bound(
        0,
        86_400,
        why="a client that neither sends nor receives this long is dropped, as Upbit "
        "does (documented 120 s); 0: never",
    ),
    "up_interval": Bound(0.1, 3_600, why='{"status":"UP"} after a text PING (Upbit: 10 s)'),
}
#: the longest gateway id: its clients' lease ids ``{gateway_id}.{n}`` stay within 128
MAX_GATEWAY_ID = 100


def default_gateway_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    return f"gw-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Everything a gateway process needs."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = DEFAULT_NAMESPACE
    host: str = "127.0.0.1"
    port: int = 8080
    #: names this process in its clients' lease ids (``{gateway_id}.{n}``)
    gateway_id: str = field(default_factory=default_gateway_id)
    #: ``wss://`` and ``https://`` when both are set (some clients accept only ``wss://``)
    tls_cert: str = ""
    tls_key: str = ""
    #: impose Upbit's per-connection limits (5 messages/s, 100/min) as Upbit does
    emulate_limits: bool = False
    #: a broker gap on a client's streams: re-send fresh SNAPSHOTs of them ("snapshot"), or
    #: close the connection with 1012 so the client's library reconnects ("close")
    on_gap: str = "snapshot"
    lease_ttl: float = 30.0
    rest_lease_seconds: float = 60.0
    max_clients: int = 10_000
    client_queue: int = 4_096
    #: Upbit's REST API, for the quotation paths the gateway does not answer itself
    upstream_rest_url: str = "https://api.upbit.com"
    #: a REST poll of a code the cache cannot answer yet waits this long for its first frame
    #: (through the broker's snapshot command), then goes to Upbit
    rest_wait: float = 3.0
    #: a forwarded REST request waits this long for the shared upstream budget, then is 429
    rest_forward_wait: float = 5.0
    #: REST requests a second per group this process sends upstream (Upbit allows 10 per IP)
    rest_per_second: int = 8
    #: Upbit's market list (``/v1/market/all``) is kept this long
    rest_market_cache: float = 300.0
    #: a client that neither sends nor receives anything this long is dropped (no close frame,
    #: as Upbit does); 0: never
    idle_timeout: float = 120.0
    #: period of ``{"status":"UP"}`` to clients that sent a text ``PING``
    up_interval: float = 10.0

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")
        validate_name(self.gateway_id, "gateway id")
        if len(self.gateway_id) > MAX_GATEWAY_ID:
            raise ConfigError(
                f"gateway id must be at most {MAX_GATEWAY_ID} characters "
                f"(its clients' lease ids add '.N'), got {len(self.gateway_id)}"
            )
        if self.on_gap not in ON_GAP:
            raise ConfigError(f"on_gap must be one of {', '.join(ON_GAP)}, got {self.on_gap!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither")
        # the broker's schemes: the gateway's clients are built by broker.redis_client and
        # consumers.subscriber, which read a redis+sentinel:// URL as the broker does
        if not self.redis_url.startswith(REDIS_URL_SCHEMES):
            raise ConfigError(
                f"redis url must start with {REDIS_URL_SCHEMES_TEXT}, "
                f"got {redact_url(self.redis_url)!r}"
            )
        if not self.upstream_rest_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"upstream rest url must be http:// or https://, got {self.upstream_rest_url!r}"
            )
        for name, bound in GATEWAY_BOUNDS.items():
            label = f"{name} ({GATEWAY_ENV_PREFIX}{name.upper()})"
            object.__setattr__(self, name, check_number(name, getattr(self, name), bound, label))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> GatewaySettings:
        """Defaults, then variables, then ``overrides`` (flags; ``None`` values ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            shared = f.name in ("redis_url", "namespace")
            raw = env.get((ENV_PREFIX if shared else GATEWAY_ENV_PREFIX) + f.name.upper())
            if raw is None or raw == "":
                continue
            if str(f.type) == "bool":
                if raw.lower() in ("1", "true", "yes", "on"):
                    values[f.name] = True
                elif raw.lower() in ("0", "false", "no", "off"):
                    values[f.name] = False
                else:
                    raise ConfigError(f"{GATEWAY_ENV_PREFIX}{f.name.upper()}: not a boolean")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> GatewaySettings:
        return replace(self, **changes)


__all__ = ["GATEWAY_BOUNDS", "GATEWAY_ENV_PREFIX", "MAX_GATEWAY_ID", "ON_GAP", "GatewaySettings"]
