"""Waiting for conditions with deadlines, never sleeping as synchronisation.

All deadlines are in one unit, scaled by ``UPBIT_TEST_TIME_SCALE`` so a slow CI can stretch them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIME_SCALE = float(os.environ.get("UPBIT_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIME_SCALE


async def wait_for(
    condition: Callable[[], Awaitable[T]] | Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``condition`` (sync or async) until it returns a truthy value; fail after ``timeout``.

    Returns the truthy value. The poll interval is not synchronisation: it only bounds how soon
    after the condition holds we notice it.
    """
    deadline = time.monotonic() + scaled(timeout)
    last: object = None
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result  # type: ignore[misc]
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message} (last={last!r})"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.02, message: str = ""
) -> T:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)
