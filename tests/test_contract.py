"""The wire contract (broker/contract.py): docs/design.md and the Structs name the same fields
with the same types; every Struct round-trips; every shape the broker and the consumers put on
the wire today decodes, and encodes back to the very same bytes. Pure: no Redis, no loop."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.contract import (
    COMMAND_TYPES,
    DROP_REASONS,
    EVENT_TYPES,
    LEASE_FIELDS,
    REPLY_TYPES,
    STATUS_FIELDS,
    CommandError,
    ConnectedEvent,
    ContractError,
    DroppedFrames,
    ErrorReply,
    GapEvent,
    LeaderEvent,
    LeaseEvent,
    LeaseRecord,
    ResubscribeCommand,
    ResubscribeReply,
    SnapshotCommand,
    SnapshotReply,
    Status,
    UnknownEvent,
    check_health,
    decode_command,
    decode_event,
    decode_reply,
    decode_status,
    encode_command,
    encode_event,
    encode_reply,
    encode_status,
)
from tests.support.imports import IO_AND_OUTER_LAYERS, modules_loaded_by

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"

# -- docs/design.md against the Structs ---------------------------------------------------------

Table = list[list[str]]


def design_tables(heading: str) -> dict[str, Table]:
    """The tables of the ``## {heading}...`` section, by the text of their first header cell;
    each row as its cells."""
    text = DESIGN.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    [section] = [s for s in sections if s.startswith(heading)]
    tables: dict[str, Table] = {}
    rows: Table = []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if rows:
            header, _separator, *body = rows
            tables[header[0]] = body
            rows = []
    return tables


def name(cell: str) -> str:
    """The first `backticked` word of a cell."""
    found = re.search(r"`([^`]+)`", cell)
    assert found, f"no `name` in table cell {cell!r}"
    return found.group(1)


def kind(tp: Any) -> str:
    """The word design.md uses for a field's type (its type column starts with it)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if isinstance(tp, types.UnionType):
        kept = [t for t in typing.get_args(tp) if t not in (type(None), msgspec.UnsetType)]
        [tp] = kept
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        return "boolean"
    if origin is int:
        return "integer"
    if origin is float:
        return "number"
    if origin is str:
        return "string"
    if origin is list:
        return "array"
    if origin is dict or (isinstance(origin, type) and issubclass(origin, msgspec.Struct)):
        return "object"
    raise AssertionError(f"no documented kind for {tp!r}")


def struct_kinds(struct: type[msgspec.Struct]) -> dict[str, str]:
    return {f.name: kind(f.type) for f in msgspec.structs.fields(struct)}


def documented(rows: Table, name_col: int = 0, type_col: int = 1) -> dict[str, str]:
    """``{field: the first word of its type cell}``; a field documented twice is an error."""
    out: dict[str, str] = {}
    for row in rows:
        field = name(row[name_col])
        assert field not in out, f"{field} documented twice"
        out[field] = row[type_col].split()[0]
    return out


def by_first_column(rows: Table) -> dict[str, Table]:
    grouped: dict[str, Table] = {}
    for row in rows:
        grouped.setdefault(name(row[0]), []).append(row[1:])
    return grouped


def test_design_lease_table_is_the_lease_record() -> None:
    rows = design_tables("Lease")["field"]
    assert documented(rows) == struct_kinds(LeaseRecord)


def test_design_status_table_is_the_status_struct() -> None:
    tables = design_tables("Status")
    assert documented(tables["field"]) == struct_kinds(Status)
    assert [name(row[0]) for row in tables["reason"]] == list(DROP_REASONS)
    assert set(struct_kinds(DroppedFrames).values()) == {"integer"}


def test_design_event_tables_are_the_event_structs() -> None:
    rows = by_first_column(design_tables("Events")["event"])
    structs = {t.__struct_config__.tag: t for t in EVENT_TYPES}
    assert set(rows) == set(structs)
    for tag, struct in structs.items():
        assert documented(rows[str(tag)]) == struct_kinds(struct), tag


