"""Scoped API keys: created by an administrator, shown once, stored hashed, rotatable
(the old key keeps working for a grace period), revocable, every change audited. A key
authenticates one server-to-server caller for the scopes it was given (``revenue-events``).

    from surge.credential.service import credential as credential_service

    SurgeError
    └── CredentialError
        ├── KeyNotFound (404)
        ├── UnknownScope (422)
        ├── InvalidServiceKey (401)   unknown, revoked, expired or not yet approved key
        │                             (< NotAuthenticated)
        └── ScopeNotGranted (403)     a valid key without the scope the route needs

A new key (created or rotated) is refused until a *different* administrator approves it
(four-eyes, ADR 0059): every key can record revenue events, which credit partners, so one
administrator minting one alone was a way around the four-eyes rule on revenue events.

A key reads ``surge_sk_<prefix>_<secret>``: the prefix finds the row, the SHA-256 of the
whole key is compared in constant time. 256 random bits need no slow hash.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.approvals import approvals
from surge.audit.service import audit as audit_service
from surge.credential import repository
from surge.kit.errors import Forbidden, NotAuthenticated, NotFound, SurgeError, UnprocessableEntity
from surge.kit.runtime import Runtime
from surge.kit.security import hash_token
from surge.kit.web.pagination import Slice
from surge.models.audit import AdminApproval
from surge.models.credential import ServiceKey

log = structlog.get_logger()

KEY_PREFIX = "surge_sk_"
#: What a key can be granted. One scope per server-to-server surface.
SCOPES = frozenset({"revenue-events:write"})


class CredentialError(SurgeError):
    pass


class KeyNotFound(CredentialError, NotFound):
    pass


class UnknownScope(CredentialError, UnprocessableEntity):
    pass


class InvalidServiceKey(CredentialError, NotAuthenticated):
    pass


class ScopeNotGranted(CredentialError, Forbidden):
    pass


@dataclass(frozen=True)
class IssuedKey:
    """A new key: ``secret`` is the only time the plaintext exists outside the caller."""

    key: ServiceKey
    secret: str
    #: The four-eyes request a second administrator approves to make the key usable.
    approval_id: UUID


@dataclass(frozen=True)
class ServiceCaller:
    """The server-to-server caller a key authenticated."""

    key_id: UUID
    name: str
    prefix: str
    scopes: tuple[str, ...]


def is_service_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_secret() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


def _view(key: ServiceKey) -> dict[str, object]:
    return {
        "name": key.name,
        "prefix": key.prefix,
        "scopes": list(key.scopes),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked": key.revoked_at is not None,
    }


class CredentialService:
    async def create(
        self,
        session: AsyncSession,
        runtime: Runtime,
        actor_id: UUID,
        *,
        name: str,
        scopes: list[str],
        request_id: str | None = None,
        rotated_from: UUID | None = None,
    ) -> IssuedKey:
        unknown = sorted(set(scopes) - SCOPES)
        if unknown or not scopes:
            raise UnknownScope(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
        prefix, secret = _new_secret()
        key = ServiceKey(
            name=name,
            prefix=prefix,
            secret_hash=hash_token(secret),
            scopes=sorted(set(scopes)),
            created_by=actor_id,
            rotated_from=rotated_from,
        )
        await repository.add(session, key)
        await audit_service.record(
            session, actor_id, action="credential.key.created", subject_type="service_key",
            subject_id=str(key.id), after=_view(key), request_id=request_id,
        )  # fmt: skip
        approval = await approvals.ask(
            session, runtime, actor_id, action=ACTIVATE, subject_type="service_key",
            subject_id=str(key.id), amount=0, currency=None,
            params={"name": name, "scopes": key.scopes, "prefix": prefix}, request_id=request_id,
        )  # fmt: skip
        log.info("credential.key.created", key_id=str(key.id), prefix=prefix)
        return IssuedKey(key, secret, approval.id)

    async def list(
        self, session: AsyncSession, *, limit: int = 50, cursor: str | None = None
    ) -> Slice[ServiceKey]:
        """Newest first, a page at a time (``kit.web.pagination``)."""
        return await repository.newest(session, limit=limit, cursor=cursor)

    async def rotate(
        self,
        session: AsyncSession,
        runtime: Runtime,
        actor_id: UUID,
        key_id: UUID,
        *,
        grace: timedelta,
        request_id: str | None = None,
    ) -> IssuedKey:
        """A new key with the same name and scopes; the old one expires after ``grace`` (0:
        at once), so a fleet can be redeployed with the new key first. The new key works
        once a second administrator approves it: rotate with a grace that leaves the time."""
        old = await self._live(session, key_id)
        before = _view(old)
        expires = _now() + grace
        old.expires_at = min(old.expires_at, expires) if old.expires_at else expires
        issued = await self.create(
            session, runtime, actor_id, name=old.name, scopes=list(old.scopes),
            request_id=request_id, rotated_from=old.id,
        )  # fmt: skip
        await audit_service.record(
            session, actor_id, action="credential.key.rotated", subject_type="service_key",
            subject_id=str(old.id), before=before,
            after={**_view(old), "replaced_by": str(issued.key.id)}, request_id=request_id,
        )  # fmt: skip
        return issued

    async def revoke(
        self, session: AsyncSession, actor_id: UUID, key_id: UUID, *, request_id: str | None = None
    ) -> ServiceKey:
        key = await repository.by_id(session, key_id, for_update=True)
        if key is None:
            raise KeyNotFound(f"no service key {key_id}")
        if key.revoked_at is None:
            before = _view(key)
            key.revoked_at = _now()
            await session.flush()
            await audit_service.record(
                session, actor_id, action="credential.key.revoked", subject_type="service_key",
                subject_id=str(key.id), before=before, after=_view(key), request_id=request_id,
            )  # fmt: skip
        return key

    async def authenticate(self, session: AsyncSession, token: str, *, scope: str) -> ServiceCaller:
        """The caller ``token`` names, if the key is live and holds ``scope``."""
        parts = token.removeprefix(KEY_PREFIX).split("_", 1)
        key = await repository.by_prefix(session, parts[0]) if len(parts) == 2 else None
        now = _now()
        if (
            key is None
            or not hmac.compare_digest(key.secret_hash, hash_token(token))
            or key.revoked_at is not None
            or (key.expires_at is not None and key.expires_at <= now)
            or key.activated_at is None
        ):
            raise InvalidServiceKey(
                "Unknown, revoked, expired or not yet approved service key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in key.scopes:
            raise ScopeNotGranted(f"This key is not granted {scope!r}")
        key.last_used_at = now
        return ServiceCaller(key.id, key.name, key.prefix, tuple(key.scopes))

    async def _live(self, session: AsyncSession, key_id: UUID) -> ServiceKey:
        key = await repository.by_id(session, key_id, for_update=True)
        if key is None or key.revoked_at is not None:
            raise KeyNotFound(f"no live service key {key_id}")
        return key


credential = CredentialService()

#: The four-eyes action that makes a new key usable (ADR 0059).
ACTIVATE = "credential.key.activate"


async def _activate(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, object]:  # fmt: skip
    key = await repository.by_id(session, UUID(approval.subject_id), for_update=True)
    if key is None or key.revoked_at is not None:
        raise KeyNotFound(f"no live service key {approval.subject_id}")
    if key.activated_at is None:
        key.activated_at = _now()
        await audit_service.record(
            session, approval.maker_id, action="credential.key.activated",
            subject_type="service_key", subject_id=str(key.id),
            after={**_view(key), "approved_by": str(checker_id)}, request_id=request_id,
        )  # fmt: skip
    return {"activated": True}


approvals.register(ACTIVATE, _activate)
