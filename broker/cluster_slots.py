"""Redis Cluster's slot arithmetic and its topology reply, without I/O (pure).

A Redis Cluster splits its keys, and its sharded pub/sub channels, over 16384 hash slots; each
master owns some ranges of them. A key's slot is ``CRC16(key) mod 16384`` (CRC-16/XMODEM),
computed over the key's *hash tag* instead when it has one: the part between the first ``{``
and the next ``}``, if not empty. So ``{upbit}:leases`` and ``{upbit}:lease:bot-1`` share a slot
(one node, one Lua script may touch both), while ``upbit:ticker:KRW-BTC`` and
``upbit:ticker:KRW-ETH`` spread over the masters.

:class:`SlotMap` is the topology a client routes by: read from ``CLUSTER SLOTS`` (every Redis
since 3.0; ``CLUSTER SHARDS`` is 7.0 only), each slot's master as an index into
:attr:`SlotMap.masters`, so routing a frame is one list lookup. :func:`parse_redirect` reads
the two redirections a node answers with when the slot is not (or no longer) its own:
``-MOVED slot host:port`` (the slot moved: refresh the map) and ``-ASK slot host:port`` (the
slot is migrating and this key already left: ask the target once, after ``ASKING``).

Reference: https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: how many hash slots a Redis Cluster has
SLOTS = 16384


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster computes it."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that is hashed: the text between the first ``{`` and the next
    ``}`` when that is not empty, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes | str) -> int:
    """The hash slot of a key or a sharded channel (``CLUSTER KEYSLOT``)."""
    data = key.encode() if isinstance(key, str) else key
    return crc16(hash_tag(data)) % SLOTS


class ClusterReplyError(ValueError):
    """A ``CLUSTER SLOTS`` reply this module cannot read."""


@dataclass(frozen=True, slots=True)
class SlotMap:
    """Which master owns each slot."""

    #: the masters, as (host, port)
    masters: tuple[tuple[str, int], ...]
    #: slot -> index into :attr:`masters` (-1: no master owns it: the cluster is not whole)
    owner: tuple[int, ...]

    def node_of(self, slot: int) -> tuple[str, int] | None:
        """The master of ``slot``, or None when no master owns it."""
        index = self.owner[slot]
        return self.masters[index] if index >= 0 else None

    @property
    def complete(self) -> bool:
        """Every slot has a master."""
        return -1 not in self.owner

    def unowned(self) -> int:
        """How many slots no master owns."""
        return self.owner.count(-1)


def parse_cluster_slots(reply: Any, default_host: str = "127.0.0.1") -> SlotMap:
    """A :class:`SlotMap` from a ``CLUSTER SLOTS`` reply (as hiredis or redis-py's raw
    ``execute_command`` return it: ``[[start, end, [host, port, id, ...], replicas...], ...]``).

    ``default_host`` stands for a master announced without a host (an empty string or ``?``:
    the node we asked does not know its own address; the caller knows it).

    Raises:
        ClusterReplyError: a reply that is not a list of slot ranges, a range outside
            0-16383 or backwards, a master without a port.
    """
    if not isinstance(reply, list):
        raise ClusterReplyError(f"CLUSTER SLOTS: expected a list, got {reply!r:.80}")
    masters: list[tuple[str, int]] = []
    index_of: dict[tuple[str, int], int] = {}
    owner = [-1] * SLOTS
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list):
            raise ClusterReplyError(f"CLUSTER SLOTS: bad slot range {entry!r:.80}")
        start, end = _int(entry[0]), _int(entry[1])
        if not 0 <= start <= end < SLOTS:
            raise ClusterReplyError(f"CLUSTER SLOTS: bad slot range {start}-{end}")
        node = _node(entry[2], default_host)
        index = index_of.get(node)
        if index is None:
            index = index_of[node] = len(masters)
            masters.append(node)
        owner[start : end + 1] = [index] * (end - start + 1)
    return SlotMap(tuple(masters), tuple(owner))


@dataclass(frozen=True, slots=True)
class Redirect:
    """A ``-MOVED`` or ``-ASK`` error reply."""

    #: "MOVED" or "ASK"
    kind: str
    slot: int
    host: str
    port: int


def parse_redirect(error: object, default_host: str = "") -> Redirect | None:
    """The redirection in an error reply (``MOVED 3999 127.0.0.1:6381``), or None when the
    error is something else. An empty host (``MOVED 3999 :6381``: the node does not know its
    own address) is ``default_host``, the host the error came from."""
    text = str(error)
    kind, _, rest = text.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot_text, _, where = rest.partition(" ")
    host, colon, port_text = where.strip().rpartition(":")
    if not colon or not slot_text.isdecimal() or not port_text.isdecimal():
        return None
    slot = int(slot_text)
    if slot >= SLOTS:
        return None
    return Redirect(kind, slot, host or default_host, int(port_text))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | bytes | str):
        raise ClusterReplyError(f"CLUSTER SLOTS: expected a number, got {value!r:.40}")
    try:
        return int(value)
    except ValueError:
        raise ClusterReplyError(f"CLUSTER SLOTS: expected a number, got {value!r:.40}") from None


def _node(fields: Sequence[Any], default_host: str) -> tuple[str, int]:
    if len(fields) < 2:
        raise ClusterReplyError(f"CLUSTER SLOTS: a master without a port {fields!r:.80}")
    raw = fields[0]
    host = raw.decode() if isinstance(raw, bytes) else str(raw or "")
    if host in ("", "?"):
        host = default_host
    port = _int(fields[1])
    if not 0 < port < 65536:
        raise ClusterReplyError(f"CLUSTER SLOTS: bad port {port}")
    return host, port


__all__ = [
    "SLOTS",
    "ClusterReplyError",
    "Redirect",
    "SlotMap",
    "crc16",
    "hash_tag",
    "key_slot",
    "parse_cluster_slots",
    "parse_redirect",
]
