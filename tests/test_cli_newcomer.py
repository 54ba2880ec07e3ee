"""What a newcomer meets first, as they meet it (issue 10): the demo ends by itself with its
summary, ``run --help`` shows its defaults, ``status`` flags a stopped broker's status as stale,
``simulate`` on a busy port says so in one line, and README's "Using it" runs as written.

Commands run as real ``upbit-broker`` processes (``broker.testing.run_cli``, a clean
environment) against a real redis-server, the simulator and ``upbit-broker run``; in normal use
none of them may print anything on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import typer
from typer.testing import CliRunner

import cli.broker_cmds
from broker.settings import BrokerSettings
from broker.testing import arun_cli, broker_process, run_cli, scaled, wait_for
from broker.testing import read_status as redis_status
from cli.main import app, reflow
from tests.support.processes import PYTHON, ROOT
from tests.support.sim import running_simulator

README = ROOT / "README.md"


def click_command(name: str) -> Any:
    group: Any = typer.main.get_command(app)
    return group.commands[name]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


# -- demo -------------------------------------------------------------------------------------


def test_demo_ends_by_itself_with_its_summary_and_nothing_on_stderr() -> None:
    [duration] = [p for p in click_command("demo").params if p.name == "duration"]
    assert duration.default == 30.0  # `make demo` ends by itself
    result = run_cli("demo", "--duration", "2", timeout=60)
    assert result.code == 0, result.output
    assert result.stderr == ""
    [summary] = [line for line in result.stdout.splitlines() if "demo finished" in line]
    assert re.match(
        r"demo finished after \d+s: the broker published \d+ frames \(upstream epoch 1\); "
        r"the consumers received \d+ ticker, \d+ trade and \d+ orderbook messages, 0 gaps; "
        r"a plain websockets client received \d+ ticker frames through the gateway$",
        summary,
    ), summary
    assert "demo-board" in result.stdout  # the lease table was drawn


# -- run --help and run's settings ------------------------------------------------------------


def test_run_help_shows_the_default_of_every_option() -> None:
    text = help_text("run")
    rows: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"│ (--[a-z-]+)", line)
        if match:
            rows[match.group(1)] = line
    options = [p.opts[0] for p in click_command("run").params if p.opts[0] != "--help"]
    assert options and set(options) <= set(rows), (options, sorted(rows))
    missing = [name for name in options if "[default: " not in rows[name]]
    assert not missing, missing
    defaults = BrokerSettings.__dataclass_fields__
    assert f"[default: {defaults['redis_url'].default}]" in rows["--redis-url"]
    assert f"[default: {defaults['lease_ttl'].default}]" in rows["--lease-ttl"]
    assert "[default: DEFAULT]" in rows["--upstream-format"]
    assert "[env var: UPBIT_BROKER_REDIS_URL]" in rows["--redis-url"]


def test_run_takes_a_flag_over_its_variable_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[BrokerSettings] = []
    # run calls run_loop(_serve(settings), ...): capture the settings, serve nothing
    monkeypatch.setattr(cli.broker_cmds, "_serve", lambda settings: settings)
    monkeypatch.setattr(cli.broker_cmds, "run_loop", lambda main, choice: seen.append(main))
    monkeypatch.setattr(cli.broker_cmds, "configure_logging", lambda *a: None)
    for key in [k for k in os.environ if k.startswith("UPBIT_")]:
        monkeypatch.delenv(key)

    def settings(args: list[str], env: dict[str, str]) -> BrokerSettings:
        result = CliRunner().invoke(app, ["run", *args], env=env)
        assert result.exit_code == 0, result.output
        return seen.pop()

    plain = settings([], {})
    assert (plain.redis_url, plain.lease_ttl, plain.namespace) == (
        "redis://127.0.0.1:6379/0",
        10.0,
        "upbit",
    )
    env = {
        "UPBIT_BROKER_LEASE_TTL": "7",
        "UPBIT_BROKER_NAMESPACE": "from-env",
        "UPBIT_BROKER_UPSTREAM_FORMAT": "simple",
        "UPBIT_BROKER_STATUS_INTERVAL": "0.3",  # a setting without a flag
    }
    from_env = settings([], env)
    assert (from_env.lease_ttl, from_env.namespace, from_env.status_interval) == (
        7.0,
        "from-env",
        0.3,
    )
    assert from_env.upstream_format.value == "SIMPLE"
    flagged = settings(["--lease-ttl", "8", "--namespace", "from-flag"], env)
    assert (flagged.lease_ttl, flagged.namespace, flagged.status_interval) == (
        8.0,
        "from-flag",
        0.3,
    )


# -- help text --------------------------------------------------------------------------------


def test_help_paragraphs_are_reflowed_and_brackets_survive() -> None:
    assert reflow("One line\n    and more.\n\n    Second\n    paragraph.") == (
        "One line and more.\n\nSecond paragraph."
    )
    assert reflow("Head.\n\n\b\nkept\nas is") == "Head.\n\n\b\nkept\nas is"
    group: Any = typer.main.get_command(app)
    for name in group.list_commands(None):  # each command module loaded (cli.main: lazily)
        command = group.commands[name]
        assert command.help, name
        for paragraph in command.help.split("\n\n"):
            assert "\n" not in paragraph, (name, paragraph)
    text = help_text("status")
    assert "redis://[user:password@]host:port/db" in text  # not eaten as rich markup


# -- status of a stopped broker ---------------------------------------------------------------


async def test_status_flags_the_status_of_a_killed_broker_as_stale(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # the broker's and the command's UPBIT_BROKER_STATUS_INTERVAL: stale after 1.5 s, a margin
    # for a busy machine while the broker runs, a short wait once it is dead
    interval = 0.5
    env = {
        "UPBIT_BROKER_REDIS_URL": redis_url,
        "UPBIT_BROKER_NAMESPACE": "t",
        "UPBIT_BROKER_STATUS_INTERVAL": str(interval),
    }
    async with (
        running_simulator(seed=3) as sim,
        broker_process(redis_url, sim.url, "doomed", tmp_path, status_interval=interval) as broker,
    ):

        async def connected() -> bool:
            return (await redis_status(redis_client)).get("connected") == "1"

        await wait_for(connected, 20, message="the broker connected upstream")
        live = await arun_cli("status", "--json", env=env)
        assert live.code == 0 and live.stderr == "", live.output
        fresh = json.loads(live.stdout)
        assert fresh["stale"] is False and fresh["connected"] is True
        assert fresh["stale_after_ms"] == 1500 and fresh["age_ms"] <= 1500

        broker.kill()  # SIGKILL: its last status stays behind, saying "connected"

        async def stale_by_server_clock() -> bool:
            seconds, micros = await redis_client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            updated = int((await redis_status(redis_client))["updated_ms"])
            return now_ms - updated > 1500

        await wait_for(stale_by_server_clock, 10, message="the status aged past 3 intervals")
        as_json = await arun_cli("status", "--json", env=env)
        human = await arun_cli("status", env={**env, "COLUMNS": "200"})
    assert as_json.code == 0 and as_json.stderr == "", as_json.output
    info = json.loads(as_json.stdout)
    assert info["stale"] is True
    assert info["connected"] is True and info["leader"] == "doomed"  # the last known state
    assert info["age_ms"] > info["stale_after_ms"] == 1500
    assert human.code == 0 and human.stderr == "", human.output
    assert "t:status (STALE)" in human.stdout
    assert re.search(r"connected\s+│ True \(stale\)", human.stdout), human.stdout
    [line] = [ln for ln in human.stdout.splitlines() if ln.startswith("stale:")]
    assert "no broker is updating namespace 't'" in line, line


# -- simulate on a busy port ------------------------------------------------------------------


def test_simulate_on_a_busy_port_fails_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("simulate", "--port", str(port), timeout=30)
    assert result.code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: port {port} is in use on 127.0.0.1 (pick another with --port, 0 picks a free one)"
    ]


# -- README "Using it", as written --------------------------------------------------------------


def using_it() -> tuple[list[list[str]], str]:
    """The ``upbit-broker`` command lines (argv after the program name) and the Python snippet
    of README's "Using it" section."""
    text = README.read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands = [
        shlex.split(line, comments=True)[1:]
        for line in section.splitlines()
        if line.startswith("    upbit-broker ")
    ]
    # the first: the complete script (later ones, e.g. "Replay and resume", are excerpts)
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    return commands, snippet


