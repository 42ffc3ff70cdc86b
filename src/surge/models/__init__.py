"""Every ORM model, one module per aggregate, all on one ``Base`` (Alembic sees them all here)."""

from surge.models.audit import AuditEntry
from surge.models.base import Base, TimestampMixin
from surge.models.identity import AuthSession, RefreshToken, Subscription, User, ViewRefresh
from surge.models.job import jobs_table

__all__ = [
    "AuditEntry",
    "AuthSession",
    "Base",
    "RefreshToken",
    "Subscription",
    "TimestampMixin",
    "User",
    "ViewRefresh",
    "jobs_table",
]
