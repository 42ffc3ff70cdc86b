"""Route order for hot paths.

Starlette matches a request against the app's routes one after the other (a regex each)
and FastAPI puts its own ``/openapi.json`` and ``/docs`` routes first, so the route the API
serves most pays for every route declared before it: about half a microsecond each on the
bench machine (ADR 0012).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute


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
