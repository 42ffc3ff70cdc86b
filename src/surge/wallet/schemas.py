"""Wallet API schemas. Amounts are integers of the currency's minor unit (cents), never
floats; percentages are basis points (1 % = 100)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class WalletRead(_Read):
    currency: str
    balance: int = Field(description="Posted balance, minor units.")
    available: int = Field(description="Balance minus pending withdrawals.")
    pending_withdrawals: int
    withdrawable: int = Field(
        description="The part of `available` a withdrawal may take: available minus the "
        "top-up credit not yet spent on operations (top-up credit buys operations and is "
        "never paid out; ADR 0033). A larger withdrawal is a 409 `not-withdrawable`. "
        "0 while the wallet is in debt.",
        ge=0,
    )
    debt: int = Field(
        default=0,
        description="What the owner owes the platform: the part of a refunded or charged-back "
        "top-up the wallet could not cover (ADR 0042). While it is above 0, nothing can be "
        "withdrawn (409 `wallet-in-debt`) and only `spendable` buys operations; top-ups, "
        "earnings and released reservations repay it first.",
        ge=0,
    )
    spendable: int = Field(
        default=0,
        description="What operations may still reserve: available minus debt, at least 0.",
        ge=0,
    )


class EntryRead(_Read):
    id: int
    transfer_id: int
    kind: str
    amount: int = Field(description="Signed: positive credits the wallet.")
    balance_before: int
    balance_after: int
    reference: str | None
    created_at: datetime


class StatsRead(BaseModel):
    currency: str
    balance: int
    available: int
    earnings_count: int
    earnings_total: int
    shown_profit_total: int
    last_earning_at: datetime | None
    withdrawn_total: int
    withdrawals_pending: int
    refreshed_at: datetime | None = Field(description="When the aggregate view was refreshed.")


class WithdrawalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(gt=0, le=2**63 - 1, strict=True, description="Minor units.")


class WithdrawalRead(_Read):
    id: UUID
    amount: int
    currency: str
    status: str
    reason: str | None = None
    decided_at: datetime | None = None
    created_at: datetime


class AdminWithdrawalRead(WithdrawalRead):
    owner_id: UUID


class EarningRead(_Read):
    """What a partner sees of an event: its shown profit and its earning, never the
    event's real profit — nor its share of it, which with the shown profit would give the
    real profit back (shown = profit × share)."""

    id: int
    event_id: str
    event_kind: str
    shown_profit: int
    amount: int
    currency: str
    commission_bps: int
    created_at: datetime


class RevenueEventCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="Idempotency key of the event.")
    kind: str = Field(min_length=1, max_length=50, examples=["game", "sale"])
    profit: int = Field(
        strict=True,
        ge=-(2**63 - 1),
        le=2**63 - 1,
        description="Real profit in minor units (a loss, ≤ 0, credits nothing).",
    )
    occurred_at: datetime | None = None


class RevenueEventRead(_Read):
    id: str
    kind: str
    profit: int
    currency: str
    occurred_at: datetime
    created: bool = Field(description="False when this event id was already recorded.")


class PartnerTerms(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share_bps: int = Field(ge=0, le=10_000, strict=True)
    commission_bps: int | None = Field(default=None, ge=0, le=10_000, strict=True)
    active: bool = True


class PartnerRead(_Read):
    owner_id: UUID
    share_bps: int
    commission_bps: int
    active: bool


class DecisionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


class WriteOffCreate(BaseModel):
    """A debt write-off request (ADR 0059): how much (default: the whole debt) and why."""

    model_config = ConfigDict(extra="forbid")

    amount: int | None = Field(default=None, strict=True, ge=1, le=2**62)
    reason: str = Field(min_length=1, max_length=500)


class BatchApproveCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] = Field(min_length=1, max_length=100)


class BatchItemRead(_Read):
    id: UUID
    ok: bool
    status: str | None = None
    error: str | None = None
    code: int | None = None


class BatchApproveRead(BaseModel):
    results: list[BatchItemRead]
    approved: int
    failed: int