def test_design_command_and_reply_tables_are_the_structs() -> None:
    tables = design_tables("Commands to the leader")
    commands = by_first_column(tables["op"])
    structs = {t.__struct_config__.tag: t for t in COMMAND_TYPES}
    assert set(commands) == set(structs)
    for op, struct in structs.items():
        assert documented(commands[str(op)]) == struct_kinds(struct), op
    replies = by_first_column(tables["reply to"])
    assert set(replies) == set(REPLY_TYPES)
    for key, reply in REPLY_TYPES.items():
        assert documented(replies[key]) == struct_kinds(reply), key


def test_lease_record_is_the_field_set_parse_lease_requires() -> None:
    from broker.core import lease as lease_rules

    assert set(LEASE_FIELDS) == set(lease_rules._REQUIRED_FIELDS)


def test_the_contract_module_is_pure() -> None:
    loaded = modules_loaded_by("import broker.contract")
    out = ",".join(sorted(m for m in loaded if m.split(".")[0] in IO_AND_OUTER_LAYERS))
    assert out == "", f"broker.contract imported I/O modules: {out}"


# -- what the broker and the consumers put on the wire today ------------------------------------

#: Exactly what broker/service.py and broker/lease_feedback.py published before the contract
#: (dicts encoded by msgspec), one of each shape.
EVENTS_ON_THE_WIRE: list[tuple[bytes, type[msgspec.Struct]]] = [
    (b'{"event":"leader","broker":"b1","ts_ms":1796414461000}', LeaderEvent),
    (b'{"event":"connected","epoch":7,"broker":"b1","ts_ms":1796414461431}', ConnectedEvent),
    (
        b'{"event":"gap","epoch":7,"since_ms":1796414460000,"until_ms":1796414461431,'
        b'"reason":"takeover","broker":"b1"}',
        GapEvent,
    ),
    (
        b'{"event":"lease","client_id":"my-bot","state":"partial","why":"serving 1 stream, '
        b"rejected 1 entry: invalid market code 'krw-eth' in ticker\","
        b'"rejected":{"ticker":["krw-eth"]},"rejected_count":1,"broker":"b1",'
        b'"ts_ms":1796414461431}',
        LeaseEvent,
    ),
    (
        b'{"event":"lease","client_id":"c","state":"invalid","why":"subs is not JSON",'
        b'"broker":"b1","ts_ms":1}',
        LeaseEvent,
    ),
    (
        b'{"event":"lease","client_id":"c","state":"expired","why":"not renewed before its '
        b'deadline; renew every ttl_ms/3 (the heartbeat)","broker":"b1","ts_ms":2}',
        LeaseEvent,
    ),
]

#: What consumers/commands.py sent before the contract, and the leader's answers.
COMMANDS_ON_THE_WIRE: list[tuple[bytes, type[msgspec.Struct]]] = [
    (
        b'{"op":"snapshot","type":"ticker","codes":["KRW-BTC","KRW-ETH"],"level":0.0,'
        b'"timeout_ms":2400,"id":"5f0c"}',
        SnapshotCommand,
    ),
    (
        b'{"op":"snapshot","type":"orderbook@10000","codes":["KRW-BTC"],"level":10000.0,'
        b'"timeout_ms":800,"id":"a1"}',
        SnapshotCommand,
    ),
    (b'{"op":"resubscribe","id":"9e"}', ResubscribeCommand),
]

REPLIES_ON_THE_WIRE: list[tuple[bytes, str, type[msgspec.Struct]]] = [
    (
        b'{"id":"5f0c","ok":true,"frames":{"KRW-BTC":{"type":"ticker","code":"KRW-BTC",'
        b'"trade_price":1.5}},"missing":["KRW-ETH"],"source":{"KRW-BTC":"cache"}}',
        "snapshot",
        SnapshotReply,
    ),
    (
        b'{"id":"9e","ok":true,"epoch":3,"upstream":{"ticker":["KRW-BTC"]}}',
        "resubscribe",
        ResubscribeReply,
    ),
    (b'{"id":"x","ok":false,"error":"unknown op \'launch\'"}', "snapshot", ErrorReply),
    (b'{"id":"x","ok":false,"error":"codes must be a non-empty list"}', "resubscribe", ErrorReply),
]

