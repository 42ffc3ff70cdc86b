"""The wallet aggregate: a double-entry ledger and the partner workflows built on it.

The tables are created by migration ``0004_wallet`` (hand-written: partitioning, the
PL/pgSQL transfer functions, the materialized view and row-level security are beyond what
autogenerate sees). These mappings are for reads and for the few rows Python writes itself
(partners, events, earnings, withdrawals); balances and entries are only ever written by
``wallet_transfer`` / ``wallet_resolve`` (ADR 0010).
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base


class LedgerAccount(Base):
    """One ledger account: a partner's wallet (``code='wallet'``, ``owner_id`` set) or a
    system account (revenue, holds, payouts, external...; a hot one is striped over several
    rows, ADR 0058). ``balance`` is credits minus debits of posted transfers;
    ``pending_out``/``pending_in`` are reservations not yet posted."""

    __tablename__ = "wallet_accounts"
    __table_args__ = (
        Index("uq_wallet_accounts_owner", "owner_id", "currency", unique=True),
        Index("uq_wallet_accounts_system", "code", "currency", "stripe", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    owner_id: Mapped[UUID | None]
    code: Mapped[str] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(Text)
    balance: Mapped[int] = mapped_column(BigInteger, server_default="0")
    pending_out: Mapped[int] = mapped_column(BigInteger, server_default="0")
    pending_in: Mapped[int] = mapped_column(BigInteger, server_default="0")
    guarded: Mapped[bool] = mapped_column(Boolean, server_default="true")
    #: Which sub-account of a striped system account this row is (ADR 0058): 0 for a
    #: wallet and for an account that is not striped; the account's balance is the sum.
    stripe: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    #: Running totals kept by the ledger's functions (ADR 0036): the sum of this account's
    #: entries against the payments account, and minus the sum of those against sales.
    topup_net: Mapped[int] = mapped_column(BigInteger, server_default="0")
    purchases_posted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: What the owner owes the platform (ADR 0042): the sum of this account's entries against
    #: the receivables account — reversals it could not cover, minus their repayments.
    debt: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: Top-up credit still in the wallet, and top-up credit posted purchases consumed (what
    #: sales giving a purchase back restores): order-dependent running totals kept by the
    #: ledger's functions (ADR 0045); ``withdrawable = available − topup_unspent``.
    topup_unspent: Mapped[int] = mapped_column(BigInteger, server_default="0")
    topup_spent: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Transfer(Base):
    """An immutable journal row. ``phase``: single (posted at once), pending (a
    reservation), post / void (the second phase of ``pending_id``)."""

    __tablename__ = "wallet_transfers"
    __table_args__ = (Index("uq_wallet_transfers_pending_id", "pending_id", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    debit_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wallet_accounts.id"))
    credit_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wallet_accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    phase: Mapped[str] = mapped_column(Text)
    pending_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("wallet_transfers.id"))
    kind: Mapped[str] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Entry(Base):
    """One leg of a posted movement on one account, with the balance before and after.
    Partitioned by month on ``created_at``."""

    __tablename__ = "wallet_entries"
    #: History is listed in posting order, by the entry sequence (migration 0005).
    __table_args__ = (Index("ix_wallet_entries_account_seq", "account_id", text("id DESC")),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), primary_key=True, server_default=func.now()
    )
    account_id: Mapped[int] = mapped_column(BigInteger)
    transfer_id: Mapped[int] = mapped_column(BigInteger)
    counterparty_account_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_before: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)


class PendingCredit(Base):
    """The credit leg of a posted transfer that found its account's row held by another
    transaction (ADR 0065): committed with the transfer and its debit entry, posted after
    (an entry with its exact before/after, this row deleted in the same transaction).
    Counted by the invariant checker with the balances."""

    __tablename__ = "wallet_pending_credits"
    __table_args__ = (Index("ix_wallet_pending_credits_account", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wallet_accounts.id"))
    transfer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("wallet_transfers.id"), unique=True
    )
    counterparty_account_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Partner(Base):
    """A partner's commercial terms (seed 001), in basis points: 4000 = 40 %."""

    __tablename__ = "wallet_partners"
    __table_args__ = (
        Index("ix_wallet_partners_active", "owner_id", postgresql_where=text("active")),
    )

    owner_id: Mapped[UUID] = mapped_column(primary_key=True)
    share_bps: Mapped[int] = mapped_column(Integer)
    commission_bps: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, server_default="true")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RevenueEvent(Base):
    """A game or sale with its real profit; its id is the idempotency key of the whole
    earnings run. Partners never see ``profit``, only their shown share of it."""

    __tablename__ = "wallet_revenue_events"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    profit: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Earning(Base):
    """What one partner earned from one event (partitioned by month)."""

    __tablename__ = "wallet_earnings"
    __table_args__ = (
        Index("ix_wallet_earnings_owner", "owner_id", text("created_at DESC"), text("id DESC")),
        Index("ix_wallet_earnings_owner_seq", "owner_id", text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), primary_key=True, server_default=func.now()
    )
    event_id: Mapped[str] = mapped_column(Text)
    owner_id: Mapped[UUID]
    transfer_id: Mapped[int] = mapped_column(BigInteger)
    shown_profit: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    share_bps: Mapped[int] = mapped_column(Integer)
    commission_bps: Mapped[int] = mapped_column(Integer)
    event_kind: Mapped[str] = mapped_column(Text)


class Withdrawal(Base):
    """A partner's request to be paid out: a pending transfer wallet → holds, then
    approved (posted, and moved on to payouts) or rejected (voided)."""

    __tablename__ = "wallet_withdrawals"
    __table_args__ = (
        Index("ix_wallet_withdrawals_owner", "owner_id", text("created_at DESC"), text("id DESC")),
        Index(
            "ix_wallet_withdrawals_pending",
            "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    owner_id: Mapped[UUID]
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wallet_accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    transfer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wallet_transfers.id"))
    resolution_transfer_id: Mapped[int | None] = mapped_column(BigInteger)
    decided_by: Mapped[UUID | None]
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyKeyRow(Base):
    """Storage of ``surge.kit.web.idempotency`` (the kit reads it with plain SQL; mapped
    here so Alembic's metadata knows the table)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    content_type: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
