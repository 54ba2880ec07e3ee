"""Candle periods: which candle of each unit a moment falls in (simulator layer, pure).

Thirteen units, in this order: the nine WebSocket units (``candle.1s`` ... ``candle.240m``,
indexes 0 to 8, the order of :data:`simulator.market.CANDLE_TYPES`), then four that only the
REST API serves: days, weeks, months, years. Every period starts on a UTC boundary, as
Upbit's do: a day candle at 00:00 UTC (09:00 KST), a week on Monday 00:00 UTC, a month on
the 1st, a year on January 1st [examples of ``/v1/candles/days``, ``weeks`` in client
libraries' recorded answers: ``candle_date_time_kst`` ``...T09:00:00``,
``first_day_of_period`` a Monday].
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from functools import lru_cache
from time import gmtime

from broker.upbit.types import CANDLE_SECONDS

DAY_MS = 86_400_000
_WEEK_MS = 7 * DAY_MS
_MONDAY_SHIFT_MS = 3 * DAY_MS  # 1970-01-01 was a Thursday; Monday 1969-12-29 is 3 days back

#: Units of the REST-only candles, after the nine WebSocket ones.
DAYS, WEEKS, MONTHS, YEARS = 9, 10, 11, 12
#: Every unit, by index: ``1s`` ... ``240m``, then the REST-only ones.
UNIT_NAMES: tuple[str, ...] = (
    *(t.value.removeprefix("candle.") for t in CANDLE_SECONDS),
    "days",
    "weeks",
    "months",
    "years",
)


def _fixed(unit_ms: int) -> Callable[[int], int]:
    def start(ms: int) -> int:
        return ms - ms % unit_ms

    return start


def week_start(ms: int) -> int:
    """Monday 00:00 UTC of the week holding ``ms``."""
    return ms - (ms + _MONDAY_SHIFT_MS) % _WEEK_MS


@lru_cache(maxsize=64)
def _month_of_day(day: int) -> tuple[int, int]:
    t = gmtime(day * 86_400)
    return (
        calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)) * 1000,
        calendar.timegm((t.tm_year, 1, 1, 0, 0, 0)) * 1000,
    )


def month_start(ms: int) -> int:
    """The 1st of the month holding ``ms``, 00:00 UTC."""
    return _month_of_day(ms // DAY_MS)[0]


def year_start(ms: int) -> int:
    """January 1st of the year holding ``ms``, 00:00 UTC."""
    return _month_of_day(ms // DAY_MS)[1]


#: Each unit's length (ms) where it is fixed and epoch-aligned, 0 for the calendar ones: the
#: market folds a second into thirteen candles without a call for most of them.
UNIT_MS: tuple[int, ...] = (*(s * 1000 for s in CANDLE_SECONDS.values()), DAY_MS, 0, 0, 0)

#: The start (ms) of the period holding a time (ms), per unit index.
PERIOD_STARTS: tuple[Callable[[int], int], ...] = (
    *(_fixed(s * 1000) for s in CANDLE_SECONDS.values()),
    _fixed(DAY_MS),
    week_start,
    month_start,
    year_start,
)


__all__ = [
    "DAYS",
    "DAY_MS",
    "MONTHS",
    "PERIOD_STARTS",
    "UNIT_MS",
    "UNIT_NAMES",
    "WEEKS",
    "YEARS",
    "month_start",
    "week_start",
    "year_start",
]
