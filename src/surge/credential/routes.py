"""``/api/admin/service-keys``: create (the key is shown once), list, rotate, revoke.
Mounted by ``surge.admin.surface`` behind the admin guard; every change is audited."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from fastapi import APIRouter, Request, status

from surge.credential.schemas import (
    ServiceKeyCreate,
    ServiceKeyIssued,
    ServiceKeyList,
    ServiceKeyRead,
    ServiceKeyRotate,
)
from surge.credential.service import IssuedKey
from surge.credential.service import credential as credential_service
from surge.identity.deps import AdminMfa
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep, request_id
from surge.kit.web.pagination import Cursor, Limit

admin_router = APIRouter(prefix="/api/admin/service-keys", tags=["admin"])


def _issued(issued: IssuedKey) -> ServiceKeyIssued:
    read = ServiceKeyRead.model_validate(issued.key)
    return ServiceKeyIssued(**read.model_dump(), key=issued.secret, approval_id=issued.approval_id)


@admin_router.post("", status_code=status.HTTP_201_CREATED)
async def create_key(
    body: ServiceKeyCreate, *, admin: AdminMfa, session: SessionDep, runtime: RuntimeDep,
    request: Request,
) -> ServiceKeyIssued:  # fmt: skip
    """A new scoped key for a server (e.g. ``revenue-events:write``); shown this once.
    Refused until a different administrator approves ``approval_id`` (ADR 0059)."""
    issued = await credential_service.create(
        session,
        runtime,
        admin.user_id,
        name=body.name,
        scopes=body.scopes,
        request_id=request_id(request),
    )
    await session.refresh(issued.key)
    return _issued(issued)


@admin_router.get("")
async def list_keys(
    session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> ServiceKeyList:
    found = await credential_service.list(session, limit=limit, cursor=cursor)
    return ServiceKeyList(
        items=[ServiceKeyRead.model_validate(k) for k in found.items],
        next_cursor=found.next_cursor,
    )


@admin_router.post("/{key_id}/rotate", status_code=status.HTTP_201_CREATED)
async def rotate_key(
    key_id: UUID,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
    body: ServiceKeyRotate | None = None,
) -> ServiceKeyIssued:
    """A replacement key (shown once); the old one works for ``grace_seconds`` more."""
    grace = (
        timedelta(seconds=body.grace_seconds)
        if body and body.grace_seconds is not None
        else runtime.settings.CREDENTIAL_ROTATION_GRACE
    )
    issued = await credential_service.rotate(
        session, runtime, admin.user_id, key_id, grace=grace, request_id=request_id(request)
    )
    await session.refresh(issued.key)
    return _issued(issued)


@admin_router.post("/{key_id}/revoke")
async def revoke_key(
    key_id: UUID, admin: AdminMfa, session: SessionDep, request: Request
) -> ServiceKeyRead:
    """Refused from now on, everywhere (keys are checked against the database each call)."""
    key = await credential_service.revoke(
        session, admin.user_id, key_id, request_id=request_id(request)
    )
    return ServiceKeyRead.model_validate(key)
