"""Plans, their features and rate-limit tiers, and the privileges a plan grants (seed 003).

Plans live in configuration (``IDENTITY_PLAN_FEATURES``, ``IDENTITY_PLAN_RATE_TIERS``), not in
a table: what a plan grants changes with a deploy, and caches then hold only *which plan* a
user has, so a new feature list applies to every cached entry at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import orjson

from surge.config import Settings

FREE = "free"


@dataclass(frozen=True)
class Plan:
    name: str
    features: frozenset[str]
    rate_tier: str


@dataclass(frozen=True)
class Catalog:
    """The configured plans; ``free`` always exists."""

    plans: dict[str, Plan] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        plans = {
            name: Plan(
                name=name,
                features=frozenset(features),
                rate_tier=settings.IDENTITY_PLAN_RATE_TIERS.get(name, name),
            )
            for name, features in settings.IDENTITY_PLAN_FEATURES.items()
        }
        plans.setdefault(FREE, Plan(FREE, frozenset(), FREE))
        return cls(plans)

    def get(self, name: str) -> Plan:
        """The plan called ``name``; an unknown (removed) plan degrades to free."""
        return self.plans.get(name) or self.plans[FREE]

    def __contains__(self, name: object) -> bool:
        return name in self.plans


@dataclass(frozen=True)
class Grant:
    """What caches hold for one user: which plan until when (features come from the catalog)."""

    plan: str
    expires_at: datetime | None = None
    #: False when the user id is unknown to the database.
    found: bool = True

    def effective_plan(self, now: datetime | None = None) -> str:
        if self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC)):
            return FREE
        return self.plan


@dataclass(frozen=True)
class Privileges:
    """A user's effective privileges and where the answer came from."""

    user_id: uuid.UUID
    plan: str
    features: frozenset[str]
    rate_tier: str
    expires_at: datetime | None
    #: memory | redis | database | stale (DB down or busy, old memory entry). With nothing
    #: cached and no answer from the database there is no Privileges: a 503 (issue 19).
    source: str
    found: bool = True

    def has(self, feature: str) -> bool:
        return feature in self.features

    @cached_property
    def json(self) -> bytes:
        """This answer as ``GET /api/v1/me/privileges`` sends it (``PrivilegesRead``),
        encoded once: the privilege store hands out the same object while the user's entry
        is unchanged, so the hot route sends memoised bytes."""
        return orjson.dumps(
            {
                "user_id": str(self.user_id),
                "plan": self.plan,
                "features": sorted(self.features),
                "rate_tier": self.rate_tier,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None,
                "source": self.source,
            }
        )


def privileges_for(
    catalog: Catalog, user_id: uuid.UUID, grant: Grant, source: str, now: datetime | None = None
) -> Privileges:
    plan = catalog.get(grant.effective_plan(now))
    return Privileges(
        user_id=user_id,
        plan=plan.name,
        features=plan.features,
        rate_tier=plan.rate_tier,
        expires_at=grant.expires_at if plan.name != FREE else None,
        source=source,
        found=grant.found,
    )
