"""Request bytes we send and the server-side reading of what a client sent."""

from __future__ import annotations

import pytest

from broker.errors import RequestError
from broker.upbit.requests import (
    LIST_SUBSCRIPTIONS,
    ParsedRequest,
    build_error_frame,
    build_list_subscriptions_request,
    build_subscribe_request,
    parse_request,
)
from broker.upbit.types import Format, Subscription, SubscriptionSet

BUILD_TABLE: list[tuple[str, list[Subscription], Format, bytes]] = [
    (
        "one type, codes sorted",
        [Subscription("ticker", ("KRW-ETH", "KRW-BTC"))],
        Format.DEFAULT,
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC","KRW-ETH"]},{"format":"DEFAULT"}]',
    ),
    (
        "duplicates dropped",
        [Subscription("trade", ("KRW-BTC", "KRW-BTC", "BTC-ETH"))],
        Format.SIMPLE,
        b'[{"ticket":"t"},{"type":"trade","codes":["BTC-ETH","KRW-BTC"]},{"format":"SIMPLE"}]',
    ),
    (
        "objects in the given order, depth suffix kept, integral level as int",
        [
            Subscription("orderbook", ("KRW-BTC.15",), level=10000.0),
            Subscription("orderbook", ("KRW-ETH.5", "KRW-BTC")),
            Subscription("candle.1s", ("KRW-BTC",)),
        ],
        Format.JSON_LIST,
        b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC.15"],"level":10000},'
        b'{"type":"orderbook","codes":["KRW-BTC","KRW-ETH.5"]},'
        b'{"type":"candle.1s","codes":["KRW-BTC"]},{"format":"JSON_LIST"}]',
    ),
    (
        "level 0 and fractional levels",
        [
            Subscription("orderbook", ("KRW-BTC",), level=0.0),
            Subscription("orderbook", ("KRW-XRP",), level=0.1),
        ],
        Format.SIMPLE_LIST,
        b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":0},'
        b'{"type":"orderbook","codes":["KRW-XRP"],"level":0.1},{"format":"SIMPLE_LIST"}]',
    ),
    (
        "flags only when set",
        [
            Subscription("ticker", ("KRW-BTC",), is_only_snapshot=True),
            Subscription("trade", ("KRW-BTC",), is_only_realtime=True),
        ],
        Format.DEFAULT,
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"],"is_only_snapshot":true},'
        b'{"type":"trade","codes":["KRW-BTC"],"is_only_realtime":true},{"format":"DEFAULT"}]',
    ),
]


@pytest.mark.parametrize(
    ("subs", "fmt", "expected"), [t[1:] for t in BUILD_TABLE], ids=[t[0] for t in BUILD_TABLE]
)
def test_build_subscribe_request_bytes(
    subs: list[Subscription], fmt: Format, expected: bytes
) -> None:
    assert build_subscribe_request(subs, ticket="t", fmt=fmt) == expected


def test_full_set_always_and_deterministic() -> None:
    # The request carries the whole set (Upbit replaces, never adds), the same bytes every time.
    a = SubscriptionSet.of(
        {
            "ticker": ["KRW-ETH", "KRW-BTC"],
            "orderbook": ["KRW-BTC.5"],
            "orderbook@1000": ["KRW-ETH"],
        }
    )
    b = SubscriptionSet.of(
        {
            "orderbook@1000": ["KRW-ETH"],
            "orderbook": ["KRW-BTC.5"],
            "ticker": ["KRW-BTC", "KRW-ETH"],
        }
    )
    request = build_subscribe_request(a.to_subscriptions(), ticket="t")
    assert request == build_subscribe_request(b.to_subscriptions(), ticket="t")
    assert request == (
        b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC.5"]},'
        b'{"type":"orderbook","codes":["KRW-ETH"],"level":1000},'
        b'{"type":"ticker","codes":["KRW-BTC","KRW-ETH"]},{"format":"DEFAULT"}]'
    )
    parsed = parse_request(request)
    assert SubscriptionSet.from_subscriptions(parsed.subscriptions) == a


def test_flags_apply_to_every_object() -> None:
    subs = SubscriptionSet.of({"ticker": ["KRW-BTC"], "trade": ["KRW-BTC"]}).to_subscriptions(
        is_only_realtime=True
    )
    assert build_subscribe_request(subs, ticket="t", fmt=Format.SIMPLE) == (
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"],"is_only_realtime":true},'
        b'{"type":"trade","codes":["KRW-BTC"],"is_only_realtime":true},{"format":"SIMPLE"}]'
    )


