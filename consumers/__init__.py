"""Consumer library of upbit-broker: lease streams, receive them from Redis, learn about gaps
and about your own lease.

Layer: consumers import only ``broker.upbit`` (the pure protocol core), ``broker.contract``
(the wire contract), ``broker.leases``, ``broker.keys``, ``broker.clock``, ``broker.errors``,
``broker.settings``, ``broker.redis_client`` and ``broker.core.lease`` (what a lease is);
nothing else of the service.

    async with BrokerClient(redis_url="redis://127.0.0.1:6379/0") as client:
        await client.subscribe("ticker", ["KRW-BTC", "KRW-ETH"])
        async for item in client.messages():
            if item.kind == "data":
                print(item.code, item.message.trade_price)
            elif item.kind == "gap":
                print("data may be missing:", item.reason)
            else:  # "lease": the broker cannot serve (part of) this lease, or it expired
                print("lease", item.state, item.why)
"""

from __future__ import annotations

from broker.errors import BrokerError, InvalidCodeError, LeaseError, SnapshotError
from broker.upbit.messages import Candle, Message, Orderbook, Ticker, Trade
from consumers.client import (
    BrokerClient,
    Callback,
    ClientStats,
    GapCallback,
    LeaseCallback,
    default_client_id,
    validate_streams,
)
from consumers.errors import (
    ClientClosedError,
    CommandRefused,
    NoBrokerError,
    NoBrokerSnapshotError,
    PartialSnapshotError,
    RedisUnavailableError,
)
from consumers.items import (
    CONSUMER_DISCONNECTED,
    FELL_BEHIND,
    LEASE_LAPSED,
    TRIMMED,
    Gap,
    Item,
    LeaseNotice,
    StreamMessage,
)
from consumers.proxy import WebSocketClientProxy
from consumers.sync import SyncBrokerClient

# The typed message models and the errors an application catches are re-exported, so
# applications import from one place.
__all__ = [
    "CONSUMER_DISCONNECTED",
    "FELL_BEHIND",
    "LEASE_LAPSED",
    "TRIMMED",
    "BrokerClient",
    "BrokerError",
    "Callback",
    "Candle",
    "ClientClosedError",
    "ClientStats",
    "CommandRefused",
    "Gap",
    "GapCallback",
    "InvalidCodeError",
    "Item",
    "LeaseCallback",
    "LeaseError",
    "LeaseNotice",
    "Message",
    "NoBrokerError",
    "NoBrokerSnapshotError",
    "Orderbook",
    "PartialSnapshotError",
    "RedisUnavailableError",
    "SnapshotError",
    "StreamMessage",
    "SyncBrokerClient",
    "Ticker",
    "Trade",
    "WebSocketClientProxy",
    "default_client_id",
    "validate_streams",
]
