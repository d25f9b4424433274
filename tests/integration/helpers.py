"""Helpers for integration tests: wait for a condition with a deadline, and run a
coroutine on a loop of its own.

Both raise ``TimeoutError`` with ``message`` (and the predicate's last result or error)
when the condition does not hold in time; no test should sleep without a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["async_wait_until", "wait_until"]


def _timeout_error(message: str | None, timeout: float, last: Any,
                   last_exc: BaseException | None) -> TimeoutError:
    what = message or "condition"
    detail = f"last error: {last_exc!r}" if last_exc is not None else f"last result: {last!r}"
    return TimeoutError(f"timed out after {timeout:g}s waiting for {what} ({detail})")


def wait_until(predicate: Callable[[], T], timeout: float = 10, interval: float = 0.05,
               message: str | None = None,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    Exceptions of the types in ``ignore`` count as "not yet"; others propagate.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise _timeout_error(message, timeout, last, last_exc)
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 10,
                           interval: float = 0.05, message: str | None = None,
                           ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Like :func:`wait_until`, for async code; ``predicate`` may be sync or async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            last = result
            last_exc = None
            if last:
                return last
        except ignore as exc:
            last_exc = exc
        if loop.time() >= deadline:
            raise _timeout_error(message, timeout, last, last_exc)
        await asyncio.sleep(interval)


def run_leaving_loop_on_failure(coro):
    """asyncio.run, except that a failure leaves its loop unclosed: closing it with a
    driver's connections still open hung the test run instead of reporting the failure."""
    loop = asyncio.new_event_loop()
    result = loop.run_until_complete(coro)
    loop.close()
    return result
