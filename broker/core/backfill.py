"""Back-fill of upstream gaps: which missed trades and candles to fetch over REST, which of them
to append to the history, and what each gap's follow-up event says (pure: no I/O, no clock).

After a gap (``broker.core.gaps``: reconnect, stall, error, takeover, redis) the live stream
resumes, but what Upbit traded meanwhile never reached the history (``{ns}:hist:...``). Upbit
still has it: ``GET /v1/trades/ticks`` pages back through the trades, newest first, by
``sequential_id`` cursor; the candle endpoints page back by start time. The I/O adapter
(``broker.backfill``) reads the history around the gap, asks these planners what to fetch,
feeds them the pages and appends what they call missing (``origin`` = ``rest``).

Trades, per stream (:class:`TradeHistory`, then :class:`TradeFill`):

- The **anchor** is the newest live entry of the history whose trade is at least
  :data:`ANCHOR_MARGIN_MS` older than the gap's start (trade times are Upbit's clock, the gap's
  ours: the margin keeps a skew from putting the anchor inside the gap). Every entry newer than
  it (by position) is **known**, by ``sequential_id``, back-filled entries included.
- The **cutoff** is the newest live entry, when it is past the gap's end: trades after it are
  the live stream's (the ones still on their way must not be appended twice); else the gap's
  end. The first page starts below it (``cursor`` = its ``sequential_id``).
- Paging stops at the anchor (a trade at or before it by ``(timestamp, sequential_id)``), or,
  without one (the history is empty or capped after the gap), at a trade older than the gap's
  start less the margin; at the end of Upbit's data (a short page: without ``days_ago`` Upbit
  answers only the latest trade date, so an older date is asked next while the gap starts
  before the date just read, up to :data:`MAX_DAYS_AGO`); or at :data:`MAX_TRADE_PAGES`
  (incomplete). An empty page tells no date: the one read is the cutoff's, or a later one
  when Upbit's date turned after the cutoff, so an empty first page asks the day before too
  (a gap that ends just after midnight: the day's first trade is the cutoff, nothing of that
  day lies below it, and the gap's trades are all the day before's). A server that ignores
  ``days_ago`` (the same trades again) leaves the stream incomplete, as does a gap that starts
  before the oldest date Upbit keeps.
- The history is read newest first until the anchor, but never past the entries appended
  :data:`SCAN_MARGIN_MS` before the gap's start (by entry ID, the Redis server's clock; the
  adapter translates): older entries hold older trades, and a history without an anchor (all
  back-filled, unreadable) is not read to its end.
- **Missing** are the trades between the anchor and the cutoff that are not known, each once
  (``sequential_id``), appended in ``(timestamp, sequential_id)`` order: Upbit does not promise
  that ``sequential_id`` follows time.

Candles, per stream (:class:`CandleHistory`, then :class:`CandleFill`): the candles that overlap
the gap and are complete (they start before the newest live candle, or ended by the gap's end)
are fetched; one is missing when the history holds no frame of that start as recent as Upbit's
(a frame from before the gap shows the candle half-way; the live stream pushes each candle
while it changes, so its last push is the complete one).

Gaps (:class:`BackfillDesk`): each announced gap queues its trade and candle streams; gaps
queued before the back-fill runs merge per stream (one window from the earliest start to the
latest end), and the job runs :data:`SETTLE_MS` after the latest gap's end, once the new
connection's frames flow (the cutoff needs them). Gaps far apart (the merged span would pass
:data:`MAX_MERGED_SPAN_MS`, say gaps queued while a long job ran) are not merged: the later
one starts the next job, so a recent gap is not paged back to an old one's start. The job's
results give every gap its follow-up: the gap event again with ``state`` (``filled``: every
trade and candle stream it covered is complete in the history; ``lost``: every stream failed
and nothing was appended; else ``partial``), ``restored`` (the ticker and orderbook types a new
connection's SNAPSHOT frames restored; none after a ``redis`` gap, whose connection never
changed) and ``backfill`` counts. A stream whose history is off cannot be filled. While the
back-fill is off, gaps queue nothing and get no follow-up (one that could only say ``lost``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from broker.contract import GapEvent
from broker.core.gaps import GapReason
from broker.core.history import history_cap
from broker.upbit.rest_frames import RestCandle, RestTrade, candle_start_ms
from broker.upbit.types import StreamKey

#: how much older than the gap's start the anchor's trade must be (clock skew, Upbit vs us)
ANCHOR_MARGIN_MS = 1_000
#: a job runs this long after its latest gap's end: the new connection's frames flow by then
SETTLE_MS = 2_000
#: ... but gaps that keep coming (a flapping connection) postpone it at most this long
MAX_DEFER_MS = 10_000
#: Upbit's largest page: trades (``count`` <= 500), candles (``count`` <= 200)
TRADE_PAGE = 500
CANDLE_PAGE = 200
#: pages per stream and job at most (10,000 trades: the default history cap; 2,000 candles)
MAX_TRADE_PAGES = 20
MAX_CANDLE_PAGES = 10
#: ``days_ago`` reaches back this many UTC days at most (Upbit keeps seven)
MAX_DAYS_AGO = 7
DAY_MS = 86_400_000
#: the history is read back to entries appended this long before the gap's start, no further
#: (a trade is appended after it happened; the margin covers Upbit's clock and the latency)
SCAN_MARGIN_MS = 60_000
#: gaps whose windows would merge into a longer span than this go to separate jobs
MAX_MERGED_SPAN_MS = 5 * 60_000
#: the types a new connection's SNAPSHOT frames restore (each frame supersedes the last)
RESTORED_TYPES = ("orderbook", "ticker")
#: above every ``sequential_id``: a cutoff at a time, not at a trade
_ANY_SID = 2**64


def fills_history(type_: str) -> bool:
    """Trades and candles are back-filled; ticker and orderbook are restored by SNAPSHOTs."""
    return type_ == "trade" or type_.startswith("candle.")


class Window(NamedTuple):
    """The span a gap left empty, wall-clock ms (``since_ms`` .. ``until_ms``)."""

    since_ms: int
    until_ms: int

    def merged(self, other: Window) -> Window:
        return Window(min(self.since_ms, other.since_ms), max(self.until_ms, other.until_ms))


class Mark(NamedTuple):
    """Where a trade stands: Upbit's trade time, then its number (the order appended in)."""

    timestamp: int
    sequential_id: int


