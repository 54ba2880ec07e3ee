"""Forwarding quotation REST requests to Upbit through one rate limiter (gateway layer, I/O
adapter: the standard library's HTTP client in the gateway's own worker threads).

Upbit limits its quotation API per IP and group (10 requests a second, PROTOCOL.md section 8),
so every request a gateway process sends upstream, whichever client asked, waits for the one
:class:`~broker.rest.RestLimiter` of that process (the broker's own: its sliding window per
group, ``Remaining-Req: sec=0`` honoured until the next second, a back-off after 429 and the
block a 418 names). A request that finds no room within ``wait`` seconds is answered here
with a 429 in Upbit's shape instead of waiting on; one that Upbit answers goes back to the
client as Upbit answered it: status, body, ``Remaining-Req`` (and ``Content-Type``,
``Retry-After``). Nothing is retried: a refusal is the client's to see, as it would be
without the gateway. No ``Origin`` header is sent (Upbit limits such requests to one per ten
seconds), and no header of the client's is passed on.

Upbit counts a request when it arrives, somewhere between our send and its answer, and the
arrival of one request may be delayed more than the next one's (a new TLS connection, a busy
loop): requests spaced a second apart when sent can arrive closer, and eleven land in one of
Upbit's seconds (measured against the simulator: 60 ms of jitter was enough). So besides the
limiter's window over send times, each group lets at most ``per_second`` requests be in
flight or answered within the last second (:class:`_Settling`): a request counts until one
second after its answer, the latest Upbit may have counted it, so no jitter can crowd
Upbit's window.

The limiter is per process: several gateway processes (or a gateway and a broker back-filling
gaps) behind one IP share Upbit's 10 a second between them, so give each its part
(``UPBIT_GATEWAY_REST_PER_SECOND``); Upbit's ``Remaining-Req`` pauses each of them when the
IP's second is spent.

:class:`AnswerCache` keeps an upstream's 200 answers for a while (``/v1/market/all``), with one
fetch at a time per key.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from broker.errors import RestRateLimitError, describe
from broker.rest import RestLimiter, parse_remaining_req
from gateway.rest import TOO_MANY, error_body, remaining_req

logger = logging.getLogger(__name__)

#: one upstream request's time at most (connect and each read)
UPSTREAM_TIMEOUT = 5.0
#: the largest upstream answer passed on (500 trades are ~150 KB, the market list ~100 KB)
MAX_BYTES = 8 * 2**20
#: worker threads for upstream requests: enough that a second's budget of every group is in
#: flight at once, so requests reach Upbit when the limiter let them go, not bunched later
WORKERS = 16
#: upstream headers passed on to the client (lower case)
PASSED_HEADERS = ("content-type", "remaining-req", "retry-after")
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer for the client: status, headers (name, value), body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    #: it came from Upbit (False: the gateway's own answer, e.g. its limiter's 429)
    upstream: bool = True

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


def local_answer(status: int, body: bytes, group: str | None, sec: int = 0) -> Answer:
    """An answer of the gateway's own, in Upbit's shape (``Remaining-Req`` when ``group``)."""
    headers = [("Content-Type", JSON)]
    if group:
        headers.append(("Remaining-Req", remaining_req(group, sec)))
    return Answer(status, tuple(headers), body, upstream=False)


def _fetch(url: str, timeout: float) -> tuple[int, list[tuple[str, str]], bytes]:
    """GET ``url``: (status, headers, body). Runs in a worker thread."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "upbit-broker-gateway"}
    )
    try:
        # http(s) only: GatewaySettings refuses any other upstream_rest_url scheme.
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_BYTES + 1)
            return int(response.status), list(response.headers.items()), body
    except urllib.error.HTTPError as exc:  # 4xx, 5xx: Upbit's answer all the same
        with exc:
            return int(exc.code), list(exc.headers.items()), exc.read(MAX_BYTES + 1)


