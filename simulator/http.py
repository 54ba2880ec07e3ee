"""Plain HTTP on the simulator's port: operator endpoints and Upbit's quotation REST API.

Simulator layer, I/O adapter (websockets hands us the parsed request in ``process_request``;
we return a ``Response`` instead of upgrading). All answers are JSON. The REST answers and
the rate limit's arithmetic are :mod:`simulator.rest` (endpoints, parameters, errors).

Operator (GET):
    /_sim/state                       connections, subscriptions, counters
    /_sim/drop                        abort every connection (no close frame)
    /_sim/stall?seconds=S             freeze every connection for S seconds
    /_sim/mute?codes=A,B&seconds=S    silence some codes for S seconds
    /_sim/sends[?clear=1]             [[time_ns, frame_key], ...] (``record_sends``)
    /_sim/trades?market=X[&full=1]    X's whole trade log, oldest first:
                                      {market, capacity, evicted, count, sequential_ids,
                                      trades (full=1: /v1/trades/ticks objects)}
REST (``/v1/...``, see :mod:`simulator.rest`): every answer carries
``Remaining-Req: group=<g>; min=600; sec=<left>``; over ``rest_rate`` a second per client IP
and group: 429. Any other path: 404 ``{"error":{"name":404,"message":"Code not found"}}``.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

from simulator import rest
from simulator.encode import encode_json

if TYPE_CHECKING:
    from simulator.server import Simulator

NOT_FOUND = rest.NOT_FOUND
BAD_PARAM = rest.BAD_PARAM


def json_response(status: int, body: Any, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    data = encode_json(body)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", "application/json; charset=utf-8"),
            *extra,
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


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["0"])[0] not in ("0", "", "false")


def handle(sim: Simulator, target: str, ip: str = "?") -> Response:
    """Answer one plain HTTP GET for ``target`` (path and query) from client ``ip``."""
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    path = parts.path.rstrip("/")
    if path.startswith("/v1/"):
        return _rest(sim, path, query, ip)
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
        return json_response(200, sim.take_sends() if _flag(query, "clear") else sim.sends)
    if path == "/_sim/trades":
        code = query.get("market", [""])[0]
        st = sim.market.states.get(code)
        if st is None:
            return json_response(404, NOT_FOUND)
        return json_response(200, rest.trade_log(st, _flag(query, "full")))
    return json_response(404, NOT_FOUND)


def _rest(sim: Simulator, path: str, query: dict[str, list[str]], ip: str) -> Response:
    group = rest.group_of(path)
    if group is None:
        return json_response(404, NOT_FOUND)
    left = sim.rest_limiter.take(ip, group, asyncio.get_running_loop().time())
    if left is None:
        sim.totals["rate_limited_rest"] += 1
        return json_response(429, rest.TOO_MANY, (("Remaining-Req", rest.remaining_req(group, 0)),))
    status, body = rest.answer(path, query, sim.listings, sim.market)
    return json_response(status, body, (("Remaining-Req", rest.remaining_req(group, left)),))


__all__ = ["BAD_PARAM", "NOT_FOUND", "handle", "json_response", "too_many_requests"]
