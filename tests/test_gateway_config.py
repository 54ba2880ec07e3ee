"""The gateway's settings (pure: no Redis, no sockets)."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.settings import REDIS_URL_SCHEMES
from gateway.config import GatewaySettings


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379,h2:26379/mymaster/0",
        "rediss+sentinel://user:secret@h1/mymaster?ssl_cert_reqs=none",
        "redis://127.0.0.1:6379/0",
        "rediss://h:6380/1",
        "unix:///run/redis.sock",
    ],
)
def test_the_gateway_accepts_every_url_the_broker_accepts(url: str) -> None:
    assert url.startswith(REDIS_URL_SCHEMES)
    assert GatewaySettings(redis_url=url).redis_url == url


def test_a_sentinel_url_from_the_shared_variable() -> None:
    env = {"UPBIT_BROKER_REDIS_URL": "redis+sentinel://s1,s2:26380/mymaster/2"}
    assert GatewaySettings.from_env(env).redis_url == env["UPBIT_BROKER_REDIS_URL"]


@pytest.mark.parametrize("url", ["http://h:6379", "sentinel://h/mymaster", "h:6379"])
def test_other_schemes_are_refused_with_the_list_of_schemes(url: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\+sentinel://"):
        GatewaySettings(redis_url=url)
