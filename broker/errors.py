"""The exception tree of upbit-broker (pure: stdlib only).

BrokerError
├── ProtocolError               (broker.upbit: what Upbit would refuse or what we cannot parse)
│   ├── RequestError            a request Upbit refuses (carries Upbit's error name)
│   ├── FrameError              an upstream frame we cannot route or decode
│   └── InvalidCodeError        a market code that is not of Upbit's shape
├── UpstreamError               the upstream connection failed
│   └── UpbitErrorFrame         Upbit sent an error frame ({"error": {...}})
├── LeaseError                  a lease that cannot be read or written
├── SnapshotError               a snapshot request got no (complete) answer
├── NotLeaderError              this broker lost (or never had) the leader lock
└── ConfigError                 settings that cannot work
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error raised by upbit-broker."""


class ProtocolError(BrokerError):
    """Something about the Upbit protocol is wrong."""


class RequestError(ProtocolError):
    """A request Upbit would refuse; ``name`` is Upbit's error name (e.g. ``NO_CODES``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class FrameError(ProtocolError):
    """An upstream frame that cannot be routed or decoded."""


class InvalidCodeError(ProtocolError, ValueError):
    """A market code that is not of Upbit's shape (``KRW-BTC``, upper case)."""


class UpstreamError(BrokerError):
    """The upstream connection failed."""


class UpbitErrorFrame(UpstreamError):
    """Upbit answered with an error frame ``{"error": {"name": ..., "message": ...}}``."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"upbit error {name}: {message}")
        self.name = name
        self.message = message

    @property
    def is_rate_limit(self) -> bool:
        return self.name in ("Too Many Requests", "I'm a teapot")


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
