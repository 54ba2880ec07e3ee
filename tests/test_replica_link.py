"""consumers.replica_link: does a subscriber on a node hear the master? (pure, table-driven:
``INFO replication`` texts as Redis 7.0 writes them)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from consumers.replica_link import Replication, full_resync, judge, parse_replication

MASTER_ID = "fbca9d8666241b5c18090bb9f07d5f3456a08dd8"
OTHER_ID = "c50c7633af2eda0e945874727f9ce4d955c6716e"

REPLICA_INFO = f"""# Replication\r
role:slave\r
master_host:127.0.0.1\r
master_port:17001\r
master_link_status:up\r
master_last_io_seconds_ago:1\r
master_sync_in_progress:0\r
slave_read_repl_offset:14\r
slave_repl_offset:14\r
slave_priority:100\r
connected_slaves:0\r
master_replid:{MASTER_ID}\r
master_replid2:0000000000000000000000000000000000000000\r
master_repl_offset:14\r
repl_backlog_active:1\r
repl_backlog_size:1048576\r
repl_backlog_first_byte_offset:1\r
repl_backlog_histlen:14\r
"""
IN_SYNC = parse_replication(REPLICA_INFO.encode())
assert IN_SYNC is not None
MASTER = Replication(role="master", replid=MASTER_ID, offset=14)


def test_info_is_read_as_text_bytes_or_redis_py_dict() -> None:
    assert (
        Replication(
            role="slave",
            link_up=True,
            sync_in_progress=False,
            replid=MASTER_ID,
            down_since_s=None,
            offset=14,
            backlog_first=1,
            backlog_histlen=14,
            backlog_size=1048576,
        )
        == IN_SYNC
    )
    as_dict = {"role": "slave", "master_link_status": "down", "master_sync_in_progress": 0,
               "master_link_down_since_seconds": 7, "slave_repl_offset": 20}  # fmt: skip
    down = parse_replication(as_dict)
    assert down is not None and not down.link_up and down.down_since_s == 7 and down.offset == 20
    text = "# Server\nrun_id:x\n# Replication\nrole:master\n"
    master = parse_replication(f"{text}master_replid:{MASTER_ID}\nmaster_repl_offset:9\n")
    assert master == Replication(role="master", replid=MASTER_ID, offset=9)


@pytest.mark.parametrize("info", [b"", "# Server\nrun_id:abc\n", {"role": "sentinel"}, None, 42])
def test_no_role_no_reading(info: object) -> None:
    assert parse_replication(info) is None


@pytest.mark.parametrize(
    ("node", "master_replid", "previous", "why"),
    [
        (IN_SYNC, MASTER_ID, None, None),
        (IN_SYNC, None, None, None),  # the master's id unknown: the link decides
        (replace(IN_SYNC, link_up=False), MASTER_ID, None, "link to its master is down"),
        (replace(IN_SYNC, link_up=False), None, None, "link to its master is down"),
        (replace(IN_SYNC, sync_in_progress=True), MASTER_ID, None, "resyncing"),
        (replace(IN_SYNC, replid=OTHER_ID), MASTER_ID, None, "another history"),
        (IN_SYNC, MASTER_ID, IN_SYNC, None),
        # a full sync since the previous reading: its backlog starts after the old offset
        (
            replace(IN_SYNC, offset=90, backlog_first=60, backlog_histlen=30),
            MASTER_ID,
            IN_SYNC,
            "resynced from scratch",
        ),
        (MASTER, MASTER_ID, None, None),  # the master itself
        (MASTER, None, None, None),
        (replace(MASTER, replid=OTHER_ID), MASTER_ID, None, "a master of its own"),
        (replace(MASTER, replid=OTHER_ID), None, IN_SYNC, "no replica any more"),
        (MASTER, MASTER_ID, IN_SYNC, "no replica any more"),  # promoted: a gap all the same
    ],
)
def test_judge(
    node: Replication, master_replid: str | None, previous: Replication | None, why: str | None
) -> None:
    verdict = judge(node, master_replid, previous)
    if why is None:
        assert verdict is None
    else:
        assert verdict is not None and why in verdict


@pytest.mark.parametrize(
    ("now", "full"),
    [
        (replace(IN_SYNC, offset=500, backlog_first=1, backlog_histlen=500), False),  # streaming
        # a partial resync continues the backlog
        (replace(IN_SYNC, offset=900, backlog_first=1, backlog_histlen=900), False),
        # a full sync: a new backlog from the master's offset at the sync
        (replace(IN_SYNC, offset=900, backlog_first=800, backlog_histlen=100), True),
        (replace(IN_SYNC, offset=15, backlog_first=15, backlog_histlen=0), False),  # one byte on
        (replace(IN_SYNC, offset=16, backlog_first=16, backlog_histlen=0), True),
        # a full backlog trimmed past the old offset: cannot be told from trimming, not judged
        (
            replace(IN_SYNC, offset=2_000_000, backlog_first=951_425, backlog_histlen=1_048_576),
            False,
        ),
        (replace(IN_SYNC, backlog_first=None), False),
    ],
)
def test_full_resync(now: Replication, full: bool) -> None:
    assert full_resync(IN_SYNC, now) is full
