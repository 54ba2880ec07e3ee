"""DEFAULT <-> SIMPLE field names, per data type, from Upbit's field tables (pure).

The simulator encodes SIMPLE frames with these maps and the message models in
``broker.upbit.messages`` decode with them, so one table serves both sides.
"""

from __future__ import annotations

COMMON: dict[str, str] = {
    "type": "ty",
    "code": "cd",
    "timestamp": "tms",
    "stream_type": "st",
}

TICKER: dict[str, str] = {
    **COMMON,
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "signed_change_price": "scp",
    "change_rate": "cr",
    "signed_change_rate": "scr",
    "trade_volume": "tv",
    "acc_trade_volume": "atv",
    "acc_trade_volume_24h": "atv24h",
    "acc_trade_price": "atp",
    "acc_trade_price_24h": "atp24h",
    "trade_date": "tdt",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "ask_bid": "ab",
    "acc_ask_volume": "aav",
    "acc_bid_volume": "abv",
    "highest_52_week_price": "h52wp",
    "highest_52_week_date": "h52wdt",
    "lowest_52_week_price": "l52wp",
    "lowest_52_week_date": "l52wdt",
    "market_state": "ms",
    "is_trading_suspended": "its",
    "delisting_date": "dd",
    "market_warning": "mw",
    # legacy keys seen in older live frames
    "trade_status": "ts",
    "market_state_for_ios": "msfi",
}

TRADE: dict[str, str] = {
    **COMMON,
    "trade_price": "tp",
    "trade_volume": "tv",
    "ask_bid": "ab",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "trade_date": "td",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "sequential_id": "sid",
    "best_ask_price": "bap",
    "best_ask_size": "bas",
    "best_bid_price": "bbp",
    "best_bid_size": "bbs",
}

ORDERBOOK: dict[str, str] = {
    **COMMON,
    "total_ask_size": "tas",
    "total_bid_size": "tbs",
    "orderbook_units": "obu",
    "level": "lv",
}

ORDERBOOK_UNIT: dict[str, str] = {
    "ask_price": "ap",
    "bid_price": "bp",
    "ask_size": "as",
    "bid_size": "bs",
}

CANDLE: dict[str, str] = {
    **COMMON,
    "candle_date_time_utc": "cdttmu",
    "candle_date_time_kst": "cdttmk",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "candle_acc_trade_volume": "catv",
    "candle_acc_trade_price": "catp",
}

LIST_SUBSCRIPTIONS: dict[str, str] = {
    "method": "mthd",
    "result": "rslt",
    "ticket": "tckt",
    "type": "ty",
    "codes": "cds",
    "level": "lv",
}


def fields_for(type_: str) -> dict[str, str]:
    """The DEFAULT -> SIMPLE map of a data type (``candle.*`` share one)."""
    if type_.startswith("candle."):
        return CANDLE
    return {"ticker": TICKER, "trade": TRADE, "orderbook": ORDERBOOK}[type_]


def to_simple(type_: str, obj: dict[str, object]) -> dict[str, object]:
    """Rename a DEFAULT frame object to SIMPLE keys (nested orderbook units too)."""
    names = fields_for(type_)
    out: dict[str, object] = {}
    for key, value in obj.items():
        if key == "orderbook_units" and isinstance(value, list):
            value = [{ORDERBOOK_UNIT.get(k, k): v for k, v in unit.items()} for unit in value]
        out[names.get(key, key)] = value
    return out
