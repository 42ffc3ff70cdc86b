"""Small asyncio helpers the kit shares."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_until_done(
    task: asyncio.Task[Any] | None, *, grace: float = 1.0, retry_every: float = 0.05
) -> None:
    """Cancel ``task`` and wait until it is really finished.

    redis-py's reads can swallow a cancellation that races their own timeout, leaving the
    task "cancelling" forever; so after ``grace`` seconds (time for its ``finally`` blocks to
    close connections) it is cancelled again every ``retry_every`` seconds, up to ten more
    seconds. Its result or error is consumed: this is for shutdown."""
    if task is None or task.done():
        if task is not None and not task.cancelled():
            task.exception()
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    for _ in range(int(10 / retry_every)):
        if done:
            break
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=retry_every)
    if task.done() and not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()
