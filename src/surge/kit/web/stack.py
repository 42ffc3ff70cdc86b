"""The assembled app's ASGI stack: ``SurgeMiddleware`` → the app's own middleware → router.

FastAPI builds every app as ``ServerErrorMiddleware`` → ``ExceptionTelemetryMiddleware`` →
``AppBodyLimitMiddleware`` → user middleware → ``ExceptionMiddleware`` →
``AsyncExitStackMiddleware`` → router. In Surge each of those is either off or done again
by ``SurgeMiddleware``: it answers every unhandled exception with a 500 problem (the server
error layer never sees one), the OpenTelemetry hooks are off unless ``OTEL_ENABLED``, the
body limit is Surge's own, and the exception handlers and the upload exit stack fit in the
one layer (``kit.web.errors``). Each layer still cost a coroutine per request, three of them
a ``send`` wrapper too (ADR 0029). ``install_stack`` builds the short stack when that holds,
and FastAPI's own (with ``SurgeMiddleware`` as its outermost user middleware) when it does
not: a 500 handler, debug mode, FastAPI's body limit or OpenTelemetry switched on.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette._exception_handler import ExceptionHandlers, StatusHandlers
from starlette.exceptions import HTTPException, WebSocketException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp

from surge.kit.web.admission import Admission
from surge.kit.web.middleware import SurgeMiddleware


def install_stack(
    app: FastAPI,
    *,
    otel: bool = False,
    admission: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Make ``SurgeMiddleware(**options)`` the app's outermost layer, with ``Admission``
    (``admission`` its keyword arguments) as its first check. Call it last, after every
    ``add_middleware``: the stack is built at the first request."""

    def build() -> ASGIApp:
        door = Admission(app.router, **admission) if admission is not None else None
        if (
            otel
            or app.debug
            or getattr(app, "max_body_size", None) is not None
            or any(key in (500, Exception) for key in app.exception_handlers)
        ):
            outer = Middleware(SurgeMiddleware, admission=door, **options)
            app.user_middleware = [outer, *app.user_middleware]
            try:
                return FastAPI.build_middleware_stack(app)
            finally:
                app.user_middleware.remove(outer)
        inner: ASGIApp = app.router
        for cls, args, kwargs in reversed(app.user_middleware):
            inner = cls(inner, *args, **kwargs)
        return SurgeMiddleware(inner, admission=door, exception_handlers=_handlers(app), **options)

    app.build_middleware_stack = build  # type: ignore[method-assign]


def _handlers(app: FastAPI) -> tuple[ExceptionHandlers, StatusHandlers]:
    """The app's handlers as ``ExceptionMiddleware`` holds them (its defaults first)."""
    defaults = ExceptionMiddleware(app.router)
    by_class: ExceptionHandlers = {
        HTTPException: defaults.http_exception,
        WebSocketException: defaults.websocket_exception,
    }
    by_status: StatusHandlers = {}
    for key, handler in app.exception_handlers.items():
        if isinstance(key, int):
            by_status[key] = handler
        else:
            by_class[key] = handler
    return by_class, by_status
