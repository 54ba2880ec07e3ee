"""``SyncBrokerClient``: :class:`BrokerClient` for code without an event loop (I/O, a thread).

The client runs in its own event loop on a daemon thread; each method submits a coroutine to
that loop and waits for its result. Callbacks run on that thread, so they must not block for
long (the same rule as for the async client: a blocked loop stops the reader, and Redis then
drops the connection and a ``fell-behind`` gap is reported).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from consumers.client import BrokerClient, Callback, ClientStats, GapCallback, LeaseCallback
from consumers.errors import ClientClosedError
from consumers.history_reader import DEFAULT_READ_COUNT
from consumers.items import Item

if TYPE_CHECKING:
    from broker.upbit.messages import Message

T = TypeVar("T")


class SyncBrokerClient:
    """Blocking wrapper: ``with SyncBrokerClient(redis_url=...) as client: ...``.

    Arguments are those of :class:`BrokerClient`. Every method takes ``timeout`` (seconds,
    ``None`` waits as long as the operation itself allows).
    """

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        client_id: str | None = None,
        namespace: str = "upbit",
        lease_ttl: float = 10.0,
        *,
        on_gap: GapCallback | None = None,
        on_lease: LeaseCallback | None = None,
        queue_size: int = 10_000,
        start_timeout: float = 20.0,
        durable: bool = False,
        read_count: int = DEFAULT_READ_COUNT,
        subscribe_url: str | None = None,
    ) -> None:
        self._client = BrokerClient(
            redis_url=redis_url,
            client_id=client_id,
            namespace=namespace,
            lease_ttl=lease_ttl,
            on_gap=on_gap,
            on_lease=on_lease,
            queue_size=queue_size,
            durable=durable,
            read_count=read_count,
            subscribe_url=subscribe_url,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever,
            name=f"broker-client-{self._client.client_id}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False
        try:
            self._call(self._client.start(), start_timeout)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def client_id(self) -> str:
        return self._client.client_id

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def subscribe(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        callback: Callback | None = None,
        *,
        level: float = 0.0,
        durable: bool | None = None,
        start: str = "$",
        latest_only: bool = False,
        timeout: float | None = 30.0,
    ) -> None:
        """:meth:`BrokerClient.subscribe`; ``callback`` runs on the client's thread."""
        codes = codes if isinstance(codes, str) else list(codes)
        self._call(
            self._client.subscribe(
                data_type,
                codes,
                callback,
                level=level,
                durable=durable,
                start=start,
                latest_only=latest_only,
            ),
            timeout,
        )

    def unsubscribe(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        *,
        level: float = 0.0,
        timeout: float | None = 30.0,
    ) -> None:
        codes = codes if isinstance(codes, str) else list(codes)
        self._call(self._client.unsubscribe(data_type, codes, level=level), timeout)

    def snapshot(
        self,
        data_type: str,
        codes: Iterable[str] | str,
        *,
        level: float = 0.0,
        timeout: float = 3.0,
    ) -> dict[str, Message]:
        codes = codes if isinstance(codes, str) else list(codes)
        return self._call(
            self._client.snapshot(data_type, codes, level=level, timeout=timeout), timeout + 5
        )

    def get_message(self, timeout: float | None = None) -> Item | None:
        """The next message, gap or lease notice, or ``None`` after ``timeout`` seconds."""
        wait = None if timeout is None else timeout + 5
        return self._call(self._client.next_message(timeout), wait)

    def close(self, timeout: float = 10.0) -> None:
        """Release the lease, close the client and stop its thread."""
        if self._closed:
            return
        try:
            self._call(self._client.close(), timeout)
        finally:
            self._stop_loop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if self._closed:
            coro.close()
            raise ClientClosedError("this SyncBrokerClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
