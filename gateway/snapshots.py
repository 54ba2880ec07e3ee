"""The broker's snapshot command, as the gateway asks it (gateway layer, I/O over Redis).

When this process has no frame of a stream a client starts (nobody here streams it yet, or a
gap made what it had untrustworthy), the SNAPSHOT comes from the broker's leader
(design.md "Commands to the leader"): it answers from the last-value cache ``{ns}:last:{stream}``
for streams flowing now, and fetches the others upstream without disturbing anyone's stream.
Reading the cache directly would be one round trip less, but only the leader knows whether a
cached value is current: a stream nobody leased for an hour still has its hour-old frame there.
Whatever comes first, this answer or the stream's own next frame, is the client's SNAPSHOT
(``gateway.hub``); a broker that does not answer in time only means the frame wins.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.contract import SnapshotCommand
from broker.errors import BrokerError, describe
from broker.keys import Keys, stream_name
from consumers.commands import new_request_id, send_command

logger = logging.getLogger(__name__)


class SnapshotFetcher:
    """``await fetcher(type, level, codes)`` -> ``{code: frame}`` for the codes answered."""

    def __init__(self, redis: Redis, keys: Keys, *, timeout: float = 3.0) -> None:
        self.redis = redis
        self.keys = keys
        self.timeout = timeout
        self.requests = 0
        self.failures = 0

    async def __call__(self, type_: str, level: float, codes: list[str]) -> dict[str, bytes]:
        self.requests += 1
        command = SnapshotCommand(
            id=new_request_id(),
            type=stream_name(type_, level),
            codes=sorted(set(codes)),
            level=level,
            # leave the broker a margin to answer what it has before our own wait ends
            timeout_ms=max(100, int(self.timeout * 800)),
        )
        try:
            reply = await send_command(self.redis, self.keys, command, timeout=self.timeout)
        except (BrokerError, RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            logger.debug("snapshot of %s %s: %s", command.type, ",".join(codes), describe(exc))
            return {}
        return {code: bytes(raw) for code, raw in reply.frames.items()}


__all__ = ["SnapshotFetcher"]