#: A status hash as broker/service.py wrote it before the contract (no breakdown, no interval).
STATUS_BEFORE = {
    b"leader": b"b1",
    b"connected": b"1",
    b"epoch": b"3",
    b"reconnects": b"1",
    b"resubscribes": b"4",
    b"list_requests": b"4",
    b"verify_mismatches": b"2",
    b"deferred_sends": b"5",
    b"desired": b'{"ticker":["KRW-BTC"],"orderbook@10000":["KRW-ETH.5"]}',
    b"upstream": b'{"ticker":["KRW-BTC"]}',
    b"last_error": b"",
    b"frames_in": b"120",
    b"frames_published": b"100",
    b"frames_dropped": b"9",
    b"frames_malformed": b"2",
    b"leases": b"2",
    b"invalid_leases": b"1",
    b"partial_leases": b"1",
    b"rejected_streams": b"3",
    b"last_frame_ms": b"1796414461000",
    b"updated_ms": b"1796414461431",
    b"upstream_url": b"wss://api.upbit.com/websocket/v1",
    b"quiet_codes": b'["ticker:KRW-XRP"]',
    b"redis_errors": b"0",
}


@pytest.mark.parametrize(("raw", "struct"), EVENTS_ON_THE_WIRE)
def test_every_event_the_broker_publishes_decodes_and_encodes_to_the_same_bytes(
    raw: bytes, struct: type[msgspec.Struct]
) -> None:
    event = decode_event(raw)
    assert type(event) is struct
    assert not isinstance(event, UnknownEvent)
    assert encode_event(event) == raw


@pytest.mark.parametrize(("raw", "struct"), COMMANDS_ON_THE_WIRE)
def test_every_command_a_client_sends_decodes(raw: bytes, struct: type[msgspec.Struct]) -> None:
    command = decode_command(raw)
    assert type(command) is struct
    assert decode_command(encode_command(command)) == command


@pytest.mark.parametrize(("raw", "op", "struct"), REPLIES_ON_THE_WIRE)
def test_every_reply_the_broker_sends_decodes_and_encodes_to_the_same_bytes(
    raw: bytes, op: Any, struct: type[msgspec.Struct]
) -> None:
    reply = decode_reply(raw, op)
    assert type(reply) is struct
    assert encode_reply(reply) == raw


def test_a_status_of_the_previous_broker_decodes_typed() -> None:
    status = decode_status(STATUS_BEFORE)
    assert status.connected is True and status.leader == "b1"
    # these two were strings in `status --json`
    assert status.verify_mismatches == 2 and status.deferred_sends == 5
    assert status.desired == {"ticker": ["KRW-BTC"], "orderbook@10000": ["KRW-ETH.5"]}
    assert status.quiet_codes == ["ticker:KRW-XRP"]
    # no breakdown from that broker: its totals stay as written, the interval unknown
    assert status.frames_dropped == 9 and status.frames_malformed == 2
    assert status.frames_dropped_by_reason == DroppedFrames()
    assert status.status_interval_ms == 0 and status.interval_s(2.5) == 2.5
    as_text = {k.decode(): v.decode() for k, v in STATUS_BEFORE.items()}
    assert decode_status(as_text) == status


# -- round trips --------------------------------------------------------------------------------

FULL_STATUS = Status(
    leader="b1",
    leader_token="9f3c0a1b2c3d4e5f",
    connected=True,
    epoch=3,
    reconnects=1,
    resubscribes=4,
    list_requests=4,
    verify_mismatches=2,
    deferred_sends=5,
    desired={"ticker": ["KRW-BTC"], "orderbook@10000": ["KRW-ETH.5"]},
    upstream={"ticker": ["KRW-BTC"]},
    last_error="upstream closed 1006",
    frames_in=120,
    frames_published=100,
    frames_dropped_by_reason=DroppedFrames(unleased=3, malformed=2, overflow=1, redis=4),
    leases=2,
    invalid_leases=1,
    partial_leases=1,
    rejected_streams=3,
    redis_errors=6,
    last_frame_ms=1796414461000,
    updated_ms=1796414461431,
    status_interval_ms=1000,
    upstream_url="wss://api.upbit.com/websocket/v1",
    quiet_codes=["ticker:KRW-XRP"],
)


