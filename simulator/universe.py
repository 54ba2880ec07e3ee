"""The simulator's market universe: which codes exist, their names, prices and tick sizes.

Simulator layer, pure (no I/O). Real KRW, BTC and USDT pairs with plausible prices come
first, in order of how busy they are; ``markets=N`` appends synthetic ``KRW-SIM0001`` ...
codes for scale. Activity follows a Zipf-like weight by rank, so a few codes carry most of
the traffic and the tail is quiet (and may have thin books).

Market events (``/v1/market/all?is_details=true``): a few codes, drawn from the seed but never
the three busiest, carry Upbit's warning (유의 종목) or caution (주의 종목) flags; a warned code's
ticker says ``market_warning: "CAUTION"``, as Upbit's did.

Prices are integers of ticks; a tick is ``mul / div`` quote units with ``div`` a power of ten,
so ``ticks * mul / div`` is the correctly rounded double of the decimal price and prints
without float noise (``0.02360001``, not ``0.023600010000000002``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

# (base, korean name, english name, KRW price). Prices are rough 2025 levels; only their order
# of magnitude matters (tick sizes, sizes of orders).
_ASSETS: dict[str, tuple[str, str, float]] = {
    "BTC": ("비트코인", "Bitcoin", 140_000_000),
    "ETH": ("이더리움", "Ethereum", 5_000_000),
    "XRP": ("엑스알피(리플)", "XRP", 3_000),
    "SOL": ("솔라나", "Solana", 250_000),
    "DOGE": ("도지코인", "Dogecoin", 300),
    "USDT": ("테더", "Tether", 1_400),
    "ADA": ("에이다", "Cardano", 1_000),
    "SUI": ("수이", "Sui", 4_500),
    "TRX": ("트론", "TRON", 350),
    "LINK": ("체인링크", "Chainlink", 25_000),
    "AVAX": ("아발란체", "Avalanche", 35_000),
    "BCH": ("비트코인캐시", "Bitcoin Cash", 650_000),
    "DOT": ("폴카닷", "Polkadot", 6_000),
    "SHIB": ("시바이누", "Shiba Inu", 0.02),
    "ETC": ("이더리움클래식", "Ethereum Classic", 28_000),
    "XLM": ("스텔라루멘", "Stellar Lumens", 400),
    "NEAR": ("니어프로토콜", "NEAR Protocol", 3_500),
    "APT": ("앱토스", "Aptos", 6_500),
    "HBAR": ("헤데라", "Hedera", 250),
    "PEPE": ("페페", "Pepe", 0.015),
    "ONDO": ("온도파이낸스", "Ondo Finance", 1_200),
    "AAVE": ("에이브", "Aave", 400_000),
    "UNI": ("유니스왑", "Uniswap", 12_000),
    "SAND": ("샌드박스", "The Sandbox", 400),
    "ATOM": ("코스모스", "Cosmos", 6_000),
    "ARB": ("아비트럼", "Arbitrum", 500),
    "POL": ("폴리곤 에코시스템 토큰", "POL (ex-MATIC)", 300),
    "SEI": ("세이", "Sei", 300),
    "STX": ("스택스", "Stacks", 900),
    "1INCH": ("1인치네트워크", "1inch Network", 300),
}

# Busiest first: the Zipf weight is by position in this list.
_REAL_CODES: tuple[str, ...] = (
    "KRW-BTC", "KRW-XRP", "KRW-ETH", "KRW-SOL", "KRW-DOGE", "KRW-USDT", "USDT-BTC",
    "KRW-ADA", "KRW-SUI", "KRW-TRX", "BTC-ETH", "KRW-LINK", "KRW-AVAX", "USDT-ETH",
    "KRW-BCH", "KRW-DOT", "KRW-SHIB", "BTC-XRP", "KRW-ETC", "KRW-XLM", "KRW-NEAR",
    "USDT-XRP", "KRW-APT", "KRW-HBAR", "KRW-PEPE", "BTC-SOL", "KRW-ONDO", "KRW-AAVE",
    "USDT-SOL", "KRW-UNI", "BTC-DOGE", "KRW-SAND", "KRW-ATOM", "BTC-ADA", "KRW-ARB",
    "KRW-POL", "USDT-DOGE", "KRW-SEI", "BTC-LINK", "KRW-STX", "BTC-TRX", "KRW-1INCH",
)  # fmt: skip

ZIPF_EXPONENT = 1.1

#: The caution kinds of ``market_event.caution``, in Upbit's order (PROTOCOL.md section 8).
CAUTIONS: tuple[str, ...] = (
    "PRICE_FLUCTUATIONS", "TRADING_VOLUME_SOARING", "DEPOSIT_AMOUNT_SOARING",
    "GLOBAL_PRICE_DIFFERENCES", "CONCENTRATION_OF_SMALL_ACCOUNTS",
)  # fmt: skip
_FLAG_SHARE = 0.04  # of codes warned; and of codes with each caution
_UNFLAGGED_HEAD = 3  # the busiest codes stay clean: demos and tests read them


@dataclass(frozen=True, slots=True)
class Listing:
    """One market: its code and names, and the integer grid its prices live on."""

    code: str
    korean_name: str
    english_name: str
    price: float  # the initial price in the quote currency
    tick_mul: int  # one tick is tick_mul / tick_div quote units
    tick_div: int
    krw_value: float  # one unit of the base asset in KRW (to size orders plausibly)
    weight: float  # relative share of market events
    warning: bool = False  # 유의 종목 (market_event.warning)
    cautions: frozenset[str] = frozenset()  # 주의 종목 kinds set (market_event.caution)

    @property
    def quote(self) -> str:
        return self.code.partition("-")[0]

    @property
    def tick_size(self) -> float:
        return self.tick_mul / self.tick_div

    def price_of(self, ticks: int) -> float:
        return ticks * self.tick_mul / self.tick_div

    def market_event(self) -> dict[str, object]:
        """``market_event`` of ``/v1/market/all?is_details=true``."""
        return {
            "warning": self.warning,
            "caution": {kind: kind in self.cautions for kind in CAUTIONS},
        }

    def supported_levels(self) -> tuple[float, ...]:
        """Orderbook grouping units served for this code: 0 and, on KRW only, powers of ten
        above the tick size up to the price (KRW-BTC: 10000 ... 100000000, like Upbit's)."""
        if self.quote != "KRW":
            return (0.0,)
        levels = [0.0]
        exponent = math.floor(math.log10(self.tick_size)) + 1
        while 10.0**exponent <= self.price:
            levels.append(float(f"1e{exponent}"))
            exponent += 1
        return tuple(levels)


def _krw_tick(price: float) -> tuple[int, int]:
    """Upbit's KRW tick table (2023-10 revision), as (mul, div)."""
    for floor_, tick in (
        (2_000_000, (1000, 1)),
        (1_000_000, (500, 1)),
        (500_000, (100, 1)),
        (100_000, (50, 1)),
        (10_000, (10, 1)),
        (1_000, (1, 1)),
        (100, (1, 10)),
        (10, (1, 100)),
        (1, (1, 1000)),
    ):
        if price >= floor_:
            return tick
    # Below 1 KRW: four significant digits.
    return 1, 10 ** (4 - math.floor(math.log10(price)) - 1)


def _tick(quote: str, price: float) -> tuple[int, int]:
    if quote == "KRW":
        return _krw_tick(price)
    if quote == "BTC":
        return 1, 100_000_000  # one satoshi
    if price >= 10:
        return 1, 100
    return 1, 10 ** (3 - math.floor(math.log10(price)))


def _listing(code: str, price_krw: float, names: tuple[str, str], weight: float) -> Listing:
    quote = code.partition("-")[0]
    price = price_krw / _ASSETS[quote][2] if quote != "KRW" else price_krw
    mul, div = _tick(quote, price)
    ticks = max(10, round(price * div / mul))
    return Listing(
        code=code,
        korean_name=names[0],
        english_name=names[1],
        price=ticks * mul / div,
        tick_mul=mul,
        tick_div=div,
        krw_value=price_krw,
        weight=weight,
    )


def build_universe(markets: int = 0, seed: int = 0) -> tuple[Listing, ...]:
    """The real codes (prices jittered by ``seed``) then ``markets`` synthetic KRW codes."""
    rng = random.Random(seed)
    out: list[Listing] = []
    for rank, code in enumerate(_REAL_CODES):
        base = code.partition("-")[2]
        korean, english, price = _ASSETS[base]
        weight = 1.0 / (rank + 1) ** ZIPF_EXPONENT
        out.append(_listing(code, price * rng.uniform(0.9, 1.1), (korean, english), weight))
    for i in range(1, markets + 1):
        rank = len(_REAL_CODES) + i - 1  # scale, not the busy head: ranked after the real codes
        price = 10 ** rng.uniform(0.0, 6.0)  # 1 KRW .. 1,000,000 KRW
        weight = 1.0 / (rank + 1) ** ZIPF_EXPONENT
        names = (f"시뮬레이션{i:04d}", f"Simulated {i:04d}")
        out.append(_listing(f"KRW-SIM{i:04d}", price, names, weight))
    # Its own generator: flags never shift the prices drawn above.
    flags = random.Random(f"{seed}:flags")
    for i in range(_UNFLAGGED_HEAD, len(out)):
        warning = flags.random() < _FLAG_SHARE
        cautions = frozenset(k for k in CAUTIONS if flags.random() < _FLAG_SHARE)
        if warning or cautions:
            out[i] = replace(out[i], warning=warning, cautions=cautions)
    return tuple(out)


__all__ = ["CAUTIONS", "ZIPF_EXPONENT", "Listing", "build_universe"]
