"""The admin router: every breaker's status and a reset."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, params

from surge.kit.breaker.core import BreakerRegistry, breakers
from surge.kit.errors import NotFound


def breaker_router(
    registry: BreakerRegistry | None = None,
    *,
    prefix: str = "/api/admin/circuit-breakers",
    dependencies: list[params.Depends] | None = None,
) -> APIRouter:
    """``GET {prefix}`` (every breaker's status) and ``POST {prefix}/reset`` (``?name=`` one,
    or all). ``dependencies`` carries the admin guard (authentication, MFA) of the app."""
    chosen = registry if registry is not None else breakers
    router = APIRouter(prefix=prefix, tags=["admin"], dependencies=dependencies or [])

    @router.get("")
    async def list_breakers() -> dict[str, Any]:
        return {"breakers": chosen.status()}

    @router.post("/reset")
    async def reset_breakers(name: str | None = None) -> dict[str, Any]:
        try:
            names = chosen.reset(name)
        except KeyError:
            raise NotFound(f"no circuit breaker named {name!r}") from None
        return {"reset": names, "breakers": chosen.status()}

    return router
