"""Market codes, depth suffixes and level spelling."""

from __future__ import annotations

import pytest

from broker.errors import InvalidCodeError
from broker.upbit.codes import (
    DEFAULT_DEPTH,
    ORDERBOOK_DEPTHS,
    format_level,
    is_valid_code,
    normalize_depth,
    split_depth,
    validate_code,
    with_depth,
)

VALID = [
    "KRW-BTC",
    "BTC-ETH",
    "USDT-SOL",
    "KRW-1INCH",
    "KRW-SIM0042",
    "KRW-A",
    "USDT-ABCDEFGHIJKLMNOP",
]
INVALID: list[object] = [
    "krw-btc",
    "KRW-btc",
    "KRW-BTC*",
    "KRW-*",
    "KRW-?",
    "KRW-[AB]",
    "KRW- BTC",
    " KRW-BTC",
    "KRW-BTC ",
    "KRW-BTC\n",
    "KRW-BTC\r\n",
    "KRW\nBTC",
    "",
    "-",
    "KRW",
    "KRW-",
    "-BTC",
    "KRW_BTC",
    "KRW-BTC-ETH",
    "KRW-BTC.15",  # a depth suffix is not part of a code
    "K-BTC",
    "KRWKRWK-BTC",
    "USDT-ABCDEFGHIJKLMNOPQ",
    "KRW-ＢTC",  # full-width letter
    "КRW-BTC",  # Cyrillic К
    "KRW-BTC\x00",
    None,
    42,
    b"KRW-BTC",
    ["KRW-BTC"],
]


@pytest.mark.parametrize("code", VALID)
def test_valid_codes(code: str) -> None:
    assert is_valid_code(code)
    assert validate_code(code) == code


@pytest.mark.parametrize("code", INVALID, ids=repr)
def test_invalid_codes(code: object) -> None:
    assert not is_valid_code(code)
    with pytest.raises(InvalidCodeError, match="invalid market code"):
        validate_code(code)
    with pytest.raises(ValueError):  # InvalidCodeError is a ValueError too
        validate_code(code)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("KRW-BTC", ("KRW-BTC", None)),
        ("KRW-BTC.1", ("KRW-BTC", 1)),
        ("KRW-BTC.5", ("KRW-BTC", 5)),
        ("KRW-BTC.15", ("KRW-BTC", 15)),
        ("KRW-BTC.30", ("KRW-BTC", 30)),
        # unsupported counts fall back to 30, as Upbit does since 2025-07-02
        ("KRW-BTC.3", ("KRW-BTC", 30)),
        ("KRW-BTC.20", ("KRW-BTC", 30)),
        ("KRW-BTC.0", ("KRW-BTC", 30)),
        ("KRW-BTC.", ("KRW-BTC", 30)),
        ("KRW-BTC.x", ("KRW-BTC", 30)),
        ("KRW-BTC.+5", ("KRW-BTC", 30)),
        ("KRW-BTC. 5", ("KRW-BTC", 30)),
        ("KRW-BTC.1_5", ("KRW-BTC", 30)),
        ("KRW-BTC.٥", ("KRW-BTC", 30)),  # Arabic-Indic five
        ("KRW-BTC.99999999999999999999", ("KRW-BTC", 30)),
        ("KRW-BTC.015", ("KRW-BTC", 15)),
    ],
)
def test_split_depth(raw: str, expected: tuple[str, int | None]) -> None:
    assert split_depth(raw) == expected


@pytest.mark.parametrize(
    ("code", "depth", "expected"),
    [("KRW-BTC", None, "KRW-BTC"), ("KRW-BTC", 30, "KRW-BTC"), ("KRW-BTC", 5, "KRW-BTC.5")],
)
def test_with_depth(code: str, depth: int | None, expected: str) -> None:
    assert with_depth(code, depth) == expected
    assert split_depth(expected)[0] == code


def test_normalize_depth() -> None:
    assert [normalize_depth(d) for d in ORDERBOOK_DEPTHS] == list(ORDERBOOK_DEPTHS)
    assert normalize_depth(None) == normalize_depth(3) == normalize_depth(31) == DEFAULT_DEPTH


@pytest.mark.parametrize(
    ("level", "text"),
    [
        (0.0, "0"),
        (10000.0, "10000"),
        (100000000.0, "100000000"),
        (0.1, "0.1"),
        (1e-05, "1e-05"),
        (2.5, "2.5"),
    ],
)
def test_format_level(level: float, text: str) -> None:
    assert format_level(level) == text
    assert float(text) == level


@pytest.mark.parametrize("level", [float("nan"), float("inf"), float("-inf")])
def test_format_level_refuses_non_finite(level: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_level(level)
