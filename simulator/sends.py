"""The send log: when each frame left the simulator, keyed by its bytes (simulator layer, pure).

With ``record_sends`` on, every frame sent on any connection is recorded as
``(time.time_ns() just before the send, frame_key(frame))``. The frame format is unchanged: a
benchmark computes the same :func:`frame_key` over the bytes it receives (the broker
republishes frames byte for byte) and subtracts. The key is 64 bits of BLAKE2b: crc32 would
collide a few dozen times in a million frames. REALTIME frames are unique in bytes (trade:
``sequential_id``; ticker: accumulated volume; orderbook: pushed only when the visible book
changed, and the model never restores a previous book exactly; candle: one push per second
at most, with the last trade's time) short of a 64-bit coincidence. A SNAPSHOT repeats a
stream's last state, as on Upbit, so two snapshots of a quiet stream can share a key.
"""

from __future__ import annotations

import hashlib
from array import array
from time import time_ns


def frame_key(frame: bytes) -> int:
    """A 64-bit identity of a frame's bytes."""
    return int.from_bytes(hashlib.blake2b(frame, digest_size=8).digest(), "big")


class SendLog:
    """(time_ns, key) pairs in two compact arrays: ~16 bytes a frame."""

    __slots__ = ("_keys", "_times")

    def __init__(self) -> None:
        self._times = array("q")
        self._keys = array("Q")

    def add(self, frame: bytes) -> None:
        self._times.append(time_ns())
        self._keys.append(int.from_bytes(hashlib.blake2b(frame, digest_size=8).digest(), "big"))

    def __len__(self) -> int:
        return len(self._times)

    def entries(self, clear: bool = False) -> list[tuple[int, int]]:
        """Every (time_ns, key) so far, oldest first; ``clear`` empties the log."""
        out = list(zip(self._times, self._keys, strict=True))
        if clear:
            self._times = array("q")
            self._keys = array("Q")
        return out


__all__ = ["SendLog", "frame_key"]