@pytest.mark.parametrize(
    ("subs", "ticket", "name"),
    [
        ([Subscription("ticker", ())], "t", "NO_CODES"),
        ([Subscription("nope", ("KRW-BTC",))], "t", "INVALID_PARAM"),
        ([Subscription("myOrder", ("KRW-BTC",))], "t", "INVALID_PARAM"),
        ([], "t", "NO_TYPE"),
        ([Subscription("ticker", ("KRW-BTC",))], "", "NO_TICKET"),
        ([Subscription("orderbook", ("KRW-BTC",), level=float("nan"))], "t", "WRONG_FORMAT"),
        ([Subscription("orderbook", ("KRW-BTC",), level=float("inf"))], "t", "WRONG_FORMAT"),
        ([Subscription("orderbook", ("KRW-BTC",), level=-1.0)], "t", "WRONG_FORMAT"),
    ],
)
def test_build_refuses_what_upbit_refuses(subs: list[Subscription], ticket: str, name: str) -> None:
    with pytest.raises(RequestError) as info:
        build_subscribe_request(subs, ticket=ticket)
    assert info.value.name == name


def test_list_subscriptions_request_bytes() -> None:
    assert build_list_subscriptions_request(ticket="t") == (
        b'[{"ticket":"t"},{"method":"LIST_SUBSCRIPTIONS"}]'
    )
    assert build_list_subscriptions_request(ticket="t", fmt=Format.SIMPLE) == (
        b'[{"ticket":"t"},{"method":"LIST_SUBSCRIPTIONS"},{"format":"SIMPLE"}]'
    )
    with pytest.raises(RequestError, match="NO_TICKET"):
        build_list_subscriptions_request(ticket="")


def test_error_frame_bytes() -> None:
    assert build_error_frame("NO_TICKET", "m") == b'{"error":{"name":"NO_TICKET","message":"m"}}'


# -- parse_request -----------------------------------------------------------------------------

T = Subscription("ticker", ("KRW-BTC",))

PARSE_TABLE: list[tuple[str, bytes | str, ParsedRequest]] = [
    (
        "canonical",
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]},{"format":"DEFAULT"}]',
        ParsedRequest("t", (T,), Format.DEFAULT),
    ),
    (
        "no format object",
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]}]',
        ParsedRequest("t", (T,), None),
    ),
    (
        "format first (cryptofeed)",
        b'[{"ticket":"t"},{"format":"SIMPLE"},{"type":"ticker","codes":["KRW-BTC"]}]',
        ParsedRequest("t", (T,), Format.SIMPLE),
    ),
    (
        "ticket last",
        '[{"type":"ticker","codes":["KRW-BTC"]},{"ticket":"t"}]',
        ParsedRequest("t", (T,), None),
    ),
    (
        "camelCase flags (pyupbit, cryptofeed)",
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"],"isOnlySnapshot":true,"isOnlyRealtime":false}]',
        ParsedRequest("t", (Subscription("ticker", ("KRW-BTC",), is_only_snapshot=True),), None),
    ),
    (
        "snake_case flags",
        b'[{"ticket":"t"},{"type":"trade","codes":["KRW-BTC"],"is_only_realtime":true}]',
        ParsedRequest("t", (Subscription("trade", ("KRW-BTC",), is_only_realtime=True),), None),
    ),
    (
        "codes kept as sent (lower case and unknown codes are not errors)",
        b'[{"ticket":"t"},{"type":"ticker","codes":["krw-btc","KRW-NOPE","KRW-BTC"]}]',
        ParsedRequest("t", (Subscription("ticker", ("krw-btc", "KRW-NOPE", "KRW-BTC")),), None),
    ),
    (
        "level as number and as numeric string",
        b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC.15"],"level":10000},'
        b'{"type":"orderbook","codes":["KRW-ETH"],"level":"0.1"}]',
        ParsedRequest(
            "t",
            (
                Subscription("orderbook", ("KRW-BTC.15",), level=10000.0),
                Subscription("orderbook", ("KRW-ETH",), level=0.1),
            ),
            None,
        ),
    ),
    (
        "two objects of one type",
        b'[{"ticket":"t"},{"type":"trade","codes":["KRW-BTC"]},{"type":"trade","codes":["KRW-ETH"]}]',
        ParsedRequest(
            "t", (Subscription("trade", ("KRW-BTC",)), Subscription("trade", ("KRW-ETH",))), None
        ),
    ),
    (
        "LIST_SUBSCRIPTIONS",
        b'[{"ticket":"t"},{"method":"LIST_SUBSCRIPTIONS"}]',
        ParsedRequest("t", (), None, LIST_SUBSCRIPTIONS),
    ),
    (
        "LIST_SUBSCRIPTIONS, method before ticket, with format",
        b'[{"method":"LIST_SUBSCRIPTIONS"},{"ticket":"t"},{"format":"SIMPLE"}]',
        ParsedRequest("t", (), Format.SIMPLE, LIST_SUBSCRIPTIONS),
    ),
    (
        "whitespace and unknown keys",
        b' [ { "ticket" : "t" , "x" : 1 } , { "type" : "ticker" , "codes" : [ "KRW-BTC" ] } ] ',
        ParsedRequest("t", (T,), None),
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [t[1:] for t in PARSE_TABLE], ids=[t[0] for t in PARSE_TABLE]
)
def test_parse_request(data: bytes | str, expected: ParsedRequest) -> None:
    assert parse_request(data) == expected


