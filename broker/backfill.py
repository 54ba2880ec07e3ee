"""Back-fill jobs: the missed trades and candles of a gap, from Upbit's REST API into the
history (I/O adapter around ``broker.core.backfill``).

The leader phase hands each due :class:`~broker.core.backfill.BackfillJob` to
:meth:`Backfiller.run`, one at a time. For each stream of the job:

1. read the history around the gap, newest first (``XREVRANGE`` in pages of
   :data:`HISTORY_PAGE`; an entry with ``origin`` is a back-filled one) into the planner's
   history view, until it has its anchor, and no further back than the planner's
   ``scan_from_ms`` (an entry ID bound: the gap's times are our clock, entry IDs the Redis
   server's, so the job measures the difference once with ``TIME``);
2. fetch the pages the planner asks for (``broker.rest``: within the process's REST rate) until
   it is done, the stream's time (:data:`STREAM_TIME`) is up, or a page fails: what was found
   before a failure is still appended;
3. append the missing entries in order: ``XADD key MAXLEN ~ cap * f FRAME origin rest``, the
   frame built as the live stream would have carried it (``broker.upbit.rest_frames``), the
   cap the publisher's, pipelined in batches of :data:`XADD_BATCH`, each only while
   ``may_write()`` says this broker still leads (the leader phase's lock check, as the
   publisher's): a leader paused past its lock's TTL must not append what its successor is
   back-filling too. Once it says no, the job ends; its streams are ``failed`` (or
   ``incomplete``, counting what Redis had accepted).

It runs beside the live stream and never stands in its way: its Redis writes go over the phase's
command connection (the publisher has its own), and nothing it meets (REST down, garbage,
429 forever, a Redis error) escapes :meth:`Backfiller.run`: such a stream's result is
``failed`` (or ``incomplete``), and the gap's follow-up says so. After
:data:`MAX_REST_FAILURES` streams in a row whose REST fetch failed, the job's other streams are
not tried (``failed``): with REST down, a thousand streams would each wait out their retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from broker.coordination import server_time
from broker.core.backfill import (
    CANDLE_PAGE,
    TRADE_PAGE,
    BackfillJob,
    CandleFill,
    CandleHistory,
    Mark,
    Outcome,
    StreamFill,
    StreamResult,
    TradeFill,
    TradeHistory,
)
from broker.core.stats import BackfillStats
from broker.errors import RestError, describe
from broker.keys import HISTORY_FRAME_FIELD, HISTORY_ORIGIN_FIELD, HISTORY_ORIGIN_REST, Keys
from broker.rest import RestClient
from broker.upbit.errors import FrameError
from broker.upbit.messages import Candle, Trade, decode_message
from broker.upbit.rest_frames import build_candle_frame, build_trade_frame, candle_start_ms
from broker.upbit.types import CANDLE_SECONDS, DataType, Format

logger = logging.getLogger(__name__)

#: history entries read per XREVRANGE
HISTORY_PAGE = 1_000
#: entries appended per pipeline
XADD_BATCH = 500
#: one stream's back-fill at most (reading, fetching, appending); a slow or refusing REST API
#: makes it ``incomplete`` or ``failed``, never a job that never ends
STREAM_TIME = 30.0
#: streams in a row whose REST fetch failed, after which a job tries no more of its streams
MAX_REST_FAILURES = 3
#: every Redis call of a back-fill is bounded by this
REDIS_TIMEOUT = 5.0

_ORIGIN = HISTORY_ORIGIN_FIELD.encode()


def _always() -> bool:
    return True


class _AppendStopped(Exception):
    """Appending stopped before the last entry; ``appended``: what Redis had accepted."""

    def __init__(self, appended: int, *, deposed: bool) -> None:
        super().__init__(appended)
        self.appended = appended
        #: ``may_write`` said no (else Redis failed)
        self.deposed = deposed


class _Deposed(Exception):
    """``may_write`` said no while a stream appended: the job ends with ``result``."""

    def __init__(self, result: StreamResult) -> None:
        super().__init__(result)
        self.result = result


def _before(entry_id: bytes) -> str:
    """The stream ID just before ``entry_id`` (an exclusive range without Redis 6.2's ``(``)."""
    ms, _, seq = entry_id.decode().partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-18446744073709551615"


class Backfiller:
    """Runs back-fill jobs against one Redis (the phase's command client) and one REST API."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        rest: RestClient | None,
        *,
        fmt: Format = Format.DEFAULT,
        stats: BackfillStats | None = None,
        stream_time: float = STREAM_TIME,
        may_write: Callable[[], bool] = _always,
        max_rest_failures: int = MAX_REST_FAILURES,
    ) -> None:
        """Args:
        redis: where the history is (bytes replies).
        keys: the namespace's names.
        rest: Upbit's REST API (None: the back-fill is off; every stream fails).
        fmt: the broker's upstream format: back-filled frames are spelled the same.
        stats: the broker's back-fill counters.
        stream_time: seconds one stream may take at most.
        may_write: asked before every stream and every XADD batch: False once this broker
            may no longer write the history (the leader phase's lock check); the job ends.
            The default (always True) is for tests: a leader must pass its check.
        max_rest_failures: streams in a row whose REST fetch failed, after which the job's
            other streams are not tried.
        """
        self.redis = redis
        self.keys = keys
        self.rest = rest
        self.fmt = fmt
        self.stats = BackfillStats() if stats is None else stats
        self.stream_time = stream_time
        self.may_write = may_write
        self.max_rest_failures = max_rest_failures

    async def run(self, job: BackfillJob) -> list[StreamResult]:
        """Back-fill every stream of ``job``, one after the other. Never raises but
        ``CancelledError`` (the phase ends): a stream that could not be done is ``failed``,
        and so is every stream after the job stopped (deposed, or REST failing)."""
        results: list[StreamResult] = []
        offset_ms = await self._redis_offset_ms()
        rest_failures = 0
        stopped: str | None = None  # why the job stopped
        not_tried = 0
        for fill in job.streams:
            if stopped is None and not self.may_write():
                stopped = "this broker may no longer write the history"
            if stopped is not None:
                result = StreamResult(fill.key, Outcome.FAILED)
                not_tried += 1
            else:
                rest_failed: bool | None = None  # None: REST was not asked
                try:
                    result, rest_failed = await self._fill(fill, offset_ms)
                except _Deposed as exc:
                    result = exc.result
                    stopped = "this broker may no longer write the history"
                except Exception as exc:  # CancelledError is no Exception: it ends the job
                    result = StreamResult(fill.key, Outcome.FAILED)
                    logger.warning(
                        "back-fill of %s:%s failed: %s",
                        fill.key.type,
                        fill.key.code,
                        describe(exc),
                    )
                if rest_failed is not None:
                    rest_failures = rest_failures + 1 if rest_failed else 0
                if stopped is None and rest_failures >= self.max_rest_failures:
                    stopped = f"{rest_failures} streams in a row failed over REST"
            results.append(result)
            self.stats.streams += 1
            self.stats.appended += result.appended
            if result.outcome is not Outcome.COMPLETE:
                self.stats.streams_failed += 1
        if stopped is not None:
            logger.warning("back-fill job stopped: %s; %d streams not tried", stopped, not_tried)
        return results

    async def _redis_offset_ms(self) -> int:
        """The Redis server's clock less ours, ms: entry IDs are its time, gaps ours (0: no
        answer; the history reads will say why)."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                seconds, micros = await server_time(self.redis, self.keys)
        except Exception as exc:  # CancelledError is no Exception
            logger.debug("redis TIME failed: %s", describe(exc))
            return 0
        return int(seconds) * 1000 + int(micros) // 1000 - time.time_ns() // 1_000_000

    async def _fill(self, fill: StreamFill, offset_ms: int) -> tuple[StreamResult, bool | None]:
        """One stream: its result, and whether its REST fetch failed (None: not asked).

        Raises:
            _Deposed: ``may_write`` said no while appending.
        """
        if self.rest is None:
            return StreamResult(fill.key, Outcome.FAILED), None
        if fill.key.type == DataType.TRADE:
            return await self._fill_trades(fill, self.rest, offset_ms)
        return await self._fill_candles(fill, self.rest, offset_ms)

    async def _fill_trades(
        self, fill: StreamFill, rest: RestClient, offset_ms: int
    ) -> tuple[StreamResult, bool]:
        key, code = self._key(fill), fill.key.code
        deadline = rest.limiter.clock() + self.stream_time
        history = TradeHistory(fill.window.since_ms)

        def entry(frame: bytes, live: bool) -> bool:
            trade = decode_message(frame)
            if not isinstance(trade, Trade):
                return False
            return history.entry(Mark(trade.trade_timestamp, trade.sequential_id), live=live)

        await self._scan(key, entry, history.scan_from_ms + offset_ms)
        plan = TradeFill(fill.window, history)
        rest_failed = False
        while not plan.done:
            request = plan.request()
            try:
                page = await rest.trades(
                    code,
                    count=TRADE_PAGE,
                    cursor=request.cursor,
                    days_ago=request.days_ago,
                    deadline=deadline,
                )
            except RestError as exc:
                plan.abort()
                rest_failed = True
                logger.warning("back-fill of trade:%s stopped: %s", code, describe(exc))
                break
            plan.page(page)
        frames = [build_trade_frame(t, self.fmt) for t in plan.missing()]
        return await self._store(fill, key, frames, plan.outcome, plan.pages), rest_failed

    async def _fill_candles(
        self, fill: StreamFill, rest: RestClient, offset_ms: int
    ) -> tuple[StreamResult, bool]:
        key, code, type_ = self._key(fill), fill.key.code, fill.key.type
        deadline = rest.limiter.clock() + self.stream_time
        unit_ms = CANDLE_SECONDS[DataType(type_)] * 1000
        history = CandleHistory(unit_ms, fill.window.since_ms)

        def entry(frame: bytes, live: bool) -> bool:
            candle = decode_message(frame)
            if not isinstance(candle, Candle):
                return False
            start = candle_start_ms(candle.candle_date_time_utc)
            return history.entry(start, candle.timestamp, live=live)

        await self._scan(key, entry, history.scan_from_ms + offset_ms)
        plan = CandleFill(fill.window, history)
        rest_failed = False
        while not plan.done:
            try:
                page = await rest.candles(
                    type_, code, to_ms=plan.request(), count=CANDLE_PAGE, deadline=deadline
                )
                plan.page(page)
            except (RestError, FrameError) as exc:  # FrameError: a candle time that is none
                plan.abort()
                rest_failed = True
                logger.warning("back-fill of %s:%s stopped: %s", type_, code, describe(exc))
                break
        frames = [build_candle_frame(type_, c, self.fmt) for c in plan.missing()]
        return await self._store(fill, key, frames, plan.outcome, plan.pages), rest_failed

    def _key(self, fill: StreamFill) -> str:
        return self.keys.history(fill.key.type, fill.key.code, fill.key.level)

    async def _scan(self, key: str, entry: Callable[[bytes, bool], bool], from_ms: int) -> None:
        """Feed the history's entries to ``entry(frame, live)``, newest first, until it returns
        True, the history ends, or its entries were appended before ``from_ms`` (the Redis
        server's clock, an entry ID bound). Entries that are no frame of the stream are
        skipped."""
        upper = "+"
        lower = f"{max(0, from_ms)}-0"
        while True:
            async with asyncio.timeout(REDIS_TIMEOUT):
                page: Any = await self.redis.xrevrange(
                    key, max=upper, min=lower, count=HISTORY_PAGE
                )
            page = page or []
            for _, fields in page:
                frame = fields.get(HISTORY_FRAME_FIELD.encode())
                if frame is None:
                    continue
                try:
                    if entry(frame, _ORIGIN not in fields):
                        return
                except FrameError:
                    continue  # not a frame we can read: it tells nothing about the gap
            if len(page) < HISTORY_PAGE:
                return
            upper = _before(page[-1][0])

    async def _store(
        self, fill: StreamFill, key: str, frames: list[bytes], outcome: Outcome, pages: int
    ) -> StreamResult:
        """Append ``frames``; the stream's result (``outcome`` if all went in).

        Raises:
            _Deposed: ``may_write`` said no before a batch (the result is in it).
        """
        try:
            appended = await self._append(key, frames, fill.cap)
        except _AppendStopped as stopped:
            appended = stopped.appended
            outcome = Outcome.INCOMPLETE if appended else Outcome.FAILED
            if stopped.deposed:
                logger.warning(
                    "back-fill of %s:%s stopped after %d of %d entries: this broker may no "
                    "longer write the history",
                    fill.key.type,
                    fill.key.code,
                    appended,
                    len(frames),
                )
                self._log(fill, outcome, appended, pages)
                raise _Deposed(StreamResult(fill.key, outcome, appended)) from None
            logger.warning(
                "back-fill of %s:%s: appending failed after %d of %d entries: %s",
                fill.key.type,
                fill.key.code,
                appended,
                len(frames),
                describe(stopped.__cause__ or stopped),
            )
        self._log(fill, outcome, appended, pages)
        return StreamResult(fill.key, outcome, appended)

    async def _append(self, key: str, frames: list[bytes], cap: int) -> int:
        """XADD ``frames`` in order, each ``f`` then ``origin rest``, capped like the live ones,
        each batch only while ``may_write()``. Returns how many Redis accepted (all).

        Raises:
            _AppendStopped: ``may_write`` said no, or Redis failed; with what Redis had
                accepted before (a batch whose answer never came counts none).
        """
        appended = 0
        for start in range(0, len(frames), XADD_BATCH):
            if not self.may_write():
                raise _AppendStopped(appended, deposed=True)
            try:
                async with (
                    asyncio.timeout(REDIS_TIMEOUT),
                    self.redis.pipeline(transaction=False) as pipe,
                ):
                    for frame in frames[start : start + XADD_BATCH]:
                        pipe.xadd(
                            key,
                            {HISTORY_FRAME_FIELD: frame, HISTORY_ORIGIN_FIELD: HISTORY_ORIGIN_REST},
                            maxlen=cap,
                            approximate=True,
                        )
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # CancelledError is no Exception: it ends the job
                raise _AppendStopped(appended, deposed=False) from exc
            refused = [reply for reply in replies if isinstance(reply, Exception)]
            appended += len(replies) - len(refused)
            if refused:
                raise _AppendStopped(appended, deposed=False) from refused[0]
        return appended

    @staticmethod
    def _log(fill: StreamFill, outcome: Outcome, appended: int, pages: int) -> None:
        logger.info(
            "back-fill %s:%s %s: %d appended from %d pages (gap %d..%d)",
            fill.key.type,
            fill.key.code,
            outcome.value,
            appended,
            pages,
            fill.window.since_ms,
            fill.window.until_ms,
            extra={
                "event": "backfill",
                "stream": fill.key.type,
                "code": fill.key.code,
                "outcome": outcome.value,
                "appended": appended,
            },
        )


__all__ = ["HISTORY_PAGE", "MAX_REST_FAILURES", "STREAM_TIME", "XADD_BATCH", "Backfiller"]
