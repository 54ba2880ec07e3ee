"""Upbit's market list, read over REST (I/O adapter: the standard library's HTTP client).

``GET /v1/market/all`` answers ``[{"market": "KRW-BTC", "korean_name": ..., ...}, ...]``.
The leader reads it when it takes the lead and every ``markets_refresh`` seconds, and feeds the
codes to the leader core, which keeps codes Upbit does not know out of the union
(``broker.core.admission``): Upbit ignores them without a word, so they would never verify.

One request every ten minutes needs no HTTP library: it runs as the back-fill's REST requests
do (``broker.rest.http_get``: ``urllib`` in a thread of the REST pool, never the event loop's
default executor, within one wall-clock deadline; redirects are not followed).
A list that cannot be read, or reads as nothing, changes nothing: the last good list stays
(none at all: every well-formed code is trusted, and verification still converges).
"""

from __future__ import annotations

import http.client

import msgspec

from broker.errors import MarketListError
from broker.rest import http_get

#: how long one read of the list may take, all of it
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


async def fetch_market_codes(url: str, timeout: float = FETCH_TIMEOUT) -> frozenset[str]:
    """Read the market list at ``url`` (``BrokerSettings.market_list_url``) within ``timeout``
    seconds.

    Raises:
        MarketListError: unreachable, out of time, an HTTP error (a redirect too), too large,
            or not a market list.
    """
    try:
        status, _, body = await http_get(url, timeout, MAX_BYTES)
    # URLError and timeouts are OSErrors; a broken answer (BadStatusLine, IncompleteRead) is
    # an HTTPException.
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise MarketListError(f"cannot read {url}: {exc}") from None
    if status != 200:
        raise MarketListError(f"cannot read {url}: HTTP {status}")
    if len(body) > MAX_BYTES:
        raise MarketListError(f"the market list at {url} is larger than {MAX_BYTES} bytes")
    return parse_market_list(body)


__all__ = ["MarketListError", "fetch_market_codes", "parse_market_list"]
