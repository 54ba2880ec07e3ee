"""broker.cluster_slots: key slots, hash tags, CLUSTER SLOTS replies and redirects (pure)."""

from __future__ import annotations

import pytest

from broker.cluster_slots import (
    SLOTS,
    ClusterReplyError,
    Redirect,
    crc16,
    hash_tag,
    key_slot,
    parse_cluster_slots,
    parse_redirect,
)
from broker.keys import Keys, keys_for


def test_crc16_is_xmodem_as_the_cluster_spec_gives_it() -> None:
    # the spec's check value: CRC16("123456789") = 0x31C3
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0
    assert key_slot("123456789") == 0x31C3 % SLOTS == 12739


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        (b"{user1000}.following", b"user1000"),
        (b"{user1000}.followers", b"user1000"),
        (b"foo{}{bar}", b"foo{}{bar}"),  # an empty tag: the whole key
        (b"foo{{bar}}zap", b"{bar"),  # from the first { to the next }
        (b"foo{bar}{zap}", b"bar"),  # only the first tag
        (b"foo{bar", b"foo{bar"),  # no closing brace
        (b"plain", b"plain"),
    ],
)
def test_hash_tags_follow_the_spec(key: bytes, hashed: bytes) -> None:
    assert hash_tag(key) == hashed
    assert key_slot(key) == crc16(hashed) % SLOTS


def test_slots_the_real_server_gave() -> None:
    # CLUSTER KEYSLOT on Redis 7.0.15
    assert key_slot("foo") == 12182
    assert key_slot("{upbit}:leases") == 1550
    assert key_slot("upbit:ticker:KRW-BTC") == 4657
    assert key_slot("{user1000}.following") == 3443


def test_coordination_keys_share_one_slot_and_frames_spread() -> None:
    keys = Keys("upbit", hash_tag=True)
    coordination = [
        keys.leases,
        keys.lease("bot-1"),
        keys.control,
        keys.requests,
        keys.reply("r1"),
        keys.leader,
        keys.epoch,
        keys.status,
        keys.events,
    ]
    assert {key_slot(k) for k in coordination} == {key_slot("upbit")}
    assert all(k.startswith("{upbit}:") for k in coordination)
    channels = [keys.channel("ticker", f"KRW-C{i}") for i in range(200)]
    assert all(c.startswith("upbit:ticker:") for c in channels)
    assert len({key_slot(c) // (SLOTS // 3) for c in channels}) == 3  # every third of the slots
    # the history streams share a tag of their own (one XREAD reads them all)
    assert keys.history("trade", "KRW-BTC") == "{upbit:hist}:trade:KRW-BTC"
    assert key_slot(keys.history("ticker", "KRW-ETH")) == key_slot("upbit:hist")
    assert keys.last_values("ticker") == "upbit:last:ticker"


def test_keys_are_tagged_only_for_a_cluster_url() -> None:
    assert keys_for("upbit", "redis+cluster://h:7000").hash_tag
    assert keys_for("upbit", "rediss+cluster://h:7000").leases == "{upbit}:leases"
    for url in ("redis://h", "rediss://h", "unix:///s", "redis+sentinel://h/m"):
        keys = keys_for("upbit", url)
        assert not keys.hash_tag
        assert keys.history("trade", "KRW-BTC") == "upbit:hist:trade:KRW-BTC"
        assert keys.leases == "upbit:leases"
        assert keys.lease("a") == "upbit:lease:a"


def _node(host: str, port: int) -> list[object]:
    return [host.encode(), port, b"id" + str(port).encode(), []]


def test_cluster_slots_reply_maps_every_slot_to_its_master() -> None:
    reply = [
        [0, 5460, _node("10.0.0.1", 7000), _node("10.0.0.4", 7003)],
        [5461, 10922, _node("10.0.0.2", 7001)],
        [10923, 16383, _node("10.0.0.3", 7002)],
        [100, 200, _node("10.0.0.2", 7001)],  # a later range wins (a moved range)
    ]
    slots = parse_cluster_slots(reply)
    assert slots.masters == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 7002))
    assert slots.complete and slots.unowned() == 0
    assert slots.node_of(0) == ("10.0.0.1", 7000)
    assert slots.node_of(150) == ("10.0.0.2", 7001)
    assert slots.node_of(5461) == ("10.0.0.2", 7001)
    assert slots.node_of(16383) == ("10.0.0.3", 7002)
    assert len(slots.owner) == SLOTS


def test_a_cluster_with_holes_says_so() -> None:
    slots = parse_cluster_slots([[0, 99, _node("h", 1)]])
    assert not slots.complete
    assert slots.unowned() == SLOTS - 100
    assert slots.node_of(100) is None
    assert parse_cluster_slots([]).unowned() == SLOTS


def test_a_master_without_a_host_is_the_node_asked() -> None:
    slots = parse_cluster_slots([[0, 16383, [b"", 7000, b"id"]]], default_host="10.1.1.1")
    assert slots.masters == (("10.1.1.1", 7000),)
    slots = parse_cluster_slots([[0, 16383, [b"?", 7000]]], default_host="h")
    assert slots.masters == (("h", 7000),)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        b"oops",
        [[0, 16384, _node("h", 1)]],
        [[10, 5, _node("h", 1)]],
        [[-1, 5, _node("h", 1)]],
        [[0, 5]],
        [[0, 5, [b"h"]]],
        [[0, 5, [b"h", 0]]],
        [[0, 5, [b"h", b"port"]]],
        [[b"x", 5, _node("h", 1)]],
        [[True, 5, _node("h", 1)]],
        ["not a range"],
    ],
)
def test_a_reply_that_is_no_slot_map_is_a_clear_error(reply: object) -> None:
    with pytest.raises(ClusterReplyError, match="CLUSTER SLOTS"):
        parse_cluster_slots(reply)


def test_redirects() -> None:
    assert parse_redirect("MOVED 3999 127.0.0.1:6381") == Redirect("MOVED", 3999, "127.0.0.1", 6381)
    assert parse_redirect(Exception("ASK 3999 10.0.0.2:7001")) == Redirect(
        "ASK", 3999, "10.0.0.2", 7001
    )
    assert parse_redirect("MOVED 1 :7000", default_host="h") == Redirect("MOVED", 1, "h", 7000)
    assert parse_redirect("MOVED 1 ::1:7000") == Redirect("MOVED", 1, "::1", 7000)  # IPv6
    for other in (
        "OOM command not allowed",
        "MOVED",
        "MOVED x h:1",
        "MOVED 16384 h:1",
        "MOVED 1 h",
        "MOVED 1 h:port",
        "ERR MOVED 1 h:1",
    ):
        assert parse_redirect(other) is None, other
