"""The durable road's pure rules: entry ids, where a stream starts, when a loss is announced,
and the queue's held and latest-only messages (no Redis)."""

from __future__ import annotations

import asyncio

import pytest

from consumers import StreamMessage
from consumers.history_window import (
    KEEP,
    UNSURE,
    ZERO,
    Lost,
    StreamInfo,
    beyond_stream,
    check_start,
    entry_frame,
    judge,
    newest_live,
    parse_offset,
    predecessor,
    resolve_start,
    stream_start,
    successor,
)
from consumers.queue import DropOldestQueue, QueueClosed

MAX = 2**64 - 1


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("0-0", (0, 0)),
        ("1700000000000-3", (1700000000000, 3)),
        (b"1700000000000-3", (1700000000000, 3)),
        ("1700000000000", (1700000000000, 0)),
        (f"1-{MAX}", (1, MAX)),
    ],
)
def test_parse_offset(text: str | bytes, offset: tuple[int, int]) -> None:
    assert parse_offset(text) == offset


@pytest.mark.parametrize("text", ["", "$", "-1", "1-", "a-1", "1-2-3", f"1-{MAX + 1}", " 1-0"])
def test_parse_offset_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="entry id"):
        parse_offset(text)


def test_neighbours_in_id_space() -> None:
    assert predecessor((5, 3)) == (5, 2)
    assert predecessor((5, 0)) == (4, MAX)
    assert predecessor(ZERO) == ZERO
    assert successor((5, 3)) == (5, 4)
    assert successor((5, MAX)) == (6, 0)
    assert successor(predecessor((5, 0))) == (5, 0)


def info(
    last: tuple[int, int], first: tuple[int, int] | None, length: int, added: int | None
) -> StreamInfo:
    return StreamInfo(last_generated=last, first=first, length=length, added=added)


# entries 10-0 .. 100-0: 91 retained of 100 ever added (9 trimmed)
STREAM = info((100, 0), (10, 0), 91, 100)


@pytest.mark.parametrize(
    ("start", "stream", "where"),
    [
        ("$", None, (ZERO, 0)),  # no stream yet: every entry it will hold is new
        ("$", STREAM, ((100, 0), 100)),
        ("0", None, (ZERO, 0)),
        ("0", STREAM, ((9, MAX), 9)),  # just before the oldest retained, the 9 trimmed before
        ("0", info((100, 0), None, 0, 100), ((100, 0), 100)),  # emptied: after the last id
        ("$", info((100, 0), (10, 0), 91, None), ((100, 0), None)),  # Redis < 7: no count
        ("50-2", STREAM, ((50, 2), None)),  # resume after that entry (its count unknown)
        ("50", STREAM, ((49, MAX), None)),  # from that millisecond on
        ("100-0", STREAM, ((100, 0), None)),  # its newest entry
        # above the newest id (a stream deleted since, another server): clamped to it, and
        # with no stream to before the first entry it will hold
        ("100-1", STREAM, ((100, 0), 100)),
        ("101", STREAM, ((100, 0), 100)),
        ("50-2", None, (ZERO, 0)),
    ],
)
def test_resolve_start(
    start: str, stream: StreamInfo | None, where: tuple[tuple[int, int], int | None]
) -> None:
    assert resolve_start(start, stream) == where


@pytest.mark.parametrize(
    ("start", "stream", "beyond"),
    [
        ("$", None, False),
        ("0", STREAM, False),
        ("100-0", STREAM, False),
        ("100-1", STREAM, True),
        ("101", STREAM, True),
        ("50-2", None, True),
        ("0-0", None, False),
    ],
)
def test_beyond_stream_says_when_a_start_was_clamped(
    start: str, stream: StreamInfo | None, beyond: bool
) -> None:
    assert beyond_stream(start, stream) is beyond


def test_stream_start_is_just_before_the_oldest_entry_retained() -> None:
    assert stream_start(None) == (ZERO, 0)
    assert stream_start(STREAM) == ((9, MAX), 9)
    assert stream_start(info((100, 0), None, 0, 100)) == ((100, 0), 100)


@pytest.mark.parametrize("start", [0, None, "now", "1-x", b"0"])
def test_check_start_refuses(start: object) -> None:
    with pytest.raises(ValueError):
        check_start(start)


