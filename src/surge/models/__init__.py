"""Every ORM model, one module per aggregate, all on one ``Base`` (Alembic sees them all here)."""

from surge.models.audit import AuditEntry
from surge.models.base import Base, TimestampMixin
from surge.models.identity import AuthSession, RefreshToken, Subscription, User, ViewRefresh
from surge.models.job import jobs_table
from surge.models.operations import (
    Attempt,
    EgressProxy,
    Operation,
    Price,
    ProviderAccount,
    Reseller,
)

__all__ = [
    "Attempt",
    "AuditEntry",
    "AuthSession",
    "Base",
    "EgressProxy",
    "Operation",
    "Price",
    "ProviderAccount",
    "RefreshToken",
    "Reseller",
    "Subscription",
    "TimestampMixin",
    "User",
    "ViewRefresh",
    "jobs_table",
]
