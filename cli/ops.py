"""Operator commands: ``status``, ``leases``, ``resubscribe``, ``check`` (cli layer).

They read the contract's keys (design.md: ``{ns}:status``, the lease store) and use the command
protocol; none of them needs the broker's code, only Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.clock import server_time_ms
from broker.contract import ContractError, Status, check_health, decode_status
from broker.keys import DEFAULT_NAMESPACE, Keys
from broker.leases import LeaseListing, LeaseStore
from cli import bounds
from cli.common import (
    DEFAULT_REDIS_URL,
    EXIT_FAILED,
    EXIT_OK,
    JsonOption,
    NamespaceOption,
    RedisUrlOption,
    VerboseOption,
    build_settings,
    configure_logging,
    open_redis,
    run,
)
from consumers import commands
from consumers.errors import CommandRefused, NoBrokerError

#: seconds a command's Redis reads may take (the clients have no socket timeout)
REDIS_TIMEOUT = 10.0


class StatusRead(NamedTuple):
    """The status hash as read: decoded (``None`` when unreadable, ``error`` says why), and the
    Redis server clock its ``updated_ms`` is judged by."""

    status: Status | None
    server_now_ms: int
    error: str = ""


def parse_status(raw: Mapping[bytes, bytes], server_now_ms: int) -> StatusRead:
    """Decode the status hash with the contract (``broker.contract.decode_status``)."""
    try:
        return StatusRead(decode_status(raw), server_now_ms)
    except ContractError as exc:
        return StatusRead(None, server_now_ms, str(exc))


def check_status(read: StatusRead | None, status_interval: float) -> tuple[bool, str]:
    """(healthy, the one line saying why) by ``broker.contract.check_health`` (``None``: no
    status at all); ``status_interval`` is assumed for a status that does not carry its own."""
    if read is None:
        return check_health(None, 0, status_interval)
    if read.status is None:
        return False, f"unreadable status: {read.error}"
    return check_health(read.status, read.server_now_ms, status_interval)


def status_json(status: Status, server_now_ms: int, status_interval: float) -> dict[str, Any]:
    """``status --json``: every field, typed (integers as numbers, JSON fields as JSON), plus
    ``age_ms`` (``null`` when undated), ``stale`` and ``stale_after_ms``."""
    info: dict[str, Any] = msgspec.to_builtins(status)
    info["age_ms"] = status.age_ms(server_now_ms)
    info["stale"] = status.is_stale(server_now_ms, status_interval)
    info["stale_after_ms"] = status.stale_after_ms(status_interval)
    return info


async def _server_now_ms(redis: Any) -> int:
    return server_time_ms(await redis.time())


async def _read_status(settings: Any, keys: Keys) -> tuple[dict[bytes, bytes], int]:
    """The status hash and the Redis server's clock (freshness is judged on its clock)."""
    async with open_redis(settings) as redis, asyncio.timeout(REDIS_TIMEOUT):
        raw: dict[bytes, bytes] = await redis.hgetall(keys.status)  # type: ignore[assignment]
        return raw, await _server_now_ms(redis)


# -- status ---------------------------------------------------------------------------------


