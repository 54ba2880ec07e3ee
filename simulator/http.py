"""Plain HTTP on the simulator's port: operator endpoints and a slice of Upbit's REST API.

Simulator layer, I/O adapter (websockets hands us the parsed request in ``process_request``;
we return a ``Response`` instead of upgrading). All answers are JSON.

Operator (GET):
    /_sim/state                       connections, subscriptions, counters
    /_sim/drop                        abort every connection (no close frame)
    /_sim/stall?seconds=S             freeze every connection for S seconds
    /_sim/mute?codes=A,B&seconds=S    silence some codes for S seconds
    /_sim/sends[?clear=1]             [[time_ns, frame_key], ...] (``record_sends``)
REST, shaped like Upbit's answers:
    /v1/market/all                    [{market, korean_name, english_name}]
    /v1/ticker?markets=A,B            REST ticker: ``market`` not ``code``, no type/stream_type,
                                      plus trade_date_kst/trade_time_kst
    /v1/orderbook/instruments?markets=A,B   [{market, quote_currency, tick_size, supported_levels}]
Anything else: 404 ``{"error":{"name":404,"message":"Code not found"}}``.
"""

from __future__ import annotations

import email.utils
import http
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

from simulator.encode import TICKER_FIELDS, encode_json
from simulator.market import kst_parts, ticker_values

if TYPE_CHECKING:
    from simulator.server import Simulator

NOT_FOUND = {"error": {"name": 404, "message": "Code not found"}}
BAD_PARAM = {"error": {"name": 400, "message": "Invalid parameter. Check the given value!"}}

# The REST ticker's fields, in Upbit's order; values come from the WebSocket ticker.
_REST_TICKER = (
    "trade_date", "trade_time", "trade_date_kst", "trade_time_kst", "trade_timestamp",
    "opening_price", "high_price", "low_price", "trade_price", "prev_closing_price", "change",
    "change_price", "change_rate", "signed_change_price", "signed_change_rate", "trade_volume",
    "acc_trade_price", "acc_trade_price_24h", "acc_trade_volume", "acc_trade_volume_24h",
    "highest_52_week_price", "highest_52_week_date", "lowest_52_week_price",
    "lowest_52_week_date", "timestamp",
)  # fmt: skip


def json_response(status: int, body: Any) -> Response:
    data = encode_json(body)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", "application/json; charset=utf-8"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


def too_many_requests() -> Response:
    """The refusal of an upgrade over the connect limit (Upbit's exact answer is UNCONFIRMED)."""
    body = {"error": {"name": "Too Many Requests", "message": "Too many connection requests."}}
    return json_response(429, body)


def _number(query: dict[str, list[str]], name: str) -> float | None:
    try:
        value = float(query[name][0])
    except (KeyError, IndexError, ValueError):
        return None
    return value if value >= 0 else None


def _decimal(value: float) -> str:
    """``1e-05`` -> ``"0.00001"``, ``10000.0`` -> ``"10000"`` (Upbit sends numeric strings)."""
    return format(Decimal(repr(value)).normalize(), "f")


def _markets(query: dict[str, list[str]]) -> list[str] | None:
    raw = ",".join(query.get("markets", []))
    codes = [c.strip() for c in raw.split(",") if c.strip()]
    return codes or None


def handle(sim: Simulator, target: str) -> Response:
    """Answer one plain HTTP GET for ``target`` (path and query)."""
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    path = parts.path.rstrip("/")
    if path == "/_sim/state":
        return json_response(200, sim.state())
    if path == "/_sim/drop":
        return json_response(200, {"dropped": sim.drop()})
    if path == "/_sim/stall":
        seconds = _number(query, "seconds")
        if seconds is None:
            return json_response(400, BAD_PARAM)
        sim.stall(seconds)
        return json_response(200, {"stalled_for": seconds})
    if path == "/_sim/mute":
        seconds = _number(query, "seconds")
        codes = [c for c in ",".join(query.get("codes", [])).split(",") if c]
        if seconds is None or not codes:
            return json_response(400, BAD_PARAM)
        return json_response(200, {"muted": sim.mute(codes, seconds), "seconds": seconds})
    if path == "/_sim/sends":
        clear = query.get("clear", ["0"])[0] not in ("0", "", "false")
        return json_response(200, sim.take_sends() if clear else sim.sends)
    if path == "/v1/market/all":
        return json_response(
            200,
            [
                {"market": x.code, "korean_name": x.korean_name, "english_name": x.english_name}
                for x in sim.listings.values()
            ],
        )
    if path == "/v1/ticker":
        return _rest_ticker(sim, query)
    if path == "/v1/orderbook/instruments":
        return _instruments(sim, query)
    return json_response(404, NOT_FOUND)


def _rest_ticker(sim: Simulator, query: dict[str, list[str]]) -> Response:
    codes = _markets(query)
    if codes is None:
        return json_response(400, BAD_PARAM)
    if any(c not in sim.listings for c in codes):
        return json_response(404, NOT_FOUND)
    out = []
    for code in codes:
        st = sim.market.states[code]
        ws = dict(zip(TICKER_FIELDS, ticker_values(st, "SNAPSHOT"), strict=True))
        ws["trade_date_kst"], ws["trade_time_kst"] = kst_parts(st.trade_ms)
        out.append({"market": code, **{k: ws[k] for k in _REST_TICKER}})
    return json_response(200, out)


def _instruments(sim: Simulator, query: dict[str, list[str]]) -> Response:
    codes = _markets(query)
    if codes is None:
        return json_response(400, BAD_PARAM)
    if any(c not in sim.listings for c in codes):
        return json_response(404, NOT_FOUND)
    out = []
    for code in codes:
        x = sim.listings[code]
        out.append(
            {
                "market": code,
                "quote_currency": x.quote,
                "tick_size": _decimal(x.tick_size),
                "supported_levels": [_decimal(v) for v in x.supported_levels()],
            }
        )
    return json_response(200, out)


__all__ = ["BAD_PARAM", "NOT_FOUND", "handle", "json_response", "too_many_requests"]
