"""Upbit's quotation REST API as the gateway answers it (gateway layer, pure: stdlib, msgspec
and the protocol core; no asyncio, no I/O).

``gateway.http`` is the adapter: it hands the request line and headers here, and gets back
what to do with them (:func:`route`), the parameters (:func:`codes_param` ...), the REST
shapes built from the broker's cached WebSocket frames (:func:`rest_ticker`,
:func:`rest_orderbook`), whether the cache may be believed (:func:`cache_doubt`), and the
bookkeeping of the gateway's one REST lease (:class:`PollBook`).

Paths (GET only) [PROTOCOL.md section 8]:

* answered here, from the broker's last-value cache: ``/v1/ticker?markets=``,
  ``/v1/ticker/all?quote_currencies=``, ``/v1/orderbook?markets=&count=`` (level 0; any
  other ``level`` is forwarded);
* ``/v1/market/all`` (``is_details``, or ``isDetails``): Upbit's own answer, kept for minutes
  (the broker does not keep the market list in Redis);
* forwarded to Upbit through the gateway's one rate limiter: every other quotation path
  (first segment ``market``, ``ticker``, ``orderbook``, ``trades``, ``candles``);
* refused (403): the exchange (authenticated) API, by its first segment (``accounts``,
  ``orders``, ``order``, ``withdraws``, ``deposits``, ``api_keys``, ``status`` ...), and any
  request that carries an ``Authorization`` header, whatever its path: the gateway never
  holds or relays anyone's keys;
* anything else under ``/v1/``: 404 here, without costing the shared upstream budget.

REST vs WebSocket shapes: the REST ticker names the pair ``market`` (not ``code``), has no
``type``/``stream_type``, and adds ``trade_date_kst``/``trade_time_kst`` (the trade's time in
KST, UTC+9); the REST orderbook is the frame's ``timestamp``, totals, units and ``level``
under ``market``. Field order follows Upbit's answers (and the simulator's).

Errors are Upbit's ``{"error": {"name": ..., "message": ...}}``: 400 and 404 with the bodies a
third-party spec transcribes (UNCONFIRMED text, as the simulator's), 429 named
``Too Many Requests`` (Upbit documents the status, not the body).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from broker.upbit.errors import FrameError
from broker.upbit.messages import Orderbook, Ticker, decode_message
from broker.upbit.ratelimit import QUOTATION_PER_SECOND, remaining_req

Query = dict[str, list[str]]

_encoder = msgspec.json.Encoder()


def error_body(name: int | str, message: str) -> bytes:
    """Upbit's REST error body."""
    return _encoder.encode({"error": {"name": name, "message": message}})


def encode_json(obj: Any) -> bytes:
    """A REST answer's body (msgspec: floats spelled as the simulator spells them)."""
    return _encoder.encode(obj)


NOT_FOUND = error_body(404, "Code not found")
BAD_PARAM = error_body(400, "Invalid parameter. Check the given value!")
TOO_MANY = error_body("Too Many Requests", "Too many API requests.")
PRIVATE_REFUSED = error_body(
    "private_api_refused",
    "This gateway serves Upbit's public quotation API only: call the exchange API "
    "(authenticated requests) at Upbit directly.",
)
METHOD_NOT_ALLOWED = error_body(405, "Only GET is served.")

#: ``sec`` shown on answers served here when the gateway emulates no limit: what Upbit shows
#: after the first request of a second, so a client that paces itself by it is never slowed
UNLIMITED_SEC = QUOTATION_PER_SECOND - 1
#: (client IP, group) budgets of the emulated limit kept before idle ones are forgotten
CLIENT_BUDGETS = 4096
#: units of a REST orderbook: ``count`` 1..30, default 30
MAX_ORDERBOOK_UNITS = 30

# First path segment after /v1/ -> the rate-limit group of Upbit's quotation API.
QUOTATION_GROUPS: dict[str, str] = {
    "market": "market",
    "ticker": "ticker",
    "orderbook": "orderbook",
    "trades": "trade",
    "candles": "candle",
}
# First path segments of Upbit's exchange (authenticated) API [docs: accounts, orders, order,
# withdraws, deposits, api_keys, status/wallet, travel_rule]. Compared in lower case.
PRIVATE_SEGMENTS = frozenset(
    {
        "accounts",
        "orders",
        "order",
        "withdraws",
        "withdraw",
        "deposits",
        "deposit",
        "api_keys",
        "status",
        "travel_rule",
    }
)
# What an Upbit path is made of; anything else (%, .., spaces) is no Upbit path.
_PATH_RE = re.compile(r"/v1(/[A-Za-z0-9_.-]+)+")