def status(
    as_json: JsonOption = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
) -> None:
    """The leader's state from {ns}:status (exit 1 when no broker has written one).

    A status older than three status intervals (its own status_interval_ms) is marked stale:
    the broker that wrote it has stopped, so its fields (connected, leader ...) are history.
    --json gives every field typed, plus "stale" (true or false), "age_ms" and
    "stale_after_ms"; `upbit-broker check` exits 1 for a stale status.
    """
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)
    keys = Keys(settings.namespace)

    async def main(stop: asyncio.Event) -> int:
        raw, now = await _read_status(settings, keys)
        if not raw:
            typer.echo(
                f"error: no status at {keys.status}: no broker is leading namespace "
                f"{settings.namespace!r}",
                err=True,
            )
            return EXIT_FAILED
        read = parse_status(raw, now)
        if read.status is None:
            typer.echo(f"error: unreadable status at {keys.status}: {read.error}", err=True)
            return EXIT_FAILED
        interval = read.status.interval_s(settings.status_interval)
        info = status_json(read.status, now, settings.status_interval)
        stale = info["stale"]
        if as_json:
            typer.echo(json.dumps(info, sort_keys=True))
            return EXIT_OK
        title = keys.status
        if stale:
            title += " (STALE)"
        table = Table(title=title, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for name in sorted(info):
            value = info[name]
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            if stale and name in ("connected", "leader"):
                text += " (stale)"
            table.add_row(name, f"[red]{text}[/]" if name == "stale" and stale else text)
        console = Console()
        console.print(table)
        if stale:
            age = info.get("age_ms")
            when = f"{age / 1000:.1f} s old" if isinstance(age, int) else "undated"
            console.print(
                f"[red]stale:[/] the status is {when} (a running leader rewrites it every "
                f"{interval:g} s): no broker is updating namespace "
                f"{settings.namespace!r}; the values above are its last known state",
                highlight=False,
                soft_wrap=True,
            )
        return EXIT_OK

    run(main, redis_url=settings.redis_url)


# -- leases ---------------------------------------------------------------------------------


def lease_rows(listing: LeaseListing) -> list[dict[str, Any]]:
    """Every lease as a JSON object; invalid ones carry ``invalid`` (the reason) instead."""
    rows: list[dict[str, Any]] = []
    for lease in listing.leases:
        rows.append(
            {
                "client_id": lease.client_id,
                "subscriptions": lease.subs_by_type(),
                "expires_in_ms": lease.expires_in_ms(listing.server_now_ms),
                "ttl_ms": lease.ttl_ms,
                "host": lease.host,
                "pid": lease.pid,
                "valid": True,
                "rejected": lease.rejected_by_type(),
            }
        )
    for client_id, reason in listing.invalid:
        rows.append({"client_id": client_id, "valid": False, "invalid": reason})
    for client_id in listing.expired:
        rows.append(
            {"client_id": client_id, "valid": False, "invalid": "expired (deadline passed)"}
        )
    return rows


def leases(
    as_json: JsonOption = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
) -> None:
    """Every consumer lease: who holds it, what it asks for, when it expires."""
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)

    async def main(stop: asyncio.Event) -> int:
        async with open_redis(settings) as redis, asyncio.timeout(REDIS_TIMEOUT):
            listing = await LeaseStore(redis, settings.namespace).list_all(scan=True)
        rows = lease_rows(listing)
        if as_json:
            typer.echo(json.dumps(rows))
            return EXIT_OK
        Console().print(lease_table(rows))
        return EXIT_OK

    run(main, redis_url=settings.redis_url)


def lease_table(rows: list[dict[str, Any]], title: str = "leases") -> Table:
    """The ``leases`` rows as a rich table (shared with ``demo``)."""
    table = Table(title=title)
    table.add_column("client")
    table.add_column("subscriptions")
    table.add_column("expires in", justify="right")
    table.add_column("host / pid")
    for row in rows:
        if not row["valid"]:
            table.add_row(
                escape(row["client_id"]), f"[red]invalid: {escape(row['invalid'])}[/]", "", ""
            )
            continue
        subs = escape("; ".join(f"{t}: {','.join(c)}" for t, c in row["subscriptions"].items()))
        if row.get("rejected"):
            refused = "; ".join(f"{t}: {','.join(c)}" for t, c in row["rejected"].items())
            subs = f"{subs or '-'} [yellow]rejected: {escape(refused)}[/]"
        table.add_row(
            row["client_id"],
            subs or "-",
            f"{row['expires_in_ms'] / 1000:.1f}s",
            f"{row['host']} / {row['pid']}",
        )
    if not rows:
        table.add_row("(none)", "", "", "")
    return table


# -- resubscribe ----------------------------------------------------------------------------


def resubscribe(
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds to wait for the leader.",
            parser=bounds.number("--timeout", bounds.COMMAND_BOUNDS["timeout"]),
        ),
    ] = 10.0,
    as_json: JsonOption = False,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
) -> None:
    """Make the leader resend its upstream subscription; exit 0 once it confirms."""
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)

    async def main(stop: asyncio.Event) -> int:
        async with open_redis(settings) as redis:
            try:
                epoch, upstream = await commands.resubscribe(
                    redis, Keys(settings.namespace), timeout=timeout
                )
            except (NoBrokerError, CommandRefused) as exc:
                typer.echo(f"error: {exc}", err=True)
                return EXIT_FAILED
        if as_json:
            typer.echo(json.dumps({"ok": True, "epoch": epoch, "upstream": upstream}))
        else:
            streams = sum(len(codes) for codes in upstream.values())
            typer.echo(f"resubscribed: epoch {epoch}, {streams} streams upstream")
        return EXIT_OK

    run(main, redis_url=settings.redis_url)


# -- check ----------------------------------------------------------------------------------


def check(
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
    verbose: VerboseOption = False,
) -> None:
    """Exit 0 when a leader is connected upstream and its status is fresh, else 1 (and why)."""
    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)
    keys = Keys(settings.namespace)

    async def main(stop: asyncio.Event) -> int:
        raw, now = await _read_status(settings, keys)
        healthy, line = check_status(
            parse_status(raw, now) if raw else None, settings.status_interval
        )
        typer.echo(line, err=not healthy)
        return EXIT_OK if healthy else EXIT_FAILED

    run(main, redis_url=settings.redis_url)


def register(app: typer.Typer) -> None:
    """Add ``status``, ``leases``, ``resubscribe`` and ``check`` to ``app``."""
    app.command("status")(status)
    app.command("leases")(leases)
    app.command("resubscribe")(resubscribe)
    app.command("check")(check)
