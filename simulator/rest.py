"""Upbit's quotation REST API over the simulated market (simulator layer, pure).

:mod:`simulator.http` is the adapter: it hands a path and its parsed query here, with the
client's IP and the time for the rate limit, and writes back the ``(status, body)`` answered
and the ``Remaining-Req`` header. Nothing here reads a clock or a socket.

Endpoints (GET), with their rate-limit group [PROTOCOL.md section 8]:

* ``/v1/market/all[?is_details=true]`` (market): ``market_event`` added with details (also
  spelled ``isDetails``, as Upbit's older docs and pyupbit do).
* ``/v1/ticker?markets=A,B``, ``/v1/ticker/all?quote_currencies=KRW,BTC`` (ticker).
* ``/v1/orderbook?markets=A,B&level=&count=`` (orderbook): the book as the WebSocket frame
  holds it, in the REST shape.
* ``/v1/orderbook/instruments?markets=A,B`` (orderbook): tick size, supported levels.
* ``/v1/trades/ticks?market=&count=&cursor=&to=&days_ago=`` (trade): from the trade log.
* ``/v1/candles/{seconds, minutes/{1,3,5,10,15,30,60,240}, days, weeks, months, years}
  ?market=&to=&count=`` (candle): from the candle history.

Trades (``/v1/trades/ticks``): newest first, from the code's trade log (every trade the market
made, streamed or not). One UTC day at a time, as Upbit serves it: the day of the code's latest
trade, or ``days_ago`` (1..7) days before it. ``to`` (``HHmmss`` or ``HH:mm:ss``, UTC)
keeps the trades before that time of that day (exclusive: a recorded client notes the ``to``
second "not included"); ``cursor`` (a ``sequential_id``) keeps those with a lower id, which is
how a client pages back: the last id of one page is the cursor of the next. ``count`` 1..500,
default 1. A page never crosses midnight: past the day's first trade it is empty, and the day
before is ``days_ago=1`` (whether Upbit's cursor crosses days is UNCONFIRMED; a client that
pages this way works either way).

Orderbooks (``/v1/orderbook``): ``[{market, timestamp, total_ask_size, total_bid_size,
orderbook_units: [{ask_price, bid_price, ask_size, bid_size}], level}]`` per code in the order
asked, the WebSocket frame's values without ``type``/``code``/``stream_type`` [PROTOCOL.md
section 8]. ``count`` 1..30 (default 30) units, a thin side zero-padded as in the frames, the
totals summed over the units returned (as the frame's are over its depth; whether Upbit's
REST totals follow ``count`` is UNCONFIRMED). ``level`` (a numeric string, default 0) groups
prices like the WebSocket ``level``; a level the code does not support answers ``[]`` for
that code, as Upbit does. ``level`` echoes as a number, integral ones without a fraction.

Only what the simulator kept is served: the last ``trade_log_size`` trades of a code, the last
``candle_history`` closed candles of a (code, unit) and its open one.

Candles: newest first, only periods with trades (Upbit makes no empty candle), the open one
included with every trade so far. Minute candles add ``unit``; day candles
``prev_closing_price`` and a signed ``change_price``/``change_rate``; week, month and year
candles ``first_day_of_period`` (the period's first day: a Monday, the 1st; recorded answers
differ on whether ``candle_date_time_utc`` of an open week is its first day: UNCONFIRMED).
``to`` (ISO 8601: ``2025-01-02T03:04:05Z``, ``2025-01-02 03:04:05``, ``...+09:00``; no offset
means UTC) keeps candles that start before it (Upbit: "exclusive"). ``count`` default 1;
above 200 it is cut to 200 (a recorded client measured ``count=250`` answering 200 candles;
UNCONFIRMED), below 1 or not a number is a 400, and so is a minute unit not in the list.

Errors: 400 ``{"error":{"name":400,"message":"Invalid parameter. Check the given value!"}}``
for a missing or malformed parameter, 404 ``{"error":{"name":404,"message":"Code not found"}}``
for an unknown market or path (both bodies transcribed from a third-party spec; exact text
UNCONFIRMED). Rate limit: 429 ``{"error":{"name":"Too Many Requests",...}}`` (Upbit documents
the status, not the body: UNCONFIRMED); the 418 ban that follows persistent excess is not
modelled.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from broker.upbit.ratelimit import NO_LIMIT_SEC, remaining_req
from simulator.candles import DAYS, MONTHS, WEEKS, YEARS
from simulator.encode import TICKER_FIELDS
from simulator.market import (
    DAY_MS,
    CodeState,
    Market,
    candle_start,
    day_change,
    kst_parts,
    orderbook_units,
    rest_candle,
    rest_trade,
    ticker_values,
)
from simulator.universe import Listing

Query = dict[str, list[str]]
Answer = tuple[int, Any]

NOT_FOUND = {"error": {"name": 404, "message": "Code not found"}}
BAD_PARAM = {"error": {"name": 400, "message": "Invalid parameter. Check the given value!"}}
# Upbit documents a 429, not its body; the name is the WebSocket tables' (PROTOCOL.md 7.1).
TOO_MANY = {"error": {"name": "Too Many Requests", "message": "Too many API requests."}}

MAX_TRADES = 500
MAX_ORDERBOOK_UNITS = 30
MAX_CANDLES = 200
MAX_DAYS_AGO = 7
#: ``sec`` shown when the limit is off (``rest_rate`` 0)
UNLIMITED = NO_LIMIT_SEC

_MINUTES = {1: 1, 3: 2, 5: 3, 10: 4, 15: 5, 30: 6, 60: 7, 240: 8}  # unit -> candle index
_PERIODS = {"seconds": 0, "days": DAYS, "weeks": WEEKS, "months": MONTHS, "years": YEARS}

# The REST ticker's fields, in Upbit's order; values come from the WebSocket ticker.
_REST_TICKER = (
    "trade_date", "trade_time", "trade_date_kst", "trade_time_kst", "trade_timestamp",
    "opening_price", "high_price", "low_price", "trade_price", "prev_closing_price", "change",
    "change_price", "change_rate", "signed_change_price", "signed_change_rate", "trade_volume",
    "acc_trade_price", "acc_trade_price_24h", "acc_trade_volume", "acc_trade_volume_24h",
    "highest_52_week_price", "highest_52_week_date", "lowest_52_week_price",
    "lowest_52_week_date", "timestamp",
)  # fmt: skip


class BadParam(Exception):
    """A query parameter is missing or malformed (answered 400)."""


# -- rate-limit groups (the limit itself: broker.upbit.ratelimit.ClientLimiter) -----------------


def group_of(path: str) -> str | None:
    """The rate-limit group of a REST path, ``None`` for a path Upbit does not serve."""
    if path == "/v1/market/all":
        return "market"
    if path in ("/v1/ticker", "/v1/ticker/all"):
        return "ticker"
    if path in ("/v1/orderbook", "/v1/orderbook/instruments"):
        return "orderbook"
    if path == "/v1/trades/ticks":
        return "trade"
    if path.startswith("/v1/candles/"):
        return "candle"
    return None


# -- parameters ---------------------------------------------------------------------------------


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    if not values or not values[0].strip():
        return None
    return values[0].strip()


def _int(query: Query, name: str, default: int, low: int, high: int | None) -> int:
    text = _one(query, name)
    if text is None:
        return default
    if not text.isdigit():
        raise BadParam(name)
    value = int(text)
    if value < low or (high is not None and value > high):
        raise BadParam(name)
    return value


def _codes(query: Query, name: str) -> list[str]:
    raw = ",".join(query.get(name, []))
    codes = [c.strip() for c in raw.split(",") if c.strip()]
    if not codes:
        raise BadParam(name)
    return codes


def _time_of_day_ms(text: str) -> int:
    """``HHmmss`` or ``HH:mm:ss`` as ms after midnight."""
    digits = text.replace(":", "") if len(text) == 8 and text[2::3] == "::" else text
    if len(digits) != 6 or not digits.isdigit():
        raise BadParam("to")
    h, m, s = int(digits[:2]), int(digits[2:4]), int(digits[4:])
    if h > 23 or m > 59 or s > 59:
        raise BadParam("to")
    return ((h * 60 + m) * 60 + s) * 1000


def _instant_ms(text: str) -> int:
    """An ISO 8601 time as Unix ms (UTC when it names no offset)."""
    # A "+09:00" sent without URL encoding arrives as " 09:00": the second spelling tried.
    head, space, tail = text.rpartition(" ")
    for spelling in (text, f"{head}+{tail}" if space else text):
        try:
            moment = datetime.fromisoformat(spelling)
            break
        except ValueError:
            continue
    else:
        raise BadParam("to")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _state(market: Market, query: Query) -> CodeState | Answer:
    code = _one(query, "market")
    if code is None:
        raise BadParam("market")
    st = market.states.get(code)
    return (404, NOT_FOUND) if st is None else st


# -- endpoints ----------------------------------------------------------------------------------


def answer(path: str, query: Query, listings: dict[str, Listing], market: Market) -> Answer:
    """The ``(status, JSON body)`` of a GET on a REST ``path`` (see :func:`group_of`)."""
    try:
        if path == "/v1/market/all":
            return _market_all(listings, query)
        if path == "/v1/ticker":
            return _tickers(market, _codes(query, "markets"))
        if path == "/v1/ticker/all":
            return _tickers_by_quote(listings, market, query)
        if path == "/v1/orderbook":
            return _orderbooks(market, query)
        if path == "/v1/orderbook/instruments":
            return _instruments(listings, _codes(query, "markets"))
        if path == "/v1/trades/ticks":
            return _trades(market, query)
        if path.startswith("/v1/candles/"):
            return _candles(market, path.removeprefix("/v1/candles/"), query)
    except BadParam:
        return 400, BAD_PARAM
    return 404, NOT_FOUND


#: the flag as Upbit's docs name it now, and as they (and pyupbit, and many bots) spelled it
#: before: Upbit answers both with ``market_event``
_DETAILS = ("is_details", "isDetails")


def _market_all(listings: dict[str, Listing], query: Query) -> Answer:
    given = (_one(query, name) for name in _DETAILS)
    details = next((t for t in given if t is not None), "false").lower()
    if details not in ("true", "false"):
        raise BadParam("is_details")
    out: list[dict[str, Any]] = []
    for x in listings.values():
        item: dict[str, Any] = {
            "market": x.code,
            "korean_name": x.korean_name,
            "english_name": x.english_name,
        }
        if details == "true":
            item["market_event"] = x.market_event()
        out.append(item)
    return 200, out


def _tickers(market: Market, codes: list[str]) -> Answer:
    states = market.states
    if any(c not in states for c in codes):
        return 404, NOT_FOUND
    out = []
    for code in codes:
        st = states[code]
        ws = dict(zip(TICKER_FIELDS, ticker_values(st, "SNAPSHOT"), strict=True))
        ws["trade_date_kst"], ws["trade_time_kst"] = kst_parts(st.trade_ms)
        out.append({"market": code, **{k: ws[k] for k in _REST_TICKER}})
    return 200, out


def _tickers_by_quote(listings: dict[str, Listing], market: Market, query: Query) -> Answer:
    quotes = set(_codes(query, "quote_currencies"))
    return _tickers(market, [x.code for x in listings.values() if x.quote in quotes])


def _orderbooks(market: Market, query: Query) -> Answer:
    codes = _codes(query, "markets")
    count = _int(query, "count", MAX_ORDERBOOK_UNITS, 1, MAX_ORDERBOOK_UNITS)
    level = _level(query)
    states = market.states
    if any(c not in states for c in codes):
        return 404, NOT_FOUND
    out: list[dict[str, Any]] = []
    for code in codes:
        st = states[code]
        if level and level not in st.listing.supported_levels():
            continue  # Upbit answers nothing for a level it does not serve
        level_ticks = round(level * st.div / st.mul) if level else 0
        units, total_ask, total_bid = orderbook_units(st, count, level_ticks)
        out.append(
            {
                "market": code,
                "timestamp": st.book_ms,
                "total_ask_size": total_ask,
                "total_bid_size": total_bid,
                "orderbook_units": [
                    {"ask_price": a, "bid_price": b, "ask_size": sa, "bid_size": sb}
                    for a, b, sa, sb in units
                ],
                # as the WebSocket frame echoes it: an integral level without a fraction
                "level": int(level) if level == int(level) else level,
            }
        )
    return 200, out


def _level(query: Query) -> float:
    text = _one(query, "level")
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise BadParam("level") from None
    if not math.isfinite(value) or value < 0:
        raise BadParam("level")
    return value


def _instruments(listings: dict[str, Listing], codes: list[str]) -> Answer:
    if any(c not in listings for c in codes):
        return 404, NOT_FOUND
    out = []
    for code in codes:
        x = listings[code]
        out.append(
            {
                "market": code,
                "quote_currency": x.quote,
                "tick_size": decimal_text(x.tick_size),
                "supported_levels": [decimal_text(v) for v in x.supported_levels()],
            }
        )
    return 200, out


def decimal_text(value: float) -> str:
    """``1e-05`` -> ``"0.00001"``, ``10000.0`` -> ``"10000"`` (Upbit sends numeric strings)."""
    return format(Decimal(repr(value)).normalize(), "f")


def _trades(market: Market, query: Query) -> Answer:
    st = _state(market, query)
    if not isinstance(st, CodeState):
        return st
    count = _int(query, "count", 1, 1, MAX_TRADES)
    days_ago = _int(query, "days_ago", 0, 1, MAX_DAYS_AGO)
    cursor_text = _one(query, "cursor")
    if cursor_text is not None and not cursor_text.isdigit():
        raise BadParam("cursor")
    to_text = _one(query, "to")
    to_ms = None if to_text is None else _time_of_day_ms(to_text)
    newest = st.log.newest
    if newest is None:
        return 200, []
    day_ms = (newest.timestamp // DAY_MS - days_ago) * DAY_MS
    trades = st.log.newest_first(
        count,
        below_seq=None if cursor_text is None else int(cursor_text),
        from_ms=day_ms,
        below_ms=day_ms + (DAY_MS if to_ms is None else to_ms),
    )
    return 200, [rest_trade(st, t) for t in trades]


def _candles(market: Market, kind: str, query: Query) -> Answer:
    unit: int | None = None
    if kind.startswith("minutes/"):
        text = kind.removeprefix("minutes/")
        if not text.isdigit() or int(text) not in _MINUTES:
            raise BadParam("unit")
        unit = int(text)
        index = _MINUTES[unit]
    elif kind in _PERIODS:
        index = _PERIODS[kind]
    else:
        return 404, NOT_FOUND
    st = _state(market, query)
    if not isinstance(st, CodeState):
        return st
    count = min(_int(query, "count", 1, 1, None), MAX_CANDLES)
    to_text = _one(query, "to")
    to_ms = None if to_text is None else _instant_ms(to_text)
    out: list[dict[str, Any]] = []
    for c in st.candle_list(index):
        if to_ms is not None and candle_start(c) >= to_ms:
            continue
        item = rest_candle(st, c)
        if unit is not None:
            item["unit"] = unit
        elif index == DAYS:
            item.update(day_change(st, c))
        elif index in (WEEKS, MONTHS, YEARS):
            item["first_day_of_period"] = item["candle_date_time_utc"][:10]
        out.append(item)
        if len(out) == count:
            break
    return 200, out


def trade_log(st: CodeState, full: bool) -> dict[str, Any]:
    """``/_sim/trades``: the code's whole trade log, oldest first."""
    log = st.log
    body: dict[str, Any] = {
        "market": st.code,
        "capacity": log.capacity,
        "evicted": log.evicted,
        "count": len(log),
        "sequential_ids": log.sequential_ids(),
    }
    if full:
        body["trades"] = [rest_trade(st, t) for t in log.entries()]
    return body


__all__ = [
    "BAD_PARAM",
    "MAX_ORDERBOOK_UNITS",
    "NOT_FOUND",
    "TOO_MANY",
    "answer",
    "decimal_text",
    "group_of",
    "remaining_req",
    "trade_log",
]