class Kind(Enum):
    """What the gateway does with a request."""

    TICKER = "ticker"  # /v1/ticker, from the cache
    TICKER_ALL = "ticker_all"  # /v1/ticker/all, from the cache
    ORDERBOOK = "orderbook"  # /v1/orderbook, from the cache (level 0)
    MARKET_ALL = "market_all"  # /v1/market/all, Upbit's answer kept for minutes
    FORWARD = "forward"  # to Upbit through the shared limiter
    PRIVATE = "private"  # refused, 403
    METHOD = "method"  # not GET, 405
    NOT_FOUND = "not_found"  # 404 here
    NOT_MINE = "not_mine"  # not under /v1/ and a WebSocket upgrade: websockets' business


@dataclass(frozen=True, slots=True)
class Route:
    """One request, classified. ``path`` is normalized (decoded, no trailing slash); ``query``
    is the raw query string, forwarded unchanged; ``group`` is the rate-limit group."""

    kind: Kind
    path: str = ""
    query: str = ""
    params: Mapping[str, list[str]] | None = None
    group: str = ""

    @property
    def target(self) -> str:
        """``path?query`` as sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path


def route(method: str, target: str, *, authorization: bool, upgrade: bool = False) -> Route:
    """Classify a request by its method, request target and two facts about its headers.

    Args:
        authorization: it carries an ``Authorization`` header (refused, whatever the path).
        upgrade: it asks for a WebSocket upgrade (outside ``/v1/`` that is not ours).
    """
    parts = urlsplit(target)
    raw_path = unquote(parts.path)
    if not (raw_path == "/v1" or raw_path.startswith("/v1/")):
        return Route(Kind.NOT_MINE if upgrade else Kind.NOT_FOUND, raw_path)
    path = raw_path.rstrip("/")
    segments = path.split("/")[2:]  # "", "v1", first ...
    first = segments[0].lower() if segments else ""
    # Refusals come first: a private path or a key is refused whatever else is wrong with it.
    if authorization or first in PRIVATE_SEGMENTS:
        return Route(Kind.PRIVATE, path)
    if method != "GET":
        return Route(Kind.METHOD, path)
    if _PATH_RE.fullmatch(path) is None or ".." in path or "/./" in f"{path}/":
        return Route(Kind.NOT_FOUND, path)
    group = QUOTATION_GROUPS.get(first)
    if group is None:
        return Route(Kind.NOT_FOUND, path)
    params = parse_qs(parts.query)
    kind = {
        "/v1/ticker": Kind.TICKER,
        "/v1/ticker/all": Kind.TICKER_ALL,
        "/v1/market/all": Kind.MARKET_ALL,
    }.get(path, Kind.FORWARD)
    if path == "/v1/orderbook":
        # Grouped books are forwarded: an unsupported level leased here would sit in the
        # broker's union as a stream Upbit never serves.
        try:
            kind = Kind.ORDERBOOK if level_param(params) == 0 else Kind.FORWARD
        except BadParam:
            kind = Kind.FORWARD  # Upbit says what is wrong with it
    return Route(kind, path, parts.query, params, group)


# -- parameters ---------------------------------------------------------------------------------


class BadParam(ValueError):
    """A query parameter is missing or malformed (answered 400)."""


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values or not values[0].strip():
        return None
    return values[0].strip()


def codes_param(params: Mapping[str, list[str]], name: str) -> list[str]:
    """A comma list (``markets=KRW-BTC,KRW-ETH``; repeated parameters joined), in order.

    Raises:
        BadParam: no code at all.
    """
    raw = ",".join(params.get(name, []))
    codes = [c.strip() for c in raw.split(",") if c.strip()]
    if not codes:
        raise BadParam(name)
    return codes


def count_param(params: Mapping[str, list[str]]) -> int:
    """``count`` of ``/v1/orderbook``: 1..30, default 30.

    Raises:
        BadParam: not an integer in range.
    """
    text = _one(params, "count")
    if text is None:
        return MAX_ORDERBOOK_UNITS
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_ORDERBOOK_UNITS:
        raise BadParam("count")
    return int(text)


def level_param(params: Mapping[str, list[str]]) -> float:
    """``level`` of ``/v1/orderbook``: a number >= 0, default 0.

    Raises:
        BadParam: not a finite number >= 0.
    """
    text = _one(params, "level")
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise BadParam("level") from None
    if not math.isfinite(value) or value < 0:
        raise BadParam("level")
    return value


#: ``/v1/market/all``'s flag, as Upbit's docs name it now and as they (and pyupbit's
#: ``get_tickers(is_details=True)``, and many bots) spelled it before; Upbit answers both
DETAILS_NAMES = ("is_details", "isDetails")


def details_param(params: Mapping[str, list[str]]) -> bool | None:
    """``is_details`` (or ``isDetails``) of ``/v1/market/all``: True, False, or None when it
    is neither."""
    given = (_one(params, name) for name in DETAILS_NAMES)
    text = next((t for t in given if t is not None), "false").lower()
    return {"true": True, "false": False}.get(text)


# -- REST shapes from WebSocket frames ----------------------------------------------------------

_KST_OFFSET_S = 9 * 3600


def kst_parts(ms: int) -> tuple[str, str]:
    """``yyyyMMdd`` and ``HHmmss`` of a Unix ms time in KST (UTC+9)."""
    t = time.gmtime(ms // 1000 + _KST_OFFSET_S)
    return time.strftime("%Y%m%d", t), time.strftime("%H%M%S", t)


def rest_ticker(frame: bytes) -> dict[str, Any]:
    """The ``/v1/ticker`` object of a WebSocket ticker frame (DEFAULT or SIMPLE).

    Raises:
        FrameError: not a ticker frame.
    """
    t = decode_message(frame)
    if not isinstance(t, Ticker):
        raise FrameError(f"not a ticker frame: {type(t).__name__}")
    date_kst, time_kst = kst_parts(t.trade_timestamp)
    return {
        "market": t.code,
        "trade_date": t.trade_date,
        "trade_time": t.trade_time,
        "trade_date_kst": date_kst,
        "trade_time_kst": time_kst,
        "trade_timestamp": t.trade_timestamp,
        "opening_price": t.opening_price,
        "high_price": t.high_price,
        "low_price": t.low_price,
        "trade_price": t.trade_price,
        "prev_closing_price": t.prev_closing_price,
        "change": t.change,
        "change_price": t.change_price,
        "change_rate": t.change_rate,
        "signed_change_price": t.signed_change_price,
        "signed_change_rate": t.signed_change_rate,
        "trade_volume": t.trade_volume,
        "acc_trade_price": t.acc_trade_price,
        "acc_trade_price_24h": t.acc_trade_price_24h,
        "acc_trade_volume": t.acc_trade_volume,
        "acc_trade_volume_24h": t.acc_trade_volume_24h,
        "highest_52_week_price": t.highest_52_week_price,
        "highest_52_week_date": t.highest_52_week_date,
        "lowest_52_week_price": t.lowest_52_week_price,
        "lowest_52_week_date": t.lowest_52_week_date,
        "timestamp": t.timestamp,
    }


def _exact_sum(values: Iterable[float]) -> float:
    """The correctly rounded sum of decimal sizes (no float drift over 30 terms): what a sum of
    integer units divided once gives, as Upbit's (and the simulator's) totals are."""
    return float(sum((Decimal(repr(v)) for v in values), Decimal(0)))


def rest_orderbook(frame: bytes, count: int = MAX_ORDERBOOK_UNITS) -> dict[str, Any] | None:
    """The ``/v1/orderbook`` object of a WebSocket orderbook frame, with ``count`` units;
    None when the frame holds fewer (a channel subscribed at a smaller depth).

    The totals are over the units returned, as the frame's are over its depth (whether
    Upbit's REST totals follow ``count`` is UNCONFIRMED).

    Raises:
        FrameError: not an orderbook frame.
    """
    ob = decode_message(frame)
    if not isinstance(ob, Orderbook):
        raise FrameError(f"not an orderbook frame: {type(ob).__name__}")
    units = ob.orderbook_units
    if len(units) < count:
        return None
    if len(units) == count:
        total_ask, total_bid = ob.total_ask_size, ob.total_bid_size
    else:
        units = units[:count]
        total_ask = _exact_sum(u.ask_size for u in units)
        total_bid = _exact_sum(u.bid_size for u in units)
    level = ob.level
    return {
        "market": ob.code,
        "timestamp": ob.timestamp,
        "total_ask_size": total_ask,
        "total_bid_size": total_bid,
        "orderbook_units": [
            {
                "ask_price": u.ask_price,
                "bid_price": u.bid_price,
                "ask_size": u.ask_size,
                "bid_size": u.bid_size,
            }
            for u in units
        ],
        # Upbit echoes the level as a number; an integral one prints without a fraction.
        "level": int(level) if level == int(level) else level,
    }


# -- the market list ------------------------------------------------------------------------------


class _Market(msgspec.Struct):
    market: str


_markets_decoder = msgspec.json.Decoder(list[_Market])


def market_codes(body: bytes) -> tuple[str, ...]:
    """The codes of a ``/v1/market/all`` answer, in its order (``/v1/ticker/all`` keeps it).

    Raises:
        ValueError: not a non-empty JSON list of objects with a ``market`` string.
    """
    try:
        codes = tuple(dict.fromkeys(m.market for m in _markets_decoder.decode(body)))
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a market list: {exc}") from None
    if not codes:
        raise ValueError("the market list is empty")
    return codes


def quote_of(code: str) -> str:
    """``KRW-BTC`` -> ``KRW``."""
    return code.partition("-")[0]


# -- can the cache be believed? -----------------------------------------------------------------

#: the status fields :func:`cache_doubt` reads (``HMGET {ns}:status ...``)
STATUS_FIELDS = ("updated_ms", "status_interval_ms", "connected", "cache_stale_since_ms", "refused")
#: a status older than this many intervals was not written by a running leader (design.md)
STALE_INTERVALS = 3
_DEFAULT_INTERVAL_MS = 1000


def _int(value: bytes | str | None) -> int | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    return int(text) if text.isascii() and text.lstrip("-").isdigit() else None


def cache_doubt(values: Sequence[bytes | str | None], server_ms: int, client_id: str) -> str | None:
    """Why the last-value cache may be stale now (None: it may be believed).

    ``values`` are the :data:`STATUS_FIELDS` of ``{ns}:status`` in order; ``server_ms`` the
    Redis clock. The cache holds the newest frame of a stream only while a leader runs,
    connected, writes it (``cache_stale_since_ms`` 0) and serves our lease (not ``refused``).
    """
    updated, interval, connected, stale_since, refused = (list(values) + [None] * 5)[:5]
    updated_ms = _int(updated)
    if updated_ms is None:
        return "no broker status"
    interval_ms = _int(interval) or _DEFAULT_INTERVAL_MS
    if server_ms - updated_ms > STALE_INTERVALS * interval_ms:
        return "the broker status is stale (no leader)"
    if _int(connected) != 1:
        return "the broker is not connected upstream"
    if _int(stale_since):
        return "the broker's cache is stale (Redis refused its writes)"
    if refused:
        text = refused.decode() if isinstance(refused, bytes) else refused
        try:
            names = msgspec.json.decode(text) if text else {}
        except msgspec.DecodeError:
            names = {}
        if isinstance(names, dict) and client_id in names:
            return "the broker refused the gateway's REST lease"
    return None


# -- the gateway's one REST lease ---------------------------------------------------------------

#: streams the REST lease holds at most (the whole market in ticker and orderbook is ~1,700;
#: the broker serves 5,000 per lease by default): codes past it are forwarded upstream
MAX_REST_STREAMS = 2_000

StreamCode = tuple[str, str]  # (stream, code)


class PollBook:
    """Which (stream, code) REST clients poll, for the gateway's one REST lease.

    A code polled is leased until it has gone ``idle_after`` seconds without a poll; the lease
    is written when the set grows, renewed every :meth:`renew_every` while anything is held
    (each renewal also drops what went idle), and released when nothing is left. Its TTL
    (:meth:`ttl`) outlasts a renewal period, so a code stays leased at least ``idle_after``
    seconds after its last poll without a background task. A code is *trusted* once a fresh
    frame of it was seen while the lease held it: from then on the cache answers it. Times are
    monotonic seconds passed in.
    """

    def __init__(self, idle_after: float, max_streams: int = MAX_REST_STREAMS) -> None:
        if idle_after <= 0 or max_streams < 1:
            raise ValueError("idle_after must be > 0 and max_streams >= 1")
        self.idle_after = idle_after
        self.max_streams = max_streams
        self._last: dict[StreamCode, float] = {}
        self._trusted: set[StreamCode] = set()
        self._written: frozenset[StreamCode] = frozenset()
        self._written_at = -math.inf
        self._dirty = False

    @property
    def renew_every(self) -> float:
        return self.idle_after / 3

    @property
    def ttl(self) -> float:
        """The lease's TTL: a code polled just after a renewal is still held ``idle_after``
        seconds later, when the lease would have been renewed had anyone polled."""
        return self.idle_after + self.renew_every

    def poll(self, stream: str, codes: Iterable[str], now: float) -> bool:
        """Record a poll of ``codes``; False when they do not all fit the lease (then none is
        added and the request is forwarded)."""
        self.expire(now)
        keys = [(stream, c) for c in codes]
        new = {k for k in keys if k not in self._last}
        if len(self._last) + len(new) > self.max_streams:
            return False
        for key in keys:
            self._last[key] = now
        return True

    def expire(self, now: float) -> None:
        """Forget what went ``idle_after`` seconds without a poll."""
        idle = [k for k, t in self._last.items() if now - t > self.idle_after]
        for key in idle:
            del self._last[key]
            self._trusted.discard(key)

    def held_now(self) -> frozenset[StreamCode]:
        """What the lease should hold now (write it, then pass it to :meth:`written`)."""
        return frozenset(self._last)

    @staticmethod
    def subs(keys: Iterable[StreamCode]) -> dict[str, list[str]]:
        """The lease's ``subs`` for ``keys``: ``{stream: [codes]}``, sorted."""
        out: dict[str, list[str]] = {}
        for stream, code in sorted(keys):
            out.setdefault(stream, []).append(code)
        return out

    def due(self, now: float) -> bool:
        """The lease must be written (the set changed, a renewal is due) or released."""
        held = frozenset(self._last)
        if held != self._written or self._dirty:
            return True
        return bool(held) and now - self._written_at >= self.renew_every

    def written(self, keys: frozenset[StreamCode], now: float) -> None:
        """The lease was written holding ``keys`` (from :meth:`held_now`, taken before the
        write: codes polled meanwhile are not in it, and make the lease due again)."""
        self._written = keys
        self._written_at = now
        self._dirty = False

    def trusted(self, stream: str, code: str) -> bool:
        return (stream, code) in self._trusted and (stream, code) in self._written

    def confirm(self, stream: str, code: str) -> None:
        """A fresh frame of a held code was seen: the cache answers it from now on."""
        if (stream, code) in self._written and (stream, code) in self._last:
            self._trusted.add((stream, code))

    def distrust(self, stream: str, code: str) -> None:
        """The cache lacked a trusted code (Redis lost it, the lease lapsed): fetch its next
        frame again, and rewrite the lease at the next chance."""
        self._trusted.discard((stream, code))
        self._dirty = True


