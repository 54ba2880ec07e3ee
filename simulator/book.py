"""One code's order book as integer ticks and size units (simulator layer, pure).

Prices are integer ticks and sizes integer units of 1e-8, so the book never accumulates float
noise and every change is exact. Each mutating method returns the index of the first
orderbook unit it changed (unit ``i`` pairs the i-th best ask with the i-th best bid); a
subscriber whose depth does not reach that index sees no change and gets no frame, as on
Upbit, where an unchanged book is not pushed.

Thin books: a side may hold fewer levels than 30 (``max_asks``/``max_bids``); the frame
builder pads it with zero slots, as Upbit does for quiet pairs.

Spreads stay in a realistic band (a busy Upbit book is one or two ticks wide): every event that
removes a best level widens the spread by the gap to the next level (1 to 3 ticks), so without a
counterweight the spread is a random walk that only grows (KRW-BTC went from 2 ticks to ~950
in five simulated minutes). The counterweight is the market maker: after a best level goes, a
new order usually arrives inside the widened spread (:data:`REFILL`), and an improving order
lands anywhere inside the spread, not only one tick in. The narrowing is proportional to the
spread, so it is mean-reverting whatever the mix of trades and quotes (``trade_share`` 0 to 1):
a few ticks on average, tens of ticks at worst over hours.
"""

from __future__ import annotations

import random

MAX_LEVELS = 30
#: how often a new order arrives inside the spread right after a best level went
REFILL = 0.8

# Hot path: each call is one market event, so draws are plain random() calls, no helpers.


