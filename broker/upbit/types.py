"""Value types of the Upbit protocol: data types, formats, subscriptions and sets (pure).

A :class:`Subscription` is one data-type object of a request as Upbit sees it. A
:class:`SubscriptionSet` is what a connection (or a lease, or the broker's union) wants: a set of
streams, one per (type, code, orderbook level), each orderbook stream with the depth it needs.
Union and diff are plain functions over these frozen values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from broker.upbit.codes import (
    DEFAULT_DEPTH,
    format_level,
    normalize_depth,
    split_depth,
    with_depth,
)


class DataType(StrEnum):
    """Public quotation types served on ``/websocket/v1``."""

    TICKER = "ticker"
    TRADE = "trade"
    ORDERBOOK = "orderbook"
    CANDLE_1S = "candle.1s"
    CANDLE_1M = "candle.1m"
    CANDLE_3M = "candle.3m"
    CANDLE_5M = "candle.5m"
    CANDLE_10M = "candle.10m"
    CANDLE_15M = "candle.15m"
    CANDLE_30M = "candle.30m"
    CANDLE_60M = "candle.60m"
    CANDLE_240M = "candle.240m"

    @property
    def is_candle(self) -> bool:
        return self.value.startswith("candle.")


#: Candle units in seconds, by type.
CANDLE_SECONDS: dict[DataType, int] = {
    DataType.CANDLE_1S: 1,
    DataType.CANDLE_1M: 60,
    DataType.CANDLE_3M: 180,
    DataType.CANDLE_5M: 300,
    DataType.CANDLE_10M: 600,
    DataType.CANDLE_15M: 900,
    DataType.CANDLE_30M: 1800,
    DataType.CANDLE_60M: 3600,
    DataType.CANDLE_240M: 14400,
}

#: Private types; the public endpoint refuses them, the protocol core still knows their names.
PRIVATE_TYPES: frozenset[str] = frozenset({"myOrder", "myAsset"})
PUBLIC_TYPES: frozenset[str] = frozenset(t.value for t in DataType)


def parse_data_type(value: str) -> DataType:
    """``"ticker"`` -> ``DataType.TICKER``; raises ``ValueError`` for anything else."""
    return DataType(value)


class Format(StrEnum):
    """Frame formats: full or abbreviated field names, one object or a list per frame."""

    DEFAULT = "DEFAULT"
    SIMPLE = "SIMPLE"
    JSON_LIST = "JSON_LIST"
    SIMPLE_LIST = "SIMPLE_LIST"

    @property
    def is_simple(self) -> bool:
        return self in (Format.SIMPLE, Format.SIMPLE_LIST)

    @property
    def is_list(self) -> bool:
        return self in (Format.JSON_LIST, Format.SIMPLE_LIST)


class StreamType(StrEnum):
    SNAPSHOT = "SNAPSHOT"
    REALTIME = "REALTIME"


@dataclass(frozen=True, slots=True)
class Subscription:
    """One data-type object of a request.

    ``codes`` are as sent on the wire, so orderbook codes may carry a depth suffix (``KRW-BTC.15``).
    ``level`` only applies to orderbook (``None`` leaves it out of the request).
    """

    type: str
    codes: tuple[str, ...]
    level: float | None = None
    is_only_snapshot: bool = False
    is_only_realtime: bool = False


class StreamKey(NamedTuple):
    """One stream, and so one Redis channel: (type, plain code, orderbook level).

    A named tuple, not a dataclass: stream keys are hashed in every set operation and every
    per-burst bookkeeping step, and a tuple hashes in C (a dataclass's ``__hash__`` is Python).
    """

    type: str
    code: str
    level: float = 0.0


@dataclass(frozen=True, slots=True)
class SubscriptionSet:
    """What a connection, a lease or the union wants: streams, each with an orderbook depth.

    ``depths`` maps every stream to the depth it needs (30 for non-orderbook types, where it is
    meaningless). Two sets are equal when they hold the same streams at the same depths.
    """

    depths: Mapping[StreamKey, int] = field(default_factory=dict)
    # Views computed once per set: the status names the union and what upstream holds every
    # second, and the quiet check walks them; with Upbit's whole market (2,586 streams)
    # sorting them afresh each time was ~10% of the broker's CPU (issue 16).
    _sorted: tuple[StreamKey, ...] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )
    _by_type: dict[str, list[str]] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )
    _keys: frozenset[StreamKey] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        # A private copy, so that the caller's dict cannot change this frozen value later, and
        # the depth invariant enforced, so that equal sets compare equal: what Upbit serves for
        # the asked depth on orderbook streams, 30 everywhere else.
        depths = {
            key: normalize_depth(depth) if key.type == DataType.ORDERBOOK else DEFAULT_DEPTH
            for key, depth in self.depths.items()
        }
        object.__setattr__(self, "depths", depths)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def of(cls, streams: Mapping[str, Iterable[str]]) -> SubscriptionSet:
        """Build from ``{stream: [codes]}``, the inverse of :meth:`by_type`.

        A stream is a type or ``orderbook@LEVEL``; orderbook codes may carry a depth suffix.
        Raises ``ValueError`` for a level that is not a finite number >= 0, or on another type.
        """
        depths: dict[StreamKey, int] = {}
        for name, codes in streams.items():
            type_, level = split_stream_name(name)
            for raw in codes:
                code, depth = split_depth(raw) if type_ == DataType.ORDERBOOK else (raw, None)
                key = StreamKey(type_, code, level)
                depths[key] = max(depths.get(key, 0), normalize_depth(depth))
        return cls(depths)

    @classmethod
    def from_subscriptions(cls, subscriptions: Iterable[Subscription]) -> SubscriptionSet:
        """The streams a request's data-type objects ask for (flags are not part of a set)."""
        depths: dict[StreamKey, int] = {}
        for sub in subscriptions:
            level = float(sub.level or 0.0) if sub.type == DataType.ORDERBOOK else 0.0
            for raw in sub.codes:
                code, depth = split_depth(raw) if sub.type == DataType.ORDERBOOK else (raw, None)
                key = StreamKey(sub.type, code, level)
                depths[key] = max(depths.get(key, 0), normalize_depth(depth))
        return cls(depths)

    # -- views --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[StreamKey]:
        ordered = self._sorted
        if ordered is None:
            ordered = tuple(sorted(self.depths))
            object.__setattr__(self, "_sorted", ordered)
        return iter(ordered)

    def __len__(self) -> int:
        return len(self.depths)

    def __bool__(self) -> bool:
        return bool(self.depths)

    def __contains__(self, key: object) -> bool:
        return key in self.depths

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubscriptionSet):
            return NotImplemented
        return dict(self.depths) == dict(other.depths)

    def __hash__(self) -> int:
        return hash(frozenset(self.depths.items()))

    def keys(self) -> frozenset[StreamKey]:
        keys = self._keys
        if keys is None:
            keys = frozenset(self.depths)
            object.__setattr__(self, "_keys", keys)
        return keys

    def by_type(self) -> dict[str, list[str]]:
        """``{type: [codes]}``, sorted; orderbook codes carry a suffix when not 30 deep.

        Non-zero orderbook levels are listed under ``orderbook@LEVEL``. A fresh dict of fresh
        lists each call (the caller may change it), copied from one built once per set.
        """
        out = self._by_type
        if out is None:
            out = {}
            for key in self:
                name = key.type
                code = key.code
                if key.type == DataType.ORDERBOOK:
                    code = with_depth(code, self.depths[key])
                    if key.level:
                        name = f"{key.type}@{format_level(key.level)}"
                out.setdefault(name, []).append(code)
            object.__setattr__(self, "_by_type", out)
        return {name: codes.copy() for name, codes in out.items()}

    def to_subscriptions(
        self, *, is_only_snapshot: bool = False, is_only_realtime: bool = False
    ) -> list[Subscription]:
        """One data-type object per (type, level), codes sorted: the deterministic request body."""
        groups: dict[tuple[str, float], list[str]] = {}
        for key in sorted(self.depths):
            code = key.code
            if key.type == DataType.ORDERBOOK:
                code = with_depth(code, self.depths[key])
            groups.setdefault((key.type, key.level), []).append(code)
        return [
            Subscription(
                type=type_,
                codes=tuple(sorted(codes)),
                level=level if type_ == DataType.ORDERBOOK and level else None,
                is_only_snapshot=is_only_snapshot,
                is_only_realtime=is_only_realtime,
            )
            for (type_, level), codes in sorted(groups.items())
        ]


