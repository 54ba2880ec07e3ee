"""upbit-broker: one Upbit market-data WebSocket shared by many processes through Redis.

Layers (arrows point at what is imported):
    cli -> broker, consumers, simulator
    broker (I/O adapters: service, leader_phase, upstream, publisher, leases, leader,
            redis_client) -> broker.core (pure rules), broker.contract (the wire contract)
    broker.core -> broker.contract, broker.upbit
    broker.upbit (pure protocol core, its own errors) -> nothing else of broker
    consumers -> broker.upbit, broker.contract, broker.leases, broker.keys, broker.clock
    simulator -> broker.upbit
This package's ``__init__`` stays import-light: importing ``broker.upbit`` must not pull in
asyncio, redis or websockets.
"""

__version__ = "0.1.0"
