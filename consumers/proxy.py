"""``WebSocketClientProxy``: the seed design's per-type interface over :class:`BrokerClient` (I/O).

Code written against a direct Upbit WebSocket client (``subscribe_ticker_realtime(symbols,
callback)`` and friends) moves onto the broker by swapping the object: each ``*_realtime`` call
adds to this process's lease, each ``*_snapshot`` call asks the broker's leader (served from its
last-value cache, or fetched upstream without disturbing anyone's stream), each
``unsubscribe_*`` shrinks the lease. Callbacks receive the typed message model
(``Ticker``, ``Trade``, ``Orderbook``, ``Candle``) and may be plain or ``async`` functions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from broker.keys import DEFAULT_NAMESPACE
from broker.upbit.types import DataType
from consumers.client import BrokerClient, GapCallback, LeaseCallback
from consumers.items import StreamMessage

if TYPE_CHECKING:
    from broker.upbit.messages import Message

#: What a proxy callback receives: the typed message.
MessageCallback = Callable[["Message"], Awaitable[None] | None]

_CANDLE_UNITS = tuple(t.value.removeprefix("candle.") for t in DataType if t.is_candle)


def candle_type(unit: str) -> str:
    """``"1m"`` (or ``"candle.1m"``) -> ``"candle.1m"``; raises ``ValueError`` otherwise."""
    name = unit if unit.startswith("candle.") else f"candle.{unit}"
    if name.removeprefix("candle.") not in _CANDLE_UNITS:
        raise ValueError(
            f"unknown candle unit {unit!r} (expected one of: {', '.join(_CANDLE_UNITS)})"
        )
    return name


def _adapt(callback: MessageCallback) -> Callable[[StreamMessage], Any]:
    def deliver(item: StreamMessage) -> Any:
        return callback(item.message)

    deliver.__qualname__ = getattr(callback, "__qualname__", "callback")
    return deliver


class WebSocketClientProxy:
    """Per-type subscribe/snapshot/unsubscribe methods backed by one broker lease.

    Usable as ``async with WebSocketClientProxy("my-app", redis_url=...) as ws:``; without
    ``async with`` the first call starts it and :meth:`close` stops it.

    Args:
        client_id: the lease's name (``None``: unique per process start).
        redis_url, namespace, lease_ttl: as :class:`BrokerClient`.
        on_gap: called with each :class:`~consumers.items.Gap` (data may be missing).
        on_lease: called with each :class:`~consumers.items.LeaseNotice` (the broker cannot
            serve this client's lease, or part of it, or it expired).
    """

    def __init__(
        self,
        client_id: str | None = None,
        redis_url: str = "redis://127.0.0.1:6379/0",
        namespace: str = DEFAULT_NAMESPACE,
        *,
        lease_ttl: float = 10.0,
        on_gap: GapCallback | None = None,
        on_lease: LeaseCallback | None = None,
    ) -> None:
        self.client = BrokerClient(
            redis_url=redis_url,
            client_id=client_id,
            namespace=namespace,
            lease_ttl=lease_ttl,
            on_gap=on_gap,
            on_lease=on_lease,
        )

    @property
    def client_id(self) -> str:
        return self.client.client_id

    async def __aenter__(self) -> Self:
        await self.client.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        """Release the lease and close the connections."""
        await self.client.close()

    # -- shared -------------------------------------------------------------------------

    async def _realtime(
        self, type_: str, symbols: Iterable[str], callback: MessageCallback, level: float = 0.0
    ) -> None:
        await self.client.start()
        await self.client.subscribe(type_, list(symbols), _adapt(callback), level=level)

    async def _snapshot(
        self, type_: str, symbols: Iterable[str], timeout: float, level: float = 0.0
    ) -> dict[str, Message]:
        await self.client.start()
        return await self.client.snapshot(type_, list(symbols), level=level, timeout=timeout)

    async def _unsubscribe(self, type_: str, symbols: Iterable[str], level: float = 0.0) -> None:
        await self.client.start()
        await self.client.unsubscribe(type_, list(symbols), level=level)

    # -- ticker -------------------------------------------------------------------------

    async def subscribe_ticker_realtime(
        self, symbols: Iterable[str], callback: MessageCallback
    ) -> None:
        """Stream tickers of ``symbols`` to ``callback``."""
        await self._realtime(DataType.TICKER, symbols, callback)

    async def subscribe_ticker_snapshot(
        self, symbols: Iterable[str], timeout: float = 3.0
    ) -> dict[str, Message]:
        """The current ticker of each symbol: ``{code: Ticker}``; raises ``SnapshotError``."""
        return await self._snapshot(DataType.TICKER, symbols, timeout)

    async def unsubscribe_ticker(self, symbols: Iterable[str]) -> None:
        await self._unsubscribe(DataType.TICKER, symbols)

    # -- trade --------------------------------------------------------------------------

    async def subscribe_trade_realtime(
        self, symbols: Iterable[str], callback: MessageCallback
    ) -> None:
        """Stream trades of ``symbols`` to ``callback``."""
        await self._realtime(DataType.TRADE, symbols, callback)

    async def subscribe_trade_snapshot(
        self, symbols: Iterable[str], timeout: float = 3.0
    ) -> dict[str, Message]:
        """The latest trade of each symbol: ``{code: Trade}``."""
        return await self._snapshot(DataType.TRADE, symbols, timeout)

    async def unsubscribe_trade(self, symbols: Iterable[str]) -> None:
        await self._unsubscribe(DataType.TRADE, symbols)

    # -- orderbook ----------------------------------------------------------------------

    async def subscribe_orderbook_realtime(
        self, symbols: Iterable[str], callback: MessageCallback, *, level: float = 0.0
    ) -> None:
        """Stream orderbooks; symbols may carry a depth (``KRW-BTC.15``); ``level`` groups."""
        await self._realtime(DataType.ORDERBOOK, symbols, callback, level)

    async def subscribe_orderbook_snapshot(
        self, symbols: Iterable[str], timeout: float = 3.0, *, level: float = 0.0
    ) -> dict[str, Message]:
        """The current orderbook of each symbol: ``{code: Orderbook}``."""
        return await self._snapshot(DataType.ORDERBOOK, symbols, timeout, level)

    async def unsubscribe_orderbook(self, symbols: Iterable[str], *, level: float = 0.0) -> None:
        await self._unsubscribe(DataType.ORDERBOOK, symbols, level)

    # -- candle -------------------------------------------------------------------------

    async def subscribe_candle_realtime(
        self, symbols: Iterable[str], callback: MessageCallback, unit: str = "1m"
    ) -> None:
        """Stream candles of ``unit`` (``1s``, ``1m``, ``3m`` ... ``240m``)."""
        await self._realtime(candle_type(unit), symbols, callback)

    async def subscribe_candle_snapshot(
        self, symbols: Iterable[str], unit: str = "1m", timeout: float = 3.0
    ) -> dict[str, Message]:
        """The current candle of each symbol: ``{code: Candle}``."""
        return await self._snapshot(candle_type(unit), symbols, timeout)

    async def unsubscribe_candle(self, symbols: Iterable[str], unit: str = "1m") -> None:
        await self._unsubscribe(candle_type(unit), symbols)
