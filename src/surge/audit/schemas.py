"""The audit log's reply shapes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AuditRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor_id: uuid.UUID | None
    action: str
    subject_type: str
    subject_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None


class ApprovalRead(BaseModel):
    """A four-eyes request (ADR 0059)."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    action: str
    subject_type: str
    subject_id: str
    amount: int
    currency: str | None
    params: dict[str, Any]
    status: str
    maker_id: uuid.UUID
    checker_id: uuid.UUID | None
    reason: str | None
    result: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None


class ApprovalDecision(BaseModel):
    """Why (optional; shown in the audit log)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


#: The 202 an action above the threshold answers: recorded, waiting (ADR 0059).
APPROVAL_PENDING_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Recorded, not done: a second administrator must approve it "
        "(application/problem+json, the request under `approval`)",
        "content": {"application/problem+json": {"schema": {"type": "object"}}},
    }
}
