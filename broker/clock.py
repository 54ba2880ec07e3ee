"""The two clocks of the contract, in milliseconds (pure: stdlib only).

Every ``*_ms`` field of the Redis contract (docs/design.md) is milliseconds since the epoch.
Lease deadlines and status freshness are judged by the Redis server's clock (``TIME``), never
by a client's, so hosts with skewed clocks agree; events and gaps carry the wall clock of the
process that wrote them. Consumers may import this module (like ``broker.keys``).
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """This process's wall clock in milliseconds (the unit of every ``*_ms`` field)."""
    return time.time_ns() // 1_000_000


def server_time_ms(server_time: tuple[int | str | bytes, int | str | bytes]) -> int:
    """The Redis server clock in milliseconds from a ``TIME`` reply ``(seconds, microseconds)``
    (redis-py gives ints; a raw reply gives text)."""
    seconds, micros = server_time
    return int(seconds) * 1000 + int(micros) // 1000


__all__ = ["now_ms", "server_time_ms"]
