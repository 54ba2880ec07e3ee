"""Runnable examples of the consumer library (public API only: ``consumers`` and redis-py).

python -m consumers.examples.ticker_board --codes KRW-BTC,KRW-ETH --redis-url redis://...
python -m consumers.examples.ohlcv_bars --codes KRW-BTC --output bars.jsonl
"""
