"""Every client connection's lease, written in batches (gateway layer, I/O adapter over Redis).

Each gateway client holds an ordinary lease (design.md "Lease"): ``client_id``
``{gateway_id}.{n}``, ``host`` the client's address, ``pid`` the gateway's, ``subs`` the
client's realtime streams. The broker's lease store writes them with the very scripts every
consumer runs (``broker/lease.lua``, ``broker/lease_release.lua``), but not one round trip
each (:meth:`~broker.leases.LeaseStore.write_many`): a change marks the lease dirty and wakes
one writer task, which sends every dirty write and release in ONE pipeline; every TTL/3 the
same task renews all the leases of the process in one pipeline. So 1,000 clients cost one
pipeline per renewal round, and a burst of subscriptions costs one round trip.

A round Redis refuses (down, restarting) is retried after a short pause with whatever is dirty
then; a gateway that dies simply stops renewing, and its leases expire after their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from broker.errors import LeaseError, describe
from broker.leases import LeaseArgs, LeaseStore, lease_args
from broker.upbit.types import SubscriptionSet

logger = logging.getLogger(__name__)

#: a failed round is retried after this long
RETRY_DELAY = 0.5
#: leases per pipeline at most (a round of more goes in several pipelines, in order)
CHUNK = 1_000


@dataclass(slots=True)
class _Held:
    args: LeaseArgs
    subs: SubscriptionSet


class LeaseBatcher:
    """The leases of one gateway process: :meth:`put` and :meth:`drop` return at once.

    Args:
        store: the namespace's lease store (its keys and Redis client).
        ttl: each lease's TTL in seconds; every lease is renewed every ``ttl / 3``.
        pid: the ``pid`` field of every lease (the gateway's process id).
    """

    def __init__(self, store: LeaseStore, *, ttl: float, pid: int) -> None:
        self.store = store
        self._ttl_ms = max(1, int(ttl * 1000))
        self._interval = ttl / 3
        self._pid = pid
        self._held: dict[str, _Held] = {}
        #: client id -> True (write) or False (release), in the order of the changes
        self._dirty: dict[str, bool] = {}
        self._wake = asyncio.Event()
        self._round_done = asyncio.Event()
        self._rounds = 0
        self.writes = 0
        self.releases = 0
        self.failed_rounds = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def rounds(self) -> int:
        """Rounds written so far (one pipeline each, or one per :data:`CHUNK` leases)."""
        return self._rounds

    def subscriptions(self, client_id: str) -> SubscriptionSet | None:
        held = self._held.get(client_id)
        return held.subs if held is not None else None

    def put(self, client_id: str, subs: SubscriptionSet, host: str) -> None:
        """Hold (or change) ``client_id``'s lease; written in the next round.

        Raises:
            LeaseError: a stream no broker would accept (never for a session's streams).
        """
        args = lease_args(client_id, subs, ttl_ms=self._ttl_ms, host=host, pid=self._pid)
        held = self._held.get(client_id)
        if held is not None and held.args == args:
            return  # the same lease: the renewal keeps it
        self._held[client_id] = _Held(args, subs)
        self._dirty.pop(client_id, None)  # keep the order of the latest change
        self._dirty[client_id] = True
        self._wake.set()

    def drop(self, client_id: str) -> None:
        """Release ``client_id``'s lease in the next round."""
        if self._held.pop(client_id, None) is None and client_id not in self._dirty:
            return
        self._dirty.pop(client_id, None)
        self._dirty[client_id] = False
        self._wake.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every change made before this call is written (a round finished after
        it). Raises ``TimeoutError``."""
        if not self._dirty:
            return
        target = self._rounds + 1
        async with asyncio.timeout(timeout):
            while self._rounds < target or self._dirty:
                self._round_done.clear()
                await self._round_done.wait()

    async def run(self) -> None:
        """Write dirty leases as they change and renew them all every TTL/3; until cancelled."""
        renew_at = time.monotonic() + self._interval
        while True:
            left = renew_at - time.monotonic()
            if left > 0 and not self._dirty:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wake.wait()
            self._wake.clear()
            renew = time.monotonic() >= renew_at
            if renew:
                renew_at = time.monotonic() + self._interval
            ops = self._take(renew)
            if not ops:
                continue
            try:
                await self._write(ops)
            except asyncio.CancelledError:
                self._restore(ops)
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self.failed_rounds += 1
                self._restore(ops)
                if self.failed_rounds == 1 or self.failed_rounds % 20 == 0:
                    logger.warning(
                        "lease round of %d failed (%s); retrying in %.1fs",
                        len(ops),
                        describe(exc),
                        RETRY_DELAY,
                    )
                await asyncio.sleep(RETRY_DELAY)
                continue
            self._rounds += 1
            self._round_done.set()

    async def release_all(self, timeout: float = 5.0) -> int:
        """Release every lease held, in one round (shutdown); returns how many.

        Raises:
            RedisError, OSError, TimeoutError: Redis did not take them (they expire by TTL).
        """
        for client_id in list(self._held):
            self.drop(client_id)
        ops = self._take(False)
        if ops:
            async with asyncio.timeout(timeout):
                await self._write(ops)
        return sum(1 for _, write in ops if not write)

    # -- internals ------------------------------------------------------------------------------

    def _take(self, renew: bool) -> list[tuple[str, bool]]:
        dirty, self._dirty = self._dirty, {}
        if renew:
            for client_id in self._held:
                dirty.setdefault(client_id, True)
        return list(dirty.items())

    def _restore(self, ops: list[tuple[str, bool]]) -> None:
        """Put a failed round's changes back, unless changed again meanwhile."""
        for client_id, write in ops:
            if client_id in self._dirty:
                continue
            if write and client_id not in self._held:
                continue  # dropped meanwhile: its release is dirty already
            self._dirty[client_id] = write

    async def _write(self, ops: list[tuple[str, bool]]) -> None:
        # what each change is now: the lease held (its ARGV), or a release (None)
        batch: list[tuple[str, LeaseArgs | None]] = []
        for client_id, write in ops:
            held = self._held.get(client_id) if write else None
            batch.append((client_id, held.args if held is not None else None))
        refusals = await self.store.write_many(batch, chunk=CHUNK)
        for (client_id, args), refusal in zip(batch, refusals, strict=True):
            if refusal is not None:
                # a refusal of this one lease (lease.lua names the rule): nothing to retry
                logger.warning("redis refused the lease of %s: %s", client_id, refusal)
            elif args is not None:
                self.writes += 1
            else:
                self.releases += 1


__all__ = ["LeaseBatcher", "LeaseError"]
