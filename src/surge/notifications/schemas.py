"""Request and response bodies of the notifications API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from surge.kit.web.pagination import Page

#: An address as relays see it: one "@", no spaces, at most 254 characters (RFC 5321).
Address = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$"
    ),
]


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class MessageRead(_Read):
    """One outbox message as the admin console lists it."""

    id: UUID
    to_address: str
    template: str
    category: str
    locale: str
    status: str
    subject: str | None
    attempts: int
    last_code: int | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None


MessagePage = Page[MessageRead]  # the one reply shape of a listing (kit.web.pagination)


class SuppressionRead(_Read):
    address: str
    reason: str
    source: str
    detail: str | None
    created_at: datetime
    expires_at: datetime | None


SuppressionPage = Page[SuppressionRead]  # the one reply shape of a listing (kit.web.pagination)


class SuppressionCreate(BaseModel):
    """A manual suppression (the address asked us to stop, a known trap...)."""

    address: Address
    detail: str | None = Field(default=None, max_length=500)
    expires_at: datetime | None = None


class LiftRead(BaseModel):
    address: str
    reason: str
    requeued: int
    """Messages held for the address and queued again by the lift."""


class RatesRead(BaseModel):
    since: datetime
    sent: int
    bounced: int
    complained: int
    bounce_rate: float
    complaint_rate: float


class ProviderEventIn(BaseModel):
    """One provider event (django-anymail's normalized vocabulary, reduced)."""

    id: str = Field(min_length=1, max_length=200, description="The provider's event id (dedup).")
    type: Literal["bounced", "complained", "delivered", "unsubscribed"]
    recipient: Address
    message_id: str | None = Field(
        default=None, max_length=300, description="Our Message-ID, `<uuid@domain>`, or the uuid."
    )
    bounce_type: Literal["hard", "soft", "blocked"] | None = None
    code: int | None = Field(default=None, ge=200, le=599)
    diagnostic: str | None = Field(default=None, max_length=1000)


class WebhookIn(BaseModel):
    """``POST /api/v1/webhooks/email`` body, signed with ``Surge-Signature`` (ADR 0019)."""

    events: list[ProviderEventIn] = Field(min_length=1, max_length=500)


class WebhookRead(BaseModel):
    applied: int
    duplicates: int


class PreferencesRead(BaseModel):
    categories: dict[str, bool]
    """Categories the user chose; missing ones are on. Security mail cannot be turned off."""


class PreferencesUpdate(BaseModel):
    categories: dict[str, bool] = Field(max_length=50)


class UnsubscribeRead(BaseModel):
    category: str
    unsubscribed: bool
