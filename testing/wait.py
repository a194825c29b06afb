"""``wait_until``: poll a condition until it holds, instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError, so a test reports it as a failure)."""


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.02,
               message: str | Callable[[], str] = "") -> T:
    """Call ``condition()`` until it returns something truthy and return that; raise :class:`WaitTimeout`
    (saying ``message``) after ``timeout`` seconds. The condition is tried at least once."""
    end = time.monotonic() + timeout
    while not (value := condition()):
        _check(end, timeout, message)
        time.sleep(interval)
    return value


async def async_wait_until(condition: Callable[[], T | Awaitable[T]], timeout: float = 30.0,
                           interval: float = 0.02, message: str | Callable[[], str] = "") -> T:
    """:func:`wait_until` for a test on an event loop: ``condition`` may be a coroutine function (it is
    awaited); sleeps with ``asyncio.sleep`` between tries."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        _check(end, timeout, message)
        await asyncio.sleep(interval)


def _check(end: float, timeout: float, message: str | Callable[[], str]) -> None:
    if time.monotonic() >= end:
        text = message() if callable(message) else message
        raise WaitTimeout(f"condition not met within {timeout:g}s{': ' + text if text else ''}")
