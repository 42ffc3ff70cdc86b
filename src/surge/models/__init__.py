"""Every ORM model, one module per aggregate, all on one ``Base`` (Alembic sees them all here)."""

from surge.models.audit import AuditEntry
from surge.models.base import Base, TimestampMixin
from surge.models.identity import AuthSession, RefreshToken, Subscription, User, ViewRefresh
from surge.models.job import jobs_table
from surge.models.payments import PaymentEvent, Topup

__all__ = [
    "AuditEntry",
    "AuthSession",
    "Base",
    "PaymentEvent",
    "RefreshToken",
    "Subscription",
    "TimestampMixin",
    "Topup",
    "User",
    "ViewRefresh",
    "jobs_table",
]
