"""The simulator's per-connection protocol state, driven without sockets (table-driven)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from broker.upbit.types import Format
from simulator.session import Listed, Pinged, Refused, Session, Stream, Subscribed
from simulator.universe import build_universe

LISTINGS = {x.code: x for x in build_universe(0, seed=1)}


def new_session(message_rate: tuple[int, int] = (1000, 1000)) -> Session:
    return Session(LISTINGS, message_rate)


def request(*objects: dict[str, Any]) -> str:
    return json.dumps([{"ticket": "t"}, *objects])


def error_of(outcome: object) -> dict[str, str]:
    assert isinstance(outcome, Refused), outcome
    body = msgspec.json.decode(outcome.frame)
    assert list(body) == ["error"]
    assert set(body["error"]) == {"name", "message"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("message", "name"),
    [
        ("hello", "WRONG_FORMAT"),
        ('{"ticket":"t"}', "WRONG_FORMAT"),
        ("[]", "WRONG_FORMAT"),
        ('[{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
        ('[{"ticket":""},{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
        ('[{"ticket":"t"},{"codes":["KRW-BTC"]}]', "NO_TYPE"),
        ('[{"ticket":"t"}]', "NO_TYPE"),
        ('[{"ticket":"t"},{"type":"ticker"}]', "NO_CODES"),
        ('[{"ticket":"t"},{"type":"ticker","codes":[]}]', "NO_CODES"),
        ('[{"ticket":"t"},{"type":"nope","codes":["KRW-BTC"]}]', "INVALID_PARAM"),
        ('[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]},{"format":"XML"}]', "WRONG_FORMAT"),
    ],
)
def test_refusals_carry_upbit_error_names(message: str, name: str) -> None:
    assert error_of(new_session().receive(message, 0.0))["name"] == name


def test_replacing_request_overwrites_the_whole_set() -> None:
    s = new_session()
    s.receive(request({"type": "ticker", "codes": ["KRW-BTC"]}), 0.0)
    assert s.streams == (Stream("ticker", "KRW-BTC"),)
    out = s.receive(request({"type": "trade", "codes": ["KRW-ETH"]}), 0.1)
    assert isinstance(out, Subscribed)
    assert s.streams == (Stream("trade", "KRW-ETH"),)
    assert out.snapshots == (Stream("trade", "KRW-ETH"),)


@pytest.mark.parametrize(
    ("flags", "snapshot", "realtime", "listed"),
    [
        ({}, True, True, True),
        ({"is_only_snapshot": True}, True, False, False),
        ({"isOnlySnapshot": True}, True, False, False),
        ({"is_only_realtime": True}, False, True, True),
        ({"isOnlyRealtime": True}, False, True, True),
        ({"is_only_snapshot": True, "is_only_realtime": True}, False, False, False),
    ],
)
def test_snapshot_flags_snake_and_camel_case(
    flags: dict[str, bool], snapshot: bool, realtime: bool, listed: bool
) -> None:
    s = new_session()
    out = s.receive(request({"type": "ticker", "codes": ["KRW-BTC"], **flags}), 0.0)
    assert isinstance(out, Subscribed)
    assert bool(out.snapshots) is snapshot
    assert bool(s.streams) is realtime
    assert bool(s.listed) is listed


def test_unknown_and_lower_case_codes_are_ignored_silently() -> None:
    s = new_session()
    out = s.receive(request({"type": "ticker", "codes": ["KRW-NOPE", "krw-btc", "KRW-ETH"]}), 0.0)
    assert isinstance(out, Subscribed)
    assert s.streams == (Stream("ticker", "KRW-ETH"),)
    assert s.listed[0].codes == ("KRW-ETH",)


@pytest.mark.parametrize(
    ("code", "depth"),
    [("KRW-BTC", 30), ("KRW-BTC.1", 1), ("KRW-BTC.5", 5), ("KRW-BTC.15", 15), ("KRW-BTC.30", 30),
     ("KRW-BTC.20", 30), ("KRW-BTC.3", 30)],
)  # fmt: skip
def test_orderbook_depth_suffix(code: str, depth: int) -> None:
    s = new_session()
    s.receive(request({"type": "orderbook", "codes": [code]}), 0.0)
    assert s.streams == (Stream("orderbook", "KRW-BTC", depth, 0.0),)


@pytest.mark.parametrize(
    ("code", "level", "served"),
    [
        ("KRW-BTC", 10000, True),
        ("KRW-BTC", "100000", True),
        ("KRW-BTC", 7, False),  # not a supported grouping unit
        ("BTC-ETH", 100, False),  # non-KRW markets serve level 0 only
        ("BTC-ETH", 0, True),
    ],
)
def test_orderbook_level_is_honoured_on_krw_codes_only(
    code: str, level: object, served: bool
) -> None:
    s = new_session()
    out = s.receive(request({"type": "orderbook", "codes": [code], "level": level}), 0.0)
    assert isinstance(out, Subscribed)
    assert bool(s.streams) is served
    assert bool(out.snapshots) is served
    assert s.listed[0].codes == (code,)  # still subscribed, silent or not


def test_duplicate_streams_collapse_to_one_with_the_deepest_depth() -> None:
    s = new_session()
    out = s.receive(
        request(
            {"type": "orderbook", "codes": ["KRW-BTC.5"]},
            {"type": "orderbook", "codes": ["KRW-BTC.15"]},
            {"type": "orderbook", "codes": ["KRW-BTC"], "level": 10000},
        ),
        0.0,
    )
    assert isinstance(out, Subscribed)
    assert s.streams == (
        Stream("orderbook", "KRW-BTC", 15, 0.0),
        Stream("orderbook", "KRW-BTC", 30, 10000.0),
    )
    assert len(out.snapshots) == 2


def test_format_object_anywhere_and_default_when_missing() -> None:
    s = new_session()
    s.receive(
        json.dumps(
            [{"format": "SIMPLE_LIST"}, {"type": "trade", "codes": ["KRW-BTC"]}, {"ticket": "t"}]
        ),
        0.0,
    )
    assert s.format is Format.SIMPLE_LIST
    s.receive(request({"type": "trade", "codes": ["KRW-BTC"]}), 0.1)
    assert s.format.value == "DEFAULT"


def test_list_subscriptions_reports_the_set_and_switches_the_format() -> None:
    s = new_session()
    s.receive(
        request(
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-NOPE", "KRW-ETH"]},
            {"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000},
            {"type": "trade", "codes": ["KRW-XRP"], "is_only_snapshot": True},
        ),
        0.0,
    )
    out = s.receive('[{"ticket":"list-1"},{"method":"LIST_SUBSCRIPTIONS"}]', 0.1)
    assert isinstance(out, Listed)
    assert msgspec.json.decode(out.frame) == {
        "method": "LIST_SUBSCRIPTIONS",
        "result": [
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
            {"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000},
        ],
        "ticket": "list-1",
    }
    assert s.streams  # the set is unchanged
    out = s.receive('[{"ticket":"l2"},{"method":"LIST_SUBSCRIPTIONS"},{"format":"SIMPLE"}]', 0.2)
    assert isinstance(out, Listed)
    assert s.format is Format.SIMPLE
    body = msgspec.json.decode(out.frame)
    assert body["mthd"] == "LIST_SUBSCRIPTIONS" and body["tckt"] == "l2"
    assert body["rslt"][1] == {"ty": "orderbook", "cds": ["KRW-BTC.15"], "lv": 10000}


def test_text_ping_starts_one_cycle() -> None:
    s = new_session()
    assert s.receive("PING", 0.0) == Pinged(first=True)
    assert s.receive(b"PING", 0.5) == Pinged(first=False)
    assert s.pinged


@pytest.mark.parametrize(
    ("rate", "times", "refused_at"),
    [
        ((5, 100), [i * 0.01 for i in range(6)], 5),  # sixth message in a second
        ((5, 100), [i * 0.25 for i in range(8)], None),  # 4 a second is fine
        ((50, 8), [i * 0.5 for i in range(9)], 8),  # ninth message in a minute
    ],
)
def test_message_budget_counts_every_message(
    rate: tuple[int, int], times: list[float], refused_at: int | None
) -> None:
    s = new_session(rate)
    messages = ["PING", '[{"ticket":"t"},{"method":"LIST_SUBSCRIPTIONS"}]', "garbage"]
    for i, t in enumerate(times):
        out = s.receive(messages[i % 3], t)
        limited = isinstance(out, Refused) and out.rate_limited
        assert limited is (i == refused_at), (i, out)
        if limited:
            assert error_of(out)["name"] == "Too Many Requests"
            return
    assert refused_at is None