REFUSE_TABLE: list[tuple[bytes, str]] = [
    (b"", "WRONG_FORMAT"),
    (b"PING", "WRONG_FORMAT"),
    (b'{"ticket":"t"}', "WRONG_FORMAT"),  # not an array
    (b'"[]"', "WRONG_FORMAT"),
    (b"[]", "WRONG_FORMAT"),
    (b'[{"ticket":"t"},5]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]}', "WRONG_FORMAT"),  # truncated
    (b'[{"ticket":"t\xff"},{"type":"ticker","codes":["KRW-BTC"]}]', "WRONG_FORMAT"),  # bad UTF-8
    (b"[" * 100_000, "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"what":1}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"format":"simple"},{"type":"ticker","codes":["KRW-BTC"]}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"format":5},{"type":"ticker","codes":["KRW-BTC"]}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"method":"NOPE"}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":5,"codes":["KRW-BTC"]}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"ticker","codes":"KRW-BTC"}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC",1]}]', "WRONG_FORMAT"),
    (
        b'[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"],"isOnlySnapshot":"yes"}]',
        "WRONG_FORMAT",
    ),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":true}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":"nan"}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":"inf"}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":"1_0"}]', "WRONG_FORMAT"),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":-1}]', "WRONG_FORMAT"),
    (
        b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":1' + b"0" * 400 + b"}]",
        "WRONG_FORMAT",
    ),
    (b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC"],"level":[1]}]', "WRONG_FORMAT"),
    (b'[{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
    (b'[{"ticket":""},{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
    (b'[{"ticket":5},{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET"),
    (b'[{"method":"LIST_SUBSCRIPTIONS"}]', "NO_TICKET"),
    (b'[{"ticket":"t"}]', "NO_TYPE"),
    (b'[{"ticket":"t"},{"format":"DEFAULT"}]', "NO_TYPE"),
    (b'[{"ticket":"t"},{"codes":["KRW-BTC"]}]', "NO_TYPE"),
    (b'[{"ticket":"t"},{"type":"ticker"}]', "NO_CODES"),
    (b'[{"ticket":"t"},{"type":"ticker","codes":[]}]', "NO_CODES"),
    (b'[{"ticket":"t"},{"type":"nope","codes":["KRW-BTC"]}]', "INVALID_PARAM"),
    (b'[{"ticket":"t"},{"type":"candle.1d","codes":["KRW-BTC"]}]', "INVALID_PARAM"),
    # private types live on /websocket/v1/private
    (b'[{"ticket":"t"},{"type":"myAsset"}]', "INVALID_AUTH"),
]


@pytest.mark.parametrize(
    ("data", "name"), REFUSE_TABLE, ids=[repr(d[:50]) for d, _ in REFUSE_TABLE]
)
def test_parse_request_refusals(data: bytes, name: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(data)
    assert info.value.name == name
    assert info.value.message


def test_invalid_type_message_names_the_type() -> None:
    with pytest.raises(RequestError, match="nope 은 지원하지 않는 타입입니다"):
        parse_request(b'[{"ticket":"t"},{"type":"nope","codes":["KRW-BTC"]}]')
