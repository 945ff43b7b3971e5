"""Waiting for a condition instead of sleeping a fixed time and hoping.

``await eventually(check)`` calls ``check`` (plain or async) every ``interval`` seconds until it
returns a truthy value without raising ``AssertionError``, and returns that value. When
``within`` seconds pass first, it fails with the last assertion (or says the condition stayed
false), so a slow machine only makes a passing test slower, and a failing one still fails with
the reason. ``within`` is a ceiling for a noisy shared machine, not a performance claim: a test
that means to bound latency measures it and asserts on that number separately.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

WITHIN = 10.0
INTERVAL = 0.02


@overload
async def eventually(check: Callable[[], Awaitable[T]], *, within: float = ..., interval: float = ...,
                     what: str | None = ...) -> T: ...


@overload
async def eventually(check: Callable[[], T], *, within: float = ..., interval: float = ...,
                     what: str | None = ...) -> T: ...


async def eventually(check: Callable[[], Any], *, within: float = WITHIN,
                     interval: float = INTERVAL, what: str | None = None) -> Any:
    """``check()``'s first truthy result (an ``AssertionError`` it raises counts as not yet)."""
    deadline = time.monotonic() + within
    while True:
        failure: AssertionError | None = None
        result: object = None
        try:
            result = await _call(check)
            if result:
                return result
        except AssertionError as exc:
            failure = exc
        if time.monotonic() >= deadline:
            label = what or getattr(check, "__name__", "condition")
            if failure is not None:
                raise AssertionError(f"{label}: still failing after {within} s: {failure}") from failure
            raise AssertionError(f"{label}: still false after {within} s (last result {result!r})")
        await asyncio.sleep(interval)


async def never(check: Callable[[], object], *, during: float, interval: float = INTERVAL,
                what: str | None = None) -> None:
    """``check()`` stays falsy for ``during`` seconds (the negative twin of :func:`eventually`)."""
    deadline = time.monotonic() + during
    while time.monotonic() < deadline:
        result = await _call(check)
        assert not result, f"{what or getattr(check, '__name__', 'condition')} became true: {result!r}"
        await asyncio.sleep(interval)


async def _call(check: Callable[[], object]) -> object:
    result = check()
    if inspect.isawaitable(result):
        return await result
    return result
