"""The CLI given an unreachable Redis, a bad URL or an invalid code: one clear line on
stderr, a non-zero exit, never a traceback.

Every command runs as a real ``upbit-broker`` process with a clean environment. Redis URLs
point at a free port (never at a default 6379 that may belong to someone else).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.processes import CliResult, run_cli
from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)


def bad_urls() -> dict[str, str]:
    port = free_port()
    return {
        "unreachable": f"redis://127.0.0.1:{port}/0",
        "scheme": f"http://127.0.0.1:{port}/0",
        "port": "redis://127.0.0.1:notaport/0",
        "ipv6": "redis://[::1/0",
        "query": f"redis://127.0.0.1:{port}/0?socket_timeout=abc",
        "ssl-option": f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=bogus",
    }


def client_commands(url: str) -> dict[str, list[str]]:
    return {
        "status": ["status", "--redis-url", url],
        "leases": ["leases", "--redis-url", url],
        "check": ["check", "--redis-url", url],
        "resubscribe": ["resubscribe", "--redis-url", url, "--timeout", "2"],
        "tail": ["tail", "ticker", "KRW-BTC", "--redis-url", url, "--duration", "3"],
        "snapshot": ["snapshot", "ticker", "KRW-BTC", "--redis-url", url, "--timeout", "2"],
    }


async def run_all(cases: dict[str, list[str]], timeout: float = 30.0) -> dict[str, Any]:
    gate = asyncio.Semaphore(4)

    async def one(args: list[str]) -> CliResult | str:
        async with gate:
            try:
                return await asyncio.to_thread(run_cli, *args, timeout=timeout)
            except Exception as exc:  # subprocess.TimeoutExpired: the command never ended
                return f"did not exit within {timeout:g}s ({type(exc).__name__})"

    results = await asyncio.gather(*(one(args) for args in cases.values()))
    return dict(zip(cases, results, strict=True))


def problems(result: CliResult | str) -> list[str]:
    """What is wrong with how a command reported its failure ([] when it was clean)."""
    if isinstance(result, str):
        return [result]
    out: list[str] = []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.code == 0:
        out.append("exit code 0")
    if "Traceback" in result.output:
        out.append("traceback")
    if len(lines) != 1:
        out.append(f"{len(lines)} lines on stderr")
    return out


def report(title: str, results: dict[str, Any]) -> dict[str, list[str]]:
    bad = {name: problems(r) for name, r in results.items() if problems(r)}
    print(f"\n[figures] {title}: cases={len(results)}, clean={len(results) - len(bad)}")
    for name, result in results.items():
        if isinstance(result, CliResult):
            first = (result.stderr.strip().splitlines() or [""])[-1][:110]
            print(f"  {name:<26} exit={result.code} {first}")
        else:
            print(f"  {name:<26} {result}")
    return bad


async def test_client_commands_with_bad_redis_urls_fail_in_one_line() -> None:
    # every command against an unreachable Redis; each other kind of bad URL against one
    # command of each road to Redis (open_redis: status; BrokerClient: tail)
    urls = bad_urls()
    cases = {
        f"{cmd}/unreachable": args for cmd, args in client_commands(urls["unreachable"]).items()
    }
    for kind, cmd in [("port", "status"), ("port", "tail"), ("scheme", "status"),
                      ("ipv6", "tail"), ("query", "status"), ("ssl-option", "tail")]:  # fmt: skip
        cases[f"{cmd}/{kind}"] = client_commands(urls[kind])[cmd]
    results = await run_all(cases)
    bad = report("CLI client commands x bad redis URLs", results)
    assert not bad, bad


async def test_commands_given_invalid_codes_or_types_fail_in_one_line(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url  # reachable: the code itself must be what is refused
    cases: dict[str, list[str]] = {
        "tail/lower": ["tail", "ticker", "krw-btc", "--redis-url", url, "--duration", "2"],
        "tail/newline": ["tail", "ticker", "KRW-BTC\nPUBLISH", "--redis-url", url],
        "snapshot/glob": ["snapshot", "ticker", "KRW-BTC,KRW-?", "--redis-url", url],
        "snapshot/blank": ["snapshot", "ticker", " ", "--redis-url", url],
        "tail/type": ["tail", "tickr", "KRW-BTC", "--redis-url", url],
        "snapshot/level": ["snapshot", "ticker", "KRW-BTC", "--level", "5", "--redis-url", url],
        "status/namespace": ["status", "--namespace", "a b*", "--redis-url", url],
    }
    results = await run_all(cases)
    bad = report("CLI commands x invalid codes, types, namespaces", results)
    for name, result in results.items():
        assert isinstance(result, CliResult), (name, result)
        assert result.stdout == "", (name, result.stdout)
    assert not bad, bad
    # the refusals came before anything was written
    import redis

    client = redis.Redis.from_url(url)
    try:
        assert client.keys("*") == []
    finally:
        client.close()


async def test_run_with_an_unusable_redis_fails_in_one_line() -> None:
    """``upbit-broker run`` must not retry forever nor print a traceback when the Redis URL
    cannot work at all (unreachable at start, bad port, bad option): one line, non-zero."""
    upstream = f"ws://127.0.0.1:{free_port()}/websocket/v1"
    cases = {
        f"run/{kind}": ["run", "--redis-url", url, "--upstream-url", upstream]
        for kind, url in bad_urls().items()
    }
    cases["run/upstream-scheme"] = ["run", "--redis-url", bad_urls()["unreachable"],
                                    "--upstream-url", "http://127.0.0.1:1/x"]  # fmt: skip
    results = await run_all(cases, timeout=12.0)
    bad = report("upbit-broker run x unusable Redis URLs", results)
    assert not bad, bad