EMPTY = SubscriptionSet()


def split_stream_name(name: str) -> tuple[str, float]:
    """``"orderbook@10000"`` -> ``("orderbook", 10000.0)``; ``"ticker"`` -> ``("ticker", 0.0)``.

    The type is not checked against the known ones (callers do); the level is: it must be a
    finite number >= 0 on an orderbook, else ``ValueError``.
    """
    type_, at, level_text = name.partition("@")
    if not at:
        return name, 0.0
    if type_ != DataType.ORDERBOOK:
        raise ValueError(f"only orderbook streams have a level: {name!r}")
    level = float(level_text)  # ValueError for text that is no number
    if not math.isfinite(level) or level < 0:
        raise ValueError(f"orderbook level must be a finite number >= 0: {name!r}")
    return type_, level


def union(*sets: SubscriptionSet) -> SubscriptionSet:
    """Every stream any set wants; an orderbook stream gets the deepest depth asked for."""
    if len(sets) == 1:
        return sets[0]  # frozen values: the one set is its own union
    depths: dict[StreamKey, int] = {}
    for s in sets:
        if not depths:
            depths.update(s.depths)
            continue
        get = depths.get
        for key, depth in s.depths.items():
            known = get(key)
            if known is None or depth > known:
                depths[key] = depth
    # Every input already holds normalised depths, so the result needs no second pass.
    result = object.__new__(SubscriptionSet)
    for name, value in (("depths", depths), ("_sorted", None), ("_by_type", None), ("_keys", None)):
        object.__setattr__(result, name, value)
    return result


@dataclass(frozen=True, slots=True)
class SetDiff:
    """What changes from ``old`` to ``new``: streams added, removed, and re-depthed."""

    added: frozenset[StreamKey]
    removed: frozenset[StreamKey]
    depth_changed: frozenset[StreamKey]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.depth_changed)


def diff(old: SubscriptionSet, new: SubscriptionSet) -> SetDiff:
    """The change from ``old`` to ``new``."""
    old_keys, new_keys = old.keys(), new.keys()
    return SetDiff(
        added=new_keys - old_keys,
        removed=old_keys - new_keys,
        depth_changed=frozenset(k for k in old_keys & new_keys if old.depths[k] != new.depths[k]),
    )


def restrict(s: SubscriptionSet, keys: Iterable[StreamKey]) -> SubscriptionSet:
    """The part of ``s`` whose streams are in ``keys``."""
    wanted = set(keys)
    return SubscriptionSet({k: d for k, d in s.depths.items() if k in wanted})


__all__ = [
    "CANDLE_SECONDS",
    "DEFAULT_DEPTH",
    "EMPTY",
    "PRIVATE_TYPES",
    "PUBLIC_TYPES",
    "DataType",
    "Format",
    "SetDiff",
    "StreamKey",
    "StreamType",
    "Subscription",
    "SubscriptionSet",
    "diff",
    "parse_data_type",
    "restrict",
    "split_stream_name",
    "union",
]
