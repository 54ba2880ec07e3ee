"""Every recorded Upbit example has an explicit, tested outcome.

The examples live in ``tests/data/upbit_examples/``: copies of ``../shared/upbit/examples``
(where they came from and how to refresh them: ``PROVENANCE.md`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from broker.errors import FrameError
from broker.upbit.codes import is_valid_code
from broker.upbit.messages import (
    Candle,
    ErrorFrame,
    LegacyFrameError,
    ListSubscriptionsReply,
    MyAsset,
    MyOrder,
    Orderbook,
    StatusUp,
    Ticker,
    Trade,
    decode_frames,
    decode_message,
)
from broker.upbit.requests import (
    LIST_SUBSCRIPTIONS,
    build_list_subscriptions_request,
    build_subscribe_request,
    parse_request,
)
from broker.upbit.router import FrameKind, route_frame
from broker.upbit.types import Format, Subscription

#: the in-repository copies the tests read
EXAMPLES = Path(__file__).resolve().parent / "data" / "upbit_examples"
#: their origin, beside the repository (present on the project's machines, not in a clone elsewhere)
SHARED_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "upbit" / "examples"


def example_names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.json") if p.is_file()}


# -- expectations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A server frame: ``decode_frames`` gives ``classes``; ``route_frame`` gives ``route``."""

    classes: tuple[type, ...]
    route: FrameKind


@dataclass(frozen=True)
class Refused:
    """A frame the decoder refuses with ``error`` (and the router drops as MALFORMED)."""

    error: type[FrameError]


@dataclass(frozen=True)
class Request:
    """A client request: ``parse_request`` reads these subscriptions, format and method."""

    subscriptions: tuple[Subscription, ...]
    format: Format | None
    method: str | None = None


class _RestError(msgspec.Struct, forbid_unknown_fields=True):
    name: int
    message: str


class _RestErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    error: _RestError


class _Market(msgspec.Struct, forbid_unknown_fields=True):
    market: str
    korean_name: str
    english_name: str


@dataclass(frozen=True)
class Rest:
    """A REST body (not a WebSocket frame): plain JSON of the documented ``shape``."""

    shape: object


EXPECTED: dict[str, Frame | Refused | Request | Rest] = {
    "candle.15m.default.json": Frame((Candle,), FrameKind.DATA),
    "candle.1m.default.json": Frame((Candle,), FrameKind.DATA),
    "candle.1s.default.ccxt-2025-04.json": Frame((Candle,), FrameKind.DATA),
    "candle.1s.default.json": Frame((Candle,), FrameKind.DATA),
    # A SIMPLE_LIST frame is an array: the router takes one object, decode_frames the array.
    "candle.1s.simple_list.json": Frame((Candle,), FrameKind.MALFORMED),
    "error.INVALID_AUTH.global-en.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.INVALID_AUTH.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.INVALID_PARAM.id-region.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.INVALID_PARAM.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.NO_CODES.id-region.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.NO_TICKET.id-region.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.NO_TICKET.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.WRONG_FORMAT.id-region.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.WRONG_FORMAT.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "error.template.json": Frame((ErrorFrame,), FrameKind.ERROR),
    "list_subscriptions.json": Frame((ListSubscriptionsReply,), FrameKind.LIST_REPLY),
    "list_subscriptions.private.json": Frame((ListSubscriptionsReply,), FrameKind.LIST_REPLY),
    "myAsset.default.json": Frame((MyAsset,), FrameKind.DATA),
    "myOrder.default.json": Frame((MyOrder,), FrameKind.DATA),
    "orderbook.default.json": Frame((Orderbook,), FrameKind.DATA),
    "orderbook.default.realtime.wire-2026-09.trimmed.json": Frame((Orderbook,), FrameKind.DATA),
    "orderbook.default.wire-2026-09.trimmed.json": Frame((Orderbook,), FrameKind.DATA),
    "orderbook.simple.2020-15units.json": Frame((Orderbook,), FrameKind.DATA),
    "orderbook.simple.wire-2026-09.trimmed.json": Frame((Orderbook,), FrameKind.DATA),
    "request.best_practice_add_trade.json": Request(
        (
            Subscription("orderbook", ("KRW-BTC.1",)),
            Subscription("trade", ("KRW-BTC",)),
        ),
        None,
    ),
    "request.list_subscriptions.json": Request((), None, LIST_SUBSCRIPTIONS),
    "request.orderbook_level_and_count.json": Request(
        (
            Subscription("orderbook", ("KRW-BTC.15",), level=10000.0),
            Subscription("orderbook", ("KRW-ETH.5",), level=1000.0),
        ),
        Format.SIMPLE_LIST,
    ),
    "request.subscribe.multi_simple.json": Request(
        (
            Subscription("trade", ("KRW-BTC", "BTC-BCH")),
            Subscription("orderbook", ("KRW-BTC", "BTC-BCH")),
        ),
        Format.SIMPLE,
    ),
    "rest.error.400.spec.json": Rest(_RestErrorBody),
    "rest.error.404.spec.json": Rest(_RestErrorBody),
    "rest.market_all.sample-2021.json": Rest(list[_Market]),
    "status_up.json": Frame((StatusUp,), FrameKind.STATUS),
    "ticker.default.json": Frame((Ticker,), FrameKind.DATA),
    # 2018 docs: `market` instead of `code`, no `type`; current Upbit never sends this.
    "ticker.legacy-2018.default.json": Refused(LegacyFrameError),
    "ticker.simple.json": Frame((Ticker,), FrameKind.DATA),
    "trade.default.json": Frame((Trade,), FrameKind.DATA),
    "trade.default.live-2026-09.json": Frame((Trade,), FrameKind.DATA),
    "trade.json_list.json": Frame((Trade, Trade), FrameKind.MALFORMED),
    "trade.simple.json": Frame((Trade,), FrameKind.DATA),
    # 2018 docs: SIMPLE with `mk` instead of `cd`, no `ty`.
    "trade.simple.legacy-2018.json": Refused(LegacyFrameError),
}


