"""Waiting for a condition with a deadline, never sleeping as synchronisation (testing layer).

Every deadline is in one unit, seconds, multiplied by :data:`TIME_SCALE`: the environment
variable ``UPBIT_TEST_TIME_SCALE`` (default 1) lets a slow CI machine stretch them all at once.
It is the one variable this package reads (the library proper never reads the environment).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

#: Multiplies every deadline of :mod:`broker.testing` (``UPBIT_TEST_TIME_SCALE``).
TIME_SCALE = float(os.environ.get("UPBIT_TEST_TIME_SCALE", "1"))


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not hold in time: a failed expectation in a test (an AssertionError)
    and a deadline that passed for anyone else (a TimeoutError)."""


def scaled(seconds: float) -> float:
    """``seconds`` times :data:`TIME_SCALE`."""
    return seconds * TIME_SCALE


@overload
async def wait_for(
    condition: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def wait_for(
    condition: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def wait_for(
    condition: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` (plain or async) until it returns a truthy value, and return it.

    The poll interval is not synchronisation: it only bounds how soon after the condition holds
    we notice it. An exception raised by ``condition`` propagates at once.

    Raises:
        WaitTimeout: still falsy after ``scaled(timeout)`` seconds (the message names
            ``message`` and the last value).
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {message} (last={result!r})")
        await asyncio.sleep(interval)


def wait_for_sync(
    condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.02, message: str = ""
) -> T:
    """:func:`wait_for` for code without an event loop (blocks the calling thread)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)


__all__ = ["TIME_SCALE", "WaitTimeout", "scaled", "wait_for", "wait_for_sync"]
