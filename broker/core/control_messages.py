"""What a burst of ``{ns}:control`` messages adds up to (pure: no I/O).

Any consumer may PUBLISH on the control channel (docs/design.md, the consumer ACL), so the
channel can carry a flood: one client at 50,000 messages a second cost the broker 0.87 core
and held a real lease change back from 0.06 s to 2 s (issue 12, item 4). The watcher of the
channel (``broker.control_channel``) reads the connection in bursts and folds every message of
one tick into a :class:`ControlBatch`; the leader core is fed once per tick, whatever the
number of messages in it (``LeaderCore.control_messages``).

The grammar (docs/design.md): ``lease <id>`` and ``release <id>`` name a lease (written,
renewed or released), ``request`` says commands wait in ``{ns}:requests``, anything else asks
for a full listing. Folding keeps what each kind asks for, once:

- the client ids named, each once (a thousand heartbeats of one lease are one read), at most
  :data:`MAX_BATCH_IDS` of them: past that, the batch asks for a full listing instead (it
  covers any id, and its cost does not grow with the flood);
- whether any ``request`` came (the commands task pops the queue once for all of them);
- whether any message named nothing readable (one full listing for all of them).

:meth:`ControlBatch.add` is the only per-message work of the broker besides hiredis's parse:
a prefix test, a partition and a set insert (about a microsecond). Ids stay bytes here; the
core decodes and validates each distinct id once per tick.
"""

from __future__ import annotations

#: distinct client ids one batch keeps; the rest of a tick's ids become one full listing
MAX_BATCH_IDS = 1024

_NAMING = (b"lease", b"release")
_REQUEST = b"request"


class ControlBatch:
    """The control messages of one tick, folded.

    Attributes:
        messages: every message added.
        ids: the distinct client ids named by ``lease``/``release`` (raw bytes, unchecked).
        commands: a ``request`` came: the commands task should pop the queue.
        read_all: a message named nothing readable (or too many ids came): list every lease.
        ignored: messages that named no lease and no command (garbage, or ids past
            :data:`MAX_BATCH_IDS`): all they can cost together is one full listing.
    """

    __slots__ = ("commands", "ids", "ignored", "messages", "read_all")

    def __init__(self) -> None:
        self.messages = 0
        self.ids: set[bytes] = set()
        self.commands = False
        self.read_all = False
        self.ignored = 0

    def __bool__(self) -> bool:
        return self.messages > 0

    def add(self, data: bytes) -> None:
        """One message's payload (as published: any bytes)."""
        self.messages += 1
        if data.startswith(_REQUEST):
            self.commands = True
            return
        kind, _, client_id = data.partition(b" ")
        if client_id and kind in _NAMING:
            ids = self.ids
            if client_id in ids or len(ids) < MAX_BATCH_IDS:
                ids.add(client_id)
                return
        self.read_all = True
        self.ignored += 1


__all__ = ["MAX_BATCH_IDS", "ControlBatch"]
