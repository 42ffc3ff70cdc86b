"""``service_or_admin(scope)``: a route a server calls with its API key, or an MFA
administrator with a session (both answer to the same bearer scheme in OpenAPI)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from surge.credential.service import ServiceCaller, is_service_key
from surge.credential.service import credential as credential_service
from surge.identity.deps import bearer_scheme, bearer_token, current_user, require_admin_mfa
from surge.kit.web.deps import SessionDep


@dataclass(frozen=True)
class Actor:
    """Who called: an administrator (``user_id``) or a service key (``service``)."""

    user_id: UUID | None
    service: ServiceCaller | None

    @property
    def label(self) -> str:
        return f"key:{self.service.prefix}" if self.service else f"user:{self.user_id}"


def service_or_admin(scope: str) -> Callable[..., Coroutine[Any, Any, Actor]]:
    async def dependency(
        request: Request,
        session: SessionDep,
        _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
    ) -> Actor:
        token = bearer_token(request)  # 401 without one
        if is_service_key(token):
            caller = await credential_service.authenticate(session, token, scope=scope)
            request.scope.setdefault("state", {})["service_key"] = caller.prefix
            return Actor(None, caller)
        principal = await require_admin_mfa(await current_user(request))
        return Actor(principal.user_id, None)

    return dependency