def test_readme_command_lines_parse() -> None:
    commands, _ = using_it()
    names = [argv[0] for argv in commands]
    for wanted in ("simulate", "run", "tail", "snapshot", "top", "status", "leases"):
        assert wanted in names, names
    for argv in commands:  # every option it shows exists, every argument is accepted
        command = click_command(argv[0])
        command.make_context(argv[0], list(argv[1:]))


async def test_readme_using_it_runs_as_written_and_quietly(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    commands, snippet = using_it()
    default_url = "redis://127.0.0.1:6379/0"
    assert snippet.count(default_url) == 1
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(default_url, redis_url))  # a private redis-server
    env = {"UPBIT_BROKER_REDIS_URL": redis_url}  # how README says the commands find Redis
    async with (
        running_simulator(seed=4, rate=200) as sim,
        # the README's namespace: the default, as the commands and the snippet use it
        broker_process(redis_url, sim.url, "readme", tmp_path, namespace="upbit") as broker,
    ):

        async def connected() -> bool:
            status = await redis_status(redis_client, namespace="upbit")
            return status.get("connected") == "1"

        await wait_for(connected, 20, message="the broker connected upstream")
        results = {}
        for argv in commands:
            if argv[0] in ("simulate", "run"):  # running above, on free ports
                continue
            if argv[0] == "top":  # a live table until Ctrl-C: a short look instead
                argv = [*argv, "--duration", "2"]
            results[" ".join(argv)] = await arun_cli(*argv, env=env, timeout=40)
        snippet_run = await run_snippet(script)
        broker_log = broker.output()
    for line, result in results.items():
        assert result.code == 0, (line, result.output)
        assert result.stderr == "", (line, result.stderr)
    tail = next(r for line, r in results.items() if line.startswith("tail "))
    assert len(tail.stdout.splitlines()) == 5
    snap = next(r for line, r in results.items() if line.startswith("snapshot "))
    assert {line.split()[0] for line in snap.stdout.splitlines()} == {"KRW-BTC", "KRW-ETH"}
    assert snippet_run.returncode == 0, snippet_run.stdout + snippet_run.stderr
    assert snippet_run.stderr == ""
    printed = snippet_run.stdout.splitlines()
    assert len(printed) == 10, printed
    assert all(re.fullmatch(r"KRW-(BTC|ETH) \d+(\.\d+)?", line) for line in printed), printed
    # `run` in normal use: info lines only, no warning
    noisy = [line for line in broker_log.splitlines() if re.search(r"warn|error", line, re.I)]
    assert not noisy, noisy


async def run_snippet(script: Path) -> subprocess.CompletedProcess[str]:
    """``python snippet.py`` as a newcomer runs it (outside the repository, the venv's python),
    without blocking the event loop that serves the simulator."""
    return await asyncio.to_thread(
        subprocess.run,
        [PYTHON, str(script)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=scaled(40),
        check=False,
    )
