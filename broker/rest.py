"""Upbit's quotation REST API, for the back-fill of upstream gaps (I/O adapter: the standard
library's HTTP client in worker threads of this module's own pool).

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
one per ten seconds. An answer that carries another market's trades or candles than the one
asked is refused whole (its paging cannot be trusted either).

Threads (:func:`http_get`, the market list's reads too): the requests run in
:data:`REST_WORKERS` threads of their own, never in the event loop's default executor, which
resolves the hosts of Upbit's WebSocket and of Redis (``loop.getaddrinfo``): a slow REST server
must not stop the broker from reconnecting. Each request has one wall-clock deadline, enforced
inside its thread: every read and write of the socket gets only what is left of it, so a server
that drips a byte at a time cannot hold a thread past it (a socket timeout alone bounds each
read, not the request), and the answer is read in chunks up to a size limit. Redirects are not
followed (``urllib`` would follow one to ``ftp://``): a 3xx is an HTTP error like a 4xx.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import http.client
import io
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

logger = logging.getLogger(__name__)

#: one request's time at most, all of it (connect, send, every read: a wall-clock deadline)
REQUEST_TIMEOUT = 5.0
#: the largest answer read (500 trades are ~150 KB)
MAX_BYTES = 4 * 2**20
#: bytes read at a time (the deadline is checked before each read)
READ_CHUNK = 64 * 1024
#: the threads REST requests run in (the process's, shared by every client and the market
#: list): the back-fill sends one request at a time, and a thread never outlives its deadline
#: by more than a name lookup
REST_WORKERS = 4
#: how much longer than its deadline the event loop waits for a request's thread (a name
#: lookup, which no socket timeout bounds, or a wait for a free thread)
THREAD_GRACE = 1.0
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


#: the threads of every REST request of this process (see the module docstring)
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(REST_WORKERS, thread_name_prefix="upbit-rest")


class _Deadline:
    """The end of one request (``time.monotonic``): each blocking step gets what is left."""

    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        """Seconds left. Raises TimeoutError once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read bounded by what is left of the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        # A SocketIO holds the socket open until it is closed, as socket.makefile does.
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket (TCP or TLS) as ``http.client`` uses it: ``sendall``, ``makefile``
    and ``close``, every send and read bounded by what is left of the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.left())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline), READ_CHUNK)

    def close(self) -> None:
        self._sock.close()


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        self.timeout = self._deadline.left()  # the connect
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        self.timeout = self._deadline.left()  # the connect, then the TLS handshake
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        # No context: HTTPSConnection's default one (certificates and host name checked).
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """http and https only (with the environment's proxies), and no redirect handler: a 3xx
    reaches the caller as an HTTP error."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        _HTTPHandler(deadline),
        _HTTPSHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _read_body(response: Any, max_bytes: int) -> bytes:
    """The answer's body in chunks, at most ``max_bytes + 1`` (more is too large anyway)."""
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = response.read(min(READ_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _fetch(url: str, at: float, max_bytes: int) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` by ``at`` (``time.monotonic``): (status, headers with lower-case names, at
    most ``max_bytes + 1`` bytes of body). Runs in a thread of the REST pool.

    Raises:
        TimeoutError: the deadline passed (the connection is closed then); OSError (URLError),
        http.client.HTTPException, ValueError: what urllib and http.client raise.
    """
    deadline = _Deadline(at)
    deadline.left()  # it may have waited for a free thread past its deadline
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) url: {url!r}")  # BrokerSettings refuses them too
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "upbit-broker"}
    )
    try:
        response = _opener(deadline).open(request, timeout=deadline.left())
    except urllib.error.HTTPError as exc:  # 3xx, 4xx, 5xx: the status and body say why
        with exc:
            headers = {k.lower(): v for k, v in exc.headers.items()}
            return int(exc.code), headers, _read_body(exc, max_bytes)
    with response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return int(response.status), headers, _read_body(response, max_bytes)


async def http_get(
    url: str, timeout: float, max_bytes: int = MAX_BYTES
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` within ``timeout`` seconds, all of it, in a thread of the REST pool: (status,
    headers with lower-case names, body). A body larger than ``max_bytes`` is cut after
    ``max_bytes + 1`` bytes (check its length).

    Raises:
        TimeoutError (an OSError): out of time. OSError (URLError: unreachable),
        http.client.HTTPException (a broken answer), ValueError (not an http(s) URL).
    """
    at = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    # The thread gives up at ``at`` by itself; this bounds what no socket timeout bounds.
    async with asyncio.timeout(timeout + THREAD_GRACE):
        return await loop.run_in_executor(_EXECUTOR, _fetch, url, at, max_bytes)


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
            RestError: unreachable, an HTTP error (a redirect too), not a list of trades, a
                trade of another market, or out of time.
        """
        params: dict[str, str | int] = {"market": code, "count": count}
        if cursor is not None:
            params["cursor"] = cursor
        if days_ago:
            params["days_ago"] = days_ago
        body = await self.get("/v1/trades/ticks", params, TRADE_GROUP, deadline)
        try:
            trades = parse_rest_trades(body)
        except FrameError as exc:
            self.stats.request_errors += 1
            raise RestError(f"/v1/trades/ticks {code}: {exc}") from exc
        self._check_market("/v1/trades/ticks", code, [t.market for t in trades])
        return trades

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
            candles = parse_rest_candles(body)
        except FrameError as exc:
            self.stats.request_errors += 1
            raise RestError(f"{path} {code}: {exc}") from exc
        self._check_market(path, code, [c.market for c in candles])
        return candles

    def _check_market(self, path: str, code: str, markets: list[str]) -> None:
        """Refuse an answer that carries another market's entries: they are dropped with the
        whole page (a page that answered another question cannot be paged on either), and the
        answer counts as a request error.

        Raises:
            RestError: an entry of another market than ``code``.
        """
        foreign = [market for market in markets if market != code]
        if foreign:
            self.stats.request_errors += 1
            raise RestError(
                f"{path} {code}: {len(foreign)} of {len(markets)} entries are of another "
                f"market ({foreign[0][:40]!r})"
            )

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
                retried: the request itself is wrong; a redirect is not followed), or too
                large.
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
                status, headers, body = await http_get(url, timeout)
            # URLError and timeouts are OSErrors; a broken answer is an HTTPException.
            except (OSError, ValueError, http.client.HTTPException) as exc:
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
            if 300 <= status < 400:
                self.stats.request_errors += 1
                where = headers.get("location", "")[:200]
                raise RestError(
                    f"GET {path}: HTTP {status}: redirects are not followed ({where})", status
                )
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
    "MAX_BYTES",
    "PROCESS_LIMITER",
    "REQUEST_TIMEOUT",
    "REST_WORKERS",
    "RestClient",
    "RestLimiter",
    "candle_path",
    "http_get",
    "parse_remaining_req",
]
