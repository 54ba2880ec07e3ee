"""The deployment files agree with the code: docker-compose.yml, .env.example, Dockerfile, lock.

Every command a service runs is a real command of the installed entry point with options it
has (checked against ``--help`` and parsed the way the program parses them); every variable a
service sets is one the program reads; every ``${VAR:-default}`` is documented in .env.example
with the same default, and the broker's defaults are broker/settings.py's. ``docker compose
config`` runs too where the compose plugin is installed (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from broker.settings import ENV_VARS, UPBIT_URL, BrokerSettings
from broker.testing import free_port
from cli.main import app
from gateway.config import GATEWAY_ENV_PREFIX, GatewaySettings
from gateway.server import Gateway
from tests.support.tls import make_certificates

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
#: every package pinned (runtime, dev, bench, pip, setuptools) and its runtime part: `make lock`
LOCK = ROOT / "requirements" / "lock.txt"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
OFFLINE_URL = "ws://simulator:8765/websocket/v1"
OFFLINE_REST_URL = "http://simulator:8765"
#: the gateway's port inside its container (its command's --port; the health check's too)
GATEWAY_PORT = 8080
#: gateway settings the compose file does not set as variables: the per-process id, and the
#: address the command gives (the Redis URL and namespace are the brokers', checked there)
GATEWAY_NOT_IN_ENV = {"gateway_id", "host", "port", "redis_url", "namespace"}
#: gateway flags the compose file sets differently from their defaults, on purpose (as the
#: brokers': one JSON object per line for log shippers)
GATEWAY_COMPOSE_OVERRIDES = {"UPBIT_GATEWAY_LOG_FORMAT": "json"}
#: broker settings the compose file sets differently from broker/settings.py, on purpose
COMPOSE_OVERRIDES = {"redis_url", "metrics_port"}
#: upbit-broker commands that do not build BrokerSettings (so read no UPBIT_BROKER_* variable
#: but those of their own flags: the gateway's Redis URL and namespace)
NO_BROKER_SETTINGS = {"simulate", "gateway"}
#: the services of the default stack (no profile): the `ha` profile must leave them as they are
DEFAULT_SERVICES = {"redis", "broker", "broker-standby", "ticker-board", "ohlcv-bars", "gateway"}
#: profile `ha`: Redis with Sentinel failover, a stack of its own
HA_DATA_NODES = ("redis-master", "redis-replica")
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_BROKERS = ("broker-ha", "broker-ha-standby")
HA_CONSUMERS = ("ticker-board-ha",)
HA_SERVICES = (*HA_DATA_NODES, *HA_SENTINELS, *HA_BROKERS, *HA_CONSUMERS)
HA_URL = "redis+sentinel://:@sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/mymaster/0"
SENTINEL_TEMPLATE = ROOT / "deploy" / "sentinel.conf"


# -- compose interpolation (the subset of the spec this repository uses, and a bit more) ------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Interpolation:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR?e}``,
    ``${VAR:+r}``, ``${VAR+r}`` (operands nest) and ``$$``; records every reference."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        #: name -> the raw default operand of each ``:-``/``-`` reference (None: no default)
        self.refs: dict[str, list[str | None]] = {}

    def __call__(self, text: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            if text[i] != "$":
                out.append(text[i])
                i += 1
            elif text.startswith("$$", i):
                out.append("$")
                i += 2
            elif text.startswith("${", i):
                end = _closing_brace(text, i)
                out.append(self._braced(text[i + 2 : end]))
                i = end + 1
            elif m := _NAME.match(text, i + 1):
                self.refs.setdefault(m.group(), []).append(None)
                out.append(self.env.get(m.group(), ""))
                i = m.end()
            else:
                out.append("$")
                i += 1
        return "".join(out)

    def _braced(self, inner: str) -> str:
        m = _NAME.match(inner)
        if m is None:
            raise ValueError(f"invalid interpolation ${{{inner}}}")
        name, rest = m.group(), inner[m.end() :]
        value = self.env.get(name)
        if not rest:
            self.refs.setdefault(name, []).append(None)
            return value or ""
        for op in (":-", ":?", ":+", "-", "?", "+"):
            if rest.startswith(op):
                operand = rest[len(op) :]
                break
        else:
            raise ValueError(f"invalid interpolation ${{{inner}}}")
        self.refs.setdefault(name, []).append(operand if op in (":-", "-") else None)
        resolved = self(operand)  # always, so nested references are recorded
        if op == ":-":
            return value if value else resolved
        if op == "-":
            return value if value is not None else resolved
        if op == ":+":
            return resolved if value else ""
        if op == "+":
            return resolved if value is not None else ""
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise ValueError(f"required variable {name} is missing: {resolved}")
        return value or ""

    def resolve(self, node: Any) -> Any:
        """Interpolate every string value (not keys) of a loaded YAML tree."""
        if isinstance(node, str):
            return self(node)
        if isinstance(node, list):
            return [self.resolve(x) for x in node]
        if isinstance(node, dict):
            return {k: self.resolve(v) for k, v in node.items()}
        return node


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    j = start
    while j < len(text):
        if text.startswith("$$", j):
            j += 2
        elif text.startswith("${", j):
            depth += 1
            j += 2
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
            j += 1
        else:
            j += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def test_interpolation_follows_the_compose_rules() -> None:
    i = Interpolation({"SET": "v", "EMPTY": ""})
    assert i("${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d} ${UNSET-d}") == "v d d  d"
    assert i("${UNSET:-a${SET}b} ${UNSET:-${ALSO:-x}} $$SET $SET ${SET:+r} ${EMPTY+r}") == (
        "avb x $SET v r r"
    )
    with pytest.raises(ValueError, match="UNSET"):
        i("${UNSET:?needed}")
    assert i.refs["UNSET"] == ["d", "d", "a${SET}b", "${ALSO:-x}", None]


# -- the files ------------------------------------------------------------------------------


@cache
def compose_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose model with variables resolved (``env`` plays the shell and .env)."""
    resolved: dict[str, Any] = Interpolation(env or {}).resolve(compose_raw())
    return resolved


