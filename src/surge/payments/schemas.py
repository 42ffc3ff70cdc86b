"""Payments API schemas. Amounts are integers of the currency's minor unit, never floats.

The bounds shown here are the process's settings (``PAYMENTS_TOPUP_MIN``/``MAX``,
``PAYMENTS_CURRENCY``), the same values the service enforces, so the OpenAPI document tells
clients exactly what the server accepts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from surge.config import settings
from surge.kit.web.pagination import Page


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TopupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(
        ge=settings.PAYMENTS_TOPUP_MIN,
        le=settings.PAYMENTS_TOPUP_MAX,
        strict=True,
        description="Minor units (cents).",
    )
    currency: str = Field(
        default=settings.PAYMENTS_CURRENCY,
        pattern=f"^{settings.PAYMENTS_CURRENCY}$",
        description="ISO 4217; the wallets' currency only.",
    )
    payment_method: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_]+$",
        description="A payment method token from the provider (test mode: pm_card_visa, "
        "pm_card_chargeDeclined, pm_card_authenticationRequired, pm_card_slow).",
    )


TopupStatus = Literal[
    "pending",
    "requires_action",
    "processing",
    "succeeded",
    "failed",
    "refunded",
    "disputed",
    "dispute_won",
]


class TopupRead(_Read):
    id: UUID
    amount: int
    currency: str
    status: TopupStatus
    provider_payment_id: str | None
    next_action_url: str | None = Field(
        description="Where the payer completes a second step (3-D Secure) when requires_action."
    )
    failure_code: str | None
    amount_credited: int
    amount_reversed: int
    created_at: datetime
    updated_at: datetime


TopupPage = Page[TopupRead]  # the one reply shape of a listing (kit.web.pagination)


class WebhookReceipt(BaseModel):
    received: bool = True
    event_id: str
    duplicate: bool = Field(description="The event id was seen before: nothing was done again.")


class EventRead(_Read):
    id: str
    type: str
    payment_id: str
    created: int
    received_at: datetime
    processed_at: datetime | None
    state: Literal["pending", "processed", "dead"]
    attempts: int
    last_error: str | None
    payload: dict[str, Any]


EventPage = Page[EventRead]  # the one reply shape of a listing (kit.web.pagination)
