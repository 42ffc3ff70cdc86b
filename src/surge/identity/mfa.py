"""Second factor: TOTP enrolment and verification, backup codes (seed 004: TOTP for admins).

    from surge.identity.mfa import mfa as mfa_service

Errors are identity's (``surge.identity.service``): a wrong or replayed code is
``InvalidCredentials`` (401); verifying before enrolment, or enrolling twice, ``Conflict``.
"""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.identity import repository
from surge.identity.errors import InvalidCredentials
from surge.identity.principal import MfaEnrollment, Principal
from surge.identity.runtime import IdentityState, identity_state
from surge.kit.errors import Conflict
from surge.kit.runtime import Runtime
from surge.kit.security import InvalidToken
from surge.models.identity import User

log = structlog.get_logger()


class MfaService:
    """Stateless; the TOTP and backup-code helpers are the process's (``IdentityState``)."""

    async def setup(
        self, session: AsyncSession, runtime: Runtime, principal: Principal
    ) -> MfaEnrollment:
        """Start (or restart) enrolment: a new secret and backup codes, active after verify."""
        state = identity_state(runtime)
        user = await repository.user_by_id(session, principal.user_id, for_update=True)
        assert user is not None
        if user.mfa_enabled:
            raise Conflict("MFA is already enabled")
        secret = state.totp.new_secret()
        codes = state.backup_codes.generate()
        user.mfa_secret = secret
        user.mfa_backup_codes = [state.backup_codes.digest(c) for c in codes]
        user.mfa_last_step = None
        return MfaEnrollment(
            secret=secret,
            provisioning_uri=state.totp.provisioning_uri(secret, user.email),
            backup_codes=codes,
        )

    async def verify(
        self, session: AsyncSession, runtime: Runtime, principal: Principal, code: str, *, ip: str
    ) -> str:
        """Check a TOTP (or backup) code: enables MFA on first success, marks this session
        as MFA-verified, returns a new access token that says so.

        A wrong code spends the sign-in failure budget of the account and of ``ip`` (ADR
        0051): a session opened before the account enrolled (no second factor asked then)
        could otherwise guess codes at the request rate limit — about one success a few days.
        A right one gives its slot back."""
        state = identity_state(runtime)
        user = await repository.user_by_id(session, principal.user_id, for_update=True)
        assert user is not None
        if user.mfa_secret is None:
            raise Conflict("Start MFA enrolment first")
        await state.login_guard.reserve(user.email, ip)  # 429 once the budget is spent
        if not await self.second_factor(session, state, user, code, allow_backup=user.mfa_enabled):
            log.info("identity.mfa.failed", user_id=str(user.id), ip=ip)
            raise InvalidCredentials("Wrong or already used one-time code")  # the slot is kept
        await state.login_guard.release(user.email, ip)
        if not user.mfa_enabled:
            user.mfa_enabled = True
            state.users.invalidate_on_commit(session, user.id)  # /me shows it
        auth = await repository.user_session(session, principal.session_id)
        if auth is None or auth.revoked_at is not None:
            raise InvalidToken("This session has been signed out")
        auth.mfa_verified = True
        await session.flush()
        log.info("identity.mfa.verified", user_id=str(principal.user_id))
        return state.access_token(principal.user_id, principal.session_id, user.role, True)

    async def second_factor(
        self,
        session: AsyncSession,
        state: IdentityState,
        user: User,
        code: str,
        *,
        allow_backup: bool = True,
    ) -> bool:
        """Whether ``code`` is the user's current TOTP (never one already used) or one of its
        unused backup codes; the code is spent in ``session``."""
        assert user.mfa_secret is not None
        step = state.totp.verify(user.mfa_secret, code, last_step=user.mfa_last_step)
        if step is not None:
            return await repository.consume_totp_step(session, user.id, step)
        if allow_backup:
            digest = state.backup_codes.match(code, list(user.mfa_backup_codes))
            if digest is not None:
                log.info("identity.mfa.backup_code_used", user_id=str(user.id))
                return await repository.consume_backup_code(session, user.id, digest)
        return False


mfa = MfaService()
