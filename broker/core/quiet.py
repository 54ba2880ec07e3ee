"""Quiet streams: a stream upstream holds that publishes nothing (pure: no I/O).

Upbit sometimes stops sending one code while the others flow (a muted or stuck stream); the
connection is healthy, so the stall detector does not see it. A stream is quiet when nothing
was published for it for ``quiet_after`` since it was first asked for on this connection. The
status lists quiet streams (``quiet_codes``), and :meth:`QuietStreams.refresh` picks them for
one fresh SNAPSHOT request (a full-set resend with them not marked realtime-only), which brings
a stuck code back without touching the connection:

- at most once per ``quiet_after``; looked at once per ``check_every`` (the status interval);
- not when every stream is quiet: that is the stall detector's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from broker.upbit.types import StreamKey, SubscriptionSet


class QuietStreams:
    """When each stream was asked for, and when quiet ones were last refreshed (monotonic)."""

    def __init__(self, quiet_after: float, check_every: float) -> None:
        self.quiet_after = quiet_after
        self.check_every = check_every
        #: when each wanted stream was first asked for on this connection
        self._since: dict[StreamKey, float] = {}
        self._last_refresh: float | None = None
        self._check_at = 0.0

    def connected(self, wanted: Iterable[StreamKey], now: float) -> None:
        """A new connection: every wanted stream starts its clock now."""
        self._since = dict.fromkeys(wanted, now)

    def wanted(self, wanted: Iterable[StreamKey], now: float) -> None:
        """The wanted set changed: new streams start their clock now, the others keep theirs."""
        since = self._since
        self._since = {key: since.get(key, now) for key in wanted}

    def quiet(
        self, held: Iterable[StreamKey], seen: Mapping[StreamKey, float], now: float
    ) -> list[StreamKey]:
        """The streams of ``held`` (what upstream holds) with nothing published (``seen``: the
        last publish of each) for ``quiet_after``."""
        horizon = now - self.quiet_after
        last_seen, since = seen.get, self._since.get
        # Most streams published recently: one lookup settles them (run every second over
        # every held stream: 2,586 with Upbit's whole market).
        keys = held.depths if isinstance(held, SubscriptionSet) else held
        return [key for key in keys if last_seen(key, 0.0) < horizon and since(key, now) < horizon]

    def next_check(self) -> float:
        return self._check_at

    def refresh(
        self, held: SubscriptionSet, seen: Mapping[StreamKey, float], now: float
    ) -> SubscriptionSet | None:
        """The quiet streams to ask a fresh snapshot of now (None: not due, or nothing to do)."""
        if now < self._check_at:
            return None
        self._check_at = now + self.check_every
        last = self._last_refresh
        if last is not None and now - last < self.quiet_after:
            return None
        quiet = self.quiet(held, seen, now)
        if not quiet or len(quiet) == len(held):
            return None  # nothing quiet, or everything quiet: that is the stall detector's
        self._last_refresh = now
        depths = held.depths
        return SubscriptionSet({key: depths[key] for key in quiet})


__all__ = ["QuietStreams"]