# (last delivered, its n, XINFO, first entry the read returned, atomic) -> verdict.
# In the stream below 200 entries were added, 150 retained: the first 50 were trimmed.
W = info((300, 0), (101, 0), 150, 200)
OLD = info((300, 0), (101, 0), 150, None)  # Redis < 7: no entries-added
JUDGE_CASES = [
    # the cursor is past what was trimmed: nothing lost
    ((120, 0), 60, W, (121, 0), True, KEEP),
    ((100, 0), 50, W, (101, 0), True, KEEP),  # exactly at the edge
    ((100, 0), 50, W, (101, 0), False, KEEP),
    # it was the 40th: the 41st to 50th were trimmed unread, up to the oldest retained
    ((90, 0), 40, W, (101, 0), True, Lost((101, 0), 10, 50)),
    ((90, 0), 40, W, (101, 0), False, Lost((101, 0), 10, 50)),
    # XINFO after the read: trimming overtook the batch read, how far was it before?
    ((90, 0), 40, info((300, 0), (105, 0), 146, 200), (101, 0), False, UNSURE),
    # atomic and nothing retained any more: lost up to just after the newest id
    ((90, 0), 40, info((300, 0), None, 0, 200), None, True, Lost((300, 1), 160, 200)),
    # no stream: none yet (nothing read), or deleted (what was not read went with it)
    (ZERO, 0, None, None, True, KEEP),
    ((90, 0), 40, None, None, True, Lost(None, None, 0, recreated=True, resume=ZERO)),
    # the count unknown (a start the user gave, Redis < 7): by ids, conservatively
    ((100, 5), None, W, (101, 0), True, Lost((101, 0), None, 50)),
    ((100, 5), None, OLD, (101, 0), False, Lost((101, 0), None, None)),
    ((101, 0), None, W, (102, 0), True, KEEP),  # inside the window
    ((100, MAX), None, W, (101, 0), True, KEEP),  # the oldest retained is the successor
    ((100, 5), None, info((300, 0), (105, 0), 146, None), (101, 0), False, UNSURE),
]  # fmt: skip


