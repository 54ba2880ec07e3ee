"""Back-fill jobs: the missed trades and candles of a gap, from Upbit's REST API into the
history (I/O adapter around ``broker.core.backfill``).

The leader phase hands each due :class:`~broker.core.backfill.BackfillJob` to
:meth:`Backfiller.run`, one at a time. For each stream of the job:

1. read the history around the gap, newest first (``XREVRANGE`` in pages of
   :data:`HISTORY_PAGE`; an entry with ``origin`` is a back-filled one) into the planner's
   history view, until it has its anchor;
2. fetch the pages the planner asks for (``broker.rest``: within the process's REST rate) until
   it is done, the stream's time (:data:`STREAM_TIME`) is up, or a page fails: what was found
   before a failure is still appended;
3. append the missing entries in order: ``XADD key MAXLEN ~ cap * f FRAME origin rest``, the
   frame built as the live stream would have carried it (``broker.upbit.rest_frames``), the
   cap the publisher's, pipelined in batches of :data:`XADD_BATCH`.

It runs beside the live stream and never stands in its way: its Redis writes go over the phase's
command connection (the publisher has its own), and nothing it meets (REST down, garbage,
429 forever, a Redis error) escapes :meth:`Backfiller.run`: such a stream's result is
``failed`` (or ``incomplete``), and the gap's follow-up says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

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
#: every Redis call of a back-fill is bounded by this
REDIS_TIMEOUT = 5.0

_ORIGIN = HISTORY_ORIGIN_FIELD.encode()


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
    ) -> None:
        """Args:
        redis: where the history is (bytes replies).
        keys: the namespace's names.
        rest: Upbit's REST API (None: the back-fill is off; every stream fails).
        fmt: the broker's upstream format: back-filled frames are spelled the same.
        stats: the broker's back-fill counters.
        stream_time: seconds one stream may take at most.
        """
        self.redis = redis
        self.keys = keys
        self.rest = rest
        self.fmt = fmt
        self.stats = BackfillStats() if stats is None else stats
        self.stream_time = stream_time

    async def run(self, job: BackfillJob) -> list[StreamResult]:
        """Back-fill every stream of ``job``, one after the other. Never raises but
        ``CancelledError`` (the phase ends): a stream that could not be done is ``failed``."""
        results: list[StreamResult] = []
        for fill in job.streams:
            try:
                result = await self._fill(fill)
            except Exception as exc:  # CancelledError is no Exception: it ends the job
                result = StreamResult(fill.key, Outcome.FAILED)
                logger.warning(
                    "back-fill of %s:%s failed: %s", fill.key.type, fill.key.code, describe(exc)
                )
            results.append(result)
            self.stats.streams += 1
            self.stats.appended += result.appended
            if result.outcome is not Outcome.COMPLETE:
                self.stats.streams_failed += 1
        return results

    async def _fill(self, fill: StreamFill) -> StreamResult:
        if self.rest is None:
            return StreamResult(fill.key, Outcome.FAILED)
        if fill.key.type == DataType.TRADE:
            return await self._fill_trades(fill, self.rest)
        return await self._fill_candles(fill, self.rest)

    async def _fill_trades(self, fill: StreamFill, rest: RestClient) -> StreamResult:
        key, code = self._key(fill), fill.key.code
        deadline = rest.limiter.clock() + self.stream_time
        history = TradeHistory(fill.window.since_ms)

        def entry(frame: bytes, live: bool) -> bool:
            trade = decode_message(frame)
            if not isinstance(trade, Trade):
                return False
            return history.entry(Mark(trade.trade_timestamp, trade.sequential_id), live=live)

        await self._scan(key, entry)
        plan = TradeFill(fill.window, history)
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
                logger.warning("back-fill of trade:%s stopped: %s", code, describe(exc))
                break
            plan.page(page)
        missing = plan.missing()
        await self._append(key, [build_trade_frame(t, self.fmt) for t in missing], fill.cap)
        self._log(fill, plan.outcome, len(missing), plan.pages)
        return StreamResult(fill.key, plan.outcome, len(missing))

    async def _fill_candles(self, fill: StreamFill, rest: RestClient) -> StreamResult:
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

        await self._scan(key, entry)
        plan = CandleFill(fill.window, history)
        while not plan.done:
            try:
                page = await rest.candles(
                    type_, code, to_ms=plan.request(), count=CANDLE_PAGE, deadline=deadline
                )
                plan.page(page)
            except (RestError, FrameError) as exc:  # FrameError: a candle time that is none
                plan.abort()
                logger.warning("back-fill of %s:%s stopped: %s", type_, code, describe(exc))
                break
        missing = plan.missing()
        frames = [build_candle_frame(type_, c, self.fmt) for c in missing]
        await self._append(key, frames, fill.cap)
        self._log(fill, plan.outcome, len(missing), plan.pages)
        return StreamResult(fill.key, plan.outcome, len(missing))

    def _key(self, fill: StreamFill) -> str:
        return self.keys.history(fill.key.type, fill.key.code, fill.key.level)

    async def _scan(self, key: str, entry: Callable[[bytes, bool], bool]) -> None:
        """Feed the history's entries to ``entry(frame, live)``, newest first, until it returns
        True or the history ends. Entries that are no frame of the stream are skipped."""
        upper = "+"
        while True:
            async with asyncio.timeout(REDIS_TIMEOUT):
                page: Any = await self.redis.xrevrange(key, max=upper, min="-", count=HISTORY_PAGE)
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

    async def _append(self, key: str, frames: list[bytes], cap: int) -> None:
        """XADD ``frames`` in order, each ``f`` then ``origin rest``, capped like the live ones."""
        for start in range(0, len(frames), XADD_BATCH):
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
                await pipe.execute()

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


__all__ = ["HISTORY_PAGE", "STREAM_TIME", "XADD_BATCH", "Backfiller"]