class _Settling:
    """One group's requests in flight, and the answer times of the last second's."""

    __slots__ = ("answered", "changed", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.answered: deque[float] = deque()
        self.changed = asyncio.Event()


class Forwarder:
    """Sends GETs to Upbit's REST API at ``base_url`` within one :class:`RestLimiter`.

    Args:
        base_url: ``https://api.upbit.com`` (or the simulator's ``http://host:port``).
        per_second: requests a second per group (Upbit allows 10 per IP).
        wait: how long a request may wait for room before it is answered 429 here.
        limiter: the process's limiter (default: a new one of ``per_second``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        per_second: int = 8,
        wait: float = 5.0,
        timeout: float = UPSTREAM_TIMEOUT,
        limiter: RestLimiter | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.limiter = RestLimiter(per_second) if limiter is None else limiter
        self.wait = wait
        self.timeout = timeout
        self.per_second = self.limiter.per_second
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="gateway-rest")
        self._settling: dict[str, _Settling] = {}
        #: requests sent upstream, and upstream refusals for the rate (429, 418)
        self.sent = 0
        self.refused = 0
        #: requests answered 429 here (no room in the budget within ``wait``)
        self.limited = 0

    async def get(self, target: str, group: str) -> Answer:
        """Upbit's answer to ``GET target`` (path and query), or the gateway's own 429 (no
        room within ``wait``), 502 (unreachable, unreadable) or 504 (no answer in time)."""
        clock = self.limiter.clock
        deadline = clock() + self.wait
        settling = self._settling.setdefault(group, _Settling())
        if not await self._room(settling, deadline):
            self.limited += 1
            return local_answer(429, TOO_MANY, group)
        try:
            return await self._send(target, group, deadline)
        finally:
            settling.in_flight -= 1
            settling.answered.append(clock())
            settling.changed.set()

    async def _room(self, settling: _Settling, deadline: float) -> bool:
        """Wait until fewer than ``per_second`` requests of the group are in flight or were
        answered within the last second, and take a place; False at ``deadline``."""
        clock = self.limiter.clock
        answered = settling.answered
        while True:
            now = clock()
            while answered and answered[0] <= now - 1.0:
                answered.popleft()
            if settling.in_flight + len(answered) < self.per_second:
                settling.in_flight += 1
                return True
            # the oldest answer leaving the second, or any answer (an event)
            wake = min(answered[0] + 1.0 if answered else deadline, deadline)
            if now >= deadline:
                return False
            settling.changed.clear()
            try:
                async with asyncio.timeout(max(0.0, wake - now)):
                    await settling.changed.wait()
            except TimeoutError:
                pass

    async def _send(self, target: str, group: str, deadline: float) -> Answer:
        try:
            await self.limiter.acquire(group, deadline)
        except RestRateLimitError:
            self.limited += 1
            return local_answer(429, TOO_MANY, group)
        self.sent += 1
        loop = asyncio.get_running_loop()
        try:
            # The socket's timeout bounds each read; this bounds the whole wait for the thread.
            async with asyncio.timeout(self.timeout + 1.0):
                status, headers, body = await loop.run_in_executor(
                    self._pool, _fetch, self.base_url + target, self.timeout
                )
        except TimeoutError:
            logger.warning("upstream rest %s: no answer in time", target.partition("?")[0])
            return local_answer(504, error_body(504, "Upbit did not answer in time."), group)
        # URLError and socket errors are OSErrors; a broken answer is an HTTPException.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            logger.warning("upstream rest %s: %s", target.partition("?")[0], describe(exc))
            return local_answer(502, error_body(502, "Upbit could not be reached."), group)
        if len(body) > MAX_BYTES:
            return local_answer(502, error_body(502, "Upbit's answer is too large."), group)
        passed = tuple((k, v) for k, v in headers if k.lower() in PASSED_HEADERS)
        retry_after = next((v for k, v in headers if k.lower() == "retry-after"), None)
        _, remaining = parse_remaining_req(
            next((v for k, v in headers if k.lower() == "remaining-req"), None)
        )
        if status in (429, 418):
            self.refused += 1
            wait = self.limiter.refused(group, status, _seconds(retry_after))
            logger.warning(
                "upbit REST refused the gateway for the rate (HTTP %d): group %s waits %.1fs",
                status,
                group,
                wait,
            )
        else:
            # Our group names the budget (Upbit's own name for it may differ in spelling).
            self.limiter.answered(group, remaining)
        return Answer(status, passed, body)

    async def aclose(self) -> None:
        """Stop the worker threads (requests in flight finish on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _seconds(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value <= 24 * 3600 else None


class AnswerCache:
    """An upstream's 200 answers kept ``ttl`` seconds per key; one fetch at a time per key, so
    a hundred clients asking at once cost Upbit one request."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._answers: dict[str, tuple[float, Answer]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def fresh(self, key: str) -> Answer | None:
        """The answer kept for ``key`` if it is younger than ``ttl``."""
        kept = self._answers.get(key)
        if kept is not None and self.clock() - kept[0] < self.ttl:
            return kept[1]
        return None

    async def get(self, key: str, fetch: Callable[[], Awaitable[Answer]]) -> Answer:
        """The kept answer, or ``fetch()``'s (kept when it is a 200 from Upbit)."""
        answer = self.fresh(key)
        if answer is not None:
            return answer
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            answer = self.fresh(key)  # fetched while we waited for the lock
            if answer is not None:
                return answer
            answer = await fetch()
            if answer.status == 200 and answer.upstream:
                self._answers[key] = (self.clock(), answer)
            return answer


__all__ = ["JSON", "Answer", "AnswerCache", "Forwarder", "local_answer"]