# A stream deleted and recreated: 3 entries added since (ids 400-0 .. 402-0), none trimmed.
NEW = info((402, 0), (400, 0), 3, 3)
RECREATED = Lost((400, 0), None, 0, recreated=True, resume=(399, MAX))
RECREATED_CASES = [
    # the counter went backwards: entries-added 3 < the 50 the cursor counted
    ((100, 0), 50, NEW, (400, 0), None, False, RECREATED),
    # fewer than n trimmed, yet the oldest entry retained lies after `last`
    ((100, 0), 50, info((500, 0), (400, 0), 60, 70), (400, 0), None, False,
     Lost((400, 0), None, 10, recreated=True, resume=(399, MAX))),
    # ids below `last` (a new server's clock behind): from its start, not after `last`
    ((900, 0), 50, NEW, None, None, False, RECREATED),
    ((900, 0), None, NEW, None, None, False, RECREATED),
    # it reads the new stream already (`last` is in it): on from there, its count unknown
    ((401, 0), 52, NEW, (402, 0), True, False,
     Lost((400, 0), None, None, recreated=True, resume=(401, 0), inside=True)),
    # `last` still there and the counts agree: nothing lost, whatever the ids say
    ((100, 0), 50, W, (101, 0), True, False, KEEP),
    ((100, 5), None, W, (101, 0), True, False, KEEP),
    # after a Redis restart: on from `last` if Redis kept the stream, else from its start
    ((100, 0), None, W, (101, 0), True, True, KEEP),
    ((100, 0), None, NEW, (400, 0), False, True, RECREATED),
    ((401, 0), None, NEW, (402, 0), None, True, RECREATED),  # `last` no entry: from the start
    ((100, 0), None, None, None, None, True, Lost(None, None, 0, recreated=True, resume=ZERO)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("last", "n", "stream", "first_read", "retained", "restarted", "verdict"), RECREATED_CASES
)
def test_judge_a_recreated_stream(
    last: tuple[int, int],
    n: int | None,
    stream: StreamInfo | None,
    first_read: tuple[int, int] | None,
    retained: bool | None,
    restarted: bool,
    verdict: object,
) -> None:
    got = judge(last, n, stream, first_read, True, last_retained=retained, restarted=restarted)
    assert got == verdict


def test_newest_live_skips_back_filled_entries() -> None:
    live = [b"1-0", [b"f", b"a"]]
    filled = [b"2-0", [b"f", b"b", b"origin", b"rest"]]
    newer = [b"3-0", [b"f", b"c"]]
    assert newest_live([live, filled]) == live
    assert newest_live([live, filled, newer]) == newer
    assert newest_live([filled]) is None
    assert newest_live([]) is None


@pytest.mark.parametrize(("last", "n", "stream", "first_read", "atomic", "verdict"), JUDGE_CASES)
def test_judge(
    last: tuple[int, int],
    n: int | None,
    stream: StreamInfo | None,
    first_read: tuple[int, int] | None,
    atomic: bool,
    verdict: object,
) -> None:
    assert judge(last, n, stream, first_read, atomic) == verdict


def test_stream_info_from_raw_and_from_redis_py() -> None:
    raw = [
        b"length", 2, b"last-generated-id", b"7-1", b"max-deleted-entry-id", b"0-0",
        b"entries-added", 9, b"first-entry", [b"5-0", [b"f", b"x"]],
        b"last-entry", [b"7-1", [b"f", b"y"]],
    ]  # fmt: skip
    parsed = {
        "length": 2,
        "last-generated-id": b"7-1",
        "entries-added": 9,
        "first-entry": (b"5-0", {b"f": b"x"}),
    }
    want = StreamInfo(last_generated=(7, 1), first=(5, 0), length=2, added=9)
    assert StreamInfo.parse(raw) == want
    assert StreamInfo.parse(parsed) == want
    assert want.trimmed == 7
    old = StreamInfo.parse([b"length", 0, b"last-generated-id", b"7-1", b"first-entry", None])
    assert old == StreamInfo(last_generated=(7, 1), first=None, length=0, added=None)
    assert old.trimmed is None


def test_entry_frame_reads_the_frame_and_the_backfill_mark() -> None:
    assert entry_frame([b"f", b"{}"]) == (b"{}", False)
    assert entry_frame([b"f", b"{}", b"origin", b"rest"]) == (b"{}", True)
    assert entry_frame([b"origin", b"rest", b"f", b"{}"]) == (b"{}", True)
    assert entry_frame([b"f", b"{}", b"origin", b"ws"]) == (b"{}", False)


# -- the queue ----------------------------------------------------------------------------------


def msg(n: int, channel: str = "upbit:ticker:KRW-BTC", offset: str | None = None) -> StreamMessage:
    return StreamMessage(
        channel=channel,
        type="ticker",
        stream="ticker",
        code=channel.rsplit(":", 1)[1],
        level=0.0,
        raw=b'{"n":%d}' % n,
        received_ms=1000 + n,
        offset=offset,
    )


def drain(q: DropOldestQueue) -> list[object]:
    out: list[object] = []
    while (item := q.get_nowait()) is not None:
        out.append(item)
    return out


def test_held_messages_are_never_discarded_and_keep_their_order() -> None:
    q = DropOldestQueue(3)
    held = [msg(n, "upbit:trade:KRW-ETH", offset=f"{n}-0") for n in range(5)]
    for n in range(10):  # droppable pub/sub messages, interleaved with held ones
        q.put(msg(n))
        if n < 5:
            q.put(held[n])
    assert q.held == 5 and q.dropped == 7
    out = drain(q)
    assert [m for m in out if isinstance(m, StreamMessage) and m.offset] == held
    assert q.held == 0


def test_latest_only_keeps_the_newest_in_the_place_of_the_oldest() -> None:
    q = DropOldestQueue(10)
    q.put(msg(1, "upbit:ticker:KRW-BTC"), latest=True)
    q.put(msg(100, "upbit:ticker:KRW-ETH"))
    for n in range(2, 6):
        q.put(msg(n, "upbit:ticker:KRW-BTC"), latest=True)
    out = drain(q)
    assert [(m.code, m.raw) for m in out if isinstance(m, StreamMessage)] == [
        ("KRW-BTC", b'{"n":5}'),
        ("KRW-ETH", b'{"n":100}'),
    ]
    assert q.conflated == 4 and q.dropped == 0  # 1 to 4 replaced, each by the next
    newer = msg(6, "upbit:ticker:KRW-BTC")
    q.put(newer, latest=True)  # the last one was taken: this one takes a new place
    assert drain(q) == [newer]


def test_latest_only_held_messages_count_once() -> None:
    q = DropOldestQueue(10)
    for n in range(1, 6):
        q.put(msg(n, offset=f"{n}-0"), latest=True)
    assert q.held == 1 and len(q) == 1
    (only,) = drain(q)
    assert isinstance(only, StreamMessage) and only.offset == "5-0"
    assert q.held == 0


async def test_wait_room_waits_until_half_the_queue_is_free() -> None:
    q = DropOldestQueue(10)
    assert await q.wait_room(4) is False  # room already
    for n in range(10):
        q.put(msg(n, offset=f"{n}-0"))
    assert q.room() == 0
    waiter = asyncio.ensure_future(q.wait_room(100))  # capped at half the queue: 5
    for _ in range(4):
        q.get_nowait()
        await asyncio.sleep(0)
        assert not waiter.done()
    q.get_nowait()  # five taken: five fit
    assert await asyncio.wait_for(waiter, 1) is True
    q.close()
    with pytest.raises(QueueClosed):
        await q.wait_room(1)
