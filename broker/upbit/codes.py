"""Market codes: the shape of Upbit's pair ids and the orderbook depth suffix (pure).

Every code that reaches a Redis key or channel name passes through :func:`validate_code`, so a
lease can never smuggle ``*``, ``?``, spaces or newlines into a channel pattern.
"""

from __future__ import annotations

import math
import re

from broker.upbit.errors import InvalidCodeError, InvalidDepthSuffixError

# Quote market first, then the base asset: KRW-BTC, BTC-ETH, USDT-SOL, KRW-1INCH, KRW-SIM0042.
_CODE_RE = re.compile(r"[A-Z]{2,6}-[A-Z0-9]{1,16}")
# The depth suffix of an orderbook code in a lease or a subscribe call: ``KRW-BTC.15``.
_DEPTH_SUFFIX_RE = re.compile(r"[0-9]{1,4}")

#: Orderbook depths Upbit serves; anything else falls back to 30 (since 2025-07-02).
ORDERBOOK_DEPTHS: tuple[int, ...] = (1, 5, 15, 30)
DEFAULT_DEPTH = 30


def is_valid_code(code: object) -> bool:
    """True when ``code`` is a string of Upbit's pair shape (upper case, no suffix)."""
    return isinstance(code, str) and _CODE_RE.fullmatch(code) is not None


def validate_code(code: object) -> str:
    """Return ``code`` unchanged, or raise :class:`InvalidCodeError` naming it."""
    if not is_valid_code(code):
        raise InvalidCodeError(f"invalid market code {code!r} (expected e.g. 'KRW-BTC')")
    assert isinstance(code, str)
    return code


def split_depth(code_with_suffix: str) -> tuple[str, int | None]:
    """Split ``"KRW-BTC.15"`` into ``("KRW-BTC", 15)``; no suffix gives ``None``.

    Unsupported counts map to 30, as Upbit does (``.3`` and ``.20`` give 30 units).
    """
    code, dot, suffix = code_with_suffix.partition(".")
    if not dot:
        return code, None
    # ASCII digits only: int() would also read " 5", "+5", "0_5" and non-ASCII digits.
    if not (suffix.isascii() and suffix.isdigit()) or len(suffix) > 4:
        return code, DEFAULT_DEPTH
    depth = int(suffix)
    return code, depth if depth in ORDERBOOK_DEPTHS else DEFAULT_DEPTH


def parse_code(raw: str, *, depth_suffix: bool = False) -> tuple[str, int | None]:
    """Read a code strictly, as a lease or a subscribe call gives it: the one parse of both.

    ``"KRW-BTC"`` gives ``("KRW-BTC", None)``. With ``depth_suffix`` (orderbook codes) a suffix
    of 1-4 ASCII digits is allowed and read like :func:`split_depth` does (``"KRW-BTC.15"``
    gives ``("KRW-BTC", 15)``, ``"KRW-BTC.3"`` gives 30); without it a suffix is simply not
    part of a valid code.

    Raises:
        InvalidDepthSuffixError: ``"invalid orderbook depth suffix in 'KRW-BTC.x'"``.
        InvalidCodeError: ``"invalid market code 'krw-btc'"`` (``raw`` as given).
    """
    if not depth_suffix:
        if not is_valid_code(raw):
            raise InvalidCodeError(f"invalid market code {raw!r}")
        return raw, None
    _, dot, suffix = raw.partition(".")
    if dot and _DEPTH_SUFFIX_RE.fullmatch(suffix) is None:
        raise InvalidDepthSuffixError(f"invalid orderbook depth suffix in {raw!r}")
    code, depth = split_depth(raw)
    if not is_valid_code(code):
        raise InvalidCodeError(f"invalid market code {raw!r}")
    return code, depth


def with_depth(code: str, depth: int | None) -> str:
    """The request spelling of an orderbook code: the default depth carries no suffix."""
    if depth is None or depth == DEFAULT_DEPTH:
        return code
    return f"{code}.{depth}"


def normalize_depth(depth: int | None) -> int:
    """Map a requested depth to the depth Upbit will serve."""
    if depth is None or depth not in ORDERBOOK_DEPTHS:
        return DEFAULT_DEPTH
    return depth


def format_level(level: float) -> str:
    """Canonical text of an orderbook ``level``: ``0``, ``10000``, ``0.1``.

    Raises ``ValueError`` for NaN and infinities, which name no level.
    """
    if not math.isfinite(level):
        raise ValueError(f"orderbook level must be finite, not {level!r}")
    if level == int(level):
        return str(int(level))
    return repr(float(level))
