"""A stream's retained window, judged (pure: stdlib and ``broker.keys``).

The broker appends every frame of a stream to a capped Redis Stream (``XADD key MAXLEN ~ N``):
trimming removes the OLDEST entries, a whole prefix at a time, never below the cap ``N``, and
nothing else removes any (the broker never XDELs). A durable consumer reads after ``last``, the
last entry it delivered; this module says whether entries after ``last`` were lost before it
read them, and which. The rules, from the cheapest:

1. **A batch shorter than COUNT is whole.** A stream trimmed past ``last`` still holds at least
   its cap of entries, every one of them after ``last``: a read from ``last`` with a COUNT at
   most that cap returns a full COUNT. So a shorter batch is delivered as it is, with no other
   command: every read of a consumer that keeps up. (COUNT must not exceed the smallest cap of
   the streams read; the client clamps it to the caps the broker writes in its status.)
2. **While ``last`` is retained, nothing after it was trimmed** (trimming removes a prefix),
   and the stream is the one the cursor read (an entry of a deleted stream does not come
   back). A read that starts at ``last``'s predecessor returns ``last`` itself first exactly
   then: one entry more per stream, no other command. The reader reads that way a stream that
   was behind (its last batch was full), and every stream after it paused (waited for room,
   stalled, reconnected: unread entries may have gone meanwhile, trimmed or deleted); a batch
   that comes full unexpectedly is delivered once ``XRANGE key last last``, sent right after
   the read, still finds ``last`` (it was there during the read, then).
3. **Otherwise an ``XINFO STREAM`` counts**, in one ``MULTI`` with the next read (atomic: exact):
   when ``last`` is gone (its batch is dropped and read again), for a ``last`` that is no
   entry (a start at ``0`` or at a time, the end of a loss), to learn the count ``n`` below,
   after a Redis restart, and once every interval per stream (rule 5). No rate or timing is
   assumed: a stream is checked exactly when rules 1 and 2 cannot prove its batch whole, so
   a reader catching up on many streams sends none while their ``last`` entries are retained.
4. **The count.** ``entries-added - length`` entries were trimmed from the front (Redis 7.0
   moves ``max-deleted-entry-id`` on XDEL only, never on trimming: redis/redis#11188 was
   closed unmerged). A cursor counts ``n``, the entries of the stream up to and including
   ``last`` (``entries-added`` when it started at the newest entry, plus one per entry
   delivered). Then ``entries-added - length > n`` exactly when entries after ``last`` were
   trimmed unread, ``entries-added - length - n`` of them, from ``last`` to the oldest entry
   retained. Without ``n`` (a start at an offset the user gave, after a restart) or without
   ``entries-added`` (Redis < 7) it judges by ids: the oldest entry retained above ``last``'s
   successor is a loss of unknown count (conservative: ids are not dense).
5. **A stream deleted and recreated** (DEL, FLUSHALL, eviction, a Redis restart the reader
   missed) lost whatever the reader had not read, and its counters start again. A check sees
   it: no stream any more although the cursor had entries; ``entries-added < n`` (the counter
   went backwards); fewer than ``n`` trimmed yet the oldest entry retained after ``last``; or
   ``last-generated-id`` below ``last`` (the new server's clock is behind: XREAD from ``last``
   would skip the new entries). That is a loss of unknown count, and the cursor goes on from
   the new stream's start. One case is left to the check every interval: a stream deleted in
   the moment between two reads of a reader that keeps up (it reads the new stream's entries
   as if nothing happened, their ids being above ``last``); the check tells then, late, and
   the cursor goes on where it is in the new stream (nothing is delivered twice).
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
    """Entries after the cursor's ``last`` and before ``to`` were lost unread.

    ``recreated``: the stream was deleted and recreated (rule 5 of the module docstring); the
    count is unknown and ``to`` is the oldest entry of the new stream (``None``: it holds none).
    """

    #: the oldest entry retained after the loss (``None``: none yet)
    to: Offset | None
    #: how many (``None``: unknown, judged by ids alone or the stream was recreated)
    count: int | None
    #: the cursor's ``n`` where it goes on (``None``: unknown)
    n: int | None
    recreated: bool = False
    #: where the cursor goes on (``None``: just before ``to``, never back); a recreated
    #: stream sets it, maybe below ``last`` (ids of a new stream may be lower)
    resume: Offset | None = None
    #: the cursor's ``last`` is an entry of the new stream already (it read on as if nothing
    #: happened): the loss lies before, and it goes on where it is
    inside: bool = False


#: :func:`judge`'s other verdicts: nothing lost; cannot tell (read again, atomically)
KEEP = "keep"
UNSURE = "unsure"
Verdict = Lost | str


def stream_start(info: StreamInfo | None) -> tuple[Offset, int | None]:
    """``(last, n)`` of a cursor before the stream's oldest entry retained (``n`` ``None``:
    Redis < 7 does not count)."""
    if info is None:
        return ZERO, 0  # no stream (yet): every entry it will hold is new
    if info.first is None:
        return info.last_generated, info.added
    return predecessor(info.first), info.trimmed


def judge(
    last: Offset,
    n: int | None,
    info: StreamInfo | None,
    first_read: Offset | None,
    atomic: bool,
    *,
    last_retained: bool | None = None,
    restarted: bool = False,
) -> Verdict:
    """Were entries after ``last`` (the ``n``-th entry of the stream) lost before the read
    that returned ``first_read`` first (``None``: it returned nothing)?

    ``info`` is ``XINFO STREAM`` (``None``: no such stream), read in the same transaction as
    that read (``atomic``) or right after it; ``last_retained``: whether the entry ``last`` was
    there in that transaction (``None``: not asked); ``restarted``: Redis restarted since the
    cursor last read (the restart was announced already). See the module docstring for the
    rules.
    """
    if info is None:
        if last == ZERO:
            return KEEP  # no stream yet: every entry it will hold is new
        # deleted (or gone with a restart): whatever the cursor had not read went with it,
        # and what the stream holds from now on is new, whatever its ids
        return Lost(None, None, 0, recreated=True, resume=ZERO)
    start, start_n = stream_start(info)
    if restarted:
        if last_retained:
            return KEEP  # Redis kept the stream (persistence): read on
        return Lost(info.first, None, start_n, recreated=True, resume=start)
    if info.last_generated < last:
        # a new stream whose ids stay below `last`: XREAD after `last` would skip them
        return Lost(info.first, None, start_n, recreated=True, resume=start)
    trimmed = info.trimmed
    if n is not None and info.added is not None and trimmed is not None:
        first = info.first
        if info.added < n or (trimmed < n and first is not None and first > last):
            if last_retained:
                # the reader already reads the new stream: go on, learn `n` again
                return Lost(first, None, None, recreated=True, resume=last, inside=True)
            return Lost(first, None, start_n, recreated=True, resume=start)
        if trimmed <= n or last_retained:
            return KEEP
        if atomic:
            # nothing returned: everything after `last` is gone, up to the newest id
            to = first_read if first_read is not None else successor(info.last_generated)
            return Lost(to, trimmed - n, trimmed)
        if first_read is not None and info.first == first_read:
            return Lost(first_read, trimmed - n, trimmed)
        return UNSURE  # trimming overtook the batch read: how far was it before the read?
    if last_retained:
        return KEEP
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

    An offset above the stream's newest id (it came from a stream deleted since, or from before
    a Redis restart) is clamped to the newest id, and with no stream to ``0-0``: what the
    stream holds from now on is new, and XREAD from the offset would skip it until the
    clock passed it (:func:`beyond_stream` says when).

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
    last = offset if "-" in start else predecessor(offset)
    if info is None:
        return ZERO, 0
    if last > info.last_generated:
        return info.last_generated, info.added
    return last, None


def beyond_stream(start: str, info: StreamInfo | None) -> bool:
    """Whether :func:`resolve_start` clamped the offset ``start`` (see there)."""
    if start in ("$", "0", "0-0"):
        return False
    offset = parse_offset(start)
    last = offset if "-" in start else predecessor(offset)
    return last != ZERO and (info is None or last > info.last_generated)


def newest_live(entries: Sequence[Any]) -> Any | None:
    """The newest of raw XREAD entries that is not back-filled (``origin`` ``rest``).

    The back-fill appends what it fetched after the live entries appended meanwhile: the
    newest entry may be an old frame, never the state to keep for a latest-only stream.
    """
    for entry in reversed(entries):
        if not entry_frame(entry[1])[1]:
            return entry
    return None


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
    "beyond_stream",
    "check_start",
    "entry_frame",
    "judge",
    "newest_live",
    "offset_text",
    "parse_offset",
    "predecessor",
    "resolve_start",
    "stream_start",
    "successor",
]
