"""The lease store: pure parse/encode rules, then every Redis behaviour against a real server."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from broker.errors import LeaseError
from broker.leases import (
    LEASE_LUA,
    RELEASE_LUA,
    Lease,
    LeaseArgs,
    LeaseStore,
    ParsedSubs,
    Rejected,
    encode_lease_fields,
    lease_args,
    parse_lease,
)
from broker.testing import RedisServer, wait_for
from broker.upbit.types import StreamKey, SubscriptionSet

NS = "t"

# -- pure: parse_lease ------------------------------------------------------------------------


def _fields(**overrides: str | None) -> dict[str, str]:
    fields = {
        "v": "1",
        "client_id": "c1",
        "host": "box",
        "pid": "42",
        "subs": '{"ticker":["KRW-BTC"]}',
        "ttl_ms": "10000",
        "created_ms": "1000",
        "renewed_ms": "2000",
        "deadline_ms": "12000",
    }
    for name, value in overrides.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    return fields


def _subs(obj: Any) -> str:
    return json.dumps(obj)


def test_a_memo_skips_revalidating_unchanged_subs_and_never_hides_a_bad_one() -> None:
    memo: dict[str, ParsedSubs] = {}
    first = parse_lease("c1", _fields(), memo=memo)
    again = parse_lease("c1", _fields(renewed_ms="3000"), memo=memo)
    assert again.subscriptions is first.subscriptions  # the same validated value
    assert again.renewed_ms == 3000  # everything but subs is read every time
    changed = parse_lease("c1", _fields(subs=_subs({"trade": ["KRW-ETH"]})), memo=memo)
    assert changed.subscriptions == SubscriptionSet({StreamKey("trade", "KRW-ETH"): 30})
    bad = _subs({"ticker": ["krw-btc"]})
    for _ in range(2):  # an invalid text is never remembered as valid
        with pytest.raises(LeaseError):
            parse_lease("c1", _fields(subs=bad), memo=memo)
    assert bad not in memo and len(memo) == 2


PARTIAL_LEASES: list[tuple[str, Any, dict[str, list[str]], list[Rejected]]] = [
    (
        "a lower-case code",
        {"ticker": ["KRW-BTC", "krw-eth"]},
        {"ticker": ["KRW-BTC"]},
        [Rejected("ticker", "krw-eth", "invalid market code 'krw-eth' in ticker")],
    ),
    (
        "an unknown stream",
        {"trade": ["KRW-BTC"], "tradee": ["KRW-ETH", "KRW-XRP"]},
        {"trade": ["KRW-BTC"]},
        [
            Rejected("tradee", code, "unknown stream 'tradee': unknown data type 'tradee'")
            for code in ("KRW-ETH", "KRW-XRP")
        ],
    ),
    (
        "a bad depth suffix",
        {"orderbook": ["KRW-BTC.5", "KRW-ETH.x"]},
        {"orderbook": ["KRW-BTC.5"]},
        [Rejected("orderbook", "KRW-ETH.x", "invalid orderbook depth suffix in 'KRW-ETH.x'")],
    ),
]


@pytest.mark.parametrize(
    ("subs", "served", "rejected"),
    [c[1:] for c in PARTIAL_LEASES],
    ids=[c[0] for c in PARTIAL_LEASES],
)
def test_a_bad_entry_is_rejected_alone_and_the_rest_is_served(
    subs: Any, served: dict[str, list[str]], rejected: list[Rejected]
) -> None:
    memo: dict[str, ParsedSubs] = {}
    lease = parse_lease("c1", _fields(subs=_subs(subs)), memo=memo)
    assert lease.subs_by_type() == served
    assert list(lease.rejected) == rejected
    by_stream: dict[str, list[str]] = {}
    for entry in rejected:
        by_stream.setdefault(entry.stream, []).append(entry.code)
    assert lease.rejected_by_type() == by_stream
    again = parse_lease("c1", _fields(subs=_subs(subs)), memo=memo)
    assert again.subscriptions is lease.subscriptions and again.rejected == lease.rejected


def test_a_lease_whose_every_entry_is_rejected_is_invalid_and_says_why() -> None:
    subs = _subs({"ticker": ["krw-btc", "KRW-*"], "tick": ["KRW-BTC"]})
    with pytest.raises(LeaseError) as info:
        parse_lease("c1", _fields(subs=subs))
    assert str(info.value) == (
        "nothing in subs can be served: invalid market code 'krw-btc' in ticker; invalid "
        "market code 'KRW-*' in ticker; unknown stream 'tick': unknown data type 'tick'"
    )


BAD_LEASES: list[tuple[str, dict[str, str], str]] = [
    ("not json", _fields(subs="{nope"), "not JSON"),
    ("json list", _fields(subs='["KRW-BTC"]'), "not JSON"),
    ("codes not a list", _fields(subs=_subs({"ticker": "KRW-BTC"})), "not JSON"),
    ("code not a string", _fields(subs=_subs({"ticker": [1]})), "not JSON"),
    ("unknown type", _fields(subs=_subs({"myOrder": ["KRW-BTC"]})), "unknown stream"),
    ("level on ticker", _fields(subs=_subs({"ticker@10": ["KRW-BTC"]})), "unknown stream"),
    ("empty level", _fields(subs=_subs({"orderbook@": ["KRW-BTC"]})), "unknown stream"),
    ("nan level", _fields(subs=_subs({"orderbook@nan": ["KRW-BTC"]})), "unknown stream"),
    ("inf level", _fields(subs=_subs({"orderbook@inf": ["KRW-BTC"]})), "unknown stream"),
    ("negative level", _fields(subs=_subs({"orderbook@-5": ["KRW-BTC"]})), "unknown stream"),
    ("spaced level", _fields(subs=_subs({"orderbook@ 10": ["KRW-BTC"]})), "unknown stream"),
    ("star code", _fields(subs=_subs({"ticker": ["KRW-*"]})), "invalid market code"),
    ("question code", _fields(subs=_subs({"trade": ["KRW-BT?"]})), "invalid market code"),
    ("space code", _fields(subs=_subs({"ticker": ["KRW BTC"]})), "invalid market code"),
    ("newline code", _fields(subs=_subs({"ticker": ["KRW-BTC\n"]})), "invalid market code"),
    ("lower case", _fields(subs=_subs({"ticker": ["krw-btc"]})), "invalid market code"),
    ("suffix off orderbook", _fields(subs=_subs({"ticker": ["KRW-BTC.5"]})), "invalid market"),
    ("star before suffix", _fields(subs=_subs({"orderbook": ["KRW-*.5"]})), "invalid market"),
    ("word suffix", _fields(subs=_subs({"orderbook": ["KRW-BTC.x"]})), "depth suffix"),
    ("newline suffix", _fields(subs=_subs({"orderbook": ["KRW-BTC.\n5"]})), "depth suffix"),
    ("missing subs", _fields(subs=None), "lacks field(s) subs"),
    ("missing deadline", _fields(deadline_ms=None), "deadline_ms"),
    ("empty hash", {}, "lacks field(s) v, client_id"),
    ("version 2", _fields(v="2"), "version"),
    ("other client", _fields(client_id="c2"), "another client"),
    ("pid not int", _fields(pid="abc"), "pid is not an integer"),
    ("float ms", _fields(created_ms="1.5"), "created_ms is not an integer"),
    ("unicode digits", _fields(renewed_ms="١٢"), "renewed_ms is not an integer"),
    ("underscore int", _fields(ttl_ms="1_000"), "ttl_ms is not an integer"),
    ("zero ttl", _fields(ttl_ms="0"), "ttl_ms 0"),
]


@pytest.mark.parametrize(
    ("fields", "reason"), [c[1:] for c in BAD_LEASES], ids=[c[0] for c in BAD_LEASES]
)
def test_parse_lease_rejects(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(LeaseError, match=None) as info:
        parse_lease("c1", fields)
    assert reason in str(info.value)


def test_parse_lease_rejects_too_many_streams() -> None:
    codes = [f"KRW-C{i}" for i in range(6)]
    fields = _fields(subs=_subs({"ticker": codes}))
    assert len(parse_lease("c1", fields, max_streams=6).subscriptions) == 6
    with pytest.raises(LeaseError, match="6 streams, more than 5"):
        parse_lease("c1", fields, max_streams=5)


def test_parse_lease_rejects_huge_subs_before_decoding() -> None:
    with pytest.raises(LeaseError, match="too large"):
        parse_lease("c1", _fields(subs="[" * 100_000), max_streams=10)


def test_parse_lease_rejects_bad_bytes_and_bad_client_id() -> None:
    with pytest.raises(LeaseError, match="not UTF-8"):
        parse_lease("c1", {b"v": b"\xff"})
    with pytest.raises(LeaseError, match="invalid client id"):
        parse_lease("bad id*", _fields())


def test_parse_lease_reads_every_field_from_bytes() -> None:
    subs = {
        "ticker": ["KRW-BTC", "KRW-ETH"],
        "orderbook": ["KRW-BTC.15", "KRW-XRP.3", "KRW-XRP"],
        "orderbook@10000": ["KRW-BTC.5"],
        "orderbook@0.1": ["KRW-DOGE"],
        "candle.1m": [],
    }
    raw = {k.encode(): v.encode() for k, v in _fields(subs=_subs(subs)).items()}
    lease = parse_lease("c1", raw)
    assert lease == Lease(
        client_id="c1",
        host="box",
        pid=42,
        subscriptions=SubscriptionSet(
            {
                StreamKey("ticker", "KRW-BTC"): 30,
                StreamKey("ticker", "KRW-ETH"): 30,
                StreamKey("orderbook", "KRW-BTC"): 15,
                StreamKey("orderbook", "KRW-XRP"): 30,  # .3 is served as 30, as Upbit does
                StreamKey("orderbook", "KRW-BTC", 10000.0): 5,
                StreamKey("orderbook", "KRW-DOGE", 0.1): 30,
            }
        ),
        ttl_ms=10000,
        created_ms=1000,
        renewed_ms=2000,
        deadline_ms=12000,
    )
    assert lease.expires_in_ms(11000) == 1000
    assert lease.expires_in_ms(13000) == -1000
    assert lease.subs_by_type() == {
        "orderbook": ["KRW-BTC.15", "KRW-XRP"],
        "orderbook@0.1": ["KRW-DOGE"],
        "orderbook@10000": ["KRW-BTC.5"],
        "ticker": ["KRW-BTC", "KRW-ETH"],
    }


def test_parse_lease_accepts_empty_subscriptions() -> None:
    assert parse_lease("c1", _fields(subs="{}")).subscriptions == SubscriptionSet()


def test_encode_parse_round_trip() -> None:
    subs = SubscriptionSet(
        {
            StreamKey("trade", "KRW-BTC"): 30,
            StreamKey("orderbook", "KRW-ETH"): 1,
            StreamKey("orderbook", "BTC-ETH", 1e-05): 15,
        }
    )
    fields = encode_lease_fields(
        "c1", subs, ttl_ms=500, host="h", pid=7, created_ms=1, renewed_ms=2, deadline_ms=502
    )
    assert set(fields) == {
        "v",
        "client_id",
        "host",
        "pid",
        "subs",
        "ttl_ms",
        "created_ms",
        "renewed_ms",
        "deadline_ms",
    }
    lease = parse_lease("c1", fields)
    assert lease.subscriptions == subs
    assert (lease.ttl_ms, lease.created_ms, lease.renewed_ms, lease.deadline_ms) == (500, 1, 2, 502)


@pytest.mark.parametrize(
    ("client_id", "subs", "ttl_ms"),
    [
        ("c 1", SubscriptionSet(), 1000),
        ("c1", SubscriptionSet(), 0),
        ("c1", SubscriptionSet({StreamKey("ticker", "KRW-*"): 30}), 1000),
        ("c1", SubscriptionSet({StreamKey("myOrder", "KRW-BTC"): 30}), 1000),
        ("c1", SubscriptionSet({StreamKey("ticker", "KRW-BTC", 10.0): 30}), 1000),
        ("c1", SubscriptionSet({StreamKey("orderbook", "KRW-BTC", float("nan")): 30}), 1000),
    ],
)
def test_encode_rejects_what_no_broker_would_accept(
    client_id: str, subs: SubscriptionSet, ttl_ms: int
) -> None:
    with pytest.raises(LeaseError):
        encode_lease_fields(client_id, subs, ttl_ms=ttl_ms, host="h", pid=1)


_field_names = st.sampled_from([*_fields(), "x"])
_stream_names = st.sampled_from(["ticker", "orderbook", "orderbook@10", "candle.1m", "x@1"])
_codes = st.one_of(st.sampled_from(["KRW-BTC", "KRW-BTC.5", "KRW-*", "KRW-BTC.\n"]), st.text())
_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
_subs_text = st.one_of(
    st.text(),
    _json.map(json.dumps),
    st.dictionaries(_stream_names | st.text(), st.lists(_codes, max_size=4)).map(json.dumps),
)


@given(st.dictionaries(st.text(), st.text()), st.text())
def test_parse_lease_arbitrary_text_only_raises_lease_error(
    fields: dict[str, str], client_id: str
) -> None:
    with contextlib.suppress(LeaseError):
        parse_lease(client_id, fields)


@given(
    st.dictionaries(_field_names, st.text() | st.integers().map(str)),
    _subs_text,
    st.integers(min_value=0, max_value=10),
)
def test_parse_lease_near_valid_only_raises_lease_error(
    overrides: dict[str, str], subs: str, max_streams: int
) -> None:
    fields = {**_fields(subs=subs), **overrides}
    try:
        lease = parse_lease("c1", fields, max_streams=max_streams)
    except LeaseError:
        return
    # whatever parses names only keys that are safe to build channel names from
    assert len(lease.subscriptions) <= max_streams
    for key in lease.subscriptions:
        assert "*" not in key.code and "\n" not in key.code and " " not in key.code


@given(st.dictionaries(st.binary(), st.binary()))
def test_parse_lease_arbitrary_bytes_only_raises_lease_error(fields: dict[bytes, bytes]) -> None:
    with contextlib.suppress(LeaseError):
        parse_lease("c1", fields)


# -- against a real redis-server --------------------------------------------------------------

SUBS = SubscriptionSet(
    {
        StreamKey("ticker", "KRW-BTC"): 30,
        StreamKey("orderbook", "KRW-ETH"): 5,
        StreamKey("orderbook", "KRW-BTC", 10000.0): 15,
    }
)
ALL_FIELDS = {
    "v",
    "client_id",
    "host",
    "pid",
    "subs",
    "ttl_ms",
    "created_ms",
    "renewed_ms",
    "deadline_ms",
}


@pytest.fixture
def store(redis_client: aioredis.Redis) -> LeaseStore:
    return LeaseStore(redis_client, NS)


async def _server_ms(r: aioredis.Redis) -> int:
    seconds, micros = await r.time()
    return seconds * 1000 + micros // 1000


async def _write_raw(r: aioredis.Redis, client_id: str, fields: dict[str, str], score: int) -> None:
    await r.hset(f"{NS}:lease:{client_id}", mapping=fields)  # type: ignore[arg-type]
    await r.zadd(f"{NS}:leases", {client_id: score})


async def test_write_read_round_trip(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    before = await _server_ms(redis_client)
    lease = await store.write("c1", SUBS, ttl_ms=10_000, host="box", pid=42)
    after = await _server_ms(redis_client)

    assert (lease.client_id, lease.host, lease.pid, lease.ttl_ms) == ("c1", "box", 42, 10_000)
    assert lease.subscriptions == SUBS
    # every timestamp is the server's clock, bracketed by TIME before and after
    assert before <= lease.created_ms == lease.renewed_ms <= after
    assert lease.deadline_ms == lease.renewed_ms + 10_000
    assert await store.read("c1") == lease

    raw = await redis_client.hgetall(f"{NS}:lease:c1")
    assert set(raw) == {f.encode() for f in ALL_FIELDS}
    assert raw[b"v"] == b"1"
    assert json.loads(raw[b"subs"]) == {
        "orderbook": ["KRW-ETH.5"],
        "orderbook@10000": ["KRW-BTC.15"],
        "ticker": ["KRW-BTC"],
    }
    assert await redis_client.zscore(f"{NS}:leases", "c1") == lease.deadline_ms
    assert 9_000 < await redis_client.pttl(f"{NS}:lease:c1") <= 10_000


async def test_renew_keeps_created_and_advances_renewed(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    first = await store.write("c1", SUBS, ttl_ms=10_000, host="box", pid=42)

    async def server_moved() -> bool:
        return await _server_ms(redis_client) > first.renewed_ms

    await wait_for(server_moved, message="server clock to pass renewed_ms")
    second = await store.renew("c1", SubscriptionSet(), ttl_ms=3_000, host="box", pid=42)
    assert second.created_ms == first.created_ms
    assert second.renewed_ms > first.renewed_ms
    assert second.deadline_ms == second.renewed_ms + 3_000
    stored = await store.read("c1")
    assert stored == second
    assert stored is not None and stored.subscriptions == SubscriptionSet()  # empty is valid
    assert await redis_client.zscore(f"{NS}:leases", "c1") == second.deadline_ms
    assert 0 < await redis_client.pttl(f"{NS}:lease:c1") <= 3_000


async def test_write_replaces_stray_fields_and_bad_created(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    await redis_client.hset(f"{NS}:lease:c1", mapping={"created_ms": "nan", "junk": "x"})
    lease = await store.write("c1", SUBS, ttl_ms=1_000, host="h", pid=1)
    assert lease.created_ms == lease.renewed_ms
    assert set(await redis_client.hgetall(f"{NS}:lease:c1")) == {f.encode() for f in ALL_FIELDS}

    await redis_client.delete(f"{NS}:lease:c1")
    await redis_client.set(f"{NS}:lease:c1", "not a hash")
    assert (await store.write("c1", SUBS, ttl_ms=1_000, host="h", pid=1)).subscriptions == SUBS


async def test_control_channel_on_write_and_release(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(f"{NS}:control")

        async def next_message() -> bytes | None:
            msg = await pubsub.get_message(timeout=0.05)
            return None if msg is None else msg["data"]

        # the subscribe confirmation is swallowed by get_message; wait until it is in place
        async def subscribed() -> bool:
            return bool((await redis_client.pubsub_numsub(f"{NS}:control"))[0][1])

        await wait_for(subscribed, message="subscription")
        await store.write("c1", SUBS, ttl_ms=1_000, host="h", pid=1)
        assert await wait_for(next_message, message="lease message") == b"lease c1"
        assert await store.release("c1") is True
        assert await wait_for(next_message, message="release message") == b"release c1"
    finally:
        await pubsub.aclose()

    assert await redis_client.exists(f"{NS}:lease:c1") == 0
    assert await redis_client.zscore(f"{NS}:leases", "c1") is None
    assert await store.release("c1") is False
    assert await store.read("c1") is None


async def test_write_many_writes_and_releases_as_write_and_release_do(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    await store.write("gone", SUBS, ttl_ms=10_000, host="h", pid=1)
    await store.write("w", SUBS, ttl_ms=10_000, host="box", pid=7)  # by write(), to compare
    ops: list[tuple[str, LeaseArgs | None]] = [
        ("a", lease_args("a", SUBS, ttl_ms=10_000, host="box", pid=7)),
        ("bad", LeaseArgs("bad", "1000", '["KRW-BTC"]', "h", "1")),  # lease.lua refuses it
        ("gone", None),
        ("b", lease_args("b", SubscriptionSet(), ttl_ms=5_000, host="h2", pid=8)),
    ]
    refusals = await store.write_many(ops, chunk=3)  # two pipelines
    assert [r is None for r in refusals] == [True, False, True, True]
    assert isinstance(refusals[1], ResponseError) and "SUBS must be" in str(refusals[1])

    a = await store.read("a")
    assert a is not None and (a.host, a.pid, a.ttl_ms, a.subscriptions) == ("box", 7, 10_000, SUBS)
    raw_a = await redis_client.hgetall(f"{NS}:lease:a")
    raw_w = await redis_client.hgetall(f"{NS}:lease:w")
    clock = {b"client_id", b"created_ms", b"renewed_ms", b"deadline_ms"}
    assert {k: v for k, v in raw_a.items() if k not in clock} == {
        k: v for k, v in raw_w.items() if k not in clock
    }  # the very hash write() makes
    assert await redis_client.zscore(f"{NS}:leases", "a") == a.deadline_ms
    b = await store.read("b")
    assert b is not None and (b.host, b.pid, b.ttl_ms) == ("h2", 8, 5_000)
    assert await store.read("gone") is None and await store.read("bad") is None
    assert await redis_client.zscore(f"{NS}:leases", "gone") is None

    async def server_moved() -> bool:
        return await _server_ms(redis_client) > a.renewed_ms

    await wait_for(server_moved, message="server clock to pass renewed_ms")
    assert await store.write_many([("a", ops[0][1])]) == [None]  # a renewal: the same ARGV
    renewed = await store.read("a")
    assert renewed is not None and renewed.created_ms == a.created_ms < renewed.renewed_ms
    assert await store.write_many([]) == []
    with pytest.raises(LeaseError):
        await store.write_many([("not a client id", None)])


async def test_list_skips_bad_leases_into_invalid(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    good_a = await store.write("a", SUBS, ttl_ms=10_000, host="h", pid=1)
    good_b = await store.write("b", SubscriptionSet(), ttl_ms=10_000, host="h", pid=2)
    far = good_a.deadline_ms
    many = {"ticker": [f"KRW-C{i}" for i in range(11)]}
    bad = {
        "bad-json": _fields(client_id="bad-json", subs="{"),
        "bad-type": _fields(client_id="bad-type", subs=_subs({"myAsset": ["KRW-BTC"]})),
        "bad-star": _fields(client_id="bad-star", subs=_subs({"ticker": ["KRW-*"]})),
        "bad-newline": _fields(client_id="bad-newline", subs=_subs({"trade": ["KRW-BTC\n"]})),
        "bad-big": _fields(client_id="bad-big", subs=_subs(many)),
    }
    for client_id, fields in bad.items():
        await _write_raw(redis_client, client_id, fields, far)
    await redis_client.set(f"{NS}:lease:bad-string", "x")
    await redis_client.zadd(f"{NS}:leases", {"bad-string": far, "bad:member": far})

    listing = await store.list_all(max_streams=10)
    assert listing.leases == [good_a, good_b]
    reasons = dict(listing.invalid)
    assert set(reasons) == {*bad, "bad-string", "bad:member"}
    assert "not JSON" in reasons["bad-json"]
    assert "unknown stream" in reasons["bad-type"]
    assert "invalid market code" in reasons["bad-star"]
    assert "invalid market code" in reasons["bad-newline"]
    assert "11 streams" in reasons["bad-big"]
    assert "not a hash" in reasons["bad-string"]
    assert "bad index entry" in reasons["bad:member"]
    assert listing.expired == []
    assert good_a.renewed_ms <= listing.server_now_ms < far


async def _eval(r: aioredis.Redis, script: str, keys: list[str], *args: str) -> Any:
    return await r.eval(script, len(keys), *keys, *args)  # type: ignore[misc]


SCRIPT_REFUSALS: list[tuple[list[str], list[str], str]] = [
    (["t:lease:c1", "t:leases"], ["c1", "1000", "{}", "h"], "usage"),
    (["t:lease:c1"], ["c1", "1000", "{}", "h", "1"], "usage"),
    (["t:lease:c1", "t:index"], ["c1", "1000", "{}", "h", "1"], "KEYS[2] must be {ns}:leases"),
    (["t:lease:c2", "t:leases"], ["c1", "1000", "{}", "h", "1"], "KEYS[1] must be t:lease:c1"),
    (["t:lease:c 1", "t:leases"], ["c 1", "1000", "{}", "h", "1"], "invalid client id"),
    (["t:lease:-c", "t:leases"], ["-c", "1000", "{}", "h", "1"], "invalid client id"),
    (["t:lease:" + "c" * 129, "t:leases"], ["c" * 129, "1", "{}", "h", "1"], "invalid client id"),
    (["t:lease:c1", "t:leases"], ["c1", "0", "{}", "h", "1"], "TTL_MS must be an integer > 0"),
    (["t:lease:c1", "t:leases"], ["c1", "1.5", "{}", "h", "1"], "TTL_MS must be an integer"),
    (["t:lease:c1", "t:leases"], ["c1", "1000", "{}", "h", "12.5"], "PID must be an integer"),
    (["t:lease:c1", "t:leases"], ["c1", "1000", "{}", "h", ""], "PID must be an integer"),
    (["t:lease:c1", "t:leases"], ["c1", "1000", '["KRW-BTC"]', "h", "1"], "SUBS must be a JSON"),
    (["t:lease:c1", "t:leases"], ["c1", "1000", "{ticker:[KRW-BTC]}", "h", "1"], "SUBS must be"),
]


@pytest.mark.parametrize(("keys", "args", "error"), SCRIPT_REFUSALS)
async def test_the_lease_script_refuses_bad_arguments_and_writes_nothing(
    redis_client: aioredis.Redis, keys: list[str], args: list[str], error: str
) -> None:
    with pytest.raises(ResponseError, match=re.escape(error)):
        await _eval(redis_client, LEASE_LUA, keys, *args)
    assert await redis_client.keys("*") == []


async def test_the_lease_script_run_by_hand_writes_what_the_broker_reads(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    subs = '{"ticker":["KRW-BTC","krw-eth"]}'
    keys = [f"{NS}:lease:hand-1", f"{NS}:leases"]
    renewed, created, deadline = await _eval(
        redis_client, LEASE_LUA, keys, "hand-1", "5000", subs, "box", "-7"
    )
    assert created == renewed and deadline == renewed + 5000
    lease = await store.read("hand-1")
    assert lease is not None and (lease.pid, lease.host, lease.deadline_ms) == (-7, "box", deadline)
    assert lease.subs_by_type() == {"ticker": ["KRW-BTC"]}
    assert lease.rejected_by_type() == {"ticker": ["krw-eth"]}
    assert await redis_client.hget(keys[0], "subs") == subs.encode()  # stored as written
    assert await _eval(redis_client, RELEASE_LUA, keys, "hand-1") == 1
    assert await _eval(redis_client, RELEASE_LUA, keys, "hand-1") == 0
    with pytest.raises(ResponseError, match=re.escape("KEYS[1] must be t:lease:hand-1")):
        await _eval(redis_client, RELEASE_LUA, [f"{NS}:lease:other", keys[1]], "hand-1")


async def test_the_deadline_field_wins_over_a_longer_key_ttl(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    now = await _server_ms(redis_client)
    live = await store.write("live", SUBS, ttl_ms=10_000, host="h", pid=1)
    # written by hand without PEXPIRE: its hash outlives its deadline
    past = _fields(client_id="past", created_ms=str(now - 5000), renewed_ms=str(now - 5000))
    past["deadline_ms"] = str(now - 1)
    await _write_raw(redis_client, "past", past, now + 60_000)  # a later index score: ignored
    listing = await store.list_all()
    assert listing.leases == [live]
    assert listing.expired == ["past"]
    assert await redis_client.exists(f"{NS}:lease:past") == 1  # not deleted: not ours to delete
    assert (await store.list_all()).expired == ["past"]  # still not served, next time too
    reads = await store.read_many(["live", "past"])
    assert reads.leases == [live] and reads.expired == ["past"] and reads.gone == []


async def test_list_reports_and_unindexes_expired(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    await store.write("short", SUBS, ttl_ms=200, host="h", pid=1)
    await store.write("long", SUBS, ttl_ms=10_000, host="h", pid=1)

    async def gone() -> bool:
        return await redis_client.pttl(f"{NS}:lease:short") == -2

    await wait_for(gone, message="short lease to expire")
    listing = await store.list_all()
    assert [lease.client_id for lease in listing.leases] == ["long"]
    assert listing.expired == ["short"]
    assert await redis_client.zscore(f"{NS}:leases", "short") is None
    assert (await store.list_all()).expired == []


async def test_next_deadline(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    deadline, now = await store.next_deadline()
    assert deadline is None
    assert abs(now - await _server_ms(redis_client)) < 1_000

    await store.write("slow", SUBS, ttl_ms=9_000, host="h", pid=1)
    soon = await store.write("soon", SUBS, ttl_ms=2_000, host="h", pid=1)
    deadline, now = await store.next_deadline()
    assert deadline == soon.deadline_ms
    assert soon.renewed_ms <= now < deadline


async def test_sweep_expired(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    await store.write("short", SUBS, ttl_ms=200, host="h", pid=1)
    renewed = await store.write("renewed", SUBS, ttl_ms=10_000, host="h", pid=1)
    # as if swept between the expiry in the index and the renew's ZADD: an old score, live hash
    await redis_client.zadd(f"{NS}:leases", {"renewed": renewed.renewed_ms - 1, "bad member": 1})

    async def gone() -> bool:
        return await redis_client.pttl(f"{NS}:lease:short") == -2

    await wait_for(gone, message="short lease to expire")
    assert await store.sweep_expired() == ["bad member", "short"]
    assert await redis_client.zrange(f"{NS}:leases", 0, -1) == [b"renewed"]
    assert await store.sweep_expired() == []


async def test_scan_finds_unindexed_leases(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    indexed = await store.write("indexed", SUBS, ttl_ms=10_000, host="h", pid=1)
    now = await _server_ms(redis_client)
    fields = encode_lease_fields(
        "by-hand", SUBS, ttl_ms=10_000, host="h", pid=9,
        created_ms=now, renewed_ms=now, deadline_ms=now + 10_000,
    )  # fmt: skip
    await redis_client.hset(f"{NS}:lease:by-hand", mapping=fields)  # type: ignore[arg-type]
    await redis_client.hset(f"{NS}:lease:bad:name", mapping=fields)  # type: ignore[arg-type]
    await redis_client.hset("other:lease:elsewhere", mapping=fields)  # type: ignore[arg-type]

    plain = await store.list_all()
    assert plain.leases == [indexed]
    assert plain.invalid == [] and plain.unindexed == []

    scanned = await store.list_all(scan=True)
    assert [lease.client_id for lease in scanned.leases] == ["by-hand", "indexed"]
    assert scanned.leases[0].pid == 9
    assert scanned.unindexed == ["by-hand"]
    assert [client_id for client_id, _ in scanned.invalid] == ["bad:name"]
    # found by SCAN, so put back in the index with its own deadline: the next plain listing
    # sees it
    assert scanned.reindexed == ["by-hand"]
    assert await redis_client.zscore(f"{NS}:leases", "by-hand") == scanned.leases[0].deadline_ms
    assert [lease.client_id for lease in (await store.list_all()).leases] == ["by-hand", "indexed"]


async def test_known_leases_are_served_and_reindexed_without_their_index_entry(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    # any consumer may ZREM from the index (the documented consumer ACL allows it): the index
    # is a hint, and a lease whose hash exists is served whether or not its entry does
    a = await store.write("a", SUBS, ttl_ms=10_000, host="h", pid=1)
    b = await store.write("b", SUBS, ttl_ms=10_000, host="h", pid=2)
    await store.write("released", SUBS, ttl_ms=10_000, host="h", pid=3)
    await store.release("released")
    await redis_client.zrem(f"{NS}:leases", "a")

    assert (await store.list_all()).leases == [b]  # only the index: a is lost
    listing = await store.list_all(known=["a", "b", "released", "never", "bad id"])
    assert listing.leases == [a, b]
    assert listing.unindexed == ["a"] and listing.reindexed == ["a"]
    assert listing.expired == [] and listing.invalid == []
    # a is back with its deadline; an id whose hash is gone (released) is never re-indexed
    assert await redis_client.zrange(f"{NS}:leases", 0, -1, withscores=True) == [
        (b"a", a.deadline_ms),
        (b"b", b.deadline_ms),
    ]
    assert (await store.list_all()).leases == [a, b]


async def test_reindex_only_a_live_hash(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    now = await _server_ms(redis_client)
    past = encode_lease_fields(
        "past", SUBS, ttl_ms=10_000, host="h", pid=1,
        created_ms=now - 20_000, renewed_ms=now - 20_000, deadline_ms=now - 10_000,
    )  # fmt: skip
    await redis_client.hset(f"{NS}:lease:past", mapping=past)  # type: ignore[arg-type]
    no_deadline = _fields(client_id="nodeadline", deadline_ms=None)
    await redis_client.hset(f"{NS}:lease:nodeadline", mapping=no_deadline)  # type: ignore[arg-type]
    await redis_client.set(f"{NS}:lease:string", "x")

    listing = await store.list_all(scan=True, known=["past"])
    assert listing.leases == [] and listing.expired == ["past"]
    assert [client_id for client_id, _ in listing.invalid] == ["nodeadline", "string"]
    assert listing.reindexed == []
    assert await redis_client.zcard(f"{NS}:leases") == 0


async def test_refused_reindex_never_fails_the_listing(
    store: LeaseStore, redis_client: aioredis.Redis
) -> None:
    a = await store.write("a", SUBS, ttl_ms=10_000, host="h", pid=1)
    await redis_client.zrem(f"{NS}:leases", "a")
    await redis_client.config_set("maxmemory", "1")  # noeviction: every write is refused
    try:
        listing = await store.list_all(known=["a"])
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert listing.leases == [a] and listing.unindexed == ["a"] and listing.reindexed == []
    assert await redis_client.zcard(f"{NS}:leases") == 0
    assert (await store.list_all(known=["a"])).reindexed == ["a"]  # memory freed: repaired


@pytest.fixture
async def retrying_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # Redis.from_url leaves the connections' Retry at 0 retries (only the Redis(host=...)
    # constructor defaults to 10), so a client that must survive a restart passes one.
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries=5)
    client = aioredis.Redis.from_url(redis_url, retry=retry)
    try:
        yield client
    finally:
        await client.aclose()


async def test_renew_refills_a_redis_restarted_empty(
    retrying_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    r = retrying_client
    store = LeaseStore(r, NS)
    first = await store.write("c1", SUBS, ttl_ms=10_000, host="h", pid=1)
    redis_server.restart()
    # the pooled connection is dead: the Retry reconnects, and AsyncScript reloads the script
    # when the empty server answers NOSCRIPT
    again = await store.renew("c1", SUBS, ttl_ms=10_000, host="h", pid=1)
    assert again.subscriptions == SUBS
    assert await store.read("c1") == again
    assert again.created_ms >= first.created_ms  # the old created_ms was lost with the data
    assert await r.zscore(f"{NS}:leases", "c1") == again.deadline_ms
    assert 0 < await r.pttl(f"{NS}:lease:c1") <= 10_000
    assert (await store.list_all()).leases == [again]


async def test_without_retry_the_next_heartbeat_recovers(
    store: LeaseStore, redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    await store.write("c1", SUBS, ttl_ms=10_000, host="h", pid=1)
    redis_server.restart()
    with pytest.raises(RedisConnectionError):  # from_url's default: no retry on a dead socket
        await store.renew("c1", SUBS, ttl_ms=10_000, host="h", pid=1)
    again = await store.renew("c1", SUBS, ttl_ms=10_000, host="h", pid=1)
    assert await store.read("c1") == again


@pytest.fixture
async def text_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_works_with_decode_responses(text_client: aioredis.Redis) -> None:
    store = LeaseStore(text_client, NS)
    lease = await store.write("c1", SUBS, ttl_ms=5_000, host="h", pid=1)
    assert await store.read("c1") == lease
    assert (await store.list_all(scan=True)).leases == [lease]
    assert (await store.next_deadline())[0] == lease.deadline_ms
    assert await store.release("c1") is True


async def test_read_raises_on_garbage(store: LeaseStore, redis_client: aioredis.Redis) -> None:
    await redis_client.hset(f"{NS}:lease:c1", mapping=_fields(subs="nope"))  # type: ignore[arg-type]
    with pytest.raises(LeaseError, match="not JSON"):
        await store.read("c1")
    await redis_client.delete(f"{NS}:lease:c1")
    await redis_client.set(f"{NS}:lease:c1", "x")
    with pytest.raises(LeaseError, match="not a hash"):
        await store.read("c1")
    with pytest.raises(LeaseError, match="invalid client id"):
        await store.read("bad id")


async def test_namespaces_are_separate(redis_client: aioredis.Redis) -> None:
    one, two = LeaseStore(redis_client, "one"), LeaseStore(redis_client, "one2")
    await one.write("c1", SUBS, ttl_ms=5_000, host="h", pid=1)
    assert (await two.list_all(scan=True)).leases == []
    with pytest.raises(LeaseError, match="namespace"):
        LeaseStore(redis_client, "bad ns")


def test_merging_single_lease_reads_reports_only_what_can_change_the_union() -> None:
    from broker.core.reconcile import merge_reads as _merge_reads
    from broker.leases import LeaseReads

    memo: dict[str, SubscriptionSet] = {}
    a = parse_lease("a", _fields(client_id="a"), memo=memo)
    b = parse_lease("b", _fields(client_id="b", subs=_subs({"trade": ["KRW-ETH"]})), memo=memo)
    cache: dict[str, Lease] = {"a": a, "b": b}
    invalid: dict[str, str] = {}

    expired: set[str] = set()

    def merge(
        leases: list[Lease], bad: list[tuple[str, str]], gone: list[str], late: tuple[str, ...] = ()
    ) -> bool:
        reads = LeaseReads(leases, bad, gone, 0, expired=list(late))
        return _merge_reads(cache, invalid, reads, expired)

    renewed = parse_lease("a", _fields(client_id="a", renewed_ms="5000"), memo=memo)
    assert not merge([renewed], [], [])  # a heartbeat: same subs text, same set object
    assert cache["a"].renewed_ms == 5000  # but the new deadline is kept
    changed = parse_lease("a", _fields(client_id="a", subs=_subs({"ticker": ["KRW-XRP"]})))
    assert merge([changed], [], [])
    assert merge([], [("b", "garbage")], []) and "b" not in cache and invalid == {"b": "garbage"}
    assert not merge([], [], ["nobody"])  # a release of a lease we never had
    assert merge([], [], ["a"]) and cache == {}
    assert merge([b], [], []) and invalid == {}  # b fixed its lease
    assert merge([], [], [], ["b"]) and cache == {} and expired == {"b"}  # past its deadline
    assert merge([b], [], []) and expired == set()  # renewed
