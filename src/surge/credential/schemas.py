"""Service key bodies. The plaintext key appears in one response only: its creation."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from surge.kit.web.pagination import Page


class ServiceKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["game-backend"])
    scopes: list[str] = Field(min_length=1, max_length=10, examples=[["revenue-events:write"]])


class ServiceKeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: int | None = Field(
        default=None, ge=0, le=7 * 86_400, description="How long the old key keeps working."
    )


class ServiceKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    activated_at: datetime | None = Field(
        default=None, description="When a second administrator approved it (ADR 0059)."
    )


class ServiceKeyIssued(ServiceKeyRead):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")
    approval_id: UUID = Field(
        description="Refused until a different administrator approves this request "
        "(POST /api/admin/approvals/{id}/approve, ADR 0059)."
    )


#: Newest first, a page at a time (``kit.web.pagination``).
ServiceKeyList = Page[ServiceKeyRead]