class Outcome(enum.StrEnum):
    """How the back-fill of one stream ended."""

    #: every missed entry is in the history now (paging reached the anchor or Upbit's end)
    COMPLETE = "complete"
    #: some were appended, but paging stopped early (the page limit, an error, the deadline)
    INCOMPLETE = "incomplete"
    #: nothing could be fetched or appended
    FAILED = "failed"


class _Pages:
    """What a trade fill and a candle fill share: pages counted against a limit, and how the
    fill ends (its :class:`Outcome`)."""

    def __init__(self, page_size: int, max_pages: int) -> None:
        self.page_size = page_size
        self.max_pages = max_pages
        self.pages = 0
        self.done = False
        self.outcome = Outcome.COMPLETE

    def missing(self) -> Sequence[object]:
        raise NotImplementedError

    def abort(self) -> None:
        """Fetching failed (an error, the deadline): what was found so far is still missing."""
        if not self.done:
            self._finish(Outcome.INCOMPLETE if self.missing() else Outcome.FAILED)

    def _finish(self, outcome: Outcome) -> None:
        self.done = True
        self.outcome = outcome


# -- trades ------------------------------------------------------------------------------------


class TradeHistory:
    """The history of one trade stream around a gap, fed newest first (``XREVRANGE``)."""

    def __init__(self, since_ms: int) -> None:
        self.floor_ms = since_ms - ANCHOR_MARGIN_MS
        #: entries appended before this (wall clock ms) are not read (:data:`SCAN_MARGIN_MS`)
        self.scan_from_ms = since_ms - SCAN_MARGIN_MS
        self.anchor: Mark | None = None
        #: the newest live entry (None: no live entry newer than the anchor)
        self.newest: Mark | None = None
        #: the ``sequential_id`` of every entry newer than the anchor (and the anchor's)
        self.known: set[int] = set()
        self.done = False

    def entry(self, mark: Mark, *, live: bool) -> bool:
        """One entry, each older than the last; ``live``: published, not back-filled (those
        are appended after newer live entries, so only live ones tell where the gap is).
        Returns True once the anchor is found: read no further."""
        if self.done:
            return True
        self.known.add(mark.sequential_id)
        if live:
            if mark.timestamp <= self.floor_ms:
                self.anchor = mark
                self.done = True
            elif self.newest is None:
                self.newest = mark
        return self.done