def test_status_round_trips_through_the_hash() -> None:
    fields = encode_status(FULL_STATUS)
    assert set(fields) == set(STATUS_FIELDS)
    assert all(isinstance(v, str) for v in fields.values())
    assert fields["connected"] == "1" and fields["epoch"] == "3"
    assert fields["frames_dropped"] == "10" and fields["frames_malformed"] == "2"
    assert msgspec.json.decode(fields["frames_dropped_by_reason"]) == {
        "unleased": 3,
        "malformed": 2,
        "overflow": 1,
        "not_leader": 0,
        "redis": 4,
    }
    assert decode_status(fields) == FULL_STATUS
    assert decode_status({k.encode(): v.encode() for k, v in fields.items()}) == FULL_STATUS
    assert decode_status(encode_status(Status())) == Status()


def test_frames_dropped_is_the_sum_of_its_reasons() -> None:
    dropped = DroppedFrames(unleased=1, malformed=2, overflow=3, not_leader=4, redis=5)
    status = Status(frames_dropped_by_reason=dropped, frames_dropped=99, frames_malformed=99)
    assert status.frames_dropped == dropped.total() == 15
    assert status.frames_malformed == 2


def test_status_decoding_skips_unknown_fields_and_defaults_missing_ones() -> None:
    status = decode_status({b"leader": b"b9", b"from_the_future": b"{", b"epoch": b"2"})
    assert status == Status(leader="b9", epoch=2)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("epoch", "x", "status field epoch: expected an integer, got 'x'"),
        ("epoch", "1.5", "status field epoch: expected an integer"),
        ("epoch", " 1", "status field epoch: expected an integer"),
        ("connected", "true", "status field connected: expected 1 or 0"),
        ("desired", "[1]", "status field desired:"),
        ("desired", "{", "status field desired:"),
        ("quiet_codes", '{"a":1}', "status field quiet_codes:"),
        ("frames_dropped_by_reason", '{"redis":"x"}', "status field frames_dropped_by_reason:"),
    ],
)
def test_a_status_field_of_the_wrong_type_is_an_error_naming_it(
    field: str, value: str, needle: str
) -> None:
    with pytest.raises(ContractError, match=re.escape(needle)):
        decode_status({field: value})


