"""The pure Upbit protocol core: value types, request bytes, frame models, routing, errors.

Stdlib and msgspec only: no asyncio, no websockets, no redis, and nothing of ``broker`` outside
this package (its exceptions are in ``broker.upbit.errors``; ``tests/test_layers.py`` checks).
"""
