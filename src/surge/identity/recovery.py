"""Password reset (issue 15): "forgot my password" → an e-mailed single-use link → a new
password, every session signed out.

    from surge.identity.recovery import password_reset as password_reset_service

    IdentityError
    └── InvalidResetToken (400)    unknown, used, expired or superseded reset token

Rules (ADR 0026):
- ``forgot`` answers the same 202, doing the same work, whether or not the address has an
  account: it spends the per-IP budget (429 past it) and the per-address budget (past it:
  nothing more happens, the answer is unchanged), then enqueues
  ``identity.password.reset_requested``. The job looks the address up; the request never
  does, so neither its answer nor its timing tells whether the account exists.
- The job (``issue``) supersedes the user's live tokens and stores the new one's SHA-256
  only; the link goes out through the outbox with the raw token *sealed* in the row
  (``notifications.send_sealed``), in the job's transaction.
- ``reset`` spends the token (row lock: one reset per token even under a race), checks the
  new password against the registration policy (``schemas.Password``), signs out every
  session (each one revoked + the user's not-before cut-off, announced after the commit),
  audits, and sends a "your password was changed" e-mail (category ``security``).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.identity import repository
from surge.identity.errors import IdentityError
from surge.identity.runtime import identity_state
from surge.identity.security import LoginGuard
from surge.kit.db import on_commit
from surge.kit.errors import BadRequest, TooManyRequests
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.kit.security import hash_token, new_opaque_token
from surge.kit.security.confusables import normalize_email
from surge.kit.web.client_ip import ip_bucket
from surge.models.password_reset import PasswordResetToken
from surge.notifications.service import notifications as notifications_service

log = structlog.get_logger()

REQUESTED_JOB = "identity.password.reset_requested"
BUDGET_EXTENSION = "identity.password_reset.budget"


class InvalidResetToken(IdentityError, BadRequest):
    status_code = 400
    title = "Bad Request"


def _now() -> datetime:
    return datetime.now(UTC)


class ResetBudget(LoginGuard):
    """Reset requests counted per address and per client IP over a fixed window (Redis when
    up, this process otherwise: ``LoginGuard``'s counters under keys of their own)."""

    async def take_ip(self, ip: str) -> None:
        (count,), ttl = await self._add((f"surge:auth:pr:ip:{ip_bucket(ip)}",), 1)
        if count > self.max_per_ip:
            log.warning("identity.password_reset.throttled", ip=ip)
            raise TooManyRequests("Too many password-reset requests; try again later",
                                  retry_after=ttl)  # fmt: skip

    async def take_address(self, email: str) -> bool:
        digest = hashlib.sha256(email.encode()).hexdigest()[:32]
        (count,), _ = await self._add((f"surge:auth:pr:a:{digest}",), 1)
        return count <= self.max_per_account


def reset_budget(runtime: Runtime) -> ResetBudget:
    """This process's reset counters (a runtime extension)."""
    budget = runtime.extensions.get(BUDGET_EXTENSION)
    if budget is None:
        settings = runtime.settings
        budget = ResetBudget(
            runtime.redis,
            window=settings.AUTH_PASSWORD_RESET_WINDOW.total_seconds(),
            max_per_account=settings.AUTH_PASSWORD_RESET_MAX_PER_ADDRESS,
            max_per_ip=settings.AUTH_PASSWORD_RESET_MAX_PER_IP,
        )
        runtime.extensions[BUDGET_EXTENSION] = budget
    assert isinstance(budget, ResetBudget)
    return budget


def reset_link(runtime: Runtime, token: str) -> str:
    settings = runtime.settings
    base = settings.AUTH_PASSWORD_RESET_URL or (
        f"{settings.NOTIFY_PUBLIC_URL.rstrip('/')}/reset-password"
    )
    return f"{base}?token={token}"


class PasswordResetService:
    """Forgot / issue / reset (see the module docstring). Stateless."""

    async def forgot(self, session: AsyncSession, runtime: Runtime, *, email: str, ip: str) -> None:
        """The request: budgets, then one job — the same work for any address."""
        budget = reset_budget(runtime)
        await budget.take_ip(ip)
        email = normalize_email(email)
        if not await budget.take_address(email):
            log.info("identity.password_reset.address_throttled")
            return
        await enqueue(session, REQUESTED_JOB, {"email": email, "ip": ip})

    async def issue(
        self, session: AsyncSession, runtime: Runtime, *, email: str, ip: str | None = None
    ) -> uuid.UUID | None:
        """The job: a new token for the account of ``email`` (older live ones superseded),
        mailed through the outbox. None when no account has that address."""
        user = await repository.user_by_email(session, normalize_email(email))
        if user is None:
            log.info("identity.password_reset.unknown_address")
            return None
        now = _now()
        await repository.supersede_reset_tokens(session, user.id, now=now)
        raw = new_opaque_token()
        row = PasswordResetToken(
            user_id=user.id, token_hash=hash_token(raw),
            expires_at=now + runtime.settings.AUTH_PASSWORD_RESET_TTL, requested_ip=ip or None,
        )  # fmt: skip
        session.add(row)
        await session.flush()
        ttl_minutes = int(runtime.settings.AUTH_PASSWORD_RESET_TTL.total_seconds() // 60)
        await notifications_service.send_sealed(
            session, runtime, secrets={"reset_url": reset_link(runtime, raw)},
            to=user.email, user_id=user.id, template="password_reset",
            context={"ttl_minutes": ttl_minutes}, category="security",
            key=f"password-reset:{row.id}",
        )  # fmt: skip
        await audit_service.record(
            session, user.id, action="identity.password.reset_requested", subject_type="user",
            subject_id=str(user.id), after={"ip": ip, "token_id": str(row.id)},
        )  # fmt: skip
        log.info("identity.password_reset.issued", user_id=str(user.id))
        return row.id

    async def reset(
        self,
        session: AsyncSession,
        runtime: Runtime,
        *,
        token: str,
        password: str,
        ip: str = "",
        request_id: str | None = None,
    ) -> uuid.UUID:
        """Spend ``token`` and set ``password``; every session of the user is signed out.
        Returns the user's id."""
        now = _now()
        found = await repository.reset_token_for_update(session, hash_token(token))
        if found is None or found.used_at is not None or found.expires_at <= now:
            raise InvalidResetToken("This reset link is invalid or has expired; ask for a new one")
        user = await repository.user_by_id(session, found.user_id, for_update=True)
        if user is None:  # deleted meanwhile (the token row cascades; a race)
            raise InvalidResetToken("This reset link is invalid or has expired; ask for a new one")
        state = identity_state(runtime)
        user.password_hash = await state.hasher.hash(password)
        found.used_at = now
        await repository.supersede_reset_tokens(session, user.id, now=now)
        live = await repository.live_sessions(session, user.id, now=now)
        revoked = await repository.revoke_sessions(
            session, [s.id for s in live], now=now, reason="password_reset"
        )
        # As "log out everywhere": the sessions' revocation covers this second's tokens,
        # the not-before cut-off every older one.
        cutoff = now.replace(microsecond=0)
        user.tokens_valid_after = cutoff
        await session.flush()
        user_id = user.id

        async def announce() -> None:
            await state.revocations.publish(revoked, (user_id, cutoff))

        on_commit(session, announce)
        await audit_service.record(
            session, user.id, action="identity.password.reset", subject_type="user",
            subject_id=str(user.id), after={"sessions_revoked": len(revoked), "ip": ip or None},
            request_id=request_id,
        )  # fmt: skip
        await notifications_service.send(
            session, to=user.email, user_id=user.id, template="password_changed",
            context={"ip": ip or None, "at": now.strftime("%Y-%m-%d %H:%M UTC")},
            category="security", key=f"password-changed:{found.id}",
        )  # fmt: skip
        log.info("identity.password_reset.done", user_id=str(user.id), sessions=len(revoked))
        return user.id


password_reset = PasswordResetService()
