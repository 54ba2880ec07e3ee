"""broker.redis_url: the ``redis+sentinel://`` URL, parsed without I/O (table-driven), and what
redis-py makes of the master's options."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.asyncio.connection import SSLConnection, parse_url

from broker.errors import ConfigError
from broker.redis_client import RedisUrlError as ReExported
from broker.redis_url import (
    SENTINEL_PORT,
    RedisUrlError,
    SentinelUrl,
    is_sentinel_url,
    names_replica,
    parse_sentinel_url,
)
from broker.settings import BrokerSettings, redact_url

GOOD: list[tuple[str, dict[str, Any]]] = [
    (
        "redis+sentinel://h1:26379,h2:26380/mymaster/0",
        {"sentinels": (("h1", 26379), ("h2", 26380)), "service": "mymaster", "db": 0},
    ),
    (
        "redis+sentinel://10.0.0.1,10.0.0.2:5000/svc",  # default port, no db
        {"sentinels": (("10.0.0.1", SENTINEL_PORT), ("10.0.0.2", 5000)), "db": 0},
    ),
    ("redis+sentinel://h/svc/3", {"db": 3, "username": None, "password": None, "tls": False}),
    ("redis+sentinel://h/svc/", {"service": "svc", "db": 0}),  # a trailing slash
    ("redis+sentinel://h/svc?db=5", {"db": 5}),
    ("redis+sentinel://h/svc/5?db=5", {"db": 5}),  # the same number twice is no conflict
    ("redis+sentinel://:s3cret@h/svc", {"username": None, "password": "s3cret"}),
    ("redis+sentinel://alice:pw@h/svc", {"username": "alice", "password": "pw"}),
    ("redis+sentinel://alice@h/svc", {"username": "alice", "password": None}),
    # percent-encoded credentials: @ and / in a password, a comma in a user name
    ("redis+sentinel://a%2Cb:p%40ss%2Fw@h/svc", {"username": "a,b", "password": "p@ss/w"}),
    (
        "redis+sentinel://:pw@h/svc?sentinel_password=spw&sentinel_username=sen",
        {"password": "pw", "sentinel_password": "spw", "sentinel_username": "sen"},
    ),
    ("redis+sentinel://h/svc?sentinel_password=", {"sentinel_password": None}),
    (
        "rediss+sentinel://h:26379/svc/1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required",
        {"tls": True, "options": (("ssl_ca_certs", "/ca.pem"), ("ssl_cert_reqs", "required"))},
    ),
    ("REDIS+SENTINEL://h/svc", {"tls": False}),  # schemes are case-insensitive
    (
        "redis+sentinel://[::1]:26379,[fe80::2]/svc",
        {"sentinels": (("::1", 26379), ("fe80::2", 26379))},
    ),
    ("redis+sentinel://h/my-master.1/2", {"service": "my-master.1", "db": 2}),
    # ?role=: a replica of the service (subscribe URLs), not an option for redis-py
    ("redis+sentinel://h/svc/0?role=replica", {"role": "replica", "options": ()}),
    (
        "redis+sentinel://h/svc?role=master&protocol=2",
        {"role": "master", "options": (("protocol", "2"),)},
    ),
    ("redis+sentinel://h/svc", {"role": "master"}),
]


@pytest.mark.parametrize(("url", "expected"), GOOD)
def test_good_urls(url: str, expected: dict[str, Any]) -> None:
    parsed = parse_sentinel_url(url)
    assert is_sentinel_url(url)
    for name, value in expected.items():
        assert getattr(parsed, name) == value, (url, name)


BAD: list[tuple[str, str]] = [
    ("redis+sentinel:///svc", "no sentinel host"),
    ("redis+sentinel://:pw@/svc", "no sentinel host"),
    ("redis+sentinel://h1,,h2/svc", "without a host"),
    ("redis+sentinel://h1:26379,:26380/svc", "without a host"),
    ("redis+sentinel://h", "no service name"),
    ("redis+sentinel://h/", "no service name"),
    ("redis+sentinel://h//0", "no service name"),
    ("redis+sentinel://h:port/svc", "must be from 1 to 65535"),
    ("redis+sentinel://h:0/svc", "must be from 1 to 65535"),
    ("redis+sentinel://h:65536/svc", "must be from 1 to 65535"),
    ("redis+sentinel://h:-1/svc", "must be from 1 to 65535"),
    ("redis+sentinel://[::1/svc", "unclosed ["),
    ("redis+sentinel://h/svc/zero", "the database must be a number"),
    ("redis+sentinel://h/svc/-1", "the database must be a number"),
    ("redis+sentinel://h/svc?db=x", "the database must be a number"),
    ("redis+sentinel://h/svc/1?db=2", "two database numbers"),
    ("redis+sentinel://h/svc/0/extra", "the path is /service[/db]"),
    ("redis+sentinel://h/my%20master", "white space"),
    ("redis://h:6379/0", "not a redis+sentinel"),
    ("redis+sentinel://h/svc?role=slave", "role must be master or replica"),
    ("redis+sentinel://h/svc?role=", "role must be master or replica"),
    # digits int() takes but no one means: a superscript (int() raises), Arabic-Indic
    ("redis+sentinel://h:2\u00b2/svc", "must be from 1 to 65535"),
    ("redis+sentinel://h/svc/\u00b2", "the database must be a number"),
    ("redis+sentinel://h:\u0662\u0666/svc", "must be from 1 to 65535"),
    ("redis+sentinel://h/svc?db=\u0663", "the database must be a number"),
]


@pytest.mark.parametrize(("url", "why"), BAD)
def test_bad_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(RedisUrlError, match=re.escape(why)):
        parse_sentinel_url(url)


def test_errors_are_config_errors_and_never_show_a_password() -> None:
    for url in (
        "redis+sentinel://user:hunter2@h:bad/svc",
        "redis+sentinel://h:bad/svc?sentinel_password=hunter2",
        "redis+sentinel://h:bad/svc?password=hunter2",
    ):
        with pytest.raises(RedisUrlError) as info:
            parse_sentinel_url(url)
        assert "hunter2" not in str(info.value) and "***" in str(info.value)
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert ReExported is RedisUrlError  # broker.redis_client's name for it still works
    assert redact_url("redis+sentinel://u:pw@h1:1,h2:2/s?sentinel_password=x&a=1") == (
        "redis+sentinel://u:***@h1:1,h2:2/s?sentinel_password=***&a=1"
    )


def test_the_master_options_mean_what_redis_py_says() -> None:
    parsed = parse_sentinel_url(
        "rediss+sentinel://al%40ice:p%40ss@h1,h2/svc/4?ssl_cert_reqs=none&sentinel_password=x"
    )
    kwargs = parse_url(parsed.redis_url("10.1.2.3", 7000))
    assert kwargs["host"] == "10.1.2.3" and kwargs["port"] == 7000 and kwargs["db"] == 4
    assert kwargs["username"] == "al@ice" and kwargs["password"] == "p@ss"
    assert kwargs["connection_class"] is SSLConnection and kwargs["ssl_cert_reqs"] == "none"
    assert "sentinel_password" not in kwargs  # the sentinels' own, never the master's
    v6 = parse_url(SentinelUrl((("h", 1),), "s").redis_url("::1", 6379))
    assert v6["host"] == "::1" and "password" not in v6
    assert parsed.describe() == "rediss+sentinel://h1:26379,h2:26379/svc/4"


def test_settings_accept_the_sentinel_schemes_only() -> None:
    for url in ("redis+sentinel://h/svc", "rediss+sentinel://h/svc/1"):
        assert BrokerSettings(redis_url=url).redis_url == url
    with pytest.raises(ConfigError, match="redis\\+sentinel://"):
        BrokerSettings(redis_url="sentinel://h/svc")
    assert not is_sentinel_url("redis://h") and not is_sentinel_url("sentinel://h/svc")


def test_role_replica_is_for_subscribe_urls_only() -> None:
    """A replica's pool for the subscriber (redis-py's ``slave_for``: ``is_master`` False, so
    no raw road either); every client that writes refuses it, and so does the library's
    ``redis_url``, before any I/O."""
    from broker.redis_client import ClosingSentinelPool, connection_pool, redis_client
    from consumers import BrokerClient
    from consumers.raw_link import raw_address

    url = "redis+sentinel://h1,h2:26380/svc/3?role=replica"
    assert names_replica(url) and not names_replica(url.replace("replica", "master"))
    assert not names_replica("redis://h/0?role=replica") and not names_replica("redis+sentinel://")
    assert (
        parse_sentinel_url(url).describe()
        == "redis+sentinel://h1:26379,h2:26380/svc/3?role=replica"
    )
    pool = connection_pool(url)
    assert isinstance(pool, ClosingSentinelPool) and not pool.is_master
    assert pool.connection_kwargs["db"] == 3 and "role" not in pool.connection_kwargs
    master_pool = connection_pool(url.replace("?role=replica", ""))
    assert isinstance(master_pool, ClosingSentinelPool) and master_pool.is_master
    assert raw_address(url) is None
    with pytest.raises(RedisUrlError, match="role=replica is for a subscribe url only"):
        redis_client(url)
    with pytest.raises(ConfigError, match="role=replica is for subscribe_url only"):
        BrokerClient(redis_url=url)
    client = BrokerClient(redis_url="redis://m:6379/0", subscribe_url=url)
    assert client.subscribe_url == url and client.redis_url == "redis://m:6379/0"
    assert BrokerClient(redis_url="redis://m:6379/0").subscribe_url == "redis://m:6379/0"
    with pytest.raises(ConfigError, match="subscribe url must start with"):
        BrokerClient(subscribe_url="http://replica:6379")
