"""Numeric settings: every one finite and within its bounds, in one table (pure, no I/O).

The broker's settings (``BrokerSettings``, from Python or ``UPBIT_BROKER_*``) and the consumer
library's options (``BrokerClient``) refuse NaN, infinities, negatives and out-of-range values
with a :class:`ConfigError` (a ``ValueError``) naming the setting. The CLI side of the same
rules (one line, exit 2) is in ``tests/test_fuzz_cli.py``.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.settings import (
    CLIENT_BOUNDS,
    ENV_PREFIX,
    SETTING_BOUNDS,
    SETTING_RELATIONS,
    Bound,
    BrokerSettings,
    bounds_table,
    check_number,
)
from consumers import BrokerClient

NUMERIC = [f.name for f in fields(BrokerSettings) if str(f.type) in ("int", "float")]

#: what every numeric setting is tried with: NaN, both infinities, -1, 0 (where the bound
#: excludes it), just outside each end, and text that is no number
BAD_NUMBERS: list[Any] = [math.nan, math.inf, -math.inf, -1, "nan", "inf", "-1", "", "x", True]


def bad_values(bound: Bound) -> list[Any]:
    out = list(BAD_NUMBERS)
    if not bound.low <= 0 <= bound.high:
        out += [0, "0"]
    out += [bound.low - (1 if bound.integer else bound.low / 10 or 0.01), bound.high + 1]
    if bound.integer:
        out += [bound.low + 0.5, f"{bound.low:g}.5"]
    return out


def test_every_numeric_setting_has_bounds() -> None:
    assert sorted(NUMERIC) == sorted(SETTING_BOUNDS)
    for name, bound in SETTING_BOUNDS.items():
        field_type = str(BrokerSettings.__dataclass_fields__[name].type)
        assert bound.integer == (field_type == "int"), name
        assert math.isfinite(bound.low) and math.isfinite(bound.high) and bound.low < bound.high
        assert bound.why, name
    for smaller, larger in SETTING_RELATIONS:
        assert smaller in SETTING_BOUNDS and larger in SETTING_BOUNDS


def test_defaults_and_both_ends_of_every_bound_are_accepted() -> None:
    BrokerSettings()  # the defaults themselves
    for name, bound in SETTING_BOUNDS.items():
        for value in (bound.low, bound.high):
            if any(name in pair for pair in SETTING_RELATIONS):
                continue  # checked with its partner below
            given: dict[str, Any] = {name: value}
            got = getattr(BrokerSettings(**given), name)
            assert got == value and type(got) is (int if bound.integer else float), name
    assert BrokerSettings(backoff_initial=1.0, backoff_max=1.0).backoff_max == 1.0
    assert BrokerSettings(rate_per_second=5, rate_per_minute=5).rate_per_minute == 5


@pytest.mark.parametrize("name", sorted(SETTING_BOUNDS))
def test_every_numeric_setting_refuses_what_cannot_work(name: str) -> None:
    bound = SETTING_BOUNDS[name]
    var = ENV_PREFIX + name.upper()
    errors: list[ConfigError] = []
    for value in bad_values(bound):
        with pytest.raises(ConfigError) as built:
            BrokerSettings(**{name: value})
        errors.append(built.value)
        if value != "":  # an empty variable means "unset": the default
            with pytest.raises(ConfigError) as from_env:
                BrokerSettings.from_env({var: str(value)})
            errors.append(from_env.value)
    for exc in errors:
        text = str(exc)
        assert isinstance(exc, ValueError)
        assert f"{name} ({var})" in text and "\n" not in text, text
        assert bound.describe() in text, text


def test_text_is_read_as_the_number_it_spells() -> None:
    s = BrokerSettings.from_env(
        {
            "UPBIT_BROKER_LEASE_TTL": " 7 ",
            "UPBIT_BROKER_METRICS_PORT": "9464",
            "UPBIT_BROKER_COALESCE_DELAY": "0",
            "UPBIT_BROKER_STALL_TIMEOUT": "1e1",
        }
    )
    assert (s.lease_ttl, s.metrics_port, s.coalesce_delay, s.stall_timeout) == (7.0, 9464, 0, 10)
    assert type(s.lease_ttl) is float and type(s.metrics_port) is int


def test_reported_cases_from_the_probe() -> None:
    """Issue 12 item 10: each of these was accepted, or failed with a traceback later."""
    for env in (
        {"UPBIT_BROKER_LEADER_TTL": "nan"},
        {"UPBIT_BROKER_LEASE_TTL": "inf"},
        {"UPBIT_BROKER_STALL_TIMEOUT": "nan"},
        {"UPBIT_BROKER_BACKOFF_MAX": "-1"},
        {"UPBIT_BROKER_STATUS_INTERVAL": "0"},
    ):
        with pytest.raises(ConfigError, match=next(iter(env))):
            BrokerSettings.from_env(env)


def test_relations_between_settings() -> None:
    with pytest.raises(ConfigError, match=r"backoff_initial .* must not exceed backoff_max"):
        BrokerSettings(backoff_initial=5.0, backoff_max=2.0)
    with pytest.raises(ConfigError, match=r"rate_per_second .* must not exceed rate_per_minute"):
        BrokerSettings(rate_per_second=5, rate_per_minute=3)
    # the default backoff_initial (0.5) stays under any allowed backoff_max
    assert BrokerSettings(backoff_max=SETTING_BOUNDS["backoff_max"].low).backoff_initial == 0.5


def test_check_number_never_prints_more_than_one_line() -> None:
    bound = Bound(1, 2)
    for value in ("1\n2", "x" * 500, 10**400, float("1e400")):
        with pytest.raises(ConfigError) as info:
            check_number("n", value, bound)
        assert "\n" not in str(info.value) and len(str(info.value)) < 120, str(info.value)


def test_bounds_table_lists_every_setting() -> None:
    table = bounds_table(SETTING_BOUNDS)
    for name in SETTING_BOUNDS:
        assert f"`{ENV_PREFIX}{name.upper()}`" in table
    assert "| `UPBIT_BROKER_BACKOFF_MAX` | 1 to 600 s |" in table
    assert "`queue_size`" in bounds_table(CLIENT_BOUNDS, env_prefix="")


# -- the consumer library ------------------------------------------------------------------------


def test_client_accepts_both_ends_of_every_bound() -> None:
    for name, bound in CLIENT_BOUNDS.items():
        for value in (bound.low, bound.high):
            given: dict[str, Any] = {name: value}
            BrokerClient(**given)  # construction only: no I/O until start()


@pytest.mark.parametrize("name", sorted(CLIENT_BOUNDS))
def test_client_refuses_numbers_that_cannot_work(name: str) -> None:
    bound = CLIENT_BOUNDS[name]
    for value in bad_values(bound):
        with pytest.raises(ValueError, match=name) as info:
            BrokerClient(**{name: value})
        assert isinstance(info.value, ConfigError) and bound.describe() in str(info.value)


def test_design_doc_quotes_the_bounds_tables() -> None:
    """docs/design.md's settings tables are the code's: generated, never hand-edited."""
    from pathlib import Path

    from broker.settings import CLIENT_BOUNDS, SETTING_BOUNDS, bounds_table

    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    assert bounds_table(SETTING_BOUNDS) in design
    assert bounds_table(CLIENT_BOUNDS, env_prefix="") in design
