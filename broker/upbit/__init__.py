"""The pure Upbit protocol core: value types, request bytes, frame models and routing.

Stdlib and msgspec only: no asyncio, no websockets, no redis (``tests/test_layers.py`` checks).
"""
