"""Identity's request and response bodies."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from surge.kit.security.confusables import normalize_email

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def _email(value: str) -> str:
    value = normalize_email(value)
    if not _EMAIL.match(value):
        raise ValueError("not an e-mail address")
    return value


#: An address someone gives to be written to (registration, a reset): normalized as stored
#: (``normalize_email``) and shaped like an address. Sign-in takes any text (a wrong one is
#: a failed sign-in, not a 422).
Email = Annotated[str, Field(max_length=254), AfterValidator(_email)]

#: argon2 hashes any length, but a megabyte password is a CPU-exhaustion request.
Password = Annotated[str, Field(min_length=8, max_length=256)]


class UserCreate(BaseModel):
    email: Email
    password: Password


class RegistrationAccepted(BaseModel):
    """The one answer to ``POST /auth/register``, whether or not the address has an account
    (a different answer would tell anyone who has one)."""

    status: str = "accepted"
    detail: str = (
        "If this address can be registered, the account is ready: sign in with it. "
        "If it already has an account, its owner has been sent an e-mail."
    )


class LoginRequest(BaseModel):
    email: str = Field(max_length=254)
    password: str = Field(max_length=256)
    otp: str | None = Field(default=None, max_length=32, description="TOTP or backup code")
    device_token: str | None = Field(
        default=None,
        max_length=2048,
        description=(
            "The device_token of this client's last successful sign-in to this account. "
            "With it, failed attempts count against this device's own small budget, and an "
            "account locked out by failures elsewhere still lets this client in. Browsers "
            "send it as the surge_device cookie instead. An invalid token is ignored."
        ),
    )


class RefreshRequest(BaseModel):
    refresh_token: str = Field(max_length=200)


class LogoutRequest(BaseModel):
    everywhere: bool = False


class TokenRead(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int
    session_id: uuid.UUID
    device_token: str | None = Field(
        default=None,
        description=(
            "After a sign-in: keep it and send it with the next sign-in to this account "
            "(valid AUTH_DEVICE_TTL, revoked by log out everywhere and a password reset). "
            "Also set as the HttpOnly surge_device cookie. Absent after a refresh."
        ),
    )


class AccessTokenRead(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: str
    mfa_enabled: bool
    created_at: datetime


class SessionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    mfa_verified: bool
    ip: str | None
    user_agent: str | None
    current: bool = False


class MfaSetupRead(BaseModel):
    secret: str
    provisioning_uri: str
    backup_codes: list[str] = Field(description="Shown once; each works once.")


class MfaVerifyRequest(BaseModel):
    code: str = Field(max_length=32)


class PrivilegesRead(BaseModel):
    user_id: uuid.UUID
    plan: str
    features: list[str]
    rate_tier: str
    expires_at: datetime | None
    source: str = Field(description="memory | redis | database | stale")


class BatchRequest(BaseModel):
    user_ids: list[uuid.UUID] = Field(min_length=1, max_length=100)
    feature: str | None = Field(default=None, max_length=100)


class BatchItem(BaseModel):
    user_id: uuid.UUID
    found: bool
    plan: str
    allowed: bool | None = None
    features: list[str]


class BatchRead(BaseModel):
    results: list[BatchItem]


class PlanChange(BaseModel):
    plan: str = Field(max_length=50)
    expires_at: datetime | None = None


# ---- password reset (issue 15) ------------------------------------------------------------
class PasswordForgotRequest(BaseModel):
    email: Email


class PasswordForgotAccepted(BaseModel):
    """The same answer for every address: an account is never revealed."""

    detail: str = "If an account uses this address, a reset link is on its way."


class PasswordResetRequest(BaseModel):
    token: str = Field(min_length=16, max_length=200)
    password: Password
