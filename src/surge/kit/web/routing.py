"""Route order and shortcuts for hot paths.

Starlette matches a request against the app's routes one after the other (a regex each)
and FastAPI puts its own ``/openapi.json`` and ``/docs`` routes first, so the route the API
serves most pays for every route declared before it: about half a microsecond each on the
bench machine (ADR 0012).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send


def promote_routes(app: Starlette, paths: Sequence[str]) -> list[str]:
    """Move the routes of ``paths`` to the front of ``app``'s routes, in the order given.

    Only a path served by exactly one route is moved: with two routes on one path (other
    methods, or a shadowed duplicate) the order decides which one answers, so it is kept.
    Returns the paths that were moved.
    """
    routes: list[BaseRoute] = app.router.routes
    by_path: dict[str, list[BaseRoute]] = {}
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            by_path.setdefault(path, []).append(route)
    front = [by_path[p][0] for p in paths if len(by_path.get(p, ())) == 1]
    if front:
        moved = {id(route) for route in front}
        routes[:] = [*front, *(route for route in routes if id(route) not in moved)]
    return [getattr(route, "path", "") for route in front]


#: Answers a request from state earlier layers already resolved: the response body, or
#: ``None`` to let the route as FastAPI built it answer.
Shortcut = Callable[[Scope], bytes | None]


def shortcut_route(
    app: Starlette,
    endpoint: Callable[..., object],
    answer: Shortcut,
    *,
    content_type: bytes = b"application/json",
) -> None:
    """Let ``answer`` serve ``endpoint``'s route when it can, without FastAPI's request
    handling (a ``Request``, two exit stacks, the dependency solver, query parsing: about a
    third of a small route's CPU, ADR 0048); when it returns ``None`` the request goes to the
    route as FastAPI built it. The route itself stays (matching, OpenAPI, 405s); with
    FastAPI's telemetry on, every request takes the full route so it is traced as before.
    For the hottest read of an API only: ``answer`` must give exactly the body the endpoint
    would, and a test must compare the two."""
    found = [r for r in app.router.routes if isinstance(r, Route) and r.endpoint is endpoint]
    if len(found) != 1:
        raise RuntimeError(f"shortcut_route: {len(found)} routes serve {endpoint!r}, need one")
    route = found[0]
    full = route.app
    kind = (b"content-type", content_type)

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        body = answer(scope) if scope.get("fastapi.telemetry") is None else None
        if body is None:
            await full(scope, receive, send)
            return
        length = (b"content-length", b"%d" % len(body))
        await send({"type": "http.response.start", "status": 200, "headers": [length, kind]})
        await send({"type": "http.response.body", "body": body})

    route.app = serve
