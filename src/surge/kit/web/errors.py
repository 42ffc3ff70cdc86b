"""What Starlette's ``ExceptionMiddleware`` and FastAPI's ``AsyncExitStackMiddleware`` do,
as two helpers ``SurgeMiddleware`` calls, so the assembled app needs neither layer (ADR 0029).

- ``handle_exception``: an exception raised outside a route (the router's 404 and 405, an
  inner middleware) goes to its registered handler — by status for an ``HTTPException``,
  else by the exception's class — and the handler's response is sent. Inside a route,
  FastAPI's own per-route wrapper already does this with the same handlers, which it finds
  in the scope (``starlette.exception_handlers``).
- ``FileStack``: the exit stack FastAPI pushes an uploaded form's ``close`` on
  (``fastapi_middleware_astack``); it is closed only when something was pushed, instead of
  an ``async with`` around every request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import structlog
from starlette._exception_handler import ExceptionHandlers, StatusHandlers
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

log = structlog.get_logger()


class FileStack(AsyncExitStack):
    """An ``AsyncExitStack`` that knows whether anything was pushed on it, and makes its
    callback queue only then: one is created for every request and almost none is used
    (ADR 0056)."""

    used = False

    # No queue until something needs it (see __getattr__), and ``object``'s own initialiser:
    # no Python frame per request either (ADR 0061).
    __init__ = object.__init__

    def __getattr__(self, name: str) -> Any:
        if name == "_exit_callbacks":
            self._exit_callbacks: deque[Any] = deque()
            return self._exit_callbacks
        raise AttributeError(name)

    def push_async_callback(
        self, callback: Callable[..., Any], /, *args: Any, **kwds: Any
    ) -> Callable[..., Any]:
        self.used = True
        return super().push_async_callback(callback, *args, **kwds)

    def push_async_exit(self, exit: Any) -> Any:
        self.used = True
        return super().push_async_exit(exit)

    async def enter_async_context(self, cm: Any) -> Any:
        self.used = True
        return await super().enter_async_context(cm)

    def callback(
        self, callback: Callable[..., Any], /, *args: Any, **kwds: Any
    ) -> Callable[..., Any]:
        self.used = True
        return super().callback(callback, *args, **kwds)

    def push(self, exit: Any) -> Any:
        self.used = True
        return super().push(exit)

    def enter_context(self, cm: Any) -> Any:
        self.used = True
        return super().enter_context(cm)


async def handle_exception(
    handlers: tuple[ExceptionHandlers, StatusHandlers],
    error: Exception,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    started: bool,
) -> bool:
    """Answer ``error`` with its handler's response; False when it has no handler, the
    response had already started, or the handler raised (the caller logs it as a bug)."""
    by_class, by_status = handlers
    handler = by_status.get(error.status_code) if isinstance(error, HTTPException) else None
    if handler is None:
        for cls in type(error).__mro__:
            if cls in by_class:
                handler = by_class[cls]
                break
    if handler is None or started:
        return False
    request = Request(scope, receive, send)
    try:
        if is_async_callable(handler):
            response = await handler(request, error)  # type: ignore[arg-type]
        else:
            response = await run_in_threadpool(handler, request, error)
        if response is not None:
            await response(scope, receive, send)
    except Exception as failure:
        if failure is not error:  # a handler that re-raises hands the error back: a bug
            log.exception("http.handler_failed", handler=getattr(handler, "__name__", "?"))
        return False
    error.__traceback__ = None  # a reused exception instance would pile up tracebacks
    return True