def services(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose(env)["services"]
    return result


def referenced_variables() -> dict[str, list[str | None]]:
    interp = Interpolation({})
    interp.resolve(compose_raw())
    return interp.refs


@cache
def env_example() -> dict[str, list[str]]:
    """``VAR -> [values]`` of every (commented or not) ``VAR=value`` line of .env.example."""
    documented: dict[str, list[str]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            documented.setdefault(m.group(1), []).append(value)
    return documented


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_default(instruction: str) -> list[str]:
    """The final stage's ENTRYPOINT or CMD (exec form)."""
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"Dockerfile has no {instruction}"
    parsed = yaml.safe_load(values[-1])
    assert isinstance(parsed, list), f"{instruction} must use the exec form"
    return [str(x) for x in parsed]


def our_services(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Services that run this repository's image."""
    return {name: s for name, s in services(env).items() if "build" in s}


def argv_of(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint + command (the image's where compose sets none;
    setting an entrypoint clears the image's CMD, as Docker does)."""
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    if entrypoint is None:
        entrypoint = image_default("ENTRYPOINT")
        if command is None:
            command = image_default("CMD")
    return [str(x) for x in [*entrypoint, *(command or [])]]


def healthcheck_argv(service: dict[str, Any]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test and test[0] == "CMD":
        return [str(x) for x in test[1:]]
    return None


# -- the programs ---------------------------------------------------------------------------


def entry_point() -> list[str]:
    """The installed ``upbit-broker`` script (what the image runs), else the module."""
    script = Path(sys.executable).parent / "upbit-broker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


@cache
def help_text(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPBIT_", "OHLCV_", "TICK"))}
    env.update({"COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"})
    if argv[0] == "upbit-broker":
        cmd = [*entry_point(), *argv[1:], "--help"]
    else:
        cmd = [sys.executable, *argv[1:], "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result.stdout


def cli_command(name: str) -> Any:
    group = typer.main.get_command(app)
    command = group.commands.get(name)  # type: ignore[attr-defined]
    assert command is not None, f"upbit-broker has no command {name!r}"
    return command


def command_envvars(name: str) -> set[str]:
    out: set[str] = set()
    for param in cli_command(name).params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            out.add(envvar)
        elif envvar:
            out.update(envvar)
    return out


def example_module(argv: list[str]) -> Any:
    assert argv[:2] == ["python", "-m"], argv
    return importlib.import_module(argv[2])


def documented_example_envvars(module: Any) -> set[str]:
    """The variables an example's docstring says it reads (``Options also come from ...``)."""
    return set(re.findall(r"``([A-Z][A-Z0-9_]{2,})``", module.__doc__ or ""))


def options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


@contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is exactly ``env`` (the container's), for in-process parsing."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def container_programs() -> list[tuple[str, str, list[str]]]:
    """(service, what, argv) of every program our services run: command and healthcheck."""
    out = []
    for name, service in our_services().items():
        out.append((name, "command", argv_of(service)))
        check = healthcheck_argv(service)
        if check is not None and check[0] == "upbit-broker":
            out.append((name, "healthcheck", check))
    return out


# -- tests: structure -----------------------------------------------------------------------


def test_the_stack_has_the_services_it_documents() -> None:
    svc = services()
    assert {
        "redis",
        "broker",
        "broker-standby",
        "ticker-board",
        "ohlcv-bars",
        "gateway",
        "simulator",
    } <= set(svc)
    for name, service in svc.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in svc, f"{name} depends on unknown service {dep}"
            assert spec.get("condition") in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in svc[dep], f"{dep} has no healthcheck for {name}"
        # Without the profile the stack must still start: nothing always-on needs a profiled one.
        if not service.get("profiles"):
            for dep in service.get("depends_on") or {}:
                assert not svc[dep].get("profiles"), f"{name} needs profiled service {dep}"


def test_redis_is_bounded_unpersisted_and_health_checked() -> None:
    redis = services()["redis"]
    assert str(redis["image"]).startswith("redis:7")
    cmd = [str(x) for x in redis["command"]]
    assert cmd[0] == "redis-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert pairs["--save"] == "" and pairs["--appendonly"] == "no"
    assert re.fullmatch(r"\d+[kmg]b", pairs["--maxmemory"])
    assert pairs["--maxmemory-policy"] == "noeviction"
    buffer = pairs["--client-output-buffer-limit"].split()
    assert buffer[0] == "pubsub" and len(buffer) == 4, buffer
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["deploy"]["resources"]["limits"]["memory"]
    assert redis["restart"] in {"always", "unless-stopped"}
    # The container limit leaves room above maxmemory for the pub/sub output buffers.
    assert _bytes(redis["deploy"]["resources"]["limits"]["memory"]) > _bytes(
        pairs["--maxmemory"]
    ) + _bytes(buffer[1])


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg])b?", size.lower())
    assert m, size
    return int(m.group(1)) * 1024 * int(1024 ** "kmg".index(m.group(2)))


def test_brokers_run_against_upbit_with_metrics_health_and_restart() -> None:
    svc = services()
    for name in ("broker", "broker-standby"):
        broker = svc[name]
        assert argv_of(broker)[:2] == ["upbit-broker", "run"], name
        assert healthcheck_argv(broker) == ["upbit-broker", "check"], name
        assert broker["restart"] in {"always", "unless-stopped"}
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        env = service_env(broker)
        assert env["UPBIT_BROKER_UPSTREAM_URL"] == UPBIT_URL  # the real Upbit by default
        port = int(env["UPBIT_BROKER_METRICS_PORT"])
        assert port > 0
        assert any(str(p).endswith(f":{port}") for p in broker.get("ports", [])), name
        assert not broker.get("profiles")
    # One image, non-root and read-only, for every service built here.
    for name, service in our_services().items():
        assert service["image"] == svc["broker"]["image"], name
        assert service.get("read_only") is True, name
        assert service.get("user") in (None, ""), f"{name}: the image sets its non-root user"


def test_example_consumers_scale() -> None:
    for name in ("ticker-board", "ohlcv-bars"):
        service = services()[name]
        # --scale needs no fixed name and no fixed host port.
        assert "container_name" not in service and "ports" not in service, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert not service.get("profiles")


def test_the_gateway_scales_behind_a_health_check() -> None:
    gateway = services()["gateway"]
    argv = argv_of(gateway)
    assert argv[:2] == ["upbit-broker", "gateway"]
    args = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert args["--host"] == "0.0.0.0" and args["--port"] == str(GATEWAY_PORT)
    # --scale needs no fixed name; the one host port mapping is a variable (a range scales)
    assert "container_name" not in gateway and not gateway.get("profiles")
    [raw_port] = compose_raw()["services"]["gateway"]["ports"]
    assert raw_port.endswith(f":{GATEWAY_PORT}") and "${GATEWAY_HOST_PORT:-" in raw_port
    ranged = services({"GATEWAY_HOST_PORT": "8080-8083"})["gateway"]["ports"]
    assert ranged == [f"127.0.0.1:8080-8083:{GATEWAY_PORT}"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "broker" in gateway["depends_on"]
    assert gateway["restart"] in {"always", "unless-stopped"}
    assert gateway["deploy"]["resources"]["limits"]["memory"]
    check = healthcheck_argv(gateway)
    assert check is not None and check[:2] == ["python", "-c"], check
    assert f"{GATEWAY_PORT}" in check[2] and "/websocket/v1" in check[2]


def _probe(port: int, env: Mapping[str, str]) -> int:
    """The gateway's health check, run as the container runs it, against ``port``."""
    [_, _, code] = healthcheck_argv(services()["gateway"]) or ["", "", ""]
    code = code.replace(str(GATEWAY_PORT), str(port))
    base = {k: v for k, v in os.environ.items() if not k.startswith("UPBIT_")}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, timeout=30
    )
    return result.returncode


async def test_the_gateway_health_check_passes_on_a_gateway_and_fails_without(
    redis_url: str, tmp_path: Path
) -> None:
    assert await asyncio.to_thread(_probe, free_port(), {}) != 0  # nothing listens
    plain = GatewaySettings(redis_url=redis_url, namespace="t", port=0)
    async with Gateway(plain) as gw:
        assert await asyncio.to_thread(_probe, gw.port, {}) == 0
    files = make_certificates(tmp_path)
    tls = plain.with_(tls_cert=str(files.cert), tls_key=str(files.key))
    async with Gateway(tls) as gw:
        env = {"UPBIT_GATEWAY_TLS_CERT": str(files.cert)}
        assert await asyncio.to_thread(_probe, gw.port, env) == 0
        assert await asyncio.to_thread(_probe, gw.port, {}) != 0  # plain HTTP on a TLS port


def test_the_offline_profile_points_the_brokers_at_the_simulator() -> None:
    assert OFFLINE_URL in env_example()["UPBIT_BROKER_UPSTREAM_URL"]
    assert OFFLINE_REST_URL in env_example()["UPBIT_GATEWAY_UPSTREAM_REST_URL"]
    assert "offline" in env_example()["COMPOSE_PROFILES"]
    svc = services(
        {
            "UPBIT_BROKER_UPSTREAM_URL": OFFLINE_URL,
            "UPBIT_GATEWAY_UPSTREAM_REST_URL": OFFLINE_REST_URL,
        }
    )
    sim = svc["simulator"]
    assert sim["profiles"] == ["offline"]
    argv = argv_of(sim)
    assert argv[:2] == ["upbit-broker", "simulate"]
    args = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert args["--host"] == "0.0.0.0"
    for name in ("broker", "broker-standby"):
        url = urlsplit(service_env(svc[name])["UPBIT_BROKER_UPSTREAM_URL"])
        assert (url.scheme, url.hostname, url.port, url.path) == (
            "ws",
            "simulator",
            int(args["--port"]),
            "/websocket/v1",
        )
    # ... and the brokers' settings accept it.
    BrokerSettings.from_env(service_env(svc["broker"]))
    # The gateway forwards REST to the simulator's own port.
    rest = urlsplit(GatewaySettings.from_env(service_env(svc["gateway"])).upstream_rest_url)
    assert (rest.scheme, rest.hostname, rest.port) == ("http", "simulator", int(args["--port"]))


# -- tests: the `ha` profile ------------------------------------------------------------------


def _pairs(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a redis-server command line (``--replicaof`` takes two)."""
    out: dict[str, str] = {}
    i = 1
    while i < len(argv):
        width = 3 if argv[i] == "--replicaof" else 2
        out[argv[i]] = " ".join(argv[i + 1 : i + width])
        i += width
    return out


def sentinel_directives(path: Path = SENTINEL_TEMPLATE) -> list[list[str]]:
    """The directives of a sentinel config file, split into words (comments dropped)."""
    lines = (line.split("#", 1)[0].split() for line in path.read_text().splitlines())
    return [words for words in lines if words]


def test_the_ha_profile_is_a_stack_of_its_own_that_leaves_the_default_unchanged() -> None:
    svc = services()
    assert set(HA_SERVICES) <= set(svc)
    for name in HA_SERVICES:
        assert svc[name].get("profiles") == ["ha"], name
    # The default stack: the same services, none of them in a profile, none needing the `ha` ones.
    always = {name for name, s in svc.items() if not s.get("profiles")}
    assert always == DEFAULT_SERVICES
    for name in always:
        assert not set(svc[name].get("depends_on") or {}) & set(HA_SERVICES), name
        env = service_env(svc[name])
        assert "sentinel" not in env.get("UPBIT_BROKER_REDIS_URL", ""), name
    # The `ha` services need only each other (they start alone: `up broker-ha ...`).
    for name in HA_SERVICES:
        deps = set(svc[name].get("depends_on") or {})
        assert deps <= set(HA_SERVICES), (name, deps)
    # Every container of the stack has a health check, and every dependency waits for it.
    for name in (*HA_DATA_NODES, *HA_SENTINELS, *HA_BROKERS):
        assert svc[name].get("healthcheck", {}).get("test"), name
    # The host ports of the brokers' metrics do not collide with the default pair's.
    published = [str(p).rsplit(":", 2)[1] for s in svc.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_the_ha_data_nodes_are_a_master_and_its_replica_as_bounded_as_redis() -> None:
    svc = services()
    base = _pairs([str(x) for x in svc["redis"]["command"]])
    for name in HA_DATA_NODES:
        node = svc[name]
        assert str(node["image"]).startswith("redis:7")
        argv = [str(x) for x in node["command"]]
        assert argv[0] == "redis-server"
        pairs = _pairs(argv)
        # The `redis` service's limits and policies, unchanged.
        for flag, value in base.items():
            assert pairs[flag] == value, (name, flag)
        # Each announces its compose hostname: what the sentinels hand out after a failover.
        assert node["hostname"] == name
        assert pairs["--replica-announce-ip"] == name
        assert "redis-cli ping" in " ".join(node["healthcheck"]["test"])
        assert node["restart"] in {"always", "unless-stopped"}
        assert node["deploy"]["resources"]["limits"]["memory"]
    assert "--replicaof" not in _pairs([str(x) for x in svc["redis-master"]["command"]])
    assert _pairs([str(x) for x in svc["redis-replica"]["command"]])["--replicaof"] == (
        "redis-master 6379"
    )
    assert svc["redis-replica"]["depends_on"]["redis-master"]["condition"] == "service_healthy"
    # min-replicas-to-write: off by default (one replica: the promoted one would have none
    # left), one variable for both nodes (either may be the master).
    for env, wanted in (({}, "0"), ({"HA_MIN_REPLICAS_TO_WRITE": "1"}, "1")):
        for name in HA_DATA_NODES:
            pairs = _pairs([str(x) for x in services(env)[name]["command"]])
            assert pairs["--min-replicas-to-write"] == wanted, name
            assert pairs["--min-replicas-max-lag"] == "10", name
    # With a password both require it, and both can sync with it (either may be the replica).
    with_password = services({"REDIS_PASSWORD": "s3cret"})
    for name in HA_DATA_NODES:
        pairs = _pairs([str(x) for x in with_password[name]["command"]])
        assert pairs["--requirepass"] == pairs["--masterauth"] == "s3cret", name
        assert service_env(with_password[name])["REDISCLI_AUTH"] == "s3cret", name


def test_the_sentinel_config_monitors_the_master_with_quorum_2() -> None:
    directives = sentinel_directives()
    monitors = [d for d in directives if d[:2] == ["sentinel", "monitor"]]
    assert len(monitors) == 1, monitors
    [[_, _, name, host, port, quorum]] = monitors
    sentinel_url = urlsplit(HA_URL)
    assert name == sentinel_url.path.split("/")[1] == "mymaster"
    assert (host, port) == ("redis-master", "6379")
    assert int(quorum) == 2
    # A quorum is a majority of the sentinels the compose file runs: one alone decides nothing.
    assert len(HA_SENTINELS) // 2 < int(quorum) <= len(HA_SENTINELS)
    words = {tuple(d) for d in directives}
    assert ("sentinel", "resolve-hostnames", "yes") in words
    assert ("sentinel", "announce-hostnames", "yes") in words
    assert ("port", "26379") in words and ("dir", "/data") in words
    assert ("protected-mode", "no") in words  # the other containers reach it
    for option in ("down-after-milliseconds", "failover-timeout", "parallel-syncs"):
        [value] = [d[3] for d in directives if d[:3] == ["sentinel", option, "mymaster"]]
        assert int(value) > 0, option


def test_the_sentinels_run_a_writable_copy_of_the_template_and_check_the_quorum() -> None:
    svc = services()
    hostnames = set()
    for name in HA_SENTINELS:
        sentinel = svc[name]
        assert str(sentinel["image"]).startswith("redis:7")
        hostnames.add(sentinel["hostname"])
        [mount] = sentinel["volumes"]
        source, target, mode = str(mount).split(":")
        assert (ROOT / source).resolve() == SENTINEL_TEMPLATE and mode == "ro"
        argv = [str(x) for x in sentinel["command"]]
        assert argv[:2] == ["sh", "-c"]
        script = argv[2]
        assert f"cp {target} /data/" in script
        assert "exec docker-entrypoint.sh redis-server /data/sentinel.conf --sentinel" in script
        check = " ".join(sentinel["healthcheck"]["test"])
        assert "-p 26379 sentinel ckquorum mymaster" in check
        assert sentinel["depends_on"]["redis-master"]["condition"] == "service_healthy"
        assert sentinel["restart"] in {"always", "unless-stopped"}
    assert hostnames == set(HA_SENTINELS)


def test_the_ha_brokers_and_consumer_find_the_master_through_the_sentinels() -> None:
    from broker.redis_url import parse_sentinel_url

    svc = services()
    sentinels = tuple((name, 26379) for name in HA_SENTINELS)
    default_broker = service_env(svc["broker"])
    for name in (*HA_BROKERS, *HA_CONSUMERS):
        env = service_env(svc[name])
        assert env["UPBIT_BROKER_REDIS_URL"] == HA_URL, name
        parsed = parse_sentinel_url(env["UPBIT_BROKER_REDIS_URL"])
        assert (parsed.sentinels, parsed.service, parsed.db) == (sentinels, "mymaster", 0)
        for dep in HA_SENTINELS:
            assert svc[name]["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
        assert env["UPBIT_BROKER_NAMESPACE"] == default_broker["UPBIT_BROKER_NAMESPACE"]
    for name in HA_BROKERS:
        broker = svc[name]
        assert argv_of(broker)[:2] == ["upbit-broker", "run"], name
        assert healthcheck_argv(broker) == ["upbit-broker", "check"], name
        assert broker["hostname"] == name
        env = service_env(broker)
        # The default brokers' settings but the Redis URL, and accepted by the broker.
        differ = {k for k in set(env) | set(default_broker) if env.get(k) != default_broker.get(k)}
        assert differ == {"UPBIT_BROKER_REDIS_URL"}, differ
        assert BrokerSettings.from_env(env).redis_url == HA_URL
    consumer, example = service_env(svc["ticker-board-ha"]), service_env(svc["ticker-board"])
    assert {k for k in consumer if consumer[k] != example.get(k)} == {"UPBIT_BROKER_REDIS_URL"}
    assert argv_of(svc["ticker-board-ha"]) == argv_of(svc["ticker-board"])
    # The password, when set, is the master's (the sentinels run without one).
    with_password = services({"REDIS_PASSWORD": "s3cret"})
    url = parse_sentinel_url(service_env(with_password["broker-ha"])["UPBIT_BROKER_REDIS_URL"])
    assert (url.password, url.sentinel_password) == ("s3cret", None)


def test_the_sentinel_containers_script_makes_a_working_sentinel(tmp_path: Path) -> None:
    """The sentinels' command and config, run here: three of them watching a real master with
    a password reach their quorum (the compose health check, run as the container runs it, says
    so), and hand out the master by hostname. Only the places differ from the containers':
    every hostname is ``localhost``, every port a free one, /data a directory of the test."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None or shutil.which("redis-server") is None:
        pytest.skip("redis-server and redis-cli are needed")
    from broker.testing import RedisServer, wait_for_sync

    sentinel = services({"REDIS_PASSWORD": "pw"})["sentinel-1"]
    script = [str(x) for x in sentinel["command"]][2]
    check = " ".join(str(x) for x in sentinel["healthcheck"]["test"][1:])
    # A fake image entry point: it passes the command on, on this sentinel's free port.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entry = bin_dir / "docker-entrypoint.sh"
    entry.write_text('#!/bin/sh\nexec "$@" --port "$SENTINEL_PORT"\n')
    entry.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    with RedisServer(("--requirepass", "pw")) as master:
        template = tmp_path / "sentinel.conf"
        template.write_text(
            SENTINEL_TEMPLATE.read_text()
            .replace("redis-master 6379", f"localhost {master.port}")
            .replace("dir /data", f"dir {tmp_path}")
            .replace("protected-mode no", "bind 127.0.0.1")
        )
        ports = [free_port() for _ in HA_SENTINELS]
        try:
            for port in ports:
                data = tmp_path / f"data-{port}"
                data.mkdir()
                local = script.replace("/etc/upbit-broker/sentinel.conf", str(template))
                local = local.replace("/data/", f"{data}/")
                env = {
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "HOSTNAME": "localhost",
                    "REDIS_PASSWORD": "pw",
                    "SENTINEL_PORT": str(port),
                }
                procs.append(
                    subprocess.Popen(
                        ["sh", "-c", local],
                        env=env,
                        cwd=data,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            for port in ports:

                def healthy(port: int = port) -> bool:
                    probe = check.replace("-p 26379", f"-p {port}")
                    return subprocess.run(["sh", "-c", probe], timeout=10).returncode == 0

                wait_for_sync(healthy, 30, 0.2, message=f"sentinel {port}'s quorum check")
                answer = subprocess.run(
                    [redis_cli, "-p", str(port), "sentinel", "get-master-addr-by-name", "mymaster"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.split()
                assert answer == ["localhost", str(master.port)]
                # The copy the sentinel runs (and rewrites), with what the script added.
                conf = (tmp_path / f"data-{port}" / "sentinel.conf").read_text()
                assert re.search(r'^sentinel auth-pass mymaster "?pw"?$', conf, re.M), conf
                assert re.search(r'^sentinel announce-ip "?localhost"?$', conf, re.M), conf
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)


# -- tests: variables -----------------------------------------------------------------------


def test_every_compose_variable_is_documented_with_its_default() -> None:
    documented = env_example()
    refs = referenced_variables()
    missing = sorted(set(refs) - set(documented))
    assert not missing, f".env.example does not document {missing}"
    for name, defaults in refs.items():
        for default in defaults:
            if default is not None and "$" not in default:
                assert default in documented[name], (name, default, documented[name])
    unused = sorted(set(documented) - set(refs) - {"COMPOSE_PROFILES"})
    assert not unused, f".env.example documents variables compose never reads: {unused}"


def test_broker_settings_come_from_env_with_the_settings_defaults() -> None:
    broker_env = service_env(services()["broker"])
    # Every setting is there (but the per-process id) ...
    assert set(ENV_VARS) - {"UPBIT_BROKER_BROKER_ID"} <= set(broker_env)
    # ... and, except deliberate overrides, with broker/settings.py's default.
    from_compose = BrokerSettings.from_env(broker_env)
    defaults = BrokerSettings()
    for f in fields(BrokerSettings):
        if f.name in COMPOSE_OVERRIDES or f.name == "broker_id":
            continue
        assert getattr(from_compose, f.name) == getattr(defaults, f.name), f.name
    assert from_compose.redis_url == "redis://:@redis:6379/0"
    with_password = services({"REDIS_PASSWORD": "s3cret"})
    assert service_env(with_password["broker"])["UPBIT_BROKER_REDIS_URL"] == (
        "redis://:s3cret@redis:6379/0"
    )
    assert "s3cret" in with_password["redis"]["command"]


def test_gateway_settings_come_from_env_with_the_settings_defaults() -> None:
    env = service_env(services()["gateway"])
    # Every setting is there (but those GATEWAY_NOT_IN_ENV names) ...
    wanted = {
        GATEWAY_ENV_PREFIX + f.name.upper()
        for f in fields(GatewaySettings)
        if f.name not in GATEWAY_NOT_IN_ENV
    }
    assert wanted <= set(env), sorted(wanted - set(env))
    # ... with gateway/config.py's defaults, and the brokers' Redis and namespace.
    from_compose = GatewaySettings.from_env(env)
    defaults = GatewaySettings()
    for f in fields(GatewaySettings):
        if f.name not in GATEWAY_NOT_IN_ENV:
            assert getattr(from_compose, f.name) == getattr(defaults, f.name), f.name
    broker_env = service_env(services()["broker"])
    for name in ("UPBIT_BROKER_REDIS_URL", "UPBIT_BROKER_NAMESPACE"):
        assert env[name] == broker_env[name], name
    # The variables of the command's flags without a setting (loop, logs) have its defaults.
    for param in cli_command("gateway").params:
        if param.envvar in env and param.name not in {f.name for f in fields(GatewaySettings)}:
            expected = GATEWAY_COMPOSE_OVERRIDES.get(param.envvar, str(param.default))
            assert env[param.envvar] == expected, param.envvar


@pytest.mark.parametrize("name", ["broker", "broker-standby", "simulator", "gateway", *HA_BROKERS])
def test_cli_services_set_only_variables_their_command_reads(name: str) -> None:
    service = services()[name]
    command = argv_of(service)[1]
    allowed = command_envvars(command)
    if command == "gateway":  # settings without a flag are read by GatewaySettings.from_env
        allowed |= {GATEWAY_ENV_PREFIX + f.name.upper() for f in fields(GatewaySettings)}
    if command not in NO_BROKER_SETTINGS:
        allowed |= set(ENV_VARS)
    unknown = sorted(set(service_env(service)) - allowed)
    assert not unknown, f"{name} sets variables `{command}` never reads: {unknown}"


@pytest.mark.parametrize("name", ["ticker-board", "ohlcv-bars", *HA_CONSUMERS])
def test_example_services_set_only_variables_the_example_reads(name: str) -> None:
    service = services()[name]
    argv = argv_of(service)
    module = example_module(argv)
    env = service_env(service)
    unknown = sorted(set(env) - documented_example_envvars(module))
    assert not unknown, f"{name}: {argv[2]} does not document {unknown}"
    # ... and really reads each: changing one changes what parse_args makes of the command.
    with environ(env):
        base = vars(module.parse_args(argv[3:]))
    for var, value in env.items():
        with environ({**env, var: value + "0"}):
            changed = vars(module.parse_args(argv[3:]))
        assert changed != base, f"{argv[2]} ignores {var}"


# -- tests: commands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "what", "argv"),
    container_programs(),
    ids=[f"{s}-{w}" for s, w, _ in container_programs()],
)
def test_every_program_is_a_real_command_with_valid_options(
    service: str, what: str, argv: list[str]
) -> None:
    env = service_env(services()[service])
    if argv[0] == "upbit-broker":
        text = help_text("upbit-broker", argv[1])
        for option in options(argv[2:]):
            assert option in text, f"{service} {what}: `upbit-broker {argv[1]}` has no {option}"
        # Parse it as the program would, with the container's environment: types and values.
        with environ(env):
            cli_command(argv[1]).make_context(argv[1], list(argv[2:]))
    else:
        module = example_module(argv)
        text = help_text(*argv[:3])
        for option in options(argv[3:]):
            assert option in text, f"{service}: {argv[2]} has no {option}"
        with environ(env):
            module.parse_args(argv[3:])


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPBIT_", "COMPOSE_"))}
    for extra in ([], ["--profile", "offline"], ["--profile", "ha"]):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *extra, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**env, "UPBIT_BROKER_UPSTREAM_URL": OFFLINE_URL} if "offline" in extra else env,
        )
        assert result.returncode == 0, result.stderr


# -- tests: image ---------------------------------------------------------------------------


def test_dockerfile_builds_a_small_non_root_image_from_the_lock() -> None:
    steps = dockerfile_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    bases = {args.get(f.split()[0].strip("${}"), f.split()[0]) for f in froms}
    assert bases == {"python:3.11-slim"}, bases
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert image_default("ENTRYPOINT") == ["upbit-broker"]
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"pip install --no-deps -r \S*requirements/runtime\.txt", runs)
    # the project is built with the locked setuptools, not whatever is newest that day
    assert re.search(r"pip install -c \S*requirements/lock\.txt setuptools", runs)
    assert re.search(r"pip install --no-deps --no-build-isolation /src", runs)
    copied = " ".join(rest for word, rest in steps if word == "COPY")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"the image lacks package {pattern}"
    # .dockerignore lets in only what the build copies (so never .venv or .git).
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    assert ignore[0] == "*"
    assert {"!requirements/runtime.txt", "!requirements/lock.txt"} <= set(ignore)
    assert not [x for x in ignore if x.startswith(("!.venv", "!.git", "!tests"))]
    # ... and lets in everything the build copies from the context (a COPY of an ignored folder
    # fails the build: "not found").
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, (
                    f".dockerignore keeps out {source}, which the Dockerfile copies"
                )


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """``{normalized name: version}`` of a lock file; every line an exact pin, once."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"not pinned: {line}"
            assert canonicalize_name(name) not in pins, f"pinned twice in {path.name}: {name}"
            pins[canonicalize_name(name)] = version
    return pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(group: str) -> list[Requirement]:
    """``runtime`` ([project] dependencies), an extra (``dev``, ``bench``), or ``build``."""
    if group == "build":
        return [Requirement(r) for r in pyproject()["build-system"]["requires"]]
    project = pyproject()["project"]
    raw = project["dependencies"] if group == "runtime" else project["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """``{name: installed version}`` of ``roots`` and everything they need, transitively, read
    from the installed metadata (markers evaluated here, extras followed)."""
    todo = [r for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:  # pragma: no cover - a broken venv
            pytest.fail(f"{req.name} is not installed")
        seen[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            extras = ["", *sorted(req.extras)]
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return seen


def test_the_lock_pins_every_requirement_within_pyproject_ranges() -> None:
    pins = lock_pins()
    for group in ("runtime", "dev", "bench", "build"):
        for req in requirements(group):
            name = canonicalize_name(req.name)
            assert name in pins, f"requirements/lock.txt lacks {group} requirement {req}"
            assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert "pip" in pins, "the lock pins the installer too (make install upgrades pip with it)"


def test_the_runtime_lock_is_the_runtime_part_of_the_lock() -> None:
    runtime, everything = lock_pins(RUNTIME_LOCK), lock_pins()
    assert runtime, "requirements/runtime.txt pins nothing"
    differ = {n: (v, everything.get(n)) for n, v in runtime.items() if everything.get(n) != v}
    assert not differ, f"runtime.txt disagrees with lock.txt (run make lock): {differ}"
    tools = {canonicalize_name(r.name) for g in ("dev", "bench", "build") for r in requirements(g)}
    tools.add("pip")
    assert not tools & set(runtime), (
        f"dev/bench/build tools in the runtime lock: {tools & set(runtime)}"
    )


def test_the_lock_covers_what_is_installed() -> None:
    """Every package the runtime and dev dependencies need, as installed here, is pinned; and
    the runtime ones are in runtime.txt (what the image installs with --no-deps). Only
    meaningful in a venv made from the lock: `make test-latest`'s newer releases may need
    packages the lock does not know yet (the next `make lock` adds them)."""
    pins, runtime_pins = lock_pins(), lock_pins(RUNTIME_LOCK)
    runtime = installed_closure(requirements("runtime"))
    dev = installed_closure(requirements("dev"))
    unlocked = {n: v for n, v in {**runtime, **dev}.items() if pins.get(n, v) != v}
    if unlocked:
        pytest.skip(f"not the locked versions here (make test-latest?): {sorted(unlocked.items())}")
    missing = sorted(set(runtime) - set(runtime_pins))
    assert not missing, f"requirements/runtime.txt lacks {missing}: run make lock"
    missing = sorted(set(dev) - set(pins))
    assert not missing, f"requirements/lock.txt lacks {missing}: run make lock"
