"""Gaps: what a new upstream connection announces about the data that may be missing before it
(pure: no I/O).

The upstream adapter says why a connection ended with a typed :class:`Loss` (never log text);
the leader core feeds it here with the wall clock of the last frame published. At the next
connection, :meth:`GapTracker.connected` gives the ``gap`` event to publish, if any:

- a loss (a close, a stall, an Upbit error frame) announces a gap from the last frame published
  in this leader phase before it (or from the loss itself when the phase published none) to the
  new connection, with the loss's reason;
- the planned switch to a fresh connection (the set shrank to nothing) loses nothing: no gap;
- the first connection of a leader that took over from another broker announces a ``takeover``
  gap from the previous leader's last frame (as its status hash says); it wins over a loss.
  So the status must always say when data stopped: until this phase publishes a frame of its
  own, it names the last frame the phase inherited (:meth:`GapTracker.last_frame_ms`).

Frames can also be lost on the way to Redis while upstream stays connected (the publish
connection broke: a reset, ``CLIENT KILL``, a timeout; or the leader held them back while its
lock was unconfirmed). Each such loss is reported once, when publishing is confirmed (or
allowed) again (:meth:`GapTracker.redis_loss`): a ``redis`` gap from the last confirmed publish
to the first one after it, if any frame was lost.
"""

from __future__ import annotations

import enum

from broker.contract import GapEvent


class GapReason(enum.StrEnum):
    """The ``reason`` of a ``gap`` event (``broker.contract.GAP_REASONS``)."""

    RECONNECT = "reconnect"
    TAKEOVER = "takeover"
    STALL = "stall"
    ERROR = "error"
    #: frames received upstream never reached Redis (the publish connection broke)
    REDIS = "redis"


class Loss(enum.Enum):
    """Why the upstream connection ended: the upstream adapter's verdict."""

    #: closed or broken (a close frame, a reset, a missing pong)
    CLOSED = "closed"
    #: no frame at all for ``stall_timeout``
    STALL = "stall"
    #: Upbit refused us with an error frame (and closes the socket)
    ERROR_FRAME = "error_frame"
    #: planned: the set shrank to nothing, a fresh connection took over; nothing was lost
    FRESH_SWITCH = "fresh_switch"

    @property
    def gap_reason(self) -> GapReason | None:
        """The gap this loss announces (None: nothing lost)."""
        return _GAP_OF_LOSS[self]


_GAP_OF_LOSS = {
    Loss.CLOSED: GapReason.RECONNECT,
    Loss.STALL: GapReason.STALL,
    Loss.ERROR_FRAME: GapReason.ERROR,
    Loss.FRESH_SWITCH: None,
}


class GapTracker:
    """The gap the next connection of one leader phase announces. Times are wall-clock ms."""

    def __init__(self, broker_id: str) -> None:
        self.broker_id = broker_id
        self._started_ms = 0
        self._pending: tuple[GapReason, int] | None = None
        self._takeover_since_ms = 0
        #: the last frame published before this phase (by the leader before it, or by this
        #: process before a lapse): the status names it until this phase publishes one
        self._inherited_last_frame_ms = 0
        #: frames announced by ``redis`` gaps so far (each loss's dropped frames)
        self.redis_frames = 0

    def took_lead(self, now_ms: int, another_process: bool, previous_last_frame_ms: int) -> None:
        """The phase started; the status hash was written by ``another_process`` (not this
        one, whatever its ``broker_id``), whose last frame was ``previous_last_frame_ms``."""
        self._started_ms = now_ms
        self._inherited_last_frame_ms = max(previous_last_frame_ms, 0)
        if previous_last_frame_ms <= 0:
            return
        if another_process:
            self._takeover_since_ms = previous_last_frame_ms
        else:
            # This very process leads again after a lapse (its lock was unconfirmed for too
            # long): its connection was torn down, so frames may have been missed since its
            # last one; an earlier loss waiting for its connection is covered by this too.
            self._pending = (GapReason.RECONNECT, previous_last_frame_ms)

    def last_frame_ms(self, published_ms: int) -> int:
        """What the status names as the last frame (a successor's takeover gap starts there):
        ``published_ms``, this process's last publish, or, until this phase has published
        anything, the last frame it inherited. A leader stopped before its first publish (a
        restart right after a restart) must not erase when data stopped: its successor read
        0 and announced no gap at all, and the frames lost in between went unannounced."""
        return max(published_ms, self._inherited_last_frame_ms)

    def lost(self, loss: Loss, at_ms: int, last_frame_ms: int) -> None:
        """The connection ended at ``at_ms``; ``last_frame_ms``: the last frame published by
        this process (0: none), which counts only if it belongs to this phase."""
        reason = loss.gap_reason
        if reason is None:
            return  # a planned switch; an earlier loss still waits for the next connection
        mine = last_frame_ms and last_frame_ms >= self._started_ms
        self._pending = (reason, last_frame_ms if mine else at_ms)

    def connected(self, epoch: int, at_ms: int) -> GapEvent | None:
        """A connection (not the planned switch) opened at ``at_ms`` with this epoch: the gap
        event to publish, if data may be missing; each gap is announced once."""
        gap = self._pending
        if self._takeover_since_ms:
            gap = (GapReason.TAKEOVER, self._takeover_since_ms)
        self._pending = None
        self._takeover_since_ms = 0
        if gap is None:
            return None
        reason, since = gap
        return GapEvent(
            epoch=epoch, since_ms=since, until_ms=at_ms, reason=reason.value, broker=self.broker_id
        )

    def redis_loss(self, epoch: int, since_ms: int, until_ms: int, frames: int) -> GapEvent | None:
        """Publishing to Redis failed from ``since_ms`` and was confirmed again at ``until_ms``;
        ``frames`` were dropped meanwhile (never confirmed, or held back while the lock was
        unconfirmed after the error). The ``redis`` gap to announce (None: nothing was lost)."""
        if frames <= 0:
            return None
        self.redis_frames += frames
        return GapEvent(
            epoch=epoch,
            since_ms=min(since_ms, until_ms),
            until_ms=until_ms,
            reason=GapReason.REDIS.value,
            broker=self.broker_id,
        )


__all__ = ["GapReason", "GapTracker", "Loss"]