class TradeRequest(NamedTuple):
    """One ``GET /v1/trades/ticks``: ``cursor`` (None: from the newest), ``days_ago`` (0: the
    latest trade date, the parameter left out)."""

    cursor: int | None
    days_ago: int


class TradeFill(_Pages):
    """What to fetch for one trade stream, and what is missing (see the module docstring)."""

    def __init__(
        self,
        window: Window,
        history: TradeHistory,
        *,
        page_size: int = TRADE_PAGE,
        max_pages: int = MAX_TRADE_PAGES,
    ) -> None:
        super().__init__(page_size, max_pages)
        self.known = history.known
        self.anchor = history.anchor
        #: at or before this, a trade is older than the gap: paging stops there
        self.stop = history.anchor or Mark(window.since_ms - ANCHOR_MARGIN_MS - 1, _ANY_SID)
        newest = history.newest
        if newest is not None and newest.timestamp >= window.until_ms:
            self.cutoff = newest
            cursor: int | None = newest.sequential_id
        else:
            self.cutoff = Mark(window.until_ms, _ANY_SID)
            cursor = None
        self._request = TradeRequest(cursor, 0)
        self._seen: set[int] = set()
        self._missing: list[RestTrade] = []
        #: the UTC day of the trades being paged (the latest trade date, then older ones)
        self._day_start: int | None = None

    def request(self) -> TradeRequest:
        """The next page to fetch (only while not :attr:`done`)."""
        return self._request

    def page(self, trades: Sequence[RestTrade]) -> None:
        """The answer to :meth:`request`, newest first."""
        self.pages += 1
        reached = False
        fresh = 0
        oldest: int | None = None
        for trade in trades:
            sid = trade.sequential_id
            oldest = trade.timestamp if oldest is None else min(oldest, trade.timestamp)
            if sid in self._seen:
                continue
            self._seen.add(sid)
            fresh += 1
            mark = Mark(trade.timestamp, sid)
            if mark <= self.stop:
                reached = True  # the rest of this page and what follows predate the gap
            elif mark <= self.cutoff and sid not in self.known:
                self._missing.append(trade)
        unknown_day = False
        if oldest is not None:
            self._day_start = oldest - oldest % DAY_MS  # the date this page is of
        elif self._day_start is None:
            # An empty page before any trade: the date read is the cutoff's, or a later one.
            self._day_start = self.cutoff.timestamp - self.cutoff.timestamp % DAY_MS
            unknown_day = True
        switched = self._request.days_ago > 0 and self._request.cursor is None
        if reached:
            self._finish(Outcome.COMPLETE)
        elif switched and trades and not fresh:
            # A server that ignores days_ago answers the same trades again: what is older
            # cannot be had from it, which is not the same as there being none.
            self._finish(Outcome.INCOMPLETE)
        elif len(trades) < self.page_size:
            self._end_of_day(unknown_day)
        elif not fresh:
            self._finish(Outcome.INCOMPLETE)  # a cursor that does not move: stop, not loop
        elif self.pages >= self.max_pages:
            self._finish(Outcome.INCOMPLETE)
        else:
            self._request = TradeRequest(trades[-1].sequential_id, self._request.days_ago)

    def _end_of_day(self, unknown_day: bool) -> None:
        """A short page: Upbit has no more trades of the UTC day asked. An older day may hold
        the rest when the stop lies before that day's start, or when the day asked is not
        known (``unknown_day``: an empty first page; Upbit's latest date may have turned after
        the cutoff, so the cutoff's own day is an older one)."""
        day = self._day_start
        assert day is not None  # set by page() before
        days_ago = self._request.days_ago
        if self.stop.timestamp >= day and not unknown_day:
            self._finish(Outcome.COMPLETE)
        elif days_ago >= MAX_DAYS_AGO or self.pages >= self.max_pages:
            self._finish(Outcome.INCOMPLETE)  # older than Upbit keeps, or the page limit
        else:
            self._day_start = day - DAY_MS
            self._request = TradeRequest(None, days_ago + 1)

    def missing(self) -> list[RestTrade]:
        """The trades to append, in ``(timestamp, sequential_id)`` order."""
        return sorted(self._missing, key=lambda t: (t.timestamp, t.sequential_id))


