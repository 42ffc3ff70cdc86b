"""SQLAlchemy's ``greenlet_spawn`` on a reused greenlet (ADR 0057).

``greenlet_spawn`` starts a new greenlet for every call: its creation, its first switch
(which maps a fresh chunk of CPython's frame stack, unmapped again when it ends: ADR 0047)
and its death cost ~10× a switch into a greenlet that already exists (15 µs against 1.5 µs
per call on this machine, under load). A unit of work that holds its connection (``unit``)
makes two such calls, the pool's checkout and its check-in, so it runs them here: the same
protocol as ``greenlet_spawn`` — the function runs synchronously in a greenlet marked as
SQLAlchemy's, each ``await_`` inside it hands its awaitable back to be awaited here, errors
and cancellation are thrown back into it — on a greenlet kept for the next call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet  # type: ignore[import-untyped]

_T = TypeVar("_T")

#: Idle greenlets, most recently used last. A few are enough: one per call in flight.
_IDLE: list[_Hop] = []
_KEEP = 64


class _Hop(greenlet):  # type: ignore[misc]
    """A greenlet SQLAlchemy's ``await_`` accepts (what its ``_AsyncIoGreenlet`` is)."""

    __sqlalchemy_greenlet_provider__ = True


class _Done:
    """What a call returned or raised; cleared by the caller, so an idle greenlet keeps
    nothing of its last call alive."""

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


def _serve(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    while True:
        done = _Done()
        try:
            done.value = fn(*args)
        except GreenletExit:  # the idle greenlet is being collected
            raise
        except BaseException as error:  # handed to the awaiting caller, raised there
            done.error = error
        del fn, args
        fn, args = getcurrent().parent.switch(done)


async def hop(fn: Callable[..., _T], *args: Any) -> _T:
    """``await greenlet_spawn(fn, *args)``, on a reused greenlet."""
    current = getcurrent()
    worker = _IDLE.pop() if _IDLE else None
    if worker is None or worker.dead or worker.parent is not current:
        worker = _Hop(_serve, current)
    worker.gr_context = current.gr_context  # the caller's contextvars, as greenlet_spawn
    result = worker.switch(fn, args)
    while not isinstance(result, _Done):
        try:
            value = await result  # an await_() inside fn
        except BaseException:
            result = worker.throw(*sys.exc_info())
        else:
            result = worker.switch(value)
    if len(_IDLE) < _KEEP:
        _IDLE.append(worker)
    value, error = result.value, result.error
    result.value = result.error = None
    if error is not None:
        raise error
    return value  # type: ignore[no-any-return]
