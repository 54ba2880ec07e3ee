"""Errors the consumer library adds to ``broker.errors`` (pure).

BrokerError                       (broker.errors)
├── RedisUnavailableError         Redis cannot be reached when the client starts
├── NoBrokerError                 no broker answered a command in time
├── CommandRefused                the leader answered {"ok": false, "error": ...}
├── ClientClosedError             the client is closed (or was never started)
└── SnapshotError                 (broker.errors)
    └── PartialSnapshotError      some codes got no data; carries the frames that did
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.errors import BrokerError, SnapshotError


class RedisUnavailableError(BrokerError):
    """Redis cannot be reached (wrong URL, not running, refused the password)."""


class NoBrokerError(BrokerError):
    """No broker answered a command in time (none is running, or none is leader)."""


class NoBrokerSnapshotError(NoBrokerError, SnapshotError):
    """No broker answered a snapshot request in time; ``missing`` names every code asked."""


class CommandRefused(BrokerError):
    """The leader answered ``{"ok": false, "error": ...}``."""


class ClientClosedError(BrokerError):
    """The client is not running: start it first (``async with``), or it was closed."""


class PartialSnapshotError(SnapshotError):
    """Some codes got no data; ``frames`` holds what did arrive (code -> raw frame bytes)."""

    def __init__(self, message: str, missing: tuple[str, ...], frames: Mapping[str, bytes]) -> None:
        super().__init__(message, missing)
        self.frames = dict(frames)