# -- candles -----------------------------------------------------------------------------------


class CandleHistory:
    """The history of one candle stream around a gap, fed newest first (``XREVRANGE``)."""

    def __init__(self, unit_ms: int, since_ms: int) -> None:
        self.unit_ms = unit_ms
        #: a candle that ends after this overlaps the gap
        self.low_ms = since_ms - ANCHOR_MARGIN_MS
        #: entries appended before this are not read: a candle overlapping the gap was pushed
        #: within a unit of the gap's start, the last push before it is the one that counts
        self.scan_from_ms = since_ms - SCAN_MARGIN_MS - unit_ms
        #: candle start -> the latest ``timestamp`` (last trade) the history has for it
        self.known: dict[int, int] = {}
        #: the start of the newest live candle (None: none newer than the window)
        self.newest_start: int | None = None
        self.done = False

    def entry(self, start_ms: int, timestamp: int, *, live: bool) -> bool:
        """One entry, each older than the last. Returns True once a live candle that ended
        before the window is read: read no further."""
        if self.done:
            return True
        if timestamp > self.known.get(start_ms, -1):
            self.known[start_ms] = timestamp
        if live:
            if start_ms + self.unit_ms <= self.low_ms:
                self.done = True
            elif self.newest_start is None:
                self.newest_start = start_ms
        return self.done


class CandleFill(_Pages):
    """What to fetch for one candle stream, and what is missing (see the module docstring)."""

    def __init__(
        self,
        window: Window,
        history: CandleHistory,
        *,
        page_size: int = CANDLE_PAGE,
        max_pages: int = MAX_CANDLE_PAGES,
    ) -> None:
        super().__init__(page_size, max_pages)
        unit = self.unit_ms = history.unit_ms
        self.known = history.known
        self.low_ms = history.low_ms
        # The live stream carries the newest candle (and any later one); a candle that started
        # before the gap's end's candle had ended by then.
        self.bound_ms = max(history.newest_start or 0, window.until_ms - window.until_ms % unit)
        self._to_ms = self.bound_ms
        self._missing: dict[int, RestCandle] = {}
        self._seen: set[int] = set()

    def request(self) -> int:
        """The next page's ``to``, ms: candles that start before it."""
        return self._to_ms

    def page(self, candles: Sequence[RestCandle]) -> None:
        """The answer to :meth:`request`, newest first.

        Raises:
            FrameError: a candle time that is no time.
        """
        self.pages += 1
        fresh = 0
        oldest: int | None = None
        for candle in candles:
            start = candle_start_ms(candle.candle_date_time_utc)
            oldest = start if oldest is None else min(oldest, start)
            if start in self._seen:
                continue
            self._seen.add(start)
            fresh += 1
            if start + self.unit_ms <= self.low_ms or start >= self.bound_ms:
                continue
            if self.known.get(start, -1) < candle.timestamp:
                self._missing[start] = candle
        if oldest is None or oldest + self.unit_ms <= self.low_ms or len(candles) < self.page_size:
            self._finish(Outcome.COMPLETE)
        elif not fresh or self.pages >= self.max_pages:
            self._finish(Outcome.INCOMPLETE)
        else:
            self._to_ms = oldest

    def missing(self) -> list[RestCandle]:
        """The complete candles to append, oldest first."""
        return [self._missing[start] for start in sorted(self._missing)]


