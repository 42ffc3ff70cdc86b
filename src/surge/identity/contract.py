"""Identity's part of the API contract: protected routes check the caller before the body.

FastAPI parses a JSON body before it solves a route's dependencies, so malformed JSON sent
to an admin route without a token answered 422 (and described the body to an anonymous
caller). ``install_auth_before_body(app)`` registers a check that runs before any 422 is
answered: on a route that needs a token (it depends on ``current_user``, or lives under
``/api/admin``), the token and the role the route asks for are checked first, so the
caller gets 401/403. The principal is left where ``current_user`` looks.

The bearer scheme itself is declared by ``current_user`` (``HTTPBearer``), so the OpenAPI
document marks exactly the operations that depend on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from surge.identity.deps import bearer_scheme, bearer_token, current_user, require_admin_mfa
from surge.identity.principal import PRINCIPAL_STATE
from surge.kit.errors import Forbidden
from surge.kit.web.problem import VALIDATION_GUARD

ADMIN_PREFIX = "/api/admin/"


def _calls(route: APIRoute) -> list[Callable[..., Any]]:
    out: list[Callable[..., Any]] = []

    def walk(dependant: Dependant) -> None:
        for dep in dependant.dependencies:
            if dep.call is not None:
                out.append(dep.call)
            walk(dep)

    walk(route.dependant)
    return out


def _roles_of(call: Callable[..., Any]) -> frozenset[str] | None:
    """The roles a ``require_role(...)`` dependency lets through (its closure's ``allowed``)."""
    if getattr(call, "__qualname__", "").startswith("require_role."):
        allowed = inspect.getclosurevars(call).nonlocals.get("allowed")
        if isinstance(allowed, frozenset):
            return allowed
    return None


async def check_caller_first(request: Request) -> None:
    route = request.scope.get("route")
    calls = _calls(route) if isinstance(route, APIRoute) else []
    admin = request.url.path.startswith(ADMIN_PREFIX) or require_admin_mfa in calls
    if not admin and current_user not in calls:
        if bearer_scheme in calls:  # its own credential check (a service key): a token first
            bearer_token(request)
        return  # a public route: the 422 is the answer
    principal = await current_user(request)
    request.scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
    if admin:
        await require_admin_mfa(principal)
    for roles in filter(None, map(_roles_of, calls)):
        if principal.role not in roles:
            raise Forbidden("Your role does not allow this")


def install_auth_before_body(app: FastAPI) -> None:
    setattr(app.state, VALIDATION_GUARD, check_caller_first)
