"""Identity's value types: the authenticated caller, a token pair, an MFA enrolment, and the
request-state keys the rate-limit hook fills for the route."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cached_property

#: Request-state key under which the rate-limit hook leaves the caller's privileges.
PRIVILEGES_STATE = "identity_privileges"
#: The principal the rate-limit hook already authenticated for this request (signature,
#: expiry and revocation), so ``current_user`` does not check the same token twice.
PRINCIPAL_STATE = "identity_live_principal"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    role: str
    mfa: bool
    issued_at: float

    @cached_property
    def key(self) -> str:
        """``str(user_id)``, formatted once per token (principals are memoised per token)."""
        return str(self.user_id)


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: uuid.UUID
    #: A sign-in's new device token (ADR 0044); None from a refresh.
    device_token: str | None = None


@dataclass(frozen=True)
class MfaEnrollment:
    secret: str
    provisioning_uri: str
    backup_codes: list[str]
