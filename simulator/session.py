"""One simulator connection's protocol state: the protocol core's session over the simulator's
market (simulator layer, pure).

The rules themselves (replace-on-subscribe, tickets, formats, the snapshot flags, LIST answers,
PING, error frames, the message budget) live once, in :mod:`broker.upbit.session`, which the
gateway drives too. This module only says what the simulated market is: its listings, and the
orderbook levels each one serves (:meth:`~simulator.universe.Listing.supported_levels`).
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.upbit import session as core
from broker.upbit.session import PING_TEXT, Listed, Outcome, Pinged, Refused, Stream, Subscribed
from simulator.universe import Listing


class ListingMarket:
    """The simulated market as the protocol core sees it (:class:`broker.upbit.session.Market`)."""

    __slots__ = ("_listings",)

    def __init__(self, listings: Mapping[str, Listing]) -> None:
        self._listings = listings

    def knows(self, code: str) -> bool:
        return code in self._listings

    def serves_level(self, code: str, level: float) -> bool:
        return level == 0.0 or level in self._listings[code].supported_levels()


class Session(core.Session):
    """Subscription set, format, message budget and PING state of one simulator connection."""

    def __init__(
        self,
        listings: Mapping[str, Listing],
        message_rate: tuple[int, int],
        *,
        refuse_codes: tuple[str, ...] = (),
    ) -> None:
        super().__init__(ListingMarket(listings), message_rate, refuse_codes=refuse_codes)


__all__ = [
    "PING_TEXT",
    "Listed",
    "ListingMarket",
    "Outcome",
    "Pinged",
    "Refused",
    "Session",
    "Stream",
    "Subscribed",
]
