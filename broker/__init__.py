"""upbit-broker: one Upbit market-data WebSocket shared by many processes through Redis.

Layers (arrows point at what is imported):
    cli -> broker, consumers, simulator
    broker (I/O adapters: upstream, leases, publisher, service) -> broker.upbit (pure protocol core)
    consumers -> broker.upbit, broker.leases, broker.keys
    simulator -> broker.upbit
This package's ``__init__`` stays import-light: importing ``broker.upbit`` must not pull in
asyncio, redis or websockets.
"""

__version__ = "0.1.0"
