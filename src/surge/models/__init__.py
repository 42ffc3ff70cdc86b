"""Every ORM model, one module per aggregate, all on one ``Base`` (Alembic sees them all here)."""

from surge.models.audit import AuditEntry
from surge.models.base import Base, TimestampMixin
from surge.models.identity import AuthSession, RefreshToken, Subscription, User, ViewRefresh
from surge.models.job import jobs_table
from surge.models.notifications import NotificationEvent, OutboxMessage, Preference, Suppression

__all__ = [
    "AuditEntry",
    "AuthSession",
    "Base",
    "NotificationEvent",
    "OutboxMessage",
    "Preference",
    "RefreshToken",
    "Subscription",
    "Suppression",
    "TimestampMixin",
    "User",
    "ViewRefresh",
    "jobs_table",
]
