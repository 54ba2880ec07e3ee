"""Redis AUTH and ACL users: broker, consumers and CLI work with credentials, least-privilege
users are enough (and stop what they should), and no password is ever printed or stored.

The ACL rules below are the ones docs/reliability.md recommends; Redis's ``ACL LOG`` must
stay empty while broker, consumers and operators do their normal work under them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from broker.leases import LeaseStore
from broker.testing import (
    CliResult,
    arun_cli,
    broker_process,
    consumer_process,
    simulator_process,
    wait_for,
)
from broker.testing import RedisServer as AuthRedis
from broker.testing import read_status as redis_status
from broker.upbit.types import SubscriptionSet
from tests.support.processes import sim_upstream, upstream_of
from tests.support.sim import running_simulator

pytestmark = pytest.mark.timeout(90)

ADMIN = "Adm1n-S3cret-x7"
BROKER_PW = "Br0ker-S3cret-k2"
CONSUMER_PW = "C0nsumer-S3cret-q9"
OPERATOR_PW = "0perator-S3cret-w4"
SECRETS = (ADMIN, BROKER_PW, CONSUMER_PW, OPERATOR_PW)

_CONNECT = "+hello +auth +ping +client|setname"
#: docs/reliability.md "Least-privilege ACLs" (namespace ``t``)
ACL_BROKER = (
    f"broker on >{BROKER_PW} resetkeys ~t:* resetchannels &t:* -@all {_CONNECT} +info "
    "+eval +evalsha +script|load +time +get +set +incr +incrby +del +exists +hget +hgetall "
    "+hset +hmget +pexpire +zadd +zrem +zrange +zrangebyscore +scan +lpop +rpush +publish "
    "+subscribe +unsubscribe +multi +exec +discard +xadd +xrange +xrevrange"
)
ACL_CONSUMER = (
    f"consumer-a on >{CONSUMER_PW} resetkeys ~t:lease:consumer-a ~t:leases ~t:requests "
    f"~t:reply:* %R~t:status %R~t:hist:* resetchannels &t:* -@all {_CONNECT} +info +evalsha "
    "+script|load +time +hget +del +hset +pexpire +zadd +zrem +publish +subscribe +unsubscribe "
    "+rpush +blpop +lrem +multi +exec +xread +xrange +xrevrange +xinfo|stream"
)
ACL_OPERATOR = (
    f"operator on >{OPERATOR_PW} resetkeys %R~t:* ~t:leases ~t:requests ~t:reply:* "
    f"resetchannels &t:control -@all {_CONNECT} +time +hgetall +zrange +scan +evalsha "
    "+script|load +exists +zrem +rpush +publish +blpop +lrem +multi +exec"
)


def acl_args(*rules: str) -> tuple[str, ...]:
    args: list[str] = ["--requirepass", ADMIN]
    for rule in rules:
        args += ["--user", *rule.split(" ")]
    return tuple(args)


@pytest_asyncio.fixture
async def acl_redis() -> AsyncIterator[AuthRedis]:
    server = AuthRedis(acl_args(ACL_BROKER, ACL_CONSUMER, ACL_OPERATOR))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.stop()


def leaked(text: str) -> list[str]:
    found = []
    for secret in SECRETS:
        if secret in text or quote(secret, safe="") in text:
            found.append(secret)
    return found


async def test_credentials_and_least_privilege_users_work_end_to_end(
    acl_redis: AuthRedis, tmp_path: Any
) -> None:
    admin = aioredis.Redis.from_url(acl_redis.url_for(password=ADMIN))
    as_broker = acl_redis.url_for("broker", BROKER_PW)
    as_consumer = acl_redis.url_for("consumer-a", CONSUMER_PW)
    as_operator = acl_redis.url_for("operator", OPERATOR_PW)
    password_only = acl_redis.url_for(password=ADMIN)
    try:
        async with (
            simulator_process(tmp_path, rate=200, seed=111) as sim,
            broker_process(as_broker, sim.url, "acl-b", tmp_path, log_level="debug") as broker,
            consumer_process(
                as_consumer,
                "consumer-a",
                {"trade": ["KRW-BTC"]},
                tmp_path,
                snapshot=["ticker", ["KRW-ETH"]],
            ) as acl_consumer,
            consumer_process(password_only, "plain", {"ticker": ["KRW-XRP"]}, tmp_path) as plain,
        ):
            expected = {"trade": {"KRW-BTC"}, "ticker": {"KRW-XRP"}}

            async def union_upstream() -> bool:
                return upstream_of(await sim.state()) == expected

            await wait_for(union_upstream, 20, message="union")
            for c in (acl_consumer, plain):
                await wait_for(lambda c=c: len(c.messages()) >= 3, 10, message=c.client_id)
            await wait_for(lambda: any(r["k"] == "snapshot" for r in acl_consumer.records()), 10)
            ns = ("--namespace", "t")
            cli: dict[str, CliResult] = {}
            for name in ("status", "leases", "check", "resubscribe"):
                cli[f"operator/{name}"] = await arun_cli(name, "--redis-url", as_operator, *ns)
            cli["password/tail"] = await arun_cli(
                "tail", "trade", "KRW-BTC", "--count", "1", "--duration", "10",
                "--redis-url", password_only, *ns,
            )  # fmt: skip
            cli["password/snapshot"] = await arun_cli(
                "snapshot", "trade", "KRW-BTC", "--redis-url", password_only, *ns
            )
            denials = await admin.acl_log(100)
            status = await redis_status(admin)
            assert broker.alive
            outputs = broker.output() + "".join(r.output for r in cli.values())
            outputs += acl_consumer.stderr() + plain.stderr()
    finally:
        await admin.aclose()
    print(
        f"\n[figures] AUTH + least-privilege ACLs: users=broker,consumer-a,operator,default; "
        f"leader={status['leader']}, consumer_frames={len(acl_consumer.messages())}, "
        f"cli={ {k: v.code for k, v in cli.items()} }, acl_denials={len(denials)}, "
        f"secrets_printed={leaked(outputs)}"
    )
    for name, result in cli.items():
        assert result.code == 0, (name, result.stderr)
    assert denials == [], [(d.get("username"), d.get("object")) for d in denials]
    assert status["leader"] == "acl-b"
    assert not leaked(outputs)


async def test_the_consumer_acl_stops_what_a_consumer_must_not_do(acl_redis: AuthRedis) -> None:
    consumer = aioredis.Redis.from_url(acl_redis.url_for("consumer-a", CONSUMER_PW))
    admin = aioredis.Redis.from_url(acl_redis.url_for(password=ADMIN))
    store = LeaseStore(consumer, "t")
    other_ns = LeaseStore(consumer, "u")
    subs = SubscriptionSet.of({"ticker": ["KRW-BTC"]})
    attempts: dict[str, Any] = {
        "write another consumer's lease": lambda: store.write(
            "consumer-b", subs, ttl_ms=1000, host="h", pid=1
        ),
        "write a lease in another namespace": lambda: other_ns.write(
            "consumer-a", subs, ttl_ms=1000, host="h", pid=1
        ),
        "take the leader lock": lambda: consumer.set("t:leader", "consumer-a"),
        "delete the leader lock": lambda: consumer.delete("t:leader"),
        "overwrite the status": lambda: consumer.hset("t:status", "leader", "me"),  # type: ignore[misc]
        "bump the epoch": lambda: consumer.incr("t:epoch"),
        "poison the last-value cache": lambda: consumer.hset("t:last:ticker", "KRW-BTC", "{}"),  # type: ignore[misc]
        "write another namespace's keys": lambda: consumer.set("u:leader", "x"),
        "publish on another namespace": lambda: consumer.publish("u:control", "lease x"),
        "list every key": lambda: consumer.keys("*"),
        "scan the keyspace": lambda: consumer.scan(0),
        "flush the database": lambda: consumer.flushall(),
        "change the config": lambda: consumer.config_set("maxmemory", "1"),
        "run arbitrary Lua": lambda: consumer.eval("return 1", 0),
        "read other replies' requests": lambda: consumer.lrange("t:requests", 0, -1),  # type: ignore[misc]
        "kill clients": lambda: consumer.client_kill_filter(_type="pubsub"),
    }
    results: dict[str, str] = {}
    try:
        # what it may do
        lease = await store.write("consumer-a", subs, ttl_ms=5000, host="h", pid=1)
        assert lease.client_id == "consumer-a"
        for what, attempt in attempts.items():
            try:
                await attempt()
                results[what] = "ALLOWED"
            except NoPermissionError:
                results[what] = "denied"
            except ResponseError as exc:
                results[what] = "denied" if "NOPERM" in str(exc) else f"error: {exc}"
        # a limitation of Redis 7.0 channel ACLs: subscribe and publish share one permission
        fake_frames = await consumer.publish("t:ticker:KRW-BTC", b"{}")
        assert await admin.get("t:leader") is None
        assert await admin.exists("t:lease:consumer-b", "u:lease:consumer-a", "u:leader") == 0
    finally:
        await consumer.aclose()
        await admin.aclose()
    print(f"\n[figures] consumer ACL: attempts={len(attempts)}, results={results}")
    print(f"[limitation] consumer-a may PUBLISH to data channels (receivers={fake_frames})")
    assert all(r == "denied" for r in results.values()), results


async def test_a_wrong_password_is_one_clear_line_and_never_printed(
    acl_redis: AuthRedis, tmp_path: Any
) -> None:
    wrong = "Wr0ng-Passw0rd-zz"
    urls = {
        "user": acl_redis.url_for("operator", wrong),
        "password": acl_redis.url_for(password=wrong),
    }
    cases: dict[str, list[str]] = {}
    for kind, url in urls.items():
        for name in ("status", "leases", "check", "resubscribe") if kind == "user" else ("check",):
            cases[f"{name}/{kind}"] = [name, "--redis-url", url]
        cases[f"tail/{kind}"] = ["tail", "ticker", "KRW-BTC", "--redis-url", url]
        cases[f"snapshot/{kind}"] = ["snapshot", "ticker", "KRW-BTC", "--redis-url", url]
    results = dict(
        zip(cases, await asyncio.gather(*(arun_cli(*a) for a in cases.values())), strict=True)
    )
    # `run` checks Redis once at start: a wrong password is a setup error, one line and exit 1
    async with (
        running_simulator(seed=112, rate=50) as sim,
        broker_process(urls["user"], sim.url, "wrong-b", tmp_path) as broker,
    ):
        await wait_for(lambda: broker.proc.poll() is not None, 15, message="broker gives up")
        assert broker.proc.returncode == 1
        broker_log = broker.output()
    print("\n[figures] wrong password:")
    for name, r in results.items():
        print(f"  {name:<22} exit={r.code} {r.stderr.strip()[:110]}")
    print(f"  {'run/user':<22} {broker_log.strip().splitlines()[-1][:120]}")
    for name, r in results.items():
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.code == 1, (name, r.code)
        assert len(lines) == 1 and "Traceback" not in r.output, (name, r.stderr)
        assert wrong not in r.output, name
        assert "invalid username-password" in r.stderr or "WRONGPASS" in r.stderr, name
    assert wrong not in broker_log
    assert "invalid username-password" in broker_log or "WRONGPASS" in broker_log
    assert len([line for line in broker_log.splitlines() if line.strip()]) == 1, broker_log


async def test_no_secret_in_logs_status_events_or_errors(tmp_path: Any) -> None:
    """Broker at debug level and every CLI command, with a password full of URL specials."""
    secret = "p@ss/w:rd%S3cret!"
    server = AuthRedis(("--requirepass", secret))
    await asyncio.to_thread(server.start)
    url = f"redis://:{quote(secret, safe='')}@127.0.0.1:{server.port}/0"
    admin = aioredis.Redis(port=server.port, password=secret)
    texts: dict[str, str] = {}
    events: list[bytes] = []
    try:
        tap = admin.pubsub()
        await tap.subscribe("t:events")
        async with (
            running_simulator(seed=113, rate=100) as sim,
            broker_process(url, sim.url, "secret-b", tmp_path, log_level="debug") as broker,
            consumer_process(url, "sc", {"ticker": ["KRW-BTC"]}, tmp_path) as consumer,
        ):
            await wait_for(lambda: sim_upstream(sim) == {"ticker": {"KRW-BTC"}}, 20)
            await wait_for(lambda: len(consumer.messages()) >= 2, 10)
            ns = ("--redis-url", url, "--namespace", "t")
            runs = {
                "status": await arun_cli("status", "--json", *ns),
                "status-table": await arun_cli("status", *ns),
                "leases": await arun_cli("leases", "--json", *ns),
                "check": await arun_cli("check", "--verbose", *ns),
                "resubscribe": await arun_cli("resubscribe", "--verbose", *ns),
                "snapshot-missing": await arun_cli(
                    "snapshot", "ticker", "KRW-NOPE", "--timeout", "1", "--verbose", *ns
                ),
                "tail": await arun_cli(
                    "tail", "ticker", "KRW-BTC", "--count", "1", "--verbose", *ns
                ),
                "no-broker-namespace": await arun_cli(
                    "resubscribe", "--timeout", "1", "--redis-url", url, "--namespace", "zz"
                ),
            }
            for name, r in runs.items():
                texts[f"cli {name}"] = r.output
            texts["status hash"] = json.dumps(await redis_status(admin))
            leases = await admin.hgetall("t:lease:sc")  # type: ignore[misc]
            texts["lease hash"] = repr(leases)
            texts["client names"] = repr([c.get("name") for c in await admin.client_list()])
            while (msg := await tap.get_message(timeout=0.2)) is not None:
                events.append(msg["data"] if isinstance(msg["data"], bytes) else b"")
            texts["events"] = repr(events)
            await consumer.stop()
            texts["consumer stderr"] = consumer.stderr()
        texts["broker log"] = broker.output()
        await tap.aclose()  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()
        server.stop()
    encoded = quote(secret, safe="")
    found = {
        where: [s for s in (secret, encoded, "w:rd%S3cret") if s in text]
        for where, text in texts.items()
    }
    found = {k: v for k, v in found.items() if v}
    print(
        f"\n[figures] secrets: places_checked={len(texts)}, log_lines="
        f"{texts['broker log'].count(os.linesep)}, leaks={found}"
    )
    assert not found, found


async def test_a_password_in_the_url_query_is_not_printed(tmp_path: Any) -> None:
    """redis-py also takes ``?password=`` in the URL query; that form must be redacted too."""
    secret = "Qu3ry-S3cret-v8"
    server = AuthRedis(("--requirepass", secret))
    await asyncio.to_thread(server.start)
    url = f"redis://127.0.0.1:{server.port}/0?password={secret}"
    unreachable = f"redis://127.0.0.1:1/0?password={secret}"
    try:
        async with (
            running_simulator(seed=114, rate=50) as sim,
            broker_process(url, sim.url, "query-b", tmp_path) as broker,
        ):
            await wait_for(lambda: "is leader" in broker.output(), 15, message="leading")
            status = await arun_cli("status", "--json", "--redis-url", url, "--namespace", "t")
            failing = await arun_cli("status", "--redis-url", unreachable)
            log = broker.output()
    finally:
        server.stop()
    places = {"broker log": log, "status --json": status.output, "error line": failing.output}
    leaks = [where for where, text in places.items() if secret in text]
    print(f"\n[figures] ?password= in the URL: places_checked={len(places)}, leaks={leaks}")
    assert status.code == 0, status.stderr
    assert not leaks, {w: places[w][:300] for w in leaks}
