"""Garbage leases: skipped and counted, never a crash, never an unvalidated key or channel.

Two layers. Pure properties (hypothesis): whatever the fields of a lease hash, ``parse_lease``
either returns a lease whose every stream makes a contract key, or raises ``LeaseError``;
every mutation the contract forbids is rejected: the whole lease, or (a bad entry among good
ones) that entry alone, which the lease then carries in ``rejected``. Then the running broker
(a subprocess) gets a few hundred hypothesis-made garbage leases, garbage index entries, keys
of the wrong type and garbage control messages in real Redis, while MONITOR records every
command it sends: the good lease and the good entries of partial leases are still served,
``invalid_leases`` and ``partial_leases`` count exactly the garbage, and no key or channel
outside the contract was ever touched.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import LeaseError
from broker.keys import Keys
from broker.leases import MAX_LEASE_STREAMS, Lease, encode_lease_fields, parse_lease
from broker.testing import RedisServer, broker_process, wait_for, write_lease
from broker.testing import read_status as redis_status
from broker.upbit.types import SubscriptionSet, union
from tests.support.processes import CODE_RE, MonitorTap, contract_key_re, sim_upstream
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000_000
STREAMS = ["ticker", "trade", "orderbook", "candle.1m", "orderbook@10000", "orderbook@0.1"]


def valid_fields(client_id: str, subs: dict[str, list[str]] | None = None) -> dict[str, str]:
    return encode_lease_fields(
        client_id,
        SubscriptionSet.of(subs or {"ticker": ["KRW-BTC"]}),
        ttl_ms=60_000,
        host="h",
        pid=1,
        created_ms=NOW,
        renewed_ms=NOW,
        deadline_ms=NOW + 60_000,
    )


# -- strategies ---------------------------------------------------------------------------

NASTY = [
    "KRW-*", "KRW-?", "KRW-BTC*", "*", "?", "[A-Z]", "KRW BTC", "KRW-BTC ", " KRW-BTC",
    "KRW-BTC\n", "KRW-BTC\r\nPUBLISH x y", "krw-btc", "KRW-btc", "KRW-", "-BTC", "",
    "t:ticker:KRW-BTC", "KRW-BTC:evil", "KRW-BTC\x00", "KRW-ÄBC", "KRW-BTC.x",
    "KRW_BTC", "KRWBTC", "K-BTC", "KRWKRWK-BTC", "KRW-" + "A" * 17, "KRW-BTC/ETH",
    "KRW-BT\u200bC", "ＫＲＷ-ＢＴＣ", "KRW-BTC\t",
]  # fmt: skip

bad_codes = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=30).filter(lambda s: CODE_RE.fullmatch(s) is None),
)
bad_streams = st.one_of(
    st.sampled_from(
        [
            "",
            "tick",
            "TICKER",
            "ticker ",
            "myOrder",
            "myAsset",
            "orderbook@",
            "orderbook@-1",
            "orderbook@nan",
            "orderbook@inf",
            "orderbook@1e999",
            "orderbook@ 5",
            "ticker@5",
            "candle.2m",
            "t:ticker",
            "*",
            "orderbook@10000@1",
            "orderbook@0x10",
        ]
    ),
    st.text(max_size=20).filter(lambda s: s not in STREAMS and not s.startswith("orderbook@")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def garbage_subs(draw: st.DrawFn) -> str:
    """A ``subs`` value the contract rejects, with the reason it must be rejected."""
    kind = draw(st.sampled_from(["code", "stream", "shape", "notjson", "huge", "depth"]))
    if kind == "code":
        stream = draw(st.sampled_from(STREAMS))
        codes = draw(st.lists(st.sampled_from(["KRW-BTC", "KRW-ETH"]), max_size=3))
        codes.insert(draw(st.integers(0, len(codes))), draw(bad_codes))
        return json.dumps({stream: codes})
    if kind == "stream":
        return json.dumps({draw(bad_streams): ["KRW-BTC"]})
    if kind == "shape":
        value = draw(
            st.one_of(
                st.lists(json_values, max_size=3),
                st.integers(),
                st.text(max_size=10),
                st.dictionaries(st.sampled_from(STREAMS), st.one_of(st.text(), st.integers(),
                                st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
                                min_size=1, max_size=2),
                st.dictionaries(st.sampled_from(STREAMS), st.lists(
                    st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3))),
                    min_size=1, max_size=3), min_size=1, max_size=2),
            )
        )  # fmt: skip
        return json.dumps(value)
    if kind == "notjson":
        text = draw(st.text(min_size=1, max_size=40))
        try:
            json.loads(text)
        except ValueError:
            return text
        return "{" + text
    if kind == "huge":
        n = MAX_LEASE_STREAMS + draw(st.integers(1, 50))
        return json.dumps({"ticker": [f"KRW-C{i:05d}" for i in range(n)]})
    suffix = draw(st.sampled_from([".", ".-1", ".99999", ".5x", ". 5", ".1.5", "..5", ".５"]))
    return json.dumps({"orderbook": ["KRW-BTC" + suffix]})


@st.composite
def garbage_lease(draw: st.DrawFn, client_id: str) -> dict[str, Any]:
    """The fields of a lease hash with at least one thing the contract forbids."""
    fields: dict[str, Any] = dict(valid_fields(client_id))
    kind = draw(
        st.sampled_from(
            ["subs", "missing", "version", "client", "int", "ttl", "bytes", "subs", "subs"]
        )
    )
    if kind == "subs":
        fields["subs"] = draw(garbage_subs())
    elif kind == "missing":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif kind == "version":
        fields["v"] = draw(st.text(max_size=5).filter(lambda v: v != "1"))
    elif kind == "client":
        fields["client_id"] = draw(st.text(max_size=20).filter(lambda v: v != client_id))
    elif kind == "int":
        name = draw(st.sampled_from(["pid", "ttl_ms", "created_ms", "renewed_ms", "deadline_ms"]))
        fields[name] = draw(
            st.sampled_from(["", "1.5", "1e3", " 1", "0x10", "NaN", "1" * 25, "-", "１"])
        )
    elif kind == "ttl":
        fields["ttl_ms"] = draw(st.sampled_from(["0", "-1", "-60000"]))
    else:
        fields[draw(st.sampled_from(["subs", "client_id", "v"]))] = b"\xff\xfe" + b"\x80"
    return fields


# -- pure properties ------------------------------------------------------------------------


def parse_garbage(client_id: str, fields: dict[str, Any]) -> Lease | None:
    """None when the lease is rejected as a whole; else it is partial: the forbidden entry is
    among its rejected ones, and every stream it serves makes a contract channel."""
    try:
        lease = parse_lease(client_id, fields)
    except LeaseError:
        return None
    assert lease.rejected, fields
    allowed = contract_key_re("t")
    keys = Keys("t")
    for key in lease.subscriptions:
        assert allowed.fullmatch(keys.channel(key.type, key.code, key.level)), key
    return lease


@settings(max_examples=400, deadline=None, database=None)
@given(st.data())
def test_parse_lease_rejects_every_forbidden_mutation(data: st.DataObject) -> None:
    fields = data.draw(garbage_lease("fuzz-1"))
    parse_garbage("fuzz-1", fields)


def test_a_bad_code_among_good_ones_rejects_that_entry_alone() -> None:
    fields = valid_fields("fuzz-3")
    fields["subs"] = json.dumps({"ticker": ["KRW-BTC", "krw-eth"], "tick": ["KRW-XRP"]})
    lease = parse_garbage("fuzz-3", fields)
    assert lease is not None
    assert lease.subs_by_type() == {"ticker": ["KRW-BTC"]}
    assert lease.rejected_by_type() == {"ticker": ["krw-eth"], "tick": ["KRW-XRP"]}


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(sorted(valid_fields("x"))), st.text(max_size=8)),
        st.one_of(st.text(max_size=40), st.binary(max_size=40), json_values.map(json.dumps)),
        max_size=12,
    ),
    st.sampled_from([None, "subs"]),
)
def test_parse_lease_never_accepts_what_makes_a_bad_key(
    fields: dict[str, Any], force_subs: str | None
) -> None:
    """Arbitrary hashes: either LeaseError, or every stream names a contract key/channel."""
    base: dict[str, Any] = dict(valid_fields("fuzz-2"))
    base.update(fields)
    allowed = contract_key_re("t")
    keys = Keys("t")
    try:
        lease = parse_lease("fuzz-2", base)
    except LeaseError:
        return
    for key in lease.subscriptions:
        assert allowed.fullmatch(keys.channel(key.type, key.code, key.level)), key
        assert allowed.fullmatch(keys.last_values(key.type, key.level)), key


# -- the running broker ---------------------------------------------------------------------


async def test_running_broker_skips_and_counts_garbage_leases(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    url = redis_server.url
    good = {"ticker": ["KRW-BTC"], "trade": ["KRW-ETH"]}
    # every connection of the test is named, so the audit can tell them from the broker's
    own = aioredis.Redis.from_url(url, client_name=OWN)
    writer = redis.Redis.from_url(url, client_name=OWN)
    published: set[str] = set()
    tap = own.pubsub()
    await tap.psubscribe("*")

    async def pump() -> None:
        while True:
            msg = await tap.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                published.add(msg["channel"].decode("utf-8", "backslashreplace"))

    pumper = asyncio.create_task(pump())
    expected_invalid = 0
    partial: list[Lease] = []  # garbage leases served in part (a bad entry among good ones)
    written: list[str] = []
    bad_members = ["evil*", "a b", "x\ny", "../../etc", "", "é" * 3, "x" * 200, "t:leader"]
    try:
        async with (
            running_simulator(seed=81, rate=20) as sim,
            MonitorTap("127.0.0.1", redis_server.port) as monitor,
            broker_process(url, sim.url, "fuzz-b", tmp_path, reconcile_interval=0.3) as broker,
        ):
            await write_lease(own, "good", good, ttl_ms=120_000)
            expected = {t: set(c) for t, c in good.items()}
            await wait_for(lambda: sim_upstream(sim) == expected, 20, message="good lease served")
            deadline_ms = int(time.time() * 1000) + 120_000
            fixed_deadline = valid_fields("x")["deadline_ms"]

            @settings(
                max_examples=150,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(st.data())
            def inject(data: st.DataObject) -> None:
                client_id = f"garbage-{len(written)}"
                fields = data.draw(garbage_lease(client_id))
                if fields.get("deadline_ms") == fixed_deadline:
                    fields["deadline_ms"] = str(deadline_ms)  # alive by today's clock
                lease = parse_garbage(client_id, fields)
                pipe = writer.pipeline(transaction=False)
                pipe.delete(f"t:lease:{client_id}")
                if fields:
                    pipe.hset(f"t:lease:{client_id}", mapping=fields)
                else:
                    pipe.set(f"t:lease:{client_id}", "not a hash")
                pipe.zadd("t:leases", {client_id: deadline_ms})
                pipe.publish("t:control", data.draw(st.sampled_from(
                    [f"lease {client_id}", "lease ../../x", "release *", "", "\x00\xff",
                     "request", "lease " + "x" * 10_000]
                )))  # fmt: skip
                pipe.execute()
                written.append(client_id)  # (an example hypothesis gives up on never gets here)
                if lease is not None:
                    partial.append(lease)

            await asyncio.to_thread(inject)
            expected_invalid += len(written) - len(partial)
            # keys of other types, and a lease hash that only the SCAN sweep finds
            await own.set("t:lease:as-string", "x")
            await own.rpush("t:lease:as-list", "x")  # type: ignore[misc]
            await own.zadd("t:leases", {"as-string": deadline_ms, "as-list": deadline_ms})
            await own.hset("t:lease:unindexed", mapping={"v": "1", "subs": "[]"})  # type: ignore[misc]
            expected_invalid += 3
            # index entries that are no valid client id (never looked up as keys)
            await own.zadd("t:leases", dict.fromkeys(bad_members, deadline_ms))
            expected_invalid += len(bad_members)
            # keys under the lease prefix whose names are no valid client id (SCAN finds them)
            for name in ("sp ace", "star*", "new\nline"):
                await own.hset(f"t:lease:{name}", mapping=valid_fields("x"))  # type: ignore[misc]
            expected_invalid += 3
            await own.publish("t:control", "lease good")

            want = (str(expected_invalid), str(len(partial)))

            async def counted() -> tuple[str, str]:
                status = await redis_status(own)
                return status.get("invalid_leases", ""), status.get("partial_leases", "")

            await wait_for(
                lambda: _equal(counted(), want), 15, message=f"(invalid, partial) == {want}"
            )
            status = await redis_status(own)
            assert broker.alive
            assert status["leases"] == str(1 + len(partial))
            assert int(status["rejected_streams"]) == sum(len(p.rejected) for p in partial)
            served = union(SubscriptionSet.of(good), *(p.subscriptions for p in partial))
            assert json.loads(status["desired"]) == served.by_type()
            expected = {t: set(codes) for t, codes in served.by_type().items()}
            await wait_for(lambda: sim_upstream(sim) == expected, 10, message="partial served")
            # still serving: a new lease is picked up at once
            await write_lease(own, "late", {"ticker": ["KRW-XRP"]}, ttl_ms=120_000)
            await wait_for(lambda: "KRW-XRP" in (sim_upstream(sim) or {}).get("ticker", set()), 10)
            await asyncio.sleep(0.5)
            skip = {c["addr"] for c in await own.client_list() if c.get("name") == OWN}
            commands = len(monitor.commands)
            odd = monitor.audit(skip)
            alive = broker.alive
    finally:
        pumper.cancel()
        await asyncio.gather(pumper, return_exceptions=True)
        await tap.aclose()  # type: ignore[no-untyped-call]
        writer.close()
    odd_channels = sorted(c for c in published if not contract_key_re("t").fullmatch(c))
    keys = [k.decode("utf-8", "backslashreplace") for k in await own.keys("*")]
    # everything outside the lease prefix and the index was made by the broker
    broker_keys = sorted(k for k in keys if not k.startswith(("t:lease:", "t:leases")))
    caches = {
        k: [f.decode("utf-8", "backslashreplace") for f in await own.hkeys(k)]  # type: ignore[misc]
        for k in broker_keys
        if k.startswith("t:last:")
    }
    await own.aclose()
    print(
        f"\n[figures] garbage leases: injected={expected_invalid + len(partial)} (hypothesis "
        f"leases {len(written)}, of them partial {len(partial)}; wrong-type keys 3, bad index "
        f"entries {len(bad_members)}, bad key names 3), counted_invalid="
        f"{status['invalid_leases']}, counted_partial={status['partial_leases']}, "
        f"broker_alive={alive}, "
        f"redis_commands_audited={commands}, off_contract_commands={len(odd)}, "
        f"channels_published={sorted(published)}, broker_keys={broker_keys}"
    )
    assert not odd, odd[:20]
    assert not odd_channels, odd_channels
    assert all(contract_key_re("t").fullmatch(k) for k in broker_keys), broker_keys
    for cache, fields in caches.items():
        assert all(CODE_RE.fullmatch(f) for f in fields), (cache, fields)


async def _equal(value: Any, expected: Any) -> bool:
    return await value == expected


OWN = "fuzz-test"
