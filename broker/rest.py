"""Upbit's quotation REST API, for the back-fill of upstream gaps (I/O adapter: the standard
library's HTTP client in a worker thread, as ``broker.markets`` reads the market list).

    GET /v1/trades/ticks?market=&count=&cursor=&days_ago=     group ``trade``, newest first
    GET /v1/candles/seconds?market=&to=&count=                group ``candle``
    GET /v1/candles/minutes/{unit}?market=&to=&count=          group ``candle``

Upbit limits these per IP and group (10 requests a second each, PROTOCOL.md section 8), so one
:class:`RestLimiter` serves the whole process (:data:`PROCESS_LIMITER`, whatever the number of
clients or leader phases): at most :data:`PER_SECOND` requests a second per group, none while
Upbit's ``Remaining-Req`` header says ``sec=0`` (until the next second), and none during a
back-off after a refusal (429: doubling from :data:`BACKOFF_INITIAL` up to
:data:`BACKOFF_MAX`; 418, Upbit blocking us: its ``Retry-After``, else :data:`TEAPOT_BLOCK`).
Every request is bounded (:data:`REQUEST_TIMEOUT`, and the caller's deadline); one that failed
(unreachable, a timeout, a 5xx, a refusal for the rate) is tried again, :data:`MAX_ATTEMPTS`
tries in all; another 4xx is not (the request itself is wrong). What cannot be read ends in a typed
:class:`~broker.errors.RestError` (:class:`~broker.errors.RestRateLimitError` for the rate),
never in a library's exception. No ``Origin`` header is sent: Upbit limits such requests to
one per ten seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping

from broker.core.stats import BackfillStats
from broker.errors import RestError, RestRateLimitError, describe
from broker.upbit.errors import FrameError
from broker.upbit.ratelimit import RateBudget
from broker.upbit.rest_frames import (
    RestCandle,
    RestTrade,
    format_candle_to,
    parse_rest_candles,
    parse_rest_trades,
)
from broker.upbit.types import CANDLE_SECONDS, DataType

logger = logging.getLogger(__name__)

#: one request's time at most (connect and each read: the socket's timeout)
REQUEST_TIMEOUT = 5.0
#: the largest answer read (500 trades are ~150 KB)
MAX_BYTES = 4 * 2**20
#: requests a second per group we allow ourselves (Upbit: 10 per group and IP)
PER_SECOND = 8
#: tries of one request (a timeout, a 5xx, a refusal for the rate) before it fails
MAX_ATTEMPTS = 4
#: the wait before retrying a failed request, doubling per try
RETRY_INITIAL = 0.25
#: the first back-off after a 429, doubling per refusal in a row, up to BACKOFF_MAX
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
#: how long a 418 (Upbit blocks us) keeps the group quiet when it names no time
TEAPOT_BLOCK = 60.0
TRADE_GROUP = "trade"
CANDLE_GROUP = "candle"


def parse_remaining_req(value: str | None) -> tuple[str | None, int | None]:
    """``"group=trade; min=1799; sec=29"`` -> ``("trade", 29)`` (None where absent or bad)."""
    if not value:
        return None, None
    parts = {}
    for item in value.split(";"):
        name, eq, text = item.strip().partition("=")
        if eq:
            parts[name.strip().lower()] = text.strip()
    sec = parts.get("sec", "")
    return parts.get("group") or None, int(sec) if sec.isascii() and sec.isdigit() else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    text = headers.get("retry-after", "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= 24 * 3600 else None


class RestLimiter:
    """The REST rate of one process, per group (see the module docstring). Its state changes
    only between awaits, so the tasks of one event loop share it without a lock."""

    def __init__(
        self,
        per_second: int = PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        *,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.per_second = per_second
        self.clock = clock
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._budgets: dict[str, RateBudget] = {}
        self._blocked_until: dict[str, float] = {}
        self._backoff: dict[str, float] = {}

    def _budget(self, group: str) -> RateBudget:
        budget = self._budgets.get(group)
        if budget is None:
            budget = self._budgets[group] = RateBudget(self.per_second, self.per_second * 60)
        return budget

    def delay(self, group: str) -> float:
        """Seconds until one more request of ``group`` may go."""
        now = self.clock()
        at = max(self._budget(group).next_allowed(now), self._blocked_until.get(group, 0.0))
        return max(0.0, at - now)

    async def acquire(self, group: str, deadline: float | None = None) -> None:
        """Wait for room for one request of ``group`` and count it.

        Raises:
            RestRateLimitError: the room comes after ``deadline`` (``clock`` time).
        """
        while True:
            wait = self.delay(group)
            if wait <= 0:
                self._budget(group).record(self.clock())
                return
            if deadline is not None and self.clock() + wait > deadline:
                raise RestRateLimitError(
                    f"upbit REST group {group}: no room before the deadline ({wait:.1f}s to wait)"
                )
            await asyncio.sleep(wait)

    def answered(self, group: str, remaining_sec: int | None) -> None:
        """Upbit answered; ``remaining_sec``: its ``Remaining-Req`` ``sec`` (None: absent)."""
        self._backoff.pop(group, None)
        if remaining_sec is not None and remaining_sec <= 0:
            # Upbit counts whole seconds: nothing more of this group until the next one.
            self._blocked_until[group] = max(self._blocked_until.get(group, 0.0), self.clock() + 1)

    def refused(self, group: str, status: int, retry_after: float | None) -> float:
        """Upbit refused a request for the rate (429, 418): the group waits. Returns how long."""
        if status == 418:
            wait = retry_after if retry_after is not None else TEAPOT_BLOCK
        else:
            backoff = self._backoff.get(group, self.backoff_initial / 2) * 2
            self._backoff[group] = min(backoff, self.backoff_max)
            wait = max(self._backoff[group], retry_after or 0.0)
        until = self.clock() + wait
        self._blocked_until[group] = max(self._blocked_until.get(group, 0.0), until)
        return wait


#: the one limiter of this process (Upbit's limits are per IP, not per client)
PROCESS_LIMITER = RestLimiter()


def _fetch(url: str, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: (status, headers with lower-case names, body). Runs in a worker thread."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "upbit-broker"}
    )
    try:
        # http(s) only: BrokerSettings refuses any other rest_url scheme.
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return int(response.status), headers, bytes(response.read(MAX_BYTES + 1))
    except urllib.error.HTTPError as exc:  # 4xx, 5xx: the status and body say why
        with exc:
            headers = {k.lower(): v for k, v in exc.headers.items()}
            return int(exc.code), headers, bytes(exc.read(MAX_BYTES + 1))


class RestClient:
    """Trades and candles of Upbit's quotation API at ``base_url`` (``https://api.upbit.com``)."""

    def __init__(
        self,
        base_url: str,
        *,
        limiter: RestLimiter | None = None,
        stats: BackfillStats | None = None,
        timeout: float = REQUEST_TIMEOUT,
        retry_initial: float = RETRY_INITIAL,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.limiter = PROCESS_LIMITER if limiter is None else limiter
        self.stats = BackfillStats() if stats is None else stats
        self.timeout = timeout
        self.retry_initial = retry_initial

    async def trades(
        self,
        code: str,
        *,
        count: int = 500,
        cursor: int | None = None,
        days_ago: int = 0,
        deadline: float | None = None,
    ) -> list[RestTrade]:
        """One page of ``code``'s trades, newest first, older than ``cursor`` (a
        ``sequential_id``; None: from the newest) of the latest trade date (``days_ago``: that
        many days before it).

        Raises:
            RestError: unreachable, an HTTP error, not a list of trades, or out of time.
        """
        params: dict[str, str | int] = {"market": code, "count": count}
        if cursor is not None:
            params["cursor"] = cursor
        if days_ago:
            params["days_ago"] = days_ago
        body = await self.get("/v1/trades/ticks", params, TRADE_GROUP, deadline)
        try:
            return parse_rest_trades(body)
        except FrameError as exc:
            self.stats.request_errors += 1
            raise RestError(f"/v1/trades/ticks {code}: {exc}") from exc

    async def candles(
        self, type_: str, code: str, *, to_ms: int, count: int = 200, deadline: float | None = None
    ) -> list[RestCandle]:
        """One page of ``code``'s candles of ``type_`` (``candle.1s``, ``candle.5m`` ...) that
        start before ``to_ms``, newest first.

        Raises:
            RestError: as :meth:`trades`; ValueError for a type that is no candle.
        """
        path = candle_path(type_)
        params: dict[str, str | int] = {
            "market": code,
            "to": format_candle_to(to_ms),
            "count": count,
        }
        body = await self.get(path, params, CANDLE_GROUP, deadline)
        try:
            return parse_rest_candles(body)
        except FrameError as exc:
            self.stats.request_errors += 1
            raise RestError(f"{path} {code}: {exc}") from exc

    async def get(
        self,
        path: str,
        params: Mapping[str, str | int],
        group: str,
        deadline: float | None = None,
    ) -> bytes:
        """The body of a 200 answer to ``GET path?params``, within the rate of ``group``.

        Raises:
            RestRateLimitError: refused for the rate on every try, or no room in time.
            RestError: unreachable, timed out, a 5xx on every try, another HTTP error (not
                retried: the request itself is wrong), or too large.
        """
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        clock = self.limiter.clock
        error: RestError = RestError(f"GET {path}: not tried")
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await self._pause(self.retry_initial * 2 ** (attempt - 1), deadline, error)
            await self.limiter.acquire(group, deadline)
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - clock())
                if timeout <= 0:
                    raise RestError(f"GET {path}: out of time") from error
            self.stats.requests += 1
            try:
                # The thread's socket timeout bounds it too; this bounds the wait for it.
                async with asyncio.timeout(timeout + 1.0):
                    status, headers, body = await asyncio.to_thread(_fetch, url, timeout)
            # URLError and socket timeouts are OSErrors; a broken answer is an HTTPException.
            except (OSError, ValueError, TimeoutError, http.client.HTTPException) as exc:
                self.stats.request_errors += 1
                error = RestError(f"GET {path}: {describe(exc)}")
                logger.debug("rest request failed (%s)", error)
                continue
            answered_group, remaining = parse_remaining_req(headers.get("remaining-req"))
            if status in (429, 418):
                self.stats.rate_limited += 1
                wait = self.limiter.refused(group, status, _retry_after(headers))
                error = RestRateLimitError(
                    f"GET {path}: HTTP {status}, waiting {wait:.1f}s", status
                )
                logger.warning(
                    "upbit REST refused us for the rate (HTTP %d): %.1fs pause", status, wait
                )
                continue
            self.limiter.answered(answered_group or group, remaining)
            if len(body) > MAX_BYTES:
                self.stats.request_errors += 1
                raise RestError(f"GET {path}: answer larger than {MAX_BYTES} bytes", status)
            if status >= 500:
                self.stats.request_errors += 1
                error = RestError(f"GET {path}: HTTP {status}", status)
                continue
            if status != 200:
                self.stats.request_errors += 1
                text = body[:200].decode(errors="replace")
                raise RestError(f"GET {path}: HTTP {status}: {text}", status)
            return body
        raise error

    async def _pause(self, seconds: float, deadline: float | None, error: RestError) -> None:
        if deadline is not None and self.limiter.clock() + seconds > deadline:
            raise error
        await asyncio.sleep(seconds)


def candle_path(type_: str) -> str:
    """``candle.1s`` -> ``/v1/candles/seconds``; ``candle.15m`` -> ``/v1/candles/minutes/15``.

    Raises:
        ValueError: not a candle type.
    """
    seconds = CANDLE_SECONDS[DataType(type_)] if type_.startswith("candle.") else None
    if seconds is None:
        raise ValueError(f"not a candle type: {type_!r}")
    if seconds < 60:
        return "/v1/candles/seconds"
    return f"/v1/candles/minutes/{seconds // 60}"


__all__ = [
    "PROCESS_LIMITER",
    "RestClient",
    "RestLimiter",
    "candle_path",
    "parse_remaining_req",
]
