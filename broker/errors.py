"""The exception tree of upbit-broker, and the one way to put an exception in a line (pure).

The root and the protocol's own errors are defined in :mod:`broker.upbit.errors`, the innermost
layer, so the protocol core and the simulator raise them without importing the service; they
are re-exported here (the very same classes), and the service's errors below derive from that
same :class:`BrokerError`, so ``except BrokerError`` catches every one of them.

BrokerError                     (defined in broker.upbit.errors)
├── ProtocolError               (broker.upbit.errors) what Upbit would refuse or we cannot parse
│   ├── RequestError            a request Upbit refuses (carries Upbit's error name)
│   ├── FrameError              an upstream frame we cannot route or decode
│   └── InvalidCodeError        a market code that is not of Upbit's shape
│       └── InvalidDepthSuffixError   an orderbook depth suffix that is not 1-4 digits
├── UpstreamError               (broker.upbit.errors) the upstream connection failed
│   ├── UpbitErrorFrame         Upbit sent an error frame ({"error": {...}})
│   ├── MarketListError         Upbit's market list (REST) could not be read
│   └── RestError               Upbit's REST API (the back-fill's trades and candles) could
│       │                       not be read, or answered what we cannot use
│       └── RestRateLimitError  Upbit refused us for the rate (429, 418) past our retries
├── LeaseError                  a lease that cannot be read or written
├── SnapshotError               a snapshot request got no (complete) answer
├── NotLeaderError              this broker lost (or never had) the leader lock
├── ConfigError                 settings that cannot work
│   └── RedisUrlError           (broker.redis_client) a Redis URL redis-py cannot parse
└── ContractError               (broker.contract) bytes that break the wire contract
    └── CommandError            a command the broker refuses (carries the id to answer)

``consumers.errors`` adds the client library's errors under the same root.
"""

from __future__ import annotations

from broker.upbit.errors import (
    BrokerError,
    FrameError,
    InvalidCodeError,
    InvalidDepthSuffixError,
    ProtocolError,
    RequestError,
    UpbitErrorFrame,
    UpstreamError,
)


class MarketListError(UpstreamError):
    """Upbit's market list (``GET /v1/market/all``) could not be read or made no sense."""


class RestError(UpstreamError):
    """Upbit's REST API could not be read (unreachable, a timeout, an HTTP error) or answered
    what we cannot use; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RestRateLimitError(RestError):
    """Upbit refused our REST requests for their rate (429 Too Many Requests, or 418 while it
    blocks us), or we would have to wait past the deadline for our own limiter."""


class LeaseError(BrokerError):
    """A lease that cannot be read or written."""


class SnapshotError(BrokerError):
    """A snapshot request got no complete answer; ``missing`` names the codes without data."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class NotLeaderError(BrokerError):
    """This broker does not hold the leader lock."""


class ConfigError(BrokerError, ValueError):
    """Settings that cannot work."""


def describe(exc: BaseException, *, with_type: bool = True) -> str:
    """One line naming ``exc``: ``"ConnectionError: refused"`` (``"refused"`` without
    ``with_type``, for people), its cause's text when it has none of its own, else its type."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type else text


__all__ = [
    "BrokerError",
    "ConfigError",
    "FrameError",
    "InvalidCodeError",
    "InvalidDepthSuffixError",
    "LeaseError",
    "MarketListError",
    "NotLeaderError",
    "ProtocolError",
    "RequestError",
    "RestError",
    "RestRateLimitError",
    "SnapshotError",
    "UpbitErrorFrame",
    "UpstreamError",
    "describe",
]