class Book:
    """Asks ascending and bids descending, best first; parallel price and size lists."""

    __slots__ = ("ask_px", "ask_sz", "bid_px", "bid_sz", "lot", "max_asks", "max_bids")

    def __init__(
        self, rng: random.Random, mid: int, lot: int, max_asks: int, max_bids: int
    ) -> None:
        self.lot = lot
        self.max_asks = max_asks
        self.max_bids = max_bids
        self.ask_px: list[int] = []
        self.bid_px: list[int] = []
        px = mid + 1
        for _ in range(max_asks):
            self.ask_px.append(px)
            px += 1 + int(rng.random() * 2.5)
        px = mid
        for _ in range(max_bids):
            if px < 1:
                break
            self.bid_px.append(px)
            px -= 1 + int(rng.random() * 2.5)
        self.ask_sz = [self.new_size(rng) for _ in self.ask_px]
        self.bid_sz = [self.new_size(rng) for _ in self.bid_px]

    def new_size(self, rng: random.Random) -> int:
        r = rng.random()
        return 1 + int(self.lot * 4.0 * r * r)

    @property
    def best_ask(self) -> int:
        return self.ask_px[0]

    @property
    def best_bid(self) -> int:
        return self.bid_px[0]

    # -- book changes (quote events) ----------------------------------------------------------

    def resize(self, rng: random.Random) -> int:
        """A resting order changed: one level of one side gets a new size."""
        asks = rng.random() < 0.5
        sizes = self.ask_sz if asks else self.bid_sz
        r = rng.random()
        i = int(r * r * len(sizes))  # the top of the book moves most
        new = self.new_size(rng)
        # The book must change, or the frame would repeat the previous one byte for byte.
        sizes[i] = new if new != sizes[i] else new + 1
        return i

    def improve(self, rng: random.Random) -> int:
        """A new best price inside the spread; falls back to a resize if the spread is 1 tick."""
        spread = self.ask_px[0] - self.bid_px[0]
        if spread <= 1:
            return self.resize(rng)
        self._quote_inside(spread, rng)
        return 0

    def _quote_inside(self, spread: int, rng: random.Random) -> None:
        """New orders from 1 to ``spread - 1`` ticks inside the spread (uniform) back to the
        side's old best, on either side: on average they halve a wide spread.

        They come layered, as dense as the rest of the book (1 to 3 ticks apart): one lone
        order deep inside would leave a hole behind it, and the spread would open by the whole
        hole once that order traded.
        """
        inside = 1 + int(rng.random() * (spread - 1))
        if rng.random() < 0.5:
            old = self.ask_px[0]
            px = old - inside
            prices: list[int] = []
            while px < old and len(prices) < self.max_asks:
                prices.append(px)
                px += 1 + int(rng.random() * 2.5)
            self.ask_px[0:0] = prices
            self.ask_sz[0:0] = [self.new_size(rng) for _ in prices]
            del self.ask_px[self.max_asks :], self.ask_sz[self.max_asks :]
        else:
            old = self.bid_px[0]
            px = old + inside
            prices = []
            while px > old and len(prices) < self.max_bids:
                prices.append(px)
                px -= 1 + int(rng.random() * 2.5)
            self.bid_px[0:0] = prices
            self.bid_sz[0:0] = [self.new_size(rng) for _ in prices]
            del self.bid_px[self.max_bids :], self.bid_sz[self.max_bids :]

    def retreat(self, rng: random.Random) -> int:
        """The best level of one side is cancelled (never the last one of a side)."""
        asks = rng.random() < 0.5
        if asks and len(self.ask_px) > 1:
            self._pop_best(True, rng)
        elif not asks and len(self.bid_px) > 1:
            self._pop_best(False, rng)
        else:
            return self.resize(rng)
        return 0

    # -- trades -------------------------------------------------------------------------------

    def take(self, buy: bool, rng: random.Random) -> tuple[int, int]:
        """A taker trade against the best level: ``buy`` lifts the ask, else hits the bid.

        Returns (price in ticks, volume in units). A quarter of trades clear the level, which
        moves the price: the random walk of the market comes from these.
        """
        sizes = self.ask_sz if buy else self.bid_sz
        price = (self.ask_px if buy else self.bid_px)[0]
        best = sizes[0]
        if best <= 1 or rng.random() < 0.25:
            volume = best
            if len(sizes) > 1:
                self._pop_best(buy, rng)
            else:
                sizes[0] = self.new_size(rng)  # the last level refills: a side never empties
        else:
            volume = 1 + int(rng.random() * (best - 1))
            sizes[0] = best - volume
        return price, volume

    def _pop_best(self, asks: bool, rng: random.Random) -> None:
        if asks:
            self.ask_px.pop(0)
            self.ask_sz.pop(0)
            sizes = self.ask_sz
            if len(self.ask_px) < self.max_asks:
                self.ask_px.append(self.ask_px[-1] + 1 + int(rng.random() * 2.5))
                self.ask_sz.append(self.new_size(rng))
        else:
            self.bid_px.pop(0)
            self.bid_sz.pop(0)
            sizes = self.bid_sz
            far = self.bid_px[-1] - 1 - int(rng.random() * 2.5)
            if len(self.bid_px) < self.max_bids and far >= 1:
                self.bid_px.append(far)
                self.bid_sz.append(self.new_size(rng))
        spread = self.ask_px[0] - self.bid_px[0]
        if spread > 1 and rng.random() < REFILL:
            self._quote_inside(spread, rng)  # the market maker steps into the gap
        # The level that becomes best changes too. Without this, inserting a best level and
        # removing it again restores the visible book exactly, and the two frames (same
        # millisecond) would repeat each other byte for byte.
        new = self.new_size(rng)
        sizes[0] = new if new != sizes[0] else new + 1

    # -- views --------------------------------------------------------------------------------

    def grouped(self, level_ticks: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """The book with prices grouped in buckets of ``level_ticks`` ticks, sizes summed.

        Asks round up and bids round down, so a bucket never crosses the spread.
        """
        ask_px: list[int] = []
        ask_sz: list[int] = []
        for px, sz in zip(self.ask_px, self.ask_sz, strict=True):
            bucket = -(-px // level_ticks) * level_ticks
            if ask_px and ask_px[-1] == bucket:
                ask_sz[-1] += sz
            else:
                ask_px.append(bucket)
                ask_sz.append(sz)
        bid_px: list[int] = []
        bid_sz: list[int] = []
        for px, sz in zip(self.bid_px, self.bid_sz, strict=True):
            bucket = px // level_ticks * level_ticks
            if bid_px and bid_px[-1] == bucket:
                bid_sz[-1] += sz
            else:
                bid_px.append(bucket)
                bid_sz.append(sz)
        return ask_px, ask_sz, bid_px, bid_sz


__all__ = ["MAX_LEVELS", "REFILL", "Book"]
