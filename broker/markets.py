"""Upbit's market list, read over REST (I/O adapter: the standard library's HTTP client).

``GET /v1/market/all`` answers ``[{"market": "KRW-BTC", "korean_name": ..., ...}, ...]``.
The leader reads it when it takes the lead and every ``markets_refresh`` seconds, and feeds the
codes to the leader core, which keeps codes Upbit does not know out of the union
(``broker.core.admission``): Upbit ignores them without a word, so they would never verify.

One request every ten minutes needs no HTTP library: ``urllib`` runs in a worker thread.
A list that cannot be read, or reads as nothing, changes nothing: the last good list stays
(none at all: every well-formed code is trusted, and verification still converges).
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.request

import msgspec

from broker.errors import MarketListError

#: how long one read of the list may take
FETCH_TIMEOUT = 10.0
#: the largest answer read (Upbit's is ~100 KB for ~850 markets)
MAX_BYTES = 8 * 2**20
#: fewer markets than this is no market list (an error page, a proxy's answer)
MIN_MARKETS = 1


class _Market(msgspec.Struct):
    market: str


_decoder = msgspec.json.Decoder(list[_Market])


def parse_market_list(body: bytes) -> frozenset[str]:
    """The codes of a ``/v1/market/all`` answer.

    Raises:
        MarketListError: not a JSON list of objects with a ``market`` string, or empty.
    """
    try:
        markets = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MarketListError(f"not a market list: {exc}") from None
    codes = frozenset(m.market for m in markets if m.market)
    if len(codes) < MIN_MARKETS:
        raise MarketListError("the market list is empty")
    return codes


def _get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "upbit-broker"}
    )
    # http(s) only: BrokerSettings refuses any other markets_url scheme.
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read(MAX_BYTES + 1))


async def fetch_market_codes(url: str, timeout: float = FETCH_TIMEOUT) -> frozenset[str]:
    """Read the market list at ``url`` (``BrokerSettings.market_list_url``).

    Raises:
        MarketListError: unreachable, an HTTP error, too large, or not a market list.
    """
    try:
        body = await asyncio.to_thread(_get, url, timeout)
    # URLError and HTTPError are OSErrors; a broken answer (BadStatusLine, IncompleteRead) is
    # an HTTPException.
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise MarketListError(f"cannot read {url}: {exc}") from None
    if len(body) > MAX_BYTES:
        raise MarketListError(f"the market list at {url} is larger than {MAX_BYTES} bytes")
    return parse_market_list(body)


__all__ = ["MarketListError", "fetch_market_codes", "parse_market_list"]
