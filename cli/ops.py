"""Operator commands: ``status``, ``leases``, ``resubscribe``, ``check`` (cli layer).

They read the contract's keys (design.md: ``{ns}:status``, the lease store) and use the command
protocol; none of them needs the broker's code, only Redis, and only ``resubscribe`` imports the
consumer library (its command protocol), when it runs.
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
from broker.coordination import server_time
from broker.core.oom import MemoryInfo
from broker.keys import DEFAULT_NAMESPACE, Keys, keys_for
from broker.leases import LeaseListing, LeaseStore
from broker.redis_oom import read_memory
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

#: seconds a command's Redis reads may take (the clients have no socket timeout)
REDIS_TIMEOUT = 10.0


class StatusRead(NamedTuple):
    """The status hash as read: decoded (``None`` when unreadable, ``error`` says why), and the
    Redis server clock its ``updated_ms`` is judged by."""

    status: Status | None
    server_now_ms: int
    error: str = ""
    #: ``INFO memory`` read by this command (None: not read, or INFO is not allowed)
    memory: MemoryInfo | None = None


def parse_status(raw: Mapping[bytes, bytes], server_now_ms: int) -> StatusRead:
    """Decode the status hash with the contract (``broker.contract.decode_status``)."""
    try:
        return StatusRead(decode_status(raw), server_now_ms)
    except ContractError as exc:
        return StatusRead(None, server_now_ms, str(exc))


def check_status(
    read: StatusRead | None, status_interval: float, memory: MemoryInfo | None = None
) -> tuple[bool, str]:
    """(healthy, the one line saying why) by ``broker.contract.check_health`` (``None``: no
    status at all); ``status_interval`` is assumed for a status that does not carry its own.

    A Redis that refuses writes for memory (``memory``: INFO read by the command, or the
    status's own figures) is named first: "redis is out of memory (maxmemory N, used M, policy
    noeviction): ..." and never healthy, whatever the leader's state; a stale status or a
    missing leader is then its consequence, not the cause."""
    if read is None:
        healthy, line = check_health(None, 0, status_interval)
        trouble = out_of_memory(None, 0, status_interval, memory)
    elif read.status is None:
        healthy, line = False, f"unreadable status: {read.error}"
        trouble = out_of_memory(None, 0, status_interval, memory or read.memory)
    else:
        healthy, line = check_health(read.status, read.server_now_ms, status_interval)
        trouble = out_of_memory(
            read.status, read.server_now_ms, status_interval, memory or read.memory
        )
    if trouble is None:
        return healthy, line
    return False, f"{trouble}; {line.removeprefix('ok: ')}"


def out_of_memory(
    status: Status | None, server_now_ms: int, status_interval: float, memory: MemoryInfo | None
) -> str | None:
    """The line naming Redis's memory as the trouble, ``redis is out of memory (maxmemory N,
    used M, policy P): ...``, when ``INFO memory`` (``memory``, read now) or a fresh status (its
    leader counted refusals) says it refuses writes; None when neither does. A stale status
    that recorded an episode is mentioned only when INFO cannot be read."""
    fresh = status is not None and not status.is_stale(server_now_ms, status_interval)
    recorded = status is not None and status.redis_oom_since_ms > 0
    if memory is not None and not memory.refuses_writes and not (fresh and recorded):
        return None
    if memory is None and not recorded:
        return None
    measured = memory is not None and memory.refuses_writes  # by this command, now
    if memory is None and status is not None:
        memory = MemoryInfo(
            status.redis_used_memory, status.redis_maxmemory, status.redis_maxmemory_policy
        )
    figures = memory.describe() if memory and memory.maxmemory else "memory figures unknown"
    if status is not None and recorded and not fresh and not measured:
        return (
            f"redis was out of memory ({figures}) when leader {status.leader or '?'} last "
            "wrote its status"
        )
    parts = [f"redis is out of memory ({figures}): it refuses writes"]
    if status is None or not fresh:  # the leader's own account is history: say no more
        return parts[0]
    if recorded:
        since = (server_now_ms - status.redis_oom_since_ms) / 1000
        parts[0] += f" since {since:.1f} s ({status.redis_oom_refusals} refused)"
    if status.cache_stale_since_ms:
        stale = (server_now_ms - status.cache_stale_since_ms) / 1000
        parts.append(f"last-value cache stale for {stale:.1f} s")
    return ", ".join(parts)


def status_json(status: Status, server_now_ms: int, status_interval: float) -> dict[str, Any]:
    """``status --json``: every field, typed (integers as numbers, JSON fields as JSON), plus
    ``age_ms`` (``null`` when undated), ``stale`` and ``stale_after_ms``."""
    info: dict[str, Any] = msgspec.to_builtins(status)
    info["age_ms"] = status.age_ms(server_now_ms)
    info["stale"] = status.is_stale(server_now_ms, status_interval)
    info["stale_after_ms"] = status.stale_after_ms(status_interval)
    return info


async def _server_now_ms(redis: Any, keys: Keys) -> int:
    return server_time_ms(await server_time(redis, keys))


async def _read_status(
    settings: Any, keys: Keys
) -> tuple[dict[bytes, bytes], int, MemoryInfo | None]:
    """The status hash, the Redis server's clock (freshness is judged on its clock) and, when
    the status does not show a healthy leader with Redis taking writes, ``INFO memory`` (None:
    not needed, or this user may not run INFO: the operator ACL lacks it, and a healthy check
    must not leave a denial in ``ACL LOG`` at every run)."""
    async with open_redis(settings) as redis, asyncio.timeout(REDIS_TIMEOUT):
        raw: dict[bytes, bytes] = await redis.hgetall(keys.status)  # type: ignore[assignment]
        now = await _server_now_ms(redis, keys)
        memory = None
        if _memory_matters(raw, now, settings.status_interval):
            memory = await read_memory(redis)
        return raw, now, memory


def _memory_matters(raw: Mapping[bytes, bytes], server_now_ms: int, interval: float) -> bool:
    """Whether Redis's memory may explain what the status shows: no status, an unreadable or
    unhealthy one, or one whose leader counted writes refused for memory."""
    status = parse_status(raw, server_now_ms).status if raw else None
    if status is None:
        return True
    healthy, _ = check_health(status, server_now_ms, interval)
    return not healthy or status.redis_oom_since_ms > 0


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
    keys = keys_for(settings.namespace, settings.redis_url)

    async def main(stop: asyncio.Event) -> int:
        raw, now, memory = await _read_status(settings, keys)
        if not raw:
            trouble = out_of_memory(None, now, settings.status_interval, memory)
            typer.echo(
                f"error: no status at {keys.status}: no broker is leading namespace "
                f"{settings.namespace!r}" + (f" ({trouble})" if trouble else ""),
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
        trouble = out_of_memory(read.status, now, settings.status_interval, memory)
        info["redis_out_of_memory"] = trouble is not None
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
        if trouble is not None:
            console.print(f"[red]{escape(trouble)}[/]", highlight=False, soft_wrap=True)
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


def lease_rows(listing: LeaseListing, served: Status | None = None) -> list[dict[str, Any]]:
    """Every lease as a JSON object; invalid ones carry ``invalid`` (the reason) instead.

    ``served``: the leader's status, which says what the broker does with valid leases: a
    refused one carries ``refused`` (why), and codes Upbit does not know join ``rejected``.
    """
    refused = served.refused if served is not None else {}
    unknown = set(served.unknown_codes) if served is not None else set()
    rows: list[dict[str, Any]] = []
    for lease in listing.leases:
        rejected = lease.rejected_by_type()
        subscriptions: dict[str, list[str]] = {}
        for stream, codes in lease.subs_by_type().items():
            for code in codes:
                if f"{stream}:{code.split('.', 1)[0]}" in unknown:  # Upbit does not know it
                    rejected.setdefault(stream, []).append(code)
                else:
                    subscriptions.setdefault(stream, []).append(code)
        row: dict[str, Any] = {
            "client_id": lease.client_id,
            "subscriptions": subscriptions,
            "expires_in_ms": lease.expires_in_ms(listing.server_now_ms),
            "ttl_ms": lease.ttl_ms,
            "host": lease.host,
            "pid": lease.pid,
            "valid": True,
            "rejected": rejected,
        }
        if lease.client_id in refused:
            row["refused"] = refused[lease.client_id]
        rows.append(row)
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
            status_key = keys_for(settings.namespace, settings.redis_url).status
            raw: dict[bytes, bytes] = await redis.hgetall(status_key)  # type: ignore[assignment]
        rows = lease_rows(listing, parse_status(raw, listing.server_now_ms).status)
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
            rejected = "; ".join(f"{t}: {','.join(c)}" for t, c in row["rejected"].items())
            subs = f"{subs or '-'} [yellow]rejected: {escape(rejected)}[/]"
        if row.get("refused"):
            subs = f"[red]refused: {escape(row['refused'])}[/] ({subs or '-'})"
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
    # here, not at the top: importing consumers loads its client (and websockets), which
    # status, leases and check, reading Redis only, start without
    from consumers import commands
    from consumers.errors import CommandRefused, NoBrokerError

    configure_logging(verbose)
    settings = build_settings(redis_url, namespace)

    async def main(stop: asyncio.Event) -> int:
        async with open_redis(settings) as redis:
            try:
                epoch, upstream = await commands.resubscribe(
                    redis, keys_for(settings.namespace, settings.redis_url), timeout=timeout
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
    keys = keys_for(settings.namespace, settings.redis_url)

    async def main(stop: asyncio.Event) -> int:
        raw, now, memory = await _read_status(settings, keys)
        healthy, line = check_status(
            parse_status(raw, now) if raw else None, settings.status_interval, memory
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
