"""Does a subscriber on this Redis node hear what the broker publishes? (pure: parse ``INFO
replication``, judge; no I/O).

PUBLISH on a master reaches the subscribers of its replicas through the replication stream, so
a consumer may SUBSCRIBE on a replica while its lease goes to the master (design.md "Fan-out
from replicas"). The hazard: a replica whose link to its master is down (the master died, the
link broke, a resync runs) keeps its subscribers' connections open and answers their PINGs,
but delivers nothing: a silent loss. And a replica that resynced *from scratch* (a full sync:
the master's backlog no longer held its offset) lost every message published while its link
was down, because an RDB carries no pub/sub; a *partial* resync replays the backlog, PUBLISHes
included, so it loses nothing.

:func:`judge` names what is wrong with a node, from its ``INFO replication`` now, the master's
``master_replid`` (the one the leases go to; ``None`` when it cannot be read), and the node's
previous reading (``None`` at connect):

- a replica must have its link up, no sync in progress, and the master's replication id (a
  replica in sync shares its master's ``master_replid``; one that follows another master, or
  is still loading, does not);
- a replica must not have resynced from scratch since the previous reading: a full sync starts
  the replica's own backlog again after the offset it had (``repl_backlog_first_byte_offset``
  beyond the previous ``slave_repl_offset``), which trimming a full backlog cannot do while the
  backlog is less than half full. (A full backlog hides it: size ``repl-backlog-size`` to hold
  more than a check interval of the replication stream, which partial resyncs need anyway.)
- a node that was a replica must still be one (``REPLICAOF NO ONE``, or promoted);
- a master must be *the* master (the same ``master_replid``): an ex-replica turned master of
  its own hears nothing the broker publishes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Replication:
    """The fields of ``INFO replication`` the judgement reads (``None``: not reported)."""

    role: str  # "master" or "slave"
    link_up: bool = False
    sync_in_progress: bool = False
    replid: str | None = None
    #: ``master_link_down_since_seconds`` (a replica whose link is down; -1: never up)
    down_since_s: int | None = None
    #: ``slave_repl_offset`` of a replica, ``master_repl_offset`` of a master
    offset: int | None = None
    backlog_first: int | None = None
    backlog_histlen: int | None = None
    backlog_size: int | None = None


def parse_replication(info: object) -> Replication | None:
    """``INFO`` (or ``INFO replication``) as text or bytes, or as redis-py's dict; ``None``
    when it has no ``role`` (a server without INFO, a reply that is no INFO)."""
    fields: dict[str, str] = {}
    if isinstance(info, dict):
        fields = {str(k): str(v) for k, v in info.items()}
    elif isinstance(info, bytes | str):
        text = info.decode(errors="replace") if isinstance(info, bytes) else info
        for line in text.splitlines():
            name, colon, value = line.partition(":")
            if colon and not name.startswith("#"):
                fields[name.strip()] = value.strip()
    role = fields.get("role")
    if role not in ("master", "slave"):
        return None
    slave = role == "slave"
    return Replication(
        role=role,
        link_up=fields.get("master_link_status") == "up",
        sync_in_progress=fields.get("master_sync_in_progress") not in (None, "0"),
        replid=fields.get("master_replid") or None,
        down_since_s=_int(fields.get("master_link_down_since_seconds")),
        offset=_int(fields.get("slave_repl_offset" if slave else "master_repl_offset")),
        backlog_first=_int(fields.get("repl_backlog_first_byte_offset")),
        backlog_histlen=_int(fields.get("repl_backlog_histlen")),
        backlog_size=_int(fields.get("repl_backlog_size")),
    )


def judge(
    node: Replication, master_replid: str | None, previous: Replication | None = None
) -> str | None:
    """Why a subscriber on ``node`` may not hear the master (``None``: it does, as far as can
    be told). See the module docstring for the rules."""
    if node.role == "slave":
        if not node.link_up:
            return "its link to its master is down (master_link_status:down)"
        if node.sync_in_progress:
            return "it is resyncing with its master"
        if master_replid is not None and node.replid != master_replid:
            return (
                f"it replicates another history than the master's (master_replid "
                f"{_short(node.replid)}, the master's {_short(master_replid)})"
            )
        if previous is not None and full_resync(previous, node):
            return "it resynced from scratch (a full sync): what was published meanwhile is lost"
        return None
    if previous is not None and previous.role == "slave":
        return "it is no replica any more (REPLICAOF NO ONE, or promoted)"
    if master_replid is not None and node.replid != master_replid:
        return (
            f"it is a master of its own, not the one the leases go to (master_replid "
            f"{_short(node.replid)}, the master's {_short(master_replid)})"
        )
    return None


def full_resync(previous: Replication, now: Replication) -> bool:
    """Whether the replica started its backlog again after ``previous``'s offset (a full
    sync), as far as a backlog less than half full tells."""
    if previous.offset is None or now.backlog_first is None:
        return False
    if now.backlog_histlen is None or now.backlog_size is None:
        return False
    return now.backlog_first > previous.offset + 1 and now.backlog_histlen < now.backlog_size // 2


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _short(replid: str | None) -> str:
    return replid[:8] if replid else "none"


__all__ = ["Replication", "full_resync", "judge", "parse_replication"]
