"""Every ORM model, one module per aggregate, all on one ``Base`` (Alembic sees them all here)."""

from surge.models.audit import AdminApproval, AdminSoloAction, AuditEntry
from surge.models.base import Base, TimestampMixin
from surge.models.credential import ServiceKey
from surge.models.identity import AuthSession, RefreshToken, Subscription, User, ViewRefresh
from surge.models.job import jobs_table
from surge.models.notifications import NotificationEvent, OutboxMessage, Preference, Suppression
from surge.models.operations import (
    Attempt,
    EgressProxy,
    Operation,
    Price,
    ProviderAccount,
    Reseller,
)
from surge.models.password_reset import PasswordResetToken
from surge.models.payments import PaymentEvent, Topup
from surge.models.wallet import (
    Earning,
    Entry,
    IdempotencyKeyRow,
    LedgerAccount,
    Partner,
    RevenueEvent,
    Transfer,
    Withdrawal,
)

__all__ = [
    "AdminApproval",
    "AdminSoloAction",
    "Attempt",
    "AuditEntry",
    "AuthSession",
    "Base",
    "Earning",
    "EgressProxy",
    "Entry",
    "IdempotencyKeyRow",
    "LedgerAccount",
    "NotificationEvent",
    "Operation",
    "OutboxMessage",
    "Partner",
    "PasswordResetToken",
    "PaymentEvent",
    "Preference",
    "Price",
    "ProviderAccount",
    "RefreshToken",
    "Reseller",
    "RevenueEvent",
    "ServiceKey",
    "Subscription",
    "Suppression",
    "TimestampMixin",
    "Topup",
    "Transfer",
    "User",
    "ViewRefresh",
    "Withdrawal",
    "jobs_table",
]
