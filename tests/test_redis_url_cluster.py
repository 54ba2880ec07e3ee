"""broker.redis_url: the ``redis+cluster://`` URL (pure), and the clients built from it."""

from __future__ import annotations

import re

import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url

from broker.errors import ConfigError
from broker.redis_client import is_cluster_client, redis_client
from broker.redis_url import (
    CLUSTER_PORT,
    ClusterUrl,
    RedisUrlError,
    is_cluster_url,
    parse_cluster_url,
)
from broker.resp import ClusterRoute, RespAddress
from broker.settings import BrokerSettings

GOOD = [
    ("redis+cluster://h", ClusterUrl(nodes=(("h", CLUSTER_PORT),))),
    ("redis+cluster://h:7000/", ClusterUrl(nodes=(("h", 7000),))),
    ("redis+cluster://h:7000/0", ClusterUrl(nodes=(("h", 7000),))),
    ("REDIS+CLUSTER://h:7000?db=0", ClusterUrl(nodes=(("h", 7000),))),
    (
        "redis+cluster://a:1,b:2,[::1]:3,c",
        ClusterUrl(nodes=(("a", 1), ("b", 2), ("::1", 3), ("c", CLUSTER_PORT))),
    ),
    (
        "rediss+cluster://u%40x:p%3Aw@h:7000?ssl_cert_reqs=none",
        ClusterUrl(
            nodes=(("h", 7000),),
            username="u@x",
            password="p:w",
            tls=True,
            options=(("ssl_cert_reqs", "none"),),
        ),
    ),
    ("redis+cluster://:pw@h:1", ClusterUrl(nodes=(("h", 1),), password="pw")),
]


@pytest.mark.parametrize(("url", "expected"), GOOD)
def test_good_urls(url: str, expected: ClusterUrl) -> None:
    assert is_cluster_url(url)
    assert parse_cluster_url(url) == expected


BAD = [
    ("redis://h", "not a redis+cluster://"),
    ("redis+cluster://", "no node"),
    ("redis+cluster://h:0", "must be from 1 to 65535"),
    ("redis+cluster://h:65536", "must be from 1 to 65535"),
    ("redis+cluster://h:\u0662", "must be from 1 to 65535"),
    ("redis+cluster://h:1,,h:2", "a node without a host"),
    ("redis+cluster://[::1:7000", "unclosed ["),
    ("redis+cluster://h/1", "only database 0"),
    ("redis+cluster://h?db=2", "only database 0"),
    ("redis+cluster://h/0?db=3", "only database 0"),
    ("redis+cluster://h?role=replica", "role= is for Sentinel"),
]


@pytest.mark.parametrize(("url", "why"), BAD)
def test_bad_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(RedisUrlError, match=re.escape(why)):
        parse_cluster_url(url)


def test_errors_never_show_a_password() -> None:
    with pytest.raises(RedisUrlError) as info:
        parse_cluster_url("redis+cluster://u:hunter2@h:bad")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_node_options_mean_what_redis_py_says() -> None:
    parsed = parse_cluster_url("rediss+cluster://al%40ice:p%40ss@h1,h2?ssl_cert_reqs=none")
    kwargs = parse_url(parsed.node_url("10.1.2.3", 7000))
    assert kwargs["host"] == "10.1.2.3" and kwargs["port"] == 7000
    assert kwargs["username"] == "al@ice" and kwargs["password"] == "p@ss"
    assert kwargs["connection_class"] is SSLConnection and kwargs["ssl_cert_reqs"] == "none"
    assert parsed.describe() == "rediss+cluster://h1:6379,h2:6379"


def test_settings_accept_the_cluster_schemes() -> None:
    for url in ("redis+cluster://h:7000", "rediss+cluster://h:7000,h:7001"):
        assert BrokerSettings(redis_url=url).redis_url == url
    with pytest.raises(ConfigError, match="redis\\+cluster://"):
        BrokerSettings(redis_url="cluster://h")


async def test_clients_from_a_cluster_url() -> None:
    """redis-py's cluster client (nothing connects yet), and the raw road's address of it."""
    client = redis_client("redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001")
    try:
        assert isinstance(client, RedisCluster) and is_cluster_client(client)
        address = RespAddress.from_client(client)
        assert address is not None
        assert address.cluster == ClusterRoute((("127.0.0.1", 7000), ("127.0.0.1", 7001)))
        assert (address.username, address.password) == ("u", "pw")
        assert address.routed(1550).cluster == ClusterRoute(address.cluster.nodes, 1550)
        assert "slot 1550" in address.routed(1550).describe()
        node = address.node("127.0.0.1", 7001)
        assert node.cluster is None and node.port == 7001 and node.password == "pw"
    finally:
        await client.aclose()
    assert not is_cluster_client(redis_client("redis://127.0.0.1:1"))
    from_url = RespAddress.from_url("redis+cluster://127.0.0.1:7000")
    assert from_url.cluster == ClusterRoute((("127.0.0.1", 7000),))
    with pytest.raises(RedisUrlError, match="only database 0"):
        redis_client("redis+cluster://h/3")