# -- gaps and jobs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GapFill:
    """An announced gap waiting for its follow-up."""

    gap: GapEvent
    #: the trade and candle streams it covers (leased when it was announced)
    streams: frozenset[StreamKey]
    #: ticker/orderbook types the new connection's SNAPSHOT frames restored
    restored: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamFill:
    """One stream to back-fill: its window (merged over the job's gaps) and history cap."""

    key: StreamKey
    window: Window
    cap: int


@dataclass(frozen=True, slots=True)
class BackfillJob:
    """The gaps queued since the last job, and the streams to fetch for them (none while the
    back-fill is off, or when the gaps covered no stream with history)."""

    gaps: tuple[GapFill, ...]
    streams: tuple[StreamFill, ...]


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How the back-fill of one stream ended, and the entries it appended."""

    key: StreamKey
    outcome: Outcome
    appended: int = 0


def _since(gap: GapEvent) -> int:
    until = gap.until_ms if gap.until_ms is not None else 0
    return gap.since_ms if gap.since_ms is not None else until


def job_since_ms(job: BackfillJob) -> int:
    """The earliest ``since_ms`` of the gaps of ``job`` (0: none)."""
    return min((_since(fill.gap) for fill in job.gaps), default=0)


@dataclass(slots=True)
class _Batch:
    """Gaps that share one job: their windows merged per stream."""

    since_ms: int
    until_ms: int
    #: the first gap's end, and when the job is due
    first_ms: int
    due_ms: int = 0
    gaps: list[GapFill] = field(default_factory=list)
    windows: dict[StreamKey, Window] = field(default_factory=dict)

    def joins(self, window: Window, max_span_ms: int) -> bool:
        """A gap of ``window`` merges into this batch: it overlaps the batch's span, or the
        merged span stays within ``max_span_ms``."""
        if window.since_ms <= self.until_ms and self.since_ms <= window.until_ms:
            return True
        merged = max(self.until_ms, window.until_ms) - min(self.since_ms, window.since_ms)
        return merged <= max_span_ms


class BackfillDesk:
    """The gaps waiting for a back-fill, merged per stream; their follow-ups once it ran."""

    def __init__(
        self,
        caps: dict[str, int],
        *,
        enabled: bool = True,
        settle_ms: int = SETTLE_MS,
        max_span_ms: int = MAX_MERGED_SPAN_MS,
    ) -> None:
        """Args:
        caps: the history's caps (``BrokerSettings.history_caps``): a stream at 0 keeps no
            history, so it cannot be filled.
        enabled: the back-fill is on (``backfill`` and a ``rest_url`` not ``off``); off, gaps
            queue nothing and get no follow-up.
        settle_ms: how long after a gap's end its job runs (:data:`SETTLE_MS`).
        max_span_ms: gaps merge into one job while their span stays within this
            (:data:`MAX_MERGED_SPAN_MS`), or while they overlap.
        """
        self.caps = dict(caps)
        self.enabled = enabled
        self.settle_ms = settle_ms
        self.max_span_ms = max_span_ms
        #: oldest first; only the last takes more gaps
        self._batches: list[_Batch] = []

    def gap(self, gap: GapEvent, streams: Iterable[StreamKey]) -> bool:
        """``gap`` was announced while ``streams`` were leased: queue its back-fill. Returns
        False when nothing was queued (the back-fill is off)."""
        if not self.enabled:
            return False
        keys = frozenset(streams)
        fill = frozenset(k for k in keys if fills_history(k.type))
        restored: tuple[str, ...] = ()
        if gap.reason != GapReason.REDIS:  # no new connection, no SNAPSHOT frames
            restored = tuple(sorted({k.type for k in keys if k.type in RESTORED_TYPES}))
        until = gap.until_ms if gap.until_ms is not None else 0
        window = Window(_since(gap), until)
        batch = self._batches[-1] if self._batches else None
        if batch is None or not batch.joins(window, self.max_span_ms):
            batch = _Batch(window.since_ms, until, first_ms=until)
            self._batches.append(batch)
        batch.since_ms = min(batch.since_ms, window.since_ms)
        batch.until_ms = max(batch.until_ms, until)
        batch.gaps.append(GapFill(gap, fill, restored))
        for key in fill:
            if history_cap(self.caps, key.type) > 0:
                known = batch.windows.get(key)
                batch.windows[key] = window if known is None else known.merged(window)
        batch.due_ms = min(max(batch.due_ms, until + self.settle_ms), batch.first_ms + MAX_DEFER_MS)
        return True

    @property
    def pending(self) -> int:
        """Gaps waiting for their job."""
        return sum(len(batch.gaps) for batch in self._batches)

    def waiting_since_ms(self) -> int:
        """The earliest ``since_ms`` of the gaps waiting for their job (0: none)."""
        return min((_since(fill.gap) for batch in self._batches for fill in batch.gaps), default=0)

    def next_due_ms(self) -> int | None:
        """When the next job is due (wall clock ms; None: no gap waits)."""
        return self._batches[0].due_ms if self._batches else None

    def take(self, now_ms: int) -> BackfillJob | None:
        """The job of the oldest gaps queued, once it is due (None: nothing due). A ``now_ms``
        long before the first gap's end means the wall clock was set back: due too."""
        if not self._batches:
            return None
        batch = self._batches[0]
        if batch.first_ms - MAX_DEFER_MS <= now_ms < batch.due_ms:
            return None
        del self._batches[0]
        streams = tuple(
            StreamFill(key, window, history_cap(self.caps, key.type))
            for key, window in sorted(batch.windows.items())
        )
        return BackfillJob(tuple(batch.gaps), streams)

    @staticmethod
    def follow_ups(job: BackfillJob, results: Iterable[StreamResult]) -> list[GapEvent]:
        """Each gap of ``job`` again, with its ``state``, ``restored`` and ``backfill`` counts
        (a stream merged over several gaps counts in each). ``lost`` only when every stream
        failed and nothing was appended: a stream stopped at the page limit with nothing
        missing found is ``partial``."""
        by_key = {result.key: result for result in results}
        events = []
        for fill in job.gaps:
            done = [by_key[key] for key in fill.streams if key in by_key]
            complete = sum(1 for r in done if r.outcome is Outcome.COMPLETE)
            fetched = sum(1 for r in done if r.outcome is not Outcome.FAILED)
            appended = sum(r.appended for r in done)
            if complete == len(fill.streams):
                state = "filled"
            elif fetched == 0 and appended == 0:
                state = "lost"
            else:
                state = "partial"
            events.append(
                msgspec.structs.replace(
                    fill.gap,
                    state=state,
                    restored=list(fill.restored),
                    backfill={
                        "streams": len(done),
                        "appended": appended,
                        "failed": len(done) - complete,
                    },
                )
            )
        return events


__all__ = [
    "ANCHOR_MARGIN_MS",
    "CANDLE_PAGE",
    "MAX_CANDLE_PAGES",
    "MAX_DAYS_AGO",
    "MAX_DEFER_MS",
    "MAX_MERGED_SPAN_MS",
    "MAX_TRADE_PAGES",
    "RESTORED_TYPES",
    "SCAN_MARGIN_MS",
    "SETTLE_MS",
    "TRADE_PAGE",
    "BackfillDesk",
    "BackfillJob",
    "CandleFill",
    "CandleHistory",
    "GapFill",
    "Mark",
    "Outcome",
    "StreamFill",
    "StreamResult",
    "TradeFill",
    "TradeHistory",
    "TradeRequest",
    "Window",
    "fills_history",
]
