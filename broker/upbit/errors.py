"""The protocol core's exceptions, and the root of every exception of upbit-broker (pure).

The root lives here, in the innermost layer, because everything else depends on this package
and this package depends on nothing else of ``broker``: ``broker.errors`` re-exports these
classes (the same objects) and adds the service's own under the same root, so one
``except BrokerError`` catches a refused request, an unreadable frame and a lost lease alike.

BrokerError                     the root (re-exported by broker.errors, which adds its children)
├── ProtocolError               what Upbit would refuse, or what we cannot parse
│   ├── RequestError            a request Upbit refuses (carries Upbit's error name)
│   ├── FrameError              an upstream frame we cannot route or decode
│   │   └── LegacyFrameError    (broker.upbit.messages) a 2018-era frame
│   └── InvalidCodeError        a market code that is not of Upbit's shape
│       └── InvalidDepthSuffixError   an orderbook code's depth suffix that is not 1-4 digits
└── UpstreamError               the upstream connection failed
    └── UpbitErrorFrame         Upbit sent an error frame ({"error": {...}})
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error raised by upbit-broker (``broker.errors`` draws the whole tree)."""


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


class InvalidDepthSuffixError(InvalidCodeError):
    """An orderbook code whose depth suffix is not 1-4 ASCII digits (``KRW-BTC.x``)."""


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

    @property
    def refuses_the_request(self) -> bool:
        """Upbit refused what the request asked for (not who asked, nor how often)."""
        return self.name in REQUEST_REFUSALS


#: error names that refuse a request's content (PROTOCOL.md 7.2); INVALID_AUTH, NO_TICKET
#: and the rate limits are about the connection, not about what the union asks for
REQUEST_REFUSALS = frozenset({"INVALID_PARAM", "WRONG_FORMAT", "NO_TYPE", "NO_CODES"})

__all__ = [
    "BrokerError",
    "FrameError",
    "InvalidCodeError",
    "InvalidDepthSuffixError",
    "ProtocolError",
    "RequestError",
    "UpbitErrorFrame",
    "UpstreamError",
]