EVENTS = [
    LeaderEvent(broker="b1", ts_ms=5),
    ConnectedEvent(epoch=2, broker="b1", ts_ms=6),
    GapEvent(epoch=2, since_ms=1, until_ms=6, reason="stall", broker="b1"),
    LeaseEvent(client_id="c", state="ok", why="every entry is served", broker="b1", ts_ms=7),
    LeaseEvent(
        client_id="c",
        state="partial",
        why="w",
        rejected={"ticker": ["krw-eth"]},
        rejected_count=60,
        broker="b1",
        ts_ms=8,
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_round_trip(event: Any) -> None:
    assert decode_event(encode_event(event)) == event


def test_lease_event_fields_left_unset_are_not_on_the_wire() -> None:
    raw = encode_event(LeaseEvent(client_id="c", state="expired", why="w", broker="b", ts_ms=1))
    assert b"rejected" not in raw


def test_events_from_older_or_newer_writers() -> None:
    # fields left out take their defaults; kinds not known here are skipped, not errors
    assert decode_event(b'{"event":"gap","reason":"stall"}') == GapEvent(reason="stall")
    assert decode_event(b'{"event":"connected","epoch":1,"extra":[1]}') == ConnectedEvent(epoch=1)
    assert decode_event(b'{"event":"lease","client_id":"c","state":"expired"}') == LeaseEvent(
        client_id="c", state="expired"
    )
    assert decode_event(b'{"event":"halt","x":1}') == UnknownEvent(event="halt")


@pytest.mark.parametrize(
    "raw",
    [
        b"[1,2]",
        b"not json",
        b"{}",
        b'{"event":5}',
        b'{"event":"gap","epoch":"three"}',
        b'{"event":"lease","state":"expired"}',
        b'{"event":"lease","client_id":"","state":"expired"}',
        b'{"event":"lease","client_id":"c","state":"partial","rejected":["x"]}',
        b"[" * 10_000 + b"]" * 10_000,
    ],
)
def test_malformed_events_are_contract_errors(raw: bytes) -> None:
    with pytest.raises(ContractError, match="malformed event"):
        decode_event(raw)
    assert issubclass(ContractError, ValueError)  # consumers catch ValueError, as before


COMMANDS = [
    SnapshotCommand(id="a", type="ticker", codes=["KRW-BTC"]),
    SnapshotCommand(id="b", type="orderbook", codes=["KRW-BTC", "KRW-ETH"], level=0.1),
    SnapshotCommand(id="c", type="candle.1m", codes=["KRW-BTC"], timeout_ms=1e300),
    ResubscribeCommand(id="d"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_commands_round_trip(command: Any) -> None:
    assert decode_command(encode_command(command)) == command


def test_a_snapshot_command_says_which_stream_it_asks_for() -> None:
    assert SnapshotCommand(id="a", type="orderbook@10000", codes=["KRW-BTC"]).stream() == (
        "orderbook",
        10000.0,
    )
    assert SnapshotCommand(id="a", type="orderbook", codes=["KRW-BTC"], level=5).stream() == (
        "orderbook",
        5.0,
    )


def snapshot(rid: Any = "r1", **fields: Any) -> bytes:
    body = {"op": "snapshot", "id": rid, "type": "ticker", "codes": ["KRW-BTC"], **fields}
    return msgspec.json.encode(body)


# (raw command, the reply id the refusal goes to, what the refusal says)
REFUSED: list[tuple[bytes, str | None, str]] = [
    (snapshot(codes=["krw-btc"]), "r1", "invalid codes: ['krw-btc']"),
    (snapshot(codes=[]), "r1", "codes must be a non-empty list"),
    (snapshot(codes=[f"KRW-C{i:03d}" for i in range(101)]), "r1", "at most 100 codes"),
    (snapshot(codes="KRW-BTC"), "r1", "invalid snapshot command"),
    (snapshot(codes=[1, None]), "r1", "invalid snapshot command"),
    (snapshot(type="tickr"), "r1", "unknown data type 'tickr'"),
    (snapshot(type=None), "r1", "invalid snapshot command"),
    (snapshot(type="ticker", level=5), "r1", "invalid level 5"),
    (snapshot(type="orderbook", level=-1), "r1", "invalid level -1"),
    (snapshot(type="orderbook", level="nan"), "r1", "invalid snapshot command"),
    (snapshot(timeout_ms="soon"), "r1", "invalid snapshot command"),
    (b'{"op":"launch","id":"op"}', "op", "unknown op 'launch'"),
    (b'{"id":"noop"}', "noop", "unknown op None"),
    # nobody to answer: no id, an id that cannot name a reply key, not an object at all
    (b'{"op":"resubscribe"}', None, "invalid resubscribe command"),
    (snapshot(rid="a b"), None, "cannot name a reply key"),
    (snapshot(rid="new\nline"), None, "cannot name a reply key"),
    (snapshot(rid="x" * 200), None, "cannot name a reply key"),
    (snapshot(rid={"nested": 1}), None, "invalid snapshot command"),
    (snapshot(rid=True), None, "invalid snapshot command"),
    (b"garbage", None, "unreadable command"),
    (b"\xff\xfe\x00", None, "unreadable command"),
    (b"[1,2,3]", None, "not a JSON object"),
    (b"null", None, "not a JSON object"),
    (b"[" * 50_000 + b"]" * 50_000, None, "unreadable command"),
]


@pytest.mark.parametrize(("raw", "request_id", "needle"), REFUSED)
def test_bad_commands_are_refused_to_their_id_or_dropped(
    raw: bytes, request_id: str | None, needle: str
) -> None:
    with pytest.raises(CommandError) as caught:
        decode_command(raw)
    assert caught.value.request_id == request_id
    assert needle in str(caught.value)


def test_what_brokers_before_the_contract_served_is_still_served() -> None:
    """An integer id (answered on the reply key of its decimal text), and a level or timeout
    given as a numeric string, were served before the typed contract: still served."""
    command = decode_command(snapshot(rid=123))
    assert isinstance(command, SnapshotCommand) and command.id == "123"
    lenient = decode_command(
        b'{"op":"snapshot","id":"r","type":"orderbook","codes":["KRW-BTC"],'
        b'"level":"1000","timeout_ms":"500"}'
    )
    assert isinstance(lenient, SnapshotCommand)
    assert (lenient.level, lenient.timeout_ms) == (1000.0, 500.0)
    resub = decode_command(b'{"op":"resubscribe","id":7}')
    assert isinstance(resub, ResubscribeCommand) and resub.id == "7"
    with pytest.raises(CommandError) as caught:  # still refused when it is wrong anyway
        decode_command(b'{"op":"snapshot","id":9,"type":"ticker","codes":[]}')
    assert caught.value.request_id == "9"


def test_extra_command_fields_are_ignored() -> None:
    command = decode_command(snapshot(pad="x" * 100_000))
    assert command == SnapshotCommand(id="r1", type="ticker", codes=["KRW-BTC"])


REPLIES = [
    (SnapshotReply(id="a", frames={"KRW-BTC": msgspec.Raw(b'{"a":1}')}), "snapshot"),
    (SnapshotReply(id="a", missing=["KRW-BTC"]), "snapshot"),
    (ResubscribeReply(id="b", epoch=4, upstream={"trade": ["KRW-ETH"]}), "resubscribe"),
    (ErrorReply(id="c", error="why"), "snapshot"),
    (ErrorReply(id="c", error="why"), "resubscribe"),
]


@pytest.mark.parametrize(("reply", "op"), REPLIES)
def test_replies_round_trip(reply: Any, op: Any) -> None:
    raw = encode_reply(reply)
    decoded = decode_reply(raw, op)
    assert encode_reply(decoded) == raw
    assert type(decoded) is type(reply)


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'{"ok":true,"id":"a","frames":[1]}', b'{"ok":"yes","id":"a"}']
)
def test_unreadable_replies_are_contract_errors(raw: bytes) -> None:
    with pytest.raises(ContractError, match="unreadable reply"):
        decode_reply(raw, "snapshot")


def test_a_reply_without_ok_is_a_refusal() -> None:
    assert decode_reply(b'{"id":"a"}', "resubscribe") == ErrorReply(id="a")


def test_lease_record_round_trips_as_json() -> None:
    record = LeaseRecord(
        v=1,
        client_id="my-bot",
        host="h",
        pid=42,
        subs={"ticker": ["KRW-BTC"]},
        ttl_ms=30_000,
        created_ms=1,
        renewed_ms=2,
        deadline_ms=30_002,
    )
    assert msgspec.json.decode(msgspec.json.encode(record), type=LeaseRecord) == record
    assert LEASE_FIELDS[0] == "v" and len(LEASE_FIELDS) == 9


# -- check's health rule ------------------------------------------------------------------------

NOW = 1_000_000


def status_at(age_ms: int | None = 100, **fields: Any) -> Status:
    base: dict[str, Any] = {"leader": "b1", "connected": True, "epoch": 4}
    if age_ms is not None:
        base["updated_ms"] = NOW - age_ms
    return Status(**{**base, **fields})


HEALTH: list[tuple[Status | None, float, bool, str]] = [
    (None, 1.0, False, "no broker status: no leader is running"),
    (status_at(leader=""), 1.0, False, "status names no leader"),
    (status_at(age_ms=None), 1.0, False, "leader b1: status has no updated_ms"),
    (status_at(age_ms=100), 1.0, True, "ok: leader b1 connected, epoch 4, status 100 ms old"),
    (status_at(age_ms=3000), 1.0, True, "ok: leader b1 connected, epoch 4, status 3000 ms old"),
    (status_at(age_ms=3001), 1.0, False, "leader b1: status is stale (3001 ms old, limit 3000 ms)"),
    # the status's own interval wins over the reader's setting
    (status_at(age_ms=3001, status_interval_ms=2000), 1.0, True, "ok: leader b1"),
    (
        status_at(age_ms=700, status_interval_ms=200),
        5.0,
        False,
        "leader b1: status is stale (700 ms old, limit 600 ms)",
    ),
    (
        status_at(connected=False, last_error="upstream closed 1006"),
        1.0,
        False,
        "leader b1 is not connected upstream (upstream closed 1006)",
    ),
    (
        status_at(connected=False),
        1.0,
        False,
        "leader b1 is not connected upstream (no error recorded)",
    ),
]


@pytest.mark.parametrize(("status", "interval", "ok", "line"), HEALTH)
def test_check_health(status: Status | None, interval: float, ok: bool, line: str) -> None:
    health = check_health(status, NOW, interval)
    assert health.ok is ok
    assert health.line.startswith(line), health.line
    if status is not None and status.updated_ms:
        assert status.is_stale(NOW, interval) is ("stale" in health.line)
