"""Running test code in other contexts (test helper, not shipped): a thread, or asyncio tasks of their own.

Per-thread and per-task state (a `contextvars.ContextVar`, such as the
replicas' read-your-writes position) starts afresh in a new thread, and a
new task starts from a copy of its creator's context. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[[], T], timeout: float = 30.0) -> T:
    """``fn()`` run in a new thread (a fresh context), its result; fails if it does not return in ``timeout``."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert out, f"{fn!r} did not return within {timeout:.0f}s in its thread (or raised there: see the log)"
    return out[0]


def in_tasks(*fns: Callable[[], T], timeout: float = 30.0) -> list[T]:
    """Each of ``fns`` called in an asyncio task of its own, in order, on one event loop in this thread.

    The tasks are created together, so none starts from a context another one changed.
    """

    async def call(fn: Callable[[], T]) -> T:
        return fn()

    async def every() -> list[T]:
        return list(await asyncio.wait_for(asyncio.gather(*(call(fn) for fn in fns)), timeout))

    return asyncio.run(every())
