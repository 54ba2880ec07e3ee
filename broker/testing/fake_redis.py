"""An in-process fakeredis TCP server: a Redis for the demo when no ``redis-server`` exists.

    async with FakeRedisServer() as server:       # or: with FakeRedisServer() as server
        ... server.url ...                        # redis://127.0.0.1:PORT/0

Needs ``fakeredis`` with Lua (``pip install 'fakeredis[lua]'``; the ``dev`` extra has it):
leases are Lua scripts. It serves from a thread of this process, so it dies with it. A
fallback, not a test double for the broker's behaviour: the tests run a real redis-server
(:class:`~broker.testing.redis.RedisServer`).
"""

from __future__ import annotations

import importlib.util
import threading
from types import TracebackType
from typing import Any, Self

from broker.testing.redis import free_port


def unavailable() -> str | None:
    """None when fakeredis with Lua is installed; otherwise what to install."""
    if importlib.util.find_spec("fakeredis") is None or importlib.util.find_spec("lupa") is None:
        return "fakeredis with Lua is not installed (pip install 'fakeredis[lua]')"
    return None


class FakeRedisServer:
    """fakeredis' TCP server on a free port of 127.0.0.1, served by a daemon thread.

    Raises:
        RuntimeError: on start, when fakeredis with Lua is not installed (:func:`unavailable`).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        server.RequestHandlerClass = _request_handler()
        threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _request_handler() -> Any:
    """fakeredis' TCP handler, except that an error reply does not close the connection.

    fakeredis (2.x) answers an error and then hangs up, which real Redis never does; redis-py's
    scripts rely on the NOSCRIPT error of EVALSHA followed by SCRIPT LOAD on the same
    connection, and the lease store and the broker use scripts. Internal API: fallback only.
    """
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    from redis.exceptions import ResponseError

    class Handler(TCPFakeRequestHandler):
        def setup(self) -> None:
            super().setup()
            read = self.current_client.read_response

            def read_response(*args: Any, **kwargs: Any) -> Any:
                try:
                    return read(*args, **kwargs)
                except ResponseError as exc:  # encoded as an error reply, connection kept
                    return exc

            self.current_client.read_response = read_response  # type: ignore[method-assign]

    return Handler


__all__ = ["FakeRedisServer", "unavailable"]