def test_examples_directory_exists() -> None:
    assert example_names(EXAMPLES), f"no Upbit examples in {EXAMPLES}"
    assert (EXAMPLES / "PROVENANCE.md").is_file()


def test_copies_match_the_shared_examples() -> None:
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip(f"{SHARED_EXAMPLES} is not there to compare with")
    shared = {p.name for p in SHARED_EXAMPLES.iterdir() if p.is_file()}
    copied = example_names(EXAMPLES)
    how = "refresh them as tests/data/upbit_examples/PROVENANCE.md says"
    assert sorted(shared - copied) == [], f"shared examples not copied: {how}"
    assert sorted(copied - shared) == [], f"copies whose original is gone: {how}"
    differ = [
        n
        for n in sorted(shared)
        if (SHARED_EXAMPLES / n).read_bytes() != (EXAMPLES / n).read_bytes()
    ]
    assert differ == [], f"copies differ from the shared examples: {how}"


def test_every_example_has_an_expectation() -> None:
    present = example_names(EXAMPLES)
    assert sorted(present - set(EXPECTED)) == [], "new example files: add their outcome here"
    assert sorted(set(EXPECTED) - present) == [], "expected example files are missing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str) -> None:
    data = (EXAMPLES / name).read_bytes()
    expected = EXPECTED[name]
    if isinstance(expected, Frame):
        _check_frame(data, expected)
    elif isinstance(expected, Refused):
        assert route_frame(data).kind is FrameKind.MALFORMED
        with pytest.raises(expected.error, match="legacy"):
            decode_message(data)
        with pytest.raises(expected.error):
            decode_frames(data)
    elif isinstance(expected, Request):
        _check_request(data, expected)
    else:
        msgspec.json.decode(data, type=expected.shape)


def _check_frame(data: bytes, expected: Frame) -> None:
    messages = decode_frames(data)
    assert tuple(type(m) for m in messages) == expected.classes
    route = route_frame(data)
    assert route.kind is expected.route
    if route.kind is not FrameKind.MALFORMED:
        assert decode_message(data) == messages[0]
    if route.kind is FrameKind.DATA:
        message = messages[0]
        assert route.type == message.type  # type: ignore[union-attr]
        assert route.code == (getattr(message, "code", None) or "")
        assert route.stream_type == message.stream_type  # type: ignore[union-attr]
        assert route.level == getattr(message, "level", 0.0)
    for message in messages:
        if isinstance(message, Ticker | Trade | Orderbook | Candle):
            assert is_valid_code(message.code)
            assert message.stream_type in ("SNAPSHOT", "REALTIME")


def _check_request(data: bytes, expected: Request) -> None:
    parsed = parse_request(data)
    assert parsed.subscriptions == expected.subscriptions
    assert parsed.format == expected.format
    assert parsed.method == expected.method
    assert parsed.ticket
    if parsed.method is not None:
        rebuilt = build_list_subscriptions_request(ticket=parsed.ticket, fmt=parsed.format)
        again = parse_request(rebuilt)
        assert (again.ticket, again.method, again.format) == (
            parsed.ticket,
            parsed.method,
            parsed.format,
        )
        return
    rebuilt = build_subscribe_request(
        parsed.subscriptions, ticket=parsed.ticket, fmt=parsed.format or Format.DEFAULT
    )
    again = parse_request(rebuilt)
    assert again.ticket == parsed.ticket
    assert again.format == (parsed.format or Format.DEFAULT)
    # The builder sorts codes; everything else survives unchanged.
    assert again.subscriptions == tuple(
        Subscription(s.type, tuple(sorted(s.codes)), s.level) for s in parsed.subscriptions
    )
    assert (
        build_subscribe_request(
            again.subscriptions, ticket=again.ticket, fmt=again.format or Format.DEFAULT
        )
        == rebuilt
    )


def test_rest_market_codes_are_valid() -> None:
    markets = msgspec.json.decode(
        (EXAMPLES / "rest.market_all.sample-2021.json").read_bytes(), type=list[_Market]
    )
    assert [m.market for m in markets] == ["KRW-BTC", "KRW-ETH", "BTC-ETH", "BTC-LTC", "USDT-BTC"]
    assert all(is_valid_code(m.market) for m in markets)


def test_error_examples_become_typed_errors() -> None:
    for name, expected in EXPECTED.items():
        if isinstance(expected, Frame) and expected.route is FrameKind.ERROR:
            message = decode_message((EXAMPLES / name).read_bytes())
            assert isinstance(message, ErrorFrame)
            assert name.split(".")[1] in (message.name, "template")
            assert message.message
            assert message.to_exception().name == message.name
