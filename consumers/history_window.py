"""A stream's retained window, judged (pure: stdlib and ``broker.keys``).

The broker appends every frame of a stream to a capped Redis Stream (``XADD key MAXLEN ~ N``):
trimming removes the OLDEST entries, a whole prefix at a time, and nothing else removes any
(the broker never XDELs). A durable consumer reads after ``last``, the last entry it delivered;
this module says whether entries after ``last`` were trimmed before it read them, and which.

Why not ``max-deleted-entry-id``: Redis 7.0 moves it on XDEL only, never on trimming (checked
against redis-server 7.0; redis/redis#11188, the fix, was closed unmerged). What trimming does
move is the gap between ``entries-added`` (every entry ever appended) and ``length`` (those
retained): ``entries-added - length`` entries were removed from the front. So a cursor counts,
besides ``last``, ``n``: how many entries of the stream came up to and including ``last``
(``entries-added`` when it started at the newest entry; plus one per entry delivered). Then:

    entries after ``last`` were trimmed unread  <=>  entries-added - length > n

exactly, and there were ``entries-added - length - n`` of them, the ones between ``last`` and
the oldest entry retained. :func:`judge` applies it to an ``XINFO STREAM`` read in the same
transaction as the XREAD (atomic: exact) or right after it (then the oldest entry retained
must still be the first one the XREAD returned; if trimming overtook that batch too, it cannot
tell and says :data:`UNSURE`: read again, atomically).

Without ``n`` (a cursor started at an offset the user gave, or after Redis restarted) or
without ``entries-added`` (Redis < 7) it judges by ids alone: the oldest entry retained above
``last``'s successor means entries after ``last`` were trimmed. Ids are not dense, so that
can announce a loss where no entry ever lay (conservative, and its count is unknown); the
cursor learns ``n`` at the first XINFO that finds it at the stream's newest entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.keys import HISTORY_FRAME_FIELD, HISTORY_ORIGIN_FIELD, HISTORY_ORIGIN_REST

#: an entry id, ``(milliseconds, sequence)``
Offset = tuple[int, int]
#: ``0-0``: before every entry
ZERO: Offset = (0, 0)
_MAX = 2**64 - 1
_OFFSET_RE = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")

_FRAME = HISTORY_FRAME_FIELD.encode()
_ORIGIN = HISTORY_ORIGIN_FIELD.encode()
_REST = HISTORY_ORIGIN_REST.encode()


def parse_offset(value: bytes | str) -> Offset:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``; a bare ``ms`` is ``(ms, 0)``.

    Raises:
        ValueError: not an entry id.
    """
    text = value.decode() if isinstance(value, bytes) else value
    match = _OFFSET_RE.match(text)
    if match is None:
        raise ValueError(f"not a stream entry id: {text!r} (expected e.g. '1700000000000-0')")
    ms, seq = int(match.group(1)), int(match.group(2) or 0)
    if ms > _MAX or seq > _MAX:
        raise ValueError(f"stream entry id out of range: {text!r}")
    return ms, seq


def offset_text(offset: Offset) -> str:
    return f"{offset[0]}-{offset[1]}"


def predecessor(offset: Offset) -> Offset:
    """The greatest id below ``offset`` (``0-0`` stays ``0-0``)."""
    ms, seq = offset
    if seq:
        return ms, seq - 1
    return (ms - 1, _MAX) if ms else ZERO


def successor(offset: Offset) -> Offset:
    """The smallest id above ``offset``."""
    ms, seq = offset
    return (ms, seq + 1) if seq < _MAX else (ms + 1, 0)


