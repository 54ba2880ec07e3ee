"""The CLI given an unreachable Redis, a bad URL, an invalid code or a number that cannot work
(NaN, infinity, out of range): one clear line on stderr, a non-zero exit, never a traceback.

Every command runs as a real ``upbit-broker`` process with a clean environment. Redis URLs
point at a free port (never at a default 6379 that may belong to someone else).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from broker.settings import ENV_PREFIX, SETTING_BOUNDS, Bound
from broker.testing import CliResult, RedisServer, free_port, run_cli
from cli.bounds import COMMAND_BOUNDS, SIMULATOR_BOUNDS

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


# -- numeric settings: finite and in range, or one line and exit 2 (issue 12, item 10) ---------

#: what every numeric setting is tried with (0 only where its range excludes it)
NUMBERS = ("nan", "inf", "-1", "0")
#: ``run``'s flags for broker settings (the others are variables only)
RUN_FLAGS = {
    "lease_ttl": "--lease-ttl",
    "leader_ttl": "--leader-ttl",
    "stall_timeout": "--stall-timeout",
    "metrics_port": "--metrics-port",
}
#: commands' own numeric flags: (command and its arguments, flag, bound)
COMMAND_FLAGS = [
    (["tail", "ticker", "KRW-BTC"], "--count", COMMAND_BOUNDS["count"]),
    (["tail", "ticker", "KRW-BTC"], "--duration", COMMAND_BOUNDS["duration"]),
    (["snapshot", "ticker", "KRW-BTC"], "--timeout", COMMAND_BOUNDS["timeout"]),
    (["top", "KRW-BTC"], "--duration", COMMAND_BOUNDS["duration"]),
    (["resubscribe"], "--timeout", COMMAND_BOUNDS["timeout"]),
    (["demo"], "--duration", COMMAND_BOUNDS["duration"]),
    (["demo"], "--rate", COMMAND_BOUNDS["rate"]),
]
#: every other command that builds broker settings, each given one bad variable
SETTINGS_COMMANDS = {
    "status": (["status"], "UPBIT_BROKER_STATUS_INTERVAL", "0"),
    "leases": (["leases"], "UPBIT_BROKER_LEASE_TTL", "nan"),
    "check": (["check"], "UPBIT_BROKER_STATUS_INTERVAL", "nan"),
    "tail": (["tail", "ticker", "KRW-BTC"], "UPBIT_BROKER_LEASE_TTL", "inf"),
    "snapshot": (["snapshot", "ticker", "KRW-BTC"], "UPBIT_BROKER_BACKOFF_MAX", "-1"),
    "top": (["top", "KRW-BTC"], "UPBIT_BROKER_LEADER_TTL", "nan"),
    "resubscribe": (["resubscribe"], "UPBIT_BROKER_STALL_TIMEOUT", "nan"),
    "demo": (["demo", "--duration", "1"], "UPBIT_BROKER_BACKOFF_MAX", "-1"),
}


@dataclass(frozen=True)
class BadSetting:
    """One command given one value that cannot work; ``names``: what its error line names."""

    args: list[str]
    env: dict[str, str]
    names: tuple[str, ...]


def invalid(bound: Bound, text: str) -> bool:
    value = float(text)
    return not (math.isfinite(value) and bound.low <= value <= bound.high)


def unused_redis() -> list[str]:
    return ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]


def run_cases(name: str) -> list[BadSetting]:
    var = ENV_PREFIX + name.upper()
    upstream = ["--upstream-url", f"ws://127.0.0.1:{free_port()}/websocket/v1"]
    base = ["run", *unused_redis(), *upstream]
    cases = []
    for text in NUMBERS:
        if not invalid(SETTING_BOUNDS[name], text):
            continue
        cases.append(BadSetting(base, {var: text}, (name, var)))
        if name in RUN_FLAGS:
            cases.append(BadSetting([*base, RUN_FLAGS[name], text], {}, (name, RUN_FLAGS[name])))
    return cases


def simulate_cases(name: str) -> list[BadSetting]:
    flag, var = "--" + name.replace("_", "-"), "UPBIT_SIM_" + name.upper()
    cases = []
    for text in NUMBERS:
        if invalid(SIMULATOR_BOUNDS[name], text):
            cases.append(BadSetting(["simulate", flag, text], {}, (flag,)))
            cases.append(BadSetting(["simulate"], {var: text}, (flag, var)))
    return cases


def command_flag_cases(args: list[str], flag: str, bound: Bound) -> list[BadSetting]:
    redis = unused_redis() if args[0] != "demo" else []
    return [
        BadSetting([*args, *redis, flag, text], {}, (flag,))
        for text in NUMBERS
        if invalid(bound, text)
    ]


def settings_command_case(command: str) -> list[BadSetting]:
    args, var, text = SETTINGS_COMMANDS[command]
    redis = unused_redis() if command != "demo" else []
    name = var.removeprefix(ENV_PREFIX).lower()
    return [BadSetting([*args, *redis], {var: text}, (name, var))]


SETTING_MATRIX: dict[str, Callable[[], list[BadSetting]]] = {
    **{f"run-{n}": functools.partial(run_cases, n) for n in SETTING_BOUNDS},
    **{f"simulate-{n}": functools.partial(simulate_cases, n) for n in SIMULATOR_BOUNDS},
    **{
        f"{args[0]}{flag}": functools.partial(command_flag_cases, args, flag, bound)
        for args, flag, bound in COMMAND_FLAGS
    },
    **{f"{c}-env": functools.partial(settings_command_case, c) for c in SETTINGS_COMMANDS},
}


def setting_problems(case: BadSetting, result: CliResult | str) -> list[str]:
    """What is wrong with how a command refused a bad number ([] when it was clean)."""
    if isinstance(result, str):
        return [result]
    out = []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.code != 2:
        out.append(f"exit code {result.code}")
    if "Traceback" in result.output:
        out.append("traceback")
    if len(lines) != 1:
        out.append(f"{len(lines)} lines on stderr")
    elif not lines[0].startswith("error: ") or not all(n in lines[0] for n in case.names):
        out.append(f"the line does not name {' and '.join(case.names)}: {lines[0]!r}")
    return out


async def refuse_all(cases: list[BadSetting]) -> dict[str, list[str]]:
    """Run every case (two at a time: each is a whole interpreter); what went wrong, by case."""
    gate = asyncio.Semaphore(2)

    async def one(case: BadSetting) -> CliResult | str:
        async with gate:
            try:
                return await asyncio.to_thread(run_cli, *case.args, env=case.env, timeout=20.0)
            except Exception as exc:  # subprocess.TimeoutExpired: it took the value and ran
                return f"did not exit within 20s ({type(exc).__name__})"

    results = await asyncio.gather(*(one(case) for case in cases))
    return {
        f"{' '.join(c.args[:1] + c.args[-2:])} {c.env}": setting_problems(c, r)
        for c, r in zip(cases, results, strict=True)
        if setting_problems(c, r)
    }


async def test_the_reported_bad_settings_end_the_command_in_one_line() -> None:
    """The probe's cases (a traceback, values taken, a connect storm, a spinning core), plus
    an integer flag typer alone would answer with a usage box, and one of each other road."""
    redis = unused_redis()
    cases = [
        BadSetting(["run", *redis, "--leader-ttl", "nan"], {}, ("leader_ttl", "--leader-ttl")),
        BadSetting(["run", *redis, "--lease-ttl", "inf"], {}, ("lease_ttl", "--lease-ttl")),
        BadSetting(["run", *redis, "--stall-timeout", "nan"], {}, ("--stall-timeout",)),
        BadSetting(["run", *redis], {"UPBIT_BROKER_BACKOFF_MAX": "-1"}, ("backoff_max",)),
        BadSetting(["run", *redis], {"UPBIT_BROKER_STATUS_INTERVAL": "0"}, ("status_interval",)),
        BadSetting(["run", *redis, "--metrics-port", "nan"], {}, ("--metrics-port",)),
        BadSetting(["simulate", "--port", "nan"], {}, ("--port",)),
        BadSetting(["tail", "ticker", "KRW-BTC", *redis, "--duration", "nan"], {}, ("--duration",)),
        *settings_command_case("status"),
    ]
    bad = await refuse_all(cases)
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(SETTING_MATRIX))
async def test_a_number_that_cannot_work_ends_the_command_in_one_line(which: str) -> None:
    """NaN, infinity, -1 and (where it cannot work) 0, for every numeric setting, as a flag
    and as a variable: exit 2 and one line naming the setting, before any I/O. (172 whole
    interpreters, about a minute on 2 cores: the slow pass.)"""
    cases = SETTING_MATRIX[which]()
    assert cases, which
    bad = await refuse_all(cases)
    assert not bad, bad
