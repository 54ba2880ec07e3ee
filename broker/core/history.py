"""The history's caps: how many entries each stream keeps (pure).

Every frame the broker publishes is also appended to a capped Redis Stream,
``{ns}:hist:{stream}:{code}`` (``broker.keys``), so a consumer can resume from an offset and a
late joiner can read what is still there. The cap is per stream and code, by data type:

    trade=10000,candle=1000,ticker=100,orderbook=100      (the default)

Trades and candles are worth minutes (each trade matters, and the back-fill after a gap appends
the missed ones); a ticker or orderbook frame supersedes the one before it, so a short tail is
enough. ``candle`` covers every candle unit (``candle.1s`` ... ``candle.240m``); a type left out,
or at 0, is not kept; ``off`` (or an empty text) keeps no history at all.

Redis trims with ``MAXLEN ~`` (whole macro nodes, cheap): a stream holds at least its cap and
at most about one node (``stream-node-max-entries``, 100 by default) more.
"""

from __future__ import annotations

from broker.errors import ConfigError

#: the types a history spec may name (``candle``: every candle unit)
HISTORY_TYPES = ("ticker", "trade", "orderbook", "candle")
#: the largest cap per stream (entries); past it one busy code alone could fill Redis
MAX_HISTORY_CAP = 10_000_000


def parse_history_caps(spec: str) -> dict[str, int]:
    """``"trade=10000,ticker=100"`` -> ``{"trade": 10000, "ticker": 100}`` (types at 0 left out).

    Raises:
        ConfigError: an unknown type, a type named twice, or a cap that is not an integer
            from 0 to :data:`MAX_HISTORY_CAP`; one line naming the part.
    """
    text = spec.strip()
    if text.lower() in ("", "off", "none"):
        return {}
    caps: dict[str, int] = {}
    seen: set[str] = set()
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in HISTORY_TYPES:
            raise ConfigError(
                f"history: {part.strip()!r} is not TYPE=ENTRIES with TYPE one of "
                f"{', '.join(HISTORY_TYPES)} (or 'off' for no history)"
            )
        if name in seen:
            raise ConfigError(f"history: {name} is named twice")
        seen.add(name)
        value = value.strip()
        if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= MAX_HISTORY_CAP:
            raise ConfigError(
                f"history: {name} must be an integer from 0 to {MAX_HISTORY_CAP}, got {value!r}"
            )
        if int(value):
            caps[name] = int(value)
    return caps


def history_cap(caps: dict[str, int], type_: str) -> int:
    """The cap of one data type (``candle.1m`` -> ``caps["candle"]``); 0: not kept."""
    if type_.startswith("candle."):
        return caps.get("candle", 0)
    return caps.get(type_, 0)


__all__ = ["HISTORY_TYPES", "MAX_HISTORY_CAP", "history_cap", "parse_history_caps"]
