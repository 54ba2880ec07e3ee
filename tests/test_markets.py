"""Upbit's market list over REST (``broker.markets``): what it reads, and that nothing it meets
can end a leader phase (the list is advisory)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from broker.core.leader import LeaderCore
from broker.core.stats import Counters
from broker.errors import MarketListError
from broker.markets import fetch_market_codes, parse_market_list
from broker.settings import BrokerSettings
from tests.support.sim import running_simulator


@asynccontextmanager
async def raw_http(answer: bytes) -> AsyncIterator[str]:
    """A server that answers every connection with ``answer`` bytes, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/market/all"
    finally:
        server.close()
        await server.wait_closed()


async def test_the_simulators_market_list_is_read() -> None:
    async with running_simulator(seed=1, markets=3) as sim:
        settings = BrokerSettings(upstream_url=sim.url)
        url = settings.market_list_url()
        assert url is not None and url.startswith("http://127.0.0.1:")
        codes = await fetch_market_codes(url)
    assert {"KRW-BTC", "KRW-SIM0001", "KRW-SIM0003"} <= codes


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",  # BadStatusLine (an http.client.HTTPException, not an OSError)
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[{",  # IncompleteRead
        b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}",  # HTTPError
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",  # an empty list
        b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"error": 1}',  # not a list
    ],
)
async def test_every_broken_answer_is_one_market_list_error(answer: bytes) -> None:
    async with raw_http(answer) as url:
        with pytest.raises(MarketListError):
            await fetch_market_codes(url, timeout=5)


def test_an_unreachable_market_list_is_one_market_list_error() -> None:
    with pytest.raises(MarketListError):
        asyncio.run(fetch_market_codes("http://127.0.0.1:1/v1/market/all", timeout=2))


def test_the_url_follows_the_upstream() -> None:
    def url(**kw: str) -> str | None:
        return BrokerSettings(**kw).market_list_url()

    assert url() == "https://api.upbit.com/v1/market/all"
    assert url(upstream_url="ws://u:p@sim:8765/websocket/v1") == "http://sim:8765/v1/market/all"
    assert url(markets_url="off") is None
    assert url(markets_url="http://x/y") == "http://x/y"
    with pytest.raises(ValueError, match="markets url"):
        BrokerSettings(markets_url="ftp://x")


def test_parse_keeps_the_codes() -> None:
    body = b'[{"market":"KRW-BTC","korean_name":"x"},{"market":"BTC-ETH","english_name":"y"}]'
    assert parse_market_list(body) == {"KRW-BTC", "BTC-ETH"}


def test_a_list_that_lost_more_than_half_is_not_believed() -> None:
    core = LeaderCore(BrokerSettings(broker_id="b1"), Counters())
    core.took_lead(0)
    full = [f"KRW-C{i}" for i in range(100)]
    assert core.markets_listed(full, 0.0, 0)
    assert not core.markets_listed(full[:40], 1.0, 0)  # truncated, or a proxy's page
    assert core.admission.markets == frozenset(full)
    assert core.markets_listed(full[:60], 2.0, 0)  # delistings happen