def entry_frame(fields: Sequence[bytes]) -> tuple[bytes, bool]:
    """``(frame, backfill)`` of one entry's field list (the broker writes ``f`` first)."""
    if len(fields) == 2 and fields[0] == _FRAME:
        return fields[1], False
    values = dict(zip(fields[::2], fields[1::2], strict=False))
    return values.get(_FRAME, b""), values.get(_ORIGIN) == _REST


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What ``XINFO STREAM`` says about a stream's window."""

    last_generated: Offset
    #: the oldest entry retained (``None``: the stream is empty)
    first: Offset | None
    length: int
    #: ``entries-added``; ``None`` where Redis (< 7) does not report it
    added: int | None

    @property
    def trimmed(self) -> int | None:
        """Entries removed from the front so far (``None``: not reported)."""
        return None if self.added is None else self.added - self.length

    @classmethod
    def parse(cls, reply: Any) -> StreamInfo:
        """From a raw reply (a flat list) or redis-py's parsed dict."""
        pairs: Iterable[tuple[Any, Any]]
        if isinstance(reply, dict):
            pairs = reply.items()
        else:
            pairs = zip(reply[::2], reply[1::2], strict=True)
        info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in pairs}
        first = info.get("first-entry")
        added = info.get("entries-added")
        return cls(
            last_generated=parse_offset(info["last-generated-id"]),
            first=parse_offset(first[0]) if first else None,
            length=int(info.get("length", 0)),
            added=int(added) if added is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Lost:
    """Entries after the cursor's ``last`` and before ``to`` were trimmed unread."""

    to: Offset
    #: how many (``None``: unknown, judged by ids alone)
    count: int | None
    #: the cursor's ``n`` at ``to``'s predecessor (``None``: unknown)
    n: int | None


#: :func:`judge`'s other verdicts: nothing lost; cannot tell (read again, atomically)
KEEP = "keep"
UNSURE = "unsure"
Verdict = Lost | str


def judge(
    last: Offset,
    n: int | None,
    info: StreamInfo | None,
    first_read: Offset | None,
    atomic: bool,
) -> Verdict:
    """Were entries after ``last`` (the ``n``-th entry of the stream) trimmed before the read
    that returned ``first_read`` first (``None``: it returned nothing)?

    ``info`` is ``XINFO STREAM`` (``None``: no such stream), read in the same transaction as
    that read (``atomic``) or right after it. See the module docstring for the rule.
    """
    if info is None:
        return KEEP  # no stream (yet, or any more): nothing retained to lose
    trimmed = info.trimmed
    if n is not None and trimmed is not None:
        if trimmed <= n:
            return KEEP
        if atomic:
            # nothing returned: everything after `last` is gone, up to the newest id
            to = first_read if first_read is not None else successor(info.last_generated)
            return Lost(to, trimmed - n, trimmed)
        if first_read is not None and info.first == first_read:
            return Lost(first_read, trimmed - n, trimmed)
        return UNSURE  # trimming overtook the batch read: how far was it before the read?
    # by ids alone (conservative): trimmed past `last`'s successor
    first = info.first
    if first is None or first <= successor(last) or first_read is None:
        return KEEP
    if atomic or first == first_read:
        return Lost(first_read, None, trimmed)
    return KEEP if first < first_read else UNSURE


def resolve_start(start: str, info: StreamInfo | None) -> tuple[Offset, int | None]:
    """Where a new cursor starts: ``(last, n)`` from ``start`` and the stream as it is now.

    ``$``: after the newest entry (only what is appended from now on); ``0``: before the oldest
    entry retained; an entry id ``ms-seq``: after that entry (e.g. the ``offset`` of the last
    message handled, to resume); a bare ``ms``: from that millisecond on.

    Raises:
        ValueError: ``start`` is none of these.
    """
    if start in ("$", "0", "0-0"):
        if info is None:
            return ZERO, 0  # no stream yet: every entry it will hold is new
        if start == "$" or info.first is None:
            return info.last_generated, info.added
        return predecessor(info.first), info.trimmed
    offset = parse_offset(start)
    return (offset if "-" in start else predecessor(offset)), None


def check_start(start: object) -> str:
    """``start`` as :func:`resolve_start` takes it (raises ``ValueError`` otherwise)."""
    if not isinstance(start, str):
        raise ValueError(f"start must be '$', '0' or an entry id string, got {start!r}")
    if start not in ("$", "0"):
        parse_offset(start)
    return start


__all__ = [
    "KEEP",
    "UNSURE",
    "ZERO",
    "Lost",
    "Offset",
    "StreamInfo",
    "Verdict",
    "check_start",
    "entry_frame",
    "judge",
    "offset_text",
    "parse_offset",
    "predecessor",
    "resolve_start",
    "successor",
]
