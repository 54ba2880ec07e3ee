"""Consumer commands: ``tail``, ``snapshot`` and ``top`` (cli layer, over ``consumers``).

Each holds a lease like any consumer (``tail``, ``top``) or asks the leader (``snapshot``), so
what they show is exactly what an application would receive. ``tail`` and ``top`` print the
broker's notices about their lease on stderr, and say so once when no data came within
:data:`NO_BROKER_AFTER` seconds because no broker serves the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from broker.errors import FrameError
from broker.keys import DEFAULT_NAMESPACE
from broker.settings import BrokerSettings
from broker.upbit.messages import Candle, Orderbook, Ticker, Trade, decode_message
from cli import bounds
from cli.common import (
    DEFAULT_REDIS_URL,
    EXIT_FAILED,
    EXIT_OK,
    JsonOption,
    NamespaceOption,
    RedisUrlOption,
    SubscribeUrlOption,
    VerboseOption,
    build_settings,
    configure_logging,
    run,
    split_codes,
)
from cli.ops import check_status, parse_status
from consumers import (
    BrokerClient,
    BrokerError,
    Gap,
    LeaseNotice,
    PartialSnapshotError,
    StreamMessage,
    validate_streams,
)

#: seconds without data after which ``tail`` and ``top`` check that a broker serves at all
NO_BROKER_AFTER = 3.0

TypeArgument = Annotated[
    str,
    typer.Argument(
        metavar="TYPE",
        help="ticker, trade, orderbook, candle.1s, candle.1m ... candle.240m",
        show_default=False,
    ),
]
CodesArgument = Annotated[
    list[str],
    typer.Argument(
        metavar="CODE...",
        help="Market codes (KRW-BTC); commas work too. Orderbook depth: KRW-BTC.15",
        show_default=False,
    ),
]
TickerCodesArgument = Annotated[
    list[str],
    typer.Argument(
        metavar="CODE...", help="Market codes (KRW-BTC); commas work too.", show_default=False
    ),
]
LevelOption = Annotated[float, typer.Option("--level", help="Orderbook grouping level.")]
_COUNT = bounds.number("--count", bounds.COMMAND_BOUNDS["count"])
_TIMEOUT = bounds.number("--timeout", bounds.COMMAND_BOUNDS["timeout"])
DurationOption = Annotated[
    float,
    typer.Option(
        "--duration",
        help="Exit after S seconds (0: until Ctrl-C).",
        parser=bounds.number("--duration", bounds.COMMAND_BOUNDS["duration"]),
    ),
]


def _client(settings: BrokerSettings, subscribe_url: str = "", **kwargs: Any) -> BrokerClient:
    return BrokerClient(
        redis_url=settings.redis_url,
        subscribe_url=subscribe_url or None,
        namespace=settings.namespace,
        lease_ttl=settings.lease_ttl,
        **kwargs,
    )


# -- formatting ---------------------------------------------------------------------------------


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def fmt_price(value: float) -> str:
    """Prices as a person reads them: ``135,061,000``, ``2,785``, ``302.4``, ``0.00012345``."""
    if value >= 1000 or value == int(value):
        return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"
    if value >= 1:
        return f"{value:,.4f}".rstrip("0").rstrip(".")
    return f"{value:.8f}".rstrip("0").rstrip(".")


def summarize(raw: bytes) -> str:
    """One human line for a frame: the numbers a person looks at first."""
    try:
        message = decode_message(raw)
    except FrameError:
        return raw.decode("utf-8", "replace")
    match message:
        case Ticker():
            return (
                f"{fmt_price(message.trade_price)}  {message.signed_change_rate * 100:+.2f}%  "
                f"vol24h {message.acc_trade_volume_24h:,.4f}"
            )
        case Trade():
            price = fmt_price(message.trade_price)
            return f"{message.ask_bid:<3} {price} x {message.trade_volume:g}"
        case Orderbook():
            book = message.levels()
            bid = fmt_price(book.bids[0].price) if book.bids else "-"
            ask = fmt_price(book.asks[0].price) if book.asks else "-"
            return f"bid {bid} / ask {ask}  ({len(message.orderbook_units)} units)"
        case Candle():
            return (
                f"{message.candle_date_time_kst}  O {fmt_price(message.opening_price)} "
                f"H {fmt_price(message.high_price)} L {fmt_price(message.low_price)} "
                f"C {fmt_price(message.trade_price)}  V {message.candle_acc_trade_volume:g}"
            )
    return raw.decode("utf-8", "replace")


def one_line_json(raw: bytes) -> bytes:
    """The frame on one line: JSON strings cannot hold raw line breaks, so any in the frame
    are whitespace between tokens, and turning them into spaces changes no value."""
    if b"\n" not in raw and b"\r" not in raw:
        return raw
    return raw.replace(b"\r", b" ").replace(b"\n", b" ")


def _gap_line(gap: Gap) -> str:
    span = gap.until_ms - gap.since_ms
    where = f" ({gap.detail})" if gap.detail else ""
    return (
        f"gap: {gap.reason} from {gap.source}, {span} ms from {_clock(gap.since_ms)} "
        f"may be missing{where}"
    )


def _lease_line(notice: LeaseNotice) -> str:
    return f"lease {notice.client_id}: {notice.state}: {notice.why}"


async def _say_if_no_broker(
    client: BrokerClient, settings: BrokerSettings, received: Callable[[], bool]
) -> None:
    """After :data:`NO_BROKER_AFTER` s without data, say once on stderr when no broker is
    serving the namespace (no status, a stale one, or its leader not connected upstream);
    the command keeps waiting either way."""
    await asyncio.sleep(NO_BROKER_AFTER)
    if received():
        return
    try:
        raw, server_now_ms = await client.broker_status()
    except BrokerError:
        return  # Redis itself is failing: the client reports that
    healthy, why = check_status(
        parse_status(raw, server_now_ms) if raw else None, settings.status_interval
    )
    if not healthy and not received():
        typer.echo(
            f"no data after {NO_BROKER_AFTER:g}s: no broker is serving namespace "
            f"{settings.namespace!r} ({why}); still waiting",
            err=True,
        )


def _write(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


# -- tail ---------------------------------------------------------------------------------------


def tail(
    data_type: TypeArgument,
    codes: CodesArgument,
    count: Annotated[
        int, typer.Option("--count", "-n", help="Exit after N messages.", parser=_COUNT)
    ] = 0,
    duration: DurationOption = 0.0,
    as_json: JsonOption = False,
    level: LevelOption = 0.0,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
    subscribe_url: SubscribeUrlOption = "",
) -> None:
    """Print a stream's messages as they arrive (holds a lease like any consumer).

    With --json each line is the frame exactly as published.
    Gaps and the broker's notices about this lease go to stderr, and so does one line
    when no broker serves the namespace.
    The lease is released on exit, Ctrl-C and SIGTERM included.
    """
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)
    wanted = split_codes(codes)

    async def main(stop: asyncio.Event) -> int:
        validate_streams(data_type, wanted, level)  # a typo fails before Redis is touched
        async with _client(settings, subscribe_url) as client:
            await client.subscribe(data_type, wanted, level=level)
            received = 0

            async def consume() -> None:
                nonlocal received
                async for item in client.messages():
                    if isinstance(item, Gap):
                        typer.echo(_gap_line(item), err=True)
                        continue
                    if isinstance(item, LeaseNotice):
                        typer.echo(_lease_line(item), err=True)
                        continue
                    _print_item(item, as_json)
                    received += 1
                    if count and received >= count:
                        return

            consumer = asyncio.create_task(consume())
            stopper = asyncio.create_task(stop.wait())
            watcher = asyncio.create_task(_say_if_no_broker(client, settings, lambda: received > 0))
            try:
                await asyncio.wait(
                    {consumer, stopper},
                    timeout=duration or None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for task in (consumer, stopper, watcher):
                    task.cancel()
                await asyncio.wait({consumer, stopper, watcher})
            if consumer.done() and not consumer.cancelled() and consumer.exception():
                raise consumer.exception()  # type: ignore[misc]
        return EXIT_OK

    run(main, redis_url=settings.redis_url, stop_on_signal=True)


def _print_item(item: StreamMessage, as_json: bool) -> None:
    if as_json:
        _write(one_line_json(item.raw))
    else:
        line = f"{_clock(item.received_ms)}  {item.stream:<10} {item.code:<12} "
        _write((line + summarize(item.raw)).encode())


# -- snapshot -----------------------------------------------------------------------------------


def snapshot(
    data_type: TypeArgument,
    codes: CodesArgument,
    as_json: JsonOption = False,
    level: LevelOption = 0.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait.", parser=_TIMEOUT)
    ] = 3.0,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
) -> None:
    """The latest message of each code (the broker's cache, or fetched upstream).

    With --json: one object {code: frame}.
    Exit 1 when a code has no data (what did arrive is still printed),
    or when no broker answers within --timeout.
    """
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)
    wanted = split_codes(codes)

    async def main(stop: asyncio.Event) -> int:
        validate_streams(data_type, wanted, level)
        async with _client(settings) as client:
            try:
                frames = await client.snapshot_frames(
                    data_type, wanted, level=level, timeout=timeout
                )
            except PartialSnapshotError as exc:
                _print_snapshot(exc.frames, as_json)
                typer.echo(f"error: {exc}", err=True)
                return EXIT_FAILED
        _print_snapshot(frames, as_json)
        return EXIT_OK

    run(main, redis_url=settings.redis_url)


def _print_snapshot(frames: dict[str, bytes], as_json: bool) -> None:
    if as_json:
        body = b",".join(
            msgspec.json.encode(code) + b":" + one_line_json(frames[code])
            for code in sorted(frames)
        )
        _write(b"{" + body + b"}")
        return
    for code in sorted(frames):
        _write(f"{code:<12} {summarize(frames[code])}".encode())


# -- top ----------------------------------------------------------------------------------------


def top(
    codes: TickerCodesArgument,
    duration: DurationOption = 0.0,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
    subscribe_url: SubscribeUrlOption = "",
) -> None:
    """A live table of price, change and 24h volume from the ticker stream.

    The broker's notices about this lease go to stderr, and so does one line when no broker
    serves the namespace.
    """
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)
    wanted = split_codes(codes)

    def on_lease(notice: LeaseNotice) -> None:
        board.on_lease(notice)
        typer.echo(_lease_line(notice), err=True)

    async def main(stop: asyncio.Event) -> int:
        validate_streams("ticker", wanted)
        async with _client(
            settings, subscribe_url, on_gap=board.on_gap, on_lease=on_lease
        ) as client:
            await client.subscribe("ticker", wanted, board.on_message)
            watcher = asyncio.create_task(
                _say_if_no_broker(client, settings, lambda: any(board.updates.values()))
            )
            try:
                with (
                    Live(board.table(), console=Console(), refresh_per_second=4) as live,
                    contextlib.suppress(TimeoutError),
                ):
                    async with asyncio.timeout(duration or None):
                        while not stop.is_set():
                            live.update(board.table())
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(0.25):
                                    await stop.wait()
            finally:
                watcher.cancel()
                await asyncio.wait({watcher})
        return EXIT_OK

    board = TickerBoard(wanted)

    run(main, redis_url=settings.redis_url, stop_on_signal=True)


class TickerBoard:
    """The latest ticker per code, rendered as a rich table (shared with ``demo``)."""

    def __init__(self, codes: list[str]) -> None:
        self.codes = list(codes)
        self.latest: dict[str, Ticker] = {}
        self.updates: dict[str, int] = dict.fromkeys(codes, 0)
        self.gaps = 0
        self.last_gap = ""
        self.lease_state = ""

    def on_message(self, item: StreamMessage) -> None:
        message = item.message
        if isinstance(message, Ticker):
            self.latest[item.code] = message
            self.updates[item.code] = self.updates.get(item.code, 0) + 1

    def on_gap(self, gap: Gap) -> None:
        self.gaps += 1
        self.last_gap = f"{gap.reason} ({gap.source})"

    def on_lease(self, notice: LeaseNotice) -> None:
        self.lease_state = "" if notice.state == "ok" else notice.state

    def table(self, title: str = "ticker") -> Table:
        caption = f"gaps: {self.gaps}" + (f", last: {self.last_gap}" if self.last_gap else "")
        if self.lease_state:
            caption += f"; lease {self.lease_state} (see stderr)"
        table = Table(title=title, caption=caption)
        table.add_column("code")
        table.add_column("price", justify="right")
        table.add_column("change", justify="right")
        table.add_column("volume 24h", justify="right")
        table.add_column("updates", justify="right")
        for code in self.codes:
            t = self.latest.get(code)
            if t is None:
                table.add_row(code, "-", "-", "-", "0")
                continue
            rate = t.signed_change_rate * 100
            style = "green" if rate > 0 else "red" if rate < 0 else ""
            table.add_row(
                code,
                fmt_price(t.trade_price),
                f"[{style}]{rate:+.2f}%[/]" if style else f"{rate:+.2f}%",
                f"{t.acc_trade_volume_24h:,.3f}",
                str(self.updates.get(code, 0)),
            )
        return table


def register(app: typer.Typer) -> None:
    """Add ``tail``, ``snapshot`` and ``top`` to ``app``."""
    app.command("tail")(tail)
    app.command("snapshot")(snapshot)
    app.command("top")(top)
