"""Waiting out a cluster that cannot serve a run yet: one backoff loop for every caller.

(``distributed.utils_comm.retry`` counts attempts; a run waits until a deadline,
however many attempts that takes, for a worker to restart or another run to finish.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

__all__ = ["retry_until"]

T = TypeVar("T")


async def retry_until(
    attempt: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    retry_on: Callable[[Exception], bool],
    on_retry: Callable[[Exception], None] | None = None,
    delay: float = 0.2,
    max_delay: float = 5.0,
    wake: Callable[[float], Awaitable[object]] | None = None,
) -> T:
    """``await attempt()`` until it returns, and return what it returns.

    An error that ``retry_on(error)`` accepts is retried after ``delay`` seconds, a
    delay that doubles up to ``max_delay``, until ``deadline`` (a ``time.time()``) has
    passed: then that error is raised.  Any other error is raised at once.
    ``on_retry(error)`` is called before each wait.  With ``wake``, each wait is
    ``await wake(delay)``, which may return sooner (word that it is worth trying now).
    """
    while True:
        try:
            return await attempt()
        except Exception as e:
            if not retry_on(e) or time.time() > deadline:
                raise
            if on_retry is not None:
                on_retry(e)
        await (asyncio.sleep(delay) if wake is None else wake(delay))
        delay = min(2 * delay, max_delay)
