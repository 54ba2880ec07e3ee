"""Subscription sets: construction, views, union and diff (tables and properties)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.upbit.types import (
    EMPTY,
    PUBLIC_TYPES,
    DataType,
    Format,
    SetDiff,
    StreamKey,
    Subscription,
    SubscriptionSet,
    diff,
    parse_data_type,
    restrict,
    split_stream_name,
    union,
)

of = SubscriptionSet.of


def ob(code: str, level: float = 0.0) -> StreamKey:
    return StreamKey("orderbook", code, level)


# -- construction and views --------------------------------------------------------------------


def test_of_reads_depth_suffixes_and_levels() -> None:
    s = of(
        {
            "ticker": ["KRW-BTC"],
            "orderbook": ["KRW-BTC.15", "KRW-ETH", "KRW-XRP.3", "KRW-SOL.1"],
            "orderbook@10000": ["KRW-BTC.5"],
            "orderbook@0.1": ["KRW-ETH"],
        }
    )
    assert dict(s.depths) == {
        StreamKey("ticker", "KRW-BTC"): 30,
        ob("KRW-BTC"): 15,
        ob("KRW-ETH"): 30,
        ob("KRW-XRP"): 30,  # unsupported depth: Upbit serves 30
        ob("KRW-SOL"): 1,
        ob("KRW-BTC", 10000.0): 5,
        ob("KRW-ETH", 0.1): 30,
    }


def test_of_takes_the_deepest_of_repeated_codes() -> None:
    assert of({"orderbook": ["KRW-BTC.5", "KRW-BTC.15", "KRW-BTC.1"]}) == of(
        {"orderbook": ["KRW-BTC.15"]}
    )
    assert of({"orderbook": ["KRW-BTC.5", "KRW-BTC"]}) == of({"orderbook": ["KRW-BTC"]})


@pytest.mark.parametrize(
    "name", ["ticker@10", "orderbook@x", "orderbook@nan", "orderbook@-1", "orderbook@inf"]
)
def test_of_refuses_bad_stream_names(name: str) -> None:
    with pytest.raises(ValueError):
        of({name: ["KRW-BTC"]})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ticker", ("ticker", 0.0)),
        ("orderbook", ("orderbook", 0.0)),
        ("orderbook@0", ("orderbook", 0.0)),
        ("orderbook@10000", ("orderbook", 10000.0)),
        ("orderbook@1e-05", ("orderbook", 1e-05)),
        ("candle.1m", ("candle.1m", 0.0)),
    ],
)
def test_split_stream_name(name: str, expected: tuple[str, float]) -> None:
    assert split_stream_name(name) == expected


def test_by_type_is_sorted_and_names_levels() -> None:
    s = of(
        {
            "trade": ["KRW-ETH", "KRW-BTC"],
            "orderbook": ["KRW-ETH.5", "KRW-BTC"],
            "orderbook@1000": ["KRW-BTC.15"],
        }
    )
    assert s.by_type() == {
        "orderbook": ["KRW-BTC", "KRW-ETH.5"],
        "orderbook@1000": ["KRW-BTC.15"],
        "trade": ["KRW-BTC", "KRW-ETH"],
    }
    assert of(s.by_type()) == s


def test_to_subscriptions_groups_by_type_and_level() -> None:
    s = of(
        {"ticker": ["KRW-ETH", "KRW-BTC"], "orderbook": ["KRW-BTC.5"], "orderbook@10": ["KRW-BTC"]}
    )
    assert s.to_subscriptions() == [
        Subscription("orderbook", ("KRW-BTC.5",)),
        Subscription("orderbook", ("KRW-BTC",), level=10.0),
        Subscription("ticker", ("KRW-BTC", "KRW-ETH")),
    ]
    assert s.to_subscriptions(is_only_snapshot=True)[0].is_only_snapshot
    assert SubscriptionSet.from_subscriptions(s.to_subscriptions()) == s
    assert EMPTY.to_subscriptions() == []


def test_from_subscriptions_ignores_flags_and_level_outside_orderbook() -> None:
    s = SubscriptionSet.from_subscriptions(
        [
            Subscription("ticker", ("KRW-BTC",), level=5.0, is_only_realtime=True),
            Subscription("orderbook", ("KRW-BTC.1",), level=0.0),
            Subscription("orderbook", ("KRW-BTC.5",), level=None),
        ]
    )
    assert dict(s.depths) == {StreamKey("ticker", "KRW-BTC"): 30, ob("KRW-BTC"): 5}


def test_a_set_is_a_frozen_value() -> None:
    depths = {StreamKey("ticker", "KRW-BTC"): 30}
    s = SubscriptionSet(depths)
    depths[StreamKey("trade", "KRW-BTC")] = 30
    assert len(s) == 1, "the caller's dict must not change the set"
    assert hash(s) == hash(of({"ticker": ["KRW-BTC"]}))
    assert s == of({"ticker": ["KRW-BTC"]})
    assert s != of({"ticker": ["KRW-ETH"]})
    assert s != "ticker"
    assert StreamKey("ticker", "KRW-BTC") in s
    assert list(s) == [StreamKey("ticker", "KRW-BTC")]
    assert bool(s) and not bool(EMPTY)


def test_depth_invariant_is_enforced() -> None:
    # Depth means nothing outside orderbook; an unsupported orderbook depth is served as 30.
    assert SubscriptionSet({StreamKey("ticker", "KRW-BTC"): 5}) == of({"ticker": ["KRW-BTC"]})
    assert SubscriptionSet({ob("KRW-BTC"): 20}) == of({"orderbook": ["KRW-BTC"]})


def test_data_types_and_formats() -> None:
    assert parse_data_type("candle.240m") is DataType.CANDLE_240M
    with pytest.raises(ValueError):
        parse_data_type("candle.1d")
    assert {t for t in PUBLIC_TYPES if DataType(t).is_candle} == {
        f"candle.{u}" for u in ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m")
    }
    assert [f for f in Format if f.is_simple] == [Format.SIMPLE, Format.SIMPLE_LIST]
    assert [f for f in Format if f.is_list] == [Format.JSON_LIST, Format.SIMPLE_LIST]


# -- union and diff ----------------------------------------------------------------------------

UNION_TABLE: list[tuple[str, list[dict[str, list[str]]], dict[str, list[str]]]] = [
    ("nothing", [], {}),
    ("empty sets", [{}, {}], {}),
    ("one set", [{"ticker": ["KRW-BTC"]}], {"ticker": ["KRW-BTC"]}),
    (
        "disjoint",
        [{"ticker": ["KRW-BTC"]}, {"trade": ["KRW-BTC"]}],
        {"ticker": ["KRW-BTC"], "trade": ["KRW-BTC"]},
    ),
    (
        "same stream once",
        [{"ticker": ["KRW-BTC"]}, {"ticker": ["KRW-BTC"]}],
        {"ticker": ["KRW-BTC"]},
    ),
    (
        "depth max",
        [{"orderbook": ["KRW-BTC.5"]}, {"orderbook": ["KRW-BTC.15"]}],
        {"orderbook": ["KRW-BTC.15"]},
    ),
    (
        "30 is deepest",
        [{"orderbook": ["KRW-BTC.15"]}, {"orderbook": ["KRW-BTC"]}],
        {"orderbook": ["KRW-BTC"]},
    ),
    (
        "levels are separate streams",
        [{"orderbook": ["KRW-BTC.5"]}, {"orderbook@10000": ["KRW-BTC.1"]}],
        {"orderbook": ["KRW-BTC.5"], "orderbook@10000": ["KRW-BTC.1"]},
    ),
    (
        "three sets",
        [{"orderbook": ["KRW-BTC.1"]}, {"orderbook": ["KRW-BTC.5"]}, {"orderbook": ["KRW-ETH.1"]}],
        {"orderbook": ["KRW-BTC.5", "KRW-ETH.1"]},
    ),
]


@pytest.mark.parametrize(
    ("sets", "expected"), [t[1:] for t in UNION_TABLE], ids=[t[0] for t in UNION_TABLE]
)
def test_union(sets: list[dict[str, list[str]]], expected: dict[str, list[str]]) -> None:
    assert union(*(of(s) for s in sets)) == of(expected)


DIFF_TABLE: list[tuple[str, dict[str, list[str]], dict[str, list[str]], SetDiff]] = [
    ("empty to empty", {}, {}, SetDiff(frozenset(), frozenset(), frozenset())),
    (
        "from empty",
        {},
        {"ticker": ["KRW-BTC"]},
        SetDiff(frozenset({StreamKey("ticker", "KRW-BTC")}), frozenset(), frozenset()),
    ),
    (
        "to empty",
        {"ticker": ["KRW-BTC"]},
        {},
        SetDiff(frozenset(), frozenset({StreamKey("ticker", "KRW-BTC")}), frozenset()),
    ),
    (
        "same",
        {"orderbook": ["KRW-BTC.5"]},
        {"orderbook": ["KRW-BTC.5"]},
        SetDiff(frozenset(), frozenset(), frozenset()),
    ),
    (
        "deeper",
        {"orderbook": ["KRW-BTC.5"]},
        {"orderbook": ["KRW-BTC.15"]},
        SetDiff(frozenset(), frozenset(), frozenset({ob("KRW-BTC")})),
    ),
    (
        "level change is remove + add",
        {"orderbook": ["KRW-BTC"]},
        {"orderbook@10": ["KRW-BTC"]},
        SetDiff(frozenset({ob("KRW-BTC", 10.0)}), frozenset({ob("KRW-BTC")}), frozenset()),
    ),
    (
        "mixed",
        {"ticker": ["KRW-BTC", "KRW-ETH"], "orderbook": ["KRW-BTC.1"]},
        {"ticker": ["KRW-ETH", "KRW-XRP"], "orderbook": ["KRW-BTC"]},
        SetDiff(
            frozenset({StreamKey("ticker", "KRW-XRP")}),
            frozenset({StreamKey("ticker", "KRW-BTC")}),
            frozenset({ob("KRW-BTC")}),
        ),
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "expected"), [t[1:] for t in DIFF_TABLE], ids=[t[0] for t in DIFF_TABLE]
)
def test_diff(old: dict[str, list[str]], new: dict[str, list[str]], expected: SetDiff) -> None:
    result = diff(of(old), of(new))
    assert result == expected
    assert bool(result) == (old != new)


def test_restrict() -> None:
    s = of({"ticker": ["KRW-BTC", "KRW-ETH"], "orderbook": ["KRW-BTC.5"]})
    assert restrict(s, [StreamKey("ticker", "KRW-ETH"), ob("KRW-BTC"), ob("KRW-XRP")]) == of(
        {"ticker": ["KRW-ETH"], "orderbook": ["KRW-BTC.5"]}
    )
    assert restrict(s, []) == EMPTY


# -- properties --------------------------------------------------------------------------------

CODES = st.sampled_from(["KRW-BTC", "KRW-ETH", "BTC-ETH", "USDT-SOL", "KRW-1INCH"])
LEVELS = st.sampled_from([0.0, 0.0, 0.1, 1000.0, 10000.0, 1e-07])
DEPTHS = st.sampled_from([1, 5, 15, 30])
KEYS = st.one_of(
    st.builds(
        StreamKey, st.sampled_from(sorted(PUBLIC_TYPES - {"orderbook"})), CODES, st.just(0.0)
    ),
    st.builds(StreamKey, st.just("orderbook"), CODES, LEVELS),
)
SETS = st.dictionaries(KEYS, DEPTHS, max_size=12).map(SubscriptionSet)


@settings(max_examples=100, deadline=None)
@given(SETS, SETS, SETS)
def test_union_is_commutative_associative_idempotent(
    a: SubscriptionSet, b: SubscriptionSet, c: SubscriptionSet
) -> None:
    assert union(a, b) == union(b, a)
    assert union(union(a, b), c) == union(a, union(b, c)) == union(a, b, c)
    assert union(a, a) == a
    assert union(a, EMPTY) == a
    assert union() == EMPTY


@settings(max_examples=100, deadline=None)
@given(SETS, SETS)
def test_union_covers_both_sides(a: SubscriptionSet, b: SubscriptionSet) -> None:
    u = union(a, b)
    assert diff(a, u).removed == frozenset()
    assert diff(b, u).removed == frozenset()
    assert u.keys() == a.keys() | b.keys()
    for key, depth in u.depths.items():
        assert depth == max(a.depths.get(key, 0), b.depths.get(key, 0))


@settings(max_examples=100, deadline=None)
@given(SETS, SETS)
def test_diff_explains_the_change(a: SubscriptionSet, b: SubscriptionSet) -> None:
    d = diff(a, b)
    assert d.added == b.keys() - a.keys()
    assert d.removed == a.keys() - b.keys()
    assert not d.added & d.removed
    assert bool(d) == (a != b)
    assert not diff(a, a)


@settings(max_examples=100, deadline=None)
@given(SETS)
def test_views_round_trip(s: SubscriptionSet) -> None:
    assert SubscriptionSet.from_subscriptions(s.to_subscriptions()) == s
    assert of(s.by_type()) == s
    subs = s.to_subscriptions()
    assert subs == sorted(subs, key=lambda x: (x.type, x.level or 0.0))
    for sub in subs:
        assert list(sub.codes) == sorted(sub.codes)
        assert sub.level is None or (sub.type == "orderbook" and math.isfinite(sub.level))


@settings(max_examples=100, deadline=None)
@given(SETS, SETS)
def test_views_are_computed_once_and_handed_out_as_copies(
    a: SubscriptionSet, b: SubscriptionSet
) -> None:
    # The status reads these views every second over the whole market: they are remembered
    # per set (a frozen value), so a caller that changes what it was given must not change
    # what the next caller gets, and a union built without __init__ has views of its own.
    for s in (a, union(a, b)):
        first = s.by_type()
        expected = {name: list(codes) for name, codes in first.items()}
        for codes in first.values():
            codes.append("KRW-CHANGED")
        first["trade"] = ["KRW-INSERTED"]
        assert s.by_type() == expected
        assert list(s) == sorted(s.depths)
        assert list(s) == list(s)
        assert s.keys() == frozenset(s.depths) and s.keys() is s.keys()
        assert of(s.by_type()) == s