@dataclass(slots=True)
class RestStats:
    """What the REST side did since the gateway started (counters)."""

    requests: int = 0
    from_cache: int = 0  # answered from the last-value cache alone
    first_frames: int = 0  # answered after fetching first frames through the broker
    snapshot_commands: int = 0  # snapshot commands sent to the broker for those
    fallbacks: int = 0  # cache answers that fell back to forwarding (no broker, timeouts)
    forwarded: int = 0  # requests sent upstream (forwarded, fallbacks, market list)
    upstream_refusals: int = 0  # upstream 429/418 answers
    limited: int = 0  # 429s of our own (the shared budget had no room in time, or emulation)
    refused_private: int = 0
    not_found: int = 0
    bad_requests: int = 0


__all__ = [
    "BAD_PARAM",
    "CLIENT_BUDGETS",
    "MAX_ORDERBOOK_UNITS",
    "MAX_REST_STREAMS",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "PRIVATE_REFUSED",
    "PRIVATE_SEGMENTS",
    "QUOTATION_GROUPS",
    "STATUS_FIELDS",
    "TOO_MANY",
    "UNLIMITED_SEC",
    "BadParam",
    "Kind",
    "PollBook",
    "RestStats",
    "Route",
    "cache_doubt",
    "codes_param",
    "count_param",
    "details_param",
    "encode_json",
    "error_body",
    "kst_parts",
    "level_param",
    "market_codes",
    "quote_of",
    "remaining_req",
    "rest_orderbook",
    "rest_ticker",
    "route",
]
