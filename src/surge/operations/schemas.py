"""Request and response bodies of the operations API (no secret is ever in a ``Read``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from surge.kit.web.pagination import Page

Kind = Literal["renew", "signal"]
Status = Literal["queued", "running", "succeeded", "failed", "needs_review"]


class OperationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Kind = "renew"
    card: str = Field(pattern=r"^\d{10,16}$", description="The card number, 10 to 16 digits.")
    package: str | None = Field(default=None, max_length=40)
    months: int = Field(default=0, ge=0, le=12, strict=True)


class AttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    outcome: str
    detail: str | None
    started_at: datetime
    ended_at: datetime


class OperationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    kind: Kind
    card: str
    package: str | None
    months: int
    amount: int
    currency: str
    status: Status
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class OperationDetail(OperationRead):
    attempts: list[AttemptRead]


OperationPage = Page[OperationRead]  # the one reply shape of a listing (kit.web.pagination)


class AdminOperationRead(OperationRead):
    owner_id: UUID
    hold_id: int | None
    sent_at: datetime | None


AdminOperationPage = Page[
    AdminOperationRead
]  # the one reply shape of a listing (kit.web.pagination)


class PricesRead(BaseModel):
    tier: str
    currency: str
    monthly: dict[str, int]
    signal: int
    available: int


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=200)
    password: SecretStr = Field(min_length=1, max_length=500)


class AccountRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    username: str
    status: str
    last_error: str | None
    failures: int
    uses: int
    last_used_at: datetime | None
    leased_until: datetime | None


class ProxyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr = Field(description="scheme://[user:password@]host:port (kept encrypted)")


class ProxyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    label: str
    status: str
    reason: str | None
    last_error: str | None
    blocks: int
    failures: int
    requests: int
    blocked_at: datetime | None
    retry_at: datetime | None = Field(description="End of the cool-down: the re-check probe.")
    last_used_at: datetime | None


class StatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["active", "disabled"]


class ResolveCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    performed: bool = Field(description="True: the provider did it (settle); False: release.")
    note: str | None = Field(default=None, max_length=500)


class TierUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str = Field(min_length=1, max_length=40)
