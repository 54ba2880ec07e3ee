"""``upbit-broker demo``: the whole system on one machine, with nothing running beforehand.

Starts, in order: a Redis (a ``redis-server`` subprocess on a free port when the binary is on
PATH, otherwise an in-process fakeredis TCP server; or the one ``--redis-url`` names), the
Upbit simulator, a broker (``run_broker``), the Upbit-compatible gateway (``Gateway``, on a
free port), three consumers (in-process ``BrokerClient``s with their own leases) and one
third-party-style client: a plain websockets connection to the gateway speaking Upbit's own
protocol, as a bot written for Upbit would (its lease is the gateway's ``{gateway_id}.1``).
Shows live prices, the trade tape, the book and the lease table for ``--duration`` seconds
(30 by default), then shuts everything down in reverse order, prints a one-line summary and
exits 0. ``--duration 0`` runs until Ctrl-C (which ends it the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from broker.leases import LeaseStore
from broker.redis_client import redis_client
from broker.service import run_broker
from broker.settings import BrokerSettings, redact_url
from broker.testing import RedisServer, fake_redis
from cli import bounds
from cli.common import (
    EXIT_OK,
    CommandError,
    NamespaceOption,
    VerboseOption,
    configure_logging,
    fail,
    run,
    split_codes,
)
from cli.consumer_cmds import TickerBoard, fmt_price
from cli.ops import lease_rows, lease_table
from consumers import BrokerClient, Gap, Orderbook, StreamMessage, Trade
from gateway.config import GatewaySettings
from simulator import Simulator

DEFAULT_CODES = "KRW-BTC,KRW-ETH,KRW-XRP,KRW-SOL,KRW-DOGE"
#: seconds the demo runs by default before it stops, prints its summary and exits 0
DEFAULT_DURATION = 30.0
#: seconds the whole shutdown may take before the demo gives up waiting
SHUTDOWN_TIMEOUT = 15.0
#: redis-servers to kill if the demo must exit without a clean shutdown
_SERVERS: list[RedisServer] = []


@contextlib.asynccontextmanager
async def local_redis(say: Callable[[str], None]) -> AsyncIterator[str]:
    """A throwaway Redis for the demo; yields its URL.

    A ``redis-server`` on a free port when the binary is on PATH (no persistence), otherwise
    an in-process fakeredis: both from :mod:`broker.testing`.
    """
    if shutil.which("redis-server"):
        server = RedisServer()
        try:
            await asyncio.to_thread(server.start)
        except RuntimeError as exc:
            server.stop()
            raise CommandError(str(exc)) from None
        _SERVERS.append(server)
        say(f"redis: started {server.binary} on port {server.port}")
        try:
            yield server.url
        finally:
            _SERVERS.remove(server)
            server.stop()
        return
    if fake_redis.unavailable() is not None:
        raise CommandError(
            "demo needs a Redis: install redis-server (Debian: apt-get install redis-server) "
            "or fakeredis with Lua (pip install 'fakeredis[lua]'), or pass --redis-url"
        )
    with fake_redis.FakeRedisServer() as fake:
        say(f"redis: no redis-server on PATH; started an in-process fakeredis on port {fake.port}")
        yield fake.url


class Tape:
    """The last trades of one code."""

    def __init__(self) -> None:
        self.trades: list[Trade] = []
        self.count = 0

    def on_trade(self, item: StreamMessage) -> None:
        trade = item.message
        if isinstance(trade, Trade):
            self.count += 1
            self.trades = [trade, *self.trades[:5]]

    def table(self, code: str) -> Table:
        table = Table(title=f"trade tape {code} ({self.count} trades)")
        table.add_column("side")
        table.add_column("price", justify="right")
        table.add_column("volume", justify="right")
        for t in self.trades:
            style = "green" if t.ask_bid == "BID" else "red"
            table.add_row(
                f"[{style}]{t.ask_bid}[/]", fmt_price(t.trade_price), f"{t.trade_volume:g}"
            )
        return table


class Book:
    """The latest orderbook of one code."""

    def __init__(self) -> None:
        self.book: Orderbook | None = None
        self.updates = 0

    def on_book(self, item: StreamMessage) -> None:
        book = item.message
        if isinstance(book, Orderbook):
            self.updates += 1
            self.book = book

    def table(self, code: str) -> Table:
        table = Table(title=f"orderbook {code} ({self.updates} updates)")
        table.add_column("bid size", justify="right")
        table.add_column("bid", justify="right", style="green")
        table.add_column("ask", justify="right", style="red")
        table.add_column("ask size", justify="right")
        if self.book is not None:
            levels = self.book.levels()
            for i in range(min(5, max(len(levels.bids), len(levels.asks)))):
                bid = levels.bids[i] if i < len(levels.bids) else None
                ask = levels.asks[i] if i < len(levels.asks) else None
                table.add_row(
                    f"{bid.size:g}" if bid else "",
                    fmt_price(bid.price) if bid else "",
                    fmt_price(ask.price) if ask else "",
                    f"{ask.size:g}" if ask else "",
                )
        return table


class UpbitBot:
    """A third-party-style client of the gateway: plain websockets and Upbit's own protocol
    (one subscribe request, binary JSON frames in DEFAULT names), nothing of this project."""

    def __init__(self, url: str, codes: list[str]) -> None:
        self.url = url
        self.codes = codes
        self.frames = 0
        self.last: dict[str, float] = {}
        self.error = ""

    async def run(self) -> None:
        request = [{"ticket": "demo-bot"}, {"type": "ticker", "codes": self.codes}]
        try:
            async with connect(self.url, compression=None, max_queue=None) as ws:
                await ws.send(json.dumps(request))
                async for message in ws:
                    self.frames += 1
                    frame = _bot_frame.decode(message)
                    self.last[frame.code] = frame.trade_price
        except (OSError, WebSocketException, msgspec.DecodeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def line(self) -> Text:
        prices = "  ".join(f"{code} {fmt_price(p)}" for code, p in sorted(self.last.items()))
        return Text(
            f"gateway {self.url}: a plain websockets client (Upbit's protocol) received "
            f"{self.frames} ticker frames  {prices}" + (f"  [{self.error}]" if self.error else "")
        )


class _BotTicker(msgspec.Struct):
    code: str
    trade_price: float


_bot_frame = msgspec.json.Decoder(_BotTicker)


def demo(
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            help="Seconds to run, then stop and summarise (0: until Ctrl-C).",
            parser=bounds.number("--duration", bounds.COMMAND_BOUNDS["duration"]),
        ),
    ] = DEFAULT_DURATION,
    codes: Annotated[str, typer.Option("--codes", help="Codes for the price board.")] = (
        DEFAULT_CODES
    ),
    rate: Annotated[
        float,
        typer.Option(
            "--rate",
            help="Simulated market events/s.",
            parser=bounds.number("--rate", bounds.COMMAND_BOUNDS["rate"]),
        ),
    ] = 50.0,
    redis_url: Annotated[
        str,
        typer.Option(
            "--redis-url",
            envvar="UPBIT_BROKER_REDIS_URL",
            show_envvar=True,
            help="Use this Redis instead of starting one (empty: start one).",
        ),
    ] = "",
    namespace: NamespaceOption = "demo",
    verbose: VerboseOption = False,
) -> None:
    """Everything at once: Redis, the simulator, a broker, the gateway and four clients, live.

    Three consumers of the library and one plain websockets client through the Upbit-compatible
    gateway. Shows live prices, the trade tape, an order book and the lease table for
    --duration seconds, then stops everything, prints a summary and exits 0 (Ctrl-C stops it
    early).
    """
    configure_logging(verbose)
    board_codes = split_codes([codes])
    if duration < 0:
        fail("--duration must be >= 0", 2)
    console = Console()

    def say(line: str) -> None:
        console.print(Text(line, style="dim"))

    async def main(stop: asyncio.Event) -> int:
        from gateway.server import Gateway  # here: every other command starts without it

        stack = contextlib.AsyncExitStack()
        try:
            url = redis_url
            if url:
                say(f"redis: using {redact_url(url)}")
            else:
                url = await stack.enter_async_context(local_redis(say))

            sim = await stack.enter_async_context(Simulator(port=0, rate=rate, seed=7))
            say(f"simulator: {sim.url} ({len(sim.codes)} codes, {rate:g} events/s)")
            unknown = [c for c in board_codes if c not in sim.listings]
            if unknown:
                raise CommandError(f"the simulator does not list {', '.join(unknown)}", 2)

            settings = BrokerSettings.from_env(
                redis_url=url,
                upstream_url=sim.url,
                namespace=namespace,
                broker_id=f"demo-broker-{os.getpid()}",
                lease_ttl=5.0,
                leader_ttl=3.0,
                status_interval=0.5,
            )
            broker = await stack.enter_async_context(run_broker(settings))
            say(f"broker: {settings.broker_id} starting (namespace {namespace!r})")

            gateway = await stack.enter_async_context(
                Gateway(
                    GatewaySettings(
                        redis_url=url,
                        namespace=namespace,
                        port=0,
                        gateway_id=f"demo-gw-{os.getpid()}",
                        lease_ttl=5.0,
                        upstream_rest_url=sim.http_url,  # REST forwarded to the simulator
                    )
                )
            )
            say(f"gateway: {gateway.url} and {gateway.http_url}/v1/ (Upbit's API, for any bot)")

            board = TickerBoard(board_codes)
            tape, book = Tape(), Book()
            tape_code, book_code = board_codes[0], board_codes[min(1, len(board_codes) - 1)]
            clients = []
            for name in ("board", "tape", "depth"):
                client = BrokerClient(
                    redis_url=url,
                    client_id=f"demo-{name}-{os.getpid()}",
                    namespace=namespace,
                    lease_ttl=5.0,
                    on_gap=board.on_gap if name == "board" else _ignore_gap,
                )
                clients.append(await stack.enter_async_context(client))
            await clients[0].subscribe("ticker", board_codes, board.on_message)
            await clients[1].subscribe("trade", [tape_code], tape.on_trade)
            await clients[2].subscribe("orderbook", [f"{book_code}.15"], book.on_book)
            say("consumers: board (ticker), tape (trade), depth (orderbook) leased")

            bot = UpbitBot(gateway.url, board_codes)
            bot_task = asyncio.create_task(bot.run(), name="demo-upbit-bot")

            async def stop_bot() -> None:
                bot_task.cancel()
                await asyncio.wait({bot_task})  # its end, without taking its cancellation

            stack.push_async_callback(stop_bot)
            say(f"bot: a plain websockets client on {gateway.url} (ticker, Upbit's protocol)")

            tools_redis = redis_client(url, name="demo-tools")  # every call bounded below
            stack.push_async_callback(tools_redis.aclose)
            store = LeaseStore(tools_redis, namespace)
            started = time.monotonic()

            async def render() -> Group:
                async with asyncio.timeout(5):
                    listing = await store.list_all()
                status = broker.status_fields()
                upstream = json.loads(status["upstream"])
                elapsed = time.monotonic() - started
                head = Text(
                    f"leader {status['leader'] or '-'}  connected {status['connected']}  "
                    f"epoch {status['epoch']}  upstream streams "
                    f"{sum(len(c) for c in upstream.values())}  "
                    f"published {status['frames_published']}  {elapsed:.0f}s"
                    + (f" / {duration:g}s" if duration else "  (Ctrl-C to stop)")
                )
                return Group(
                    head,
                    bot.line(),
                    board.table("prices (ticker)"),
                    tape.table(tape_code),
                    book.table(book_code),
                    lease_table(lease_rows(listing), "leases"),
                )

            with (
                Live(await render(), console=console, refresh_per_second=4) as live,
                contextlib.suppress(TimeoutError),
            ):
                async with asyncio.timeout(duration or None):
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.25):
                                await stop.wait()
                        live.update(await render())
            console.line()
            final = broker.status_fields()
            summary = (
                f"demo finished after {time.monotonic() - started:.0f}s: the broker published "
                f"{final['frames_published']} frames (upstream epoch {final['epoch']}); "
                f"the consumers received {sum(board.updates.values())} "
                f"ticker, {tape.count} trade and {book.updates} orderbook messages, "
                f"{board.gaps} gaps; a plain websockets client received {bot.frames} "
                "ticker frames through the gateway"
            )
        finally:
            await _shut_down(stack, say)
        console.print(summary, soft_wrap=True)
        return EXIT_OK

    run(main, stop_on_signal=True)


async def _shut_down(stack: contextlib.AsyncExitStack, say: Any) -> None:
    """Close everything in reverse order of start; never hang.

    A task that swallows its cancellation (Python 3.11's ``asyncio.wait_for`` does, under
    redis-py with a socket timeout) cannot be stopped by a timeout from here, and would also
    keep ``asyncio.run`` from returning. So a plain timer is the last resort: it kills the
    Redis this demo started and exits the process.
    """
    say(
        "stopping: the clients leave and release their leases, then the gateway, the broker, "
        "the simulator, redis"
    )
    loop = asyncio.get_running_loop()
    guard = loop.call_later(
        SHUTDOWN_TIMEOUT, _give_up, f"shutdown did not finish within {SHUTDOWN_TIMEOUT:g}s"
    )
    try:
        await stack.aclose()
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if left:
            _, pending = await asyncio.wait(left, timeout=3)
            if pending:
                names = ", ".join(sorted(t.get_name() for t in pending))
                _give_up(f"{len(pending)} task(s) did not stop ({names})")
    finally:
        guard.cancel()


def _give_up(why: str) -> None:
    for server in _SERVERS:
        server.kill()
    sys.stdout.flush()
    sys.stderr.write(f"error: {why}; exiting\n")
    sys.stderr.flush()
    os._exit(1)


def _ignore_gap(gap: Gap) -> None:
    """The tape and depth consumers show no gaps; the board counts them."""


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo)
