"""Snapshot commands: which codes the cache answers, which are fetched upstream, and when each
request is answered (pure: no I/O).

A snapshot command names one stream and up to 100 codes (``broker.contract.SnapshotCommand``
validates it). The last-value cache is trusted only for streams flowing now: others may hold
hours-old values. So a request first becomes a :class:`CacheQuery` for its flowing codes, which
the service answers from ``{ns}:last:{stream}`` (:meth:`SnapshotDesk.cached`); what the cache
cannot give is fetched upstream (a snapshot-only request riding along the full set, so nobody's
realtime stream breaks), and the frames published for it are fed back
(:meth:`SnapshotDesk.published`). A request is answered once every code arrived, or at its
deadline with the rest ``missing``.

A cache Redis stopped taking writes (at maxmemory: ``cache_stale_since_ms`` in the status) is
not trusted either: the service answers the lookup with nothing while it is stale, so every
code is fetched upstream (``broker.publisher`` says when it is current again).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

import msgspec

from broker.contract import SnapshotCommand, SnapshotReply
from broker.core.stats import BrokerStats
from broker.upbit.types import StreamKey

#: a snapshot request never waits longer than this for upstream
MAX_SNAPSHOT_TIMEOUT = 30.0
#: the depth a snapshot fetch asks for (the deepest Upbit serves)
SNAPSHOT_DEPTH = 30


@dataclass(frozen=True, slots=True)
class CacheQuery:
    """Look these codes up in the last-value cache (``HMGET {ns}:last:{stream} codes``) and
    feed the values back in the same order; ``[]`` when the cache is off or unreachable."""

    request_id: str
    type: str
    level: float
    codes: tuple[str, ...]
    #: every stream the request asks for
    keys: frozenset[StreamKey]
    #: when the request is answered whatever arrived (monotonic)
    deadline: float


@dataclass(slots=True)
class _Waiter:
    request_id: str
    requested: frozenset[StreamKey]
    frames: dict[str, bytes]
    sources: dict[str, str]
    waiting: set[StreamKey]
    deadline: float


class SnapshotDesk:
    """Snapshot requests in progress. Times are monotonic seconds."""

    def __init__(self, stats: BrokerStats) -> None:
        self.stats = stats
        self._waiters: list[_Waiter] = []
        #: streams whose next published frame a request is waiting for
        self.awaited: frozenset[StreamKey] = frozenset()

    def query(
        self, command: SnapshotCommand, flowing: Container[StreamKey], now: float
    ) -> CacheQuery:
        """The cache lookup for a valid command: its codes among the ``flowing`` streams."""
        type_, level = command.stream()
        keys = frozenset(StreamKey(type_, code, level) for code in command.codes)
        timeout = min(command.timeout_ms / 1000, MAX_SNAPSHOT_TIMEOUT)
        codes = tuple(sorted(key.code for key in keys if key in flowing))
        return CacheQuery(command.id, type_, level, codes, keys, now + timeout)

    def cached(self, query: CacheQuery, values: Sequence[object], now: float) -> set[StreamKey]:
        """The cache's values for ``query.codes`` (bytes, or None when absent); returns the
        streams to fetch upstream (the request waits for them)."""
        frames: dict[str, bytes] = {}
        for code, value in zip(query.codes, values, strict=False):
            if isinstance(value, bytes):
                frames[code] = value
        self.stats.snapshots_from_cache += len(frames)
        missing = {key for key in query.keys if key.code not in frames}
        if missing:
            self.stats.snapshots_from_upstream += 1
        sources = dict.fromkeys(frames, "cache")
        self._waiters.append(
            _Waiter(query.request_id, query.keys, frames, sources, missing, query.deadline)
        )
        self._update_awaited()
        return missing

    def published(self, frames: Iterable[tuple[StreamKey, bytes]]) -> None:
        """Frames of awaited streams were published (the first one of each counts)."""
        taken = False
        for key, frame in frames:
            for waiter in self._waiters:
                if key in waiter.waiting:
                    waiter.waiting.discard(key)
                    waiter.frames[key.code] = frame
                    waiter.sources[key.code] = "upstream"
                    taken = True
        if taken:
            self._update_awaited()

    def finish(self, now: float) -> tuple[list[SnapshotReply], set[StreamKey]]:
        """Answer every request that is complete or past its deadline: the replies, and the
        streams that delivered (snapshot-only ones need no more routing)."""
        replies: list[SnapshotReply] = []
        delivered: set[StreamKey] = set()
        keep: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.waiting and now < waiter.deadline:
                keep.append(waiter)
                continue
            missing = sorted(key.code for key in waiter.waiting)
            self.stats.snapshot_codes_missing += len(missing)
            delivered |= {key for key in waiter.requested if key.code in waiter.frames}
            frames = {code: msgspec.Raw(frame) for code, frame in waiter.frames.items()}
            replies.append(
                SnapshotReply(
                    id=waiter.request_id, frames=frames, missing=missing, source=waiter.sources
                )
            )
        if len(keep) != len(self._waiters):
            self._waiters = keep
            self._update_awaited()
        return replies, delivered

    def next_deadline(self) -> float | None:
        """The earliest deadline of a request in progress (None: none)."""
        return min((waiter.deadline for waiter in self._waiters), default=None)

    def _update_awaited(self) -> None:
        awaited: set[StreamKey] = set()
        for waiter in self._waiters:
            awaited |= waiter.waiting
        self.awaited = frozenset(awaited)


__all__ = ["MAX_SNAPSHOT_TIMEOUT", "SNAPSHOT_DEPTH", "CacheQuery", "SnapshotDesk"]
