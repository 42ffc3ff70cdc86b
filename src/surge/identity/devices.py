"""Device tokens: the account-wide login lock-out is not a denial of service (ADR 0044).

OWASP's "Slow Down Online Guessing Attacks with Device Cookies": every successful sign-in
gives the client a *device token*, a signed statement "this client signed in to account U".
A later sign-in to U that presents a trusted device token is judged by that device's own
failure budget (``AUTH_LOGIN_MAX_FAILURES_DEVICE``), not the account's: an attacker who
spends the account's budget from many addresses locks out only clients *without* a
trusted token, never the owner on a device they signed in from before.

A token is trusted for a sign-in when, and only when:
- its signature verifies (HS256 under a key derived from ``SECRET_KEY`` for this purpose
  alone, ``typ: device+jwt``; an access token is not a device token, nor the reverse) and
  it has not expired (``AUTH_DEVICE_TTL``);
- it names the account the e-mail belongs to (``sub``): another account's token is no token;
- its ``gen`` equals the account's current ``tokens_valid_after``: "log out everywhere" and
  a password reset move that value, which revokes every device token issued before.

Checking needs no I/O of its own: the signature is CPU only and the account row is the one
the sign-in reads anyway. Nothing here runs on the per-request authentication path.

Transport: the token is a field of ``POST /api/v1/auth/login`` (``device_token`` in the
request and in the response) and, for browsers, an ``HttpOnly``, ``SameSite=Strict``
cookie (``surge_device``) whose path is the sign-in endpoint only (the JSON API's, and the
console's form).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from starlette.responses import Response

from surge.config import Settings
from surge.kit.security import InvalidToken, KeyRing, TokenCodec

#: The cookie that carries a browser's device token to a sign-in endpoint (and nowhere else).
DEVICE_COOKIE = "surge_device"
TOKEN_TYPE = "device+jwt"


@dataclass(frozen=True)
class DeviceClaims:
    """What a signed, unexpired device token says (not yet matched to an account)."""

    user_id: uuid.UUID
    device_id: str
    generation: int


def generation(tokens_valid_after: datetime | None) -> int:
    """The account's sign-out generation: ``tokens_valid_after`` in milliseconds (0: never)."""
    return 0 if tokens_valid_after is None else round(tokens_valid_after.timestamp() * 1000)


class DeviceTokens:
    """Issues and checks device tokens (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        ring = KeyRing.derived(settings.SECRET_KEY.get_secret_value(), "d0", purpose="device")
        self.ttl = settings.AUTH_DEVICE_TTL.total_seconds()
        self.codec = TokenCodec(
            ring,
            issuer=settings.AUTH_JWT_ISSUER,
            audience=settings.AUTH_JWT_AUDIENCE,
            ttl=self.ttl,
            memo_size=0,  # sign-ins only: nothing worth remembering between them
            token_type=TOKEN_TYPE,
        )

    def issue(self, user_id: uuid.UUID, tokens_valid_after: datetime | None) -> str:
        """A new device token (a new device id) for ``user_id``, revoked by the next
        "log out everywhere" or password reset."""
        # The token's own ``jti`` is the device id: every sign-in starts a new device, so a
        # copy stolen earlier no longer shares a budget with the owner's current token.
        return self.codec.issue(str(user_id), {"gen": generation(tokens_valid_after)})

    def read(self, token: str | None) -> DeviceClaims | None:
        """The claims of a genuine, unexpired device token; None for anything else (absent,
        forged, expired, an access token, garbage): such a client is untrusted, not refused."""
        if not token:
            return None
        try:
            claims = self.codec.verify(token)
            return DeviceClaims(
                user_id=uuid.UUID(str(claims["sub"])),
                device_id=uuid.UUID(str(claims["jti"])).hex,
                generation=int(claims["gen"]),
            )
        except (InvalidToken, KeyError, ValueError, TypeError):
            return None

    @staticmethod
    def trusted(
        claims: DeviceClaims | None, user_id: uuid.UUID, tokens_valid_after: datetime | None
    ) -> str | None:
        """The device id when ``claims`` vouch for this account and were not revoked since."""
        if claims is None or claims.user_id != user_id:
            return None
        if claims.generation != generation(tokens_valid_after):
            return None
        return claims.device_id


def set_device_cookie(response: Response, token: str, settings: Settings, *, path: str) -> None:
    """Hand a browser its device token, sent back to the sign-in endpoint at ``path`` only."""
    response.set_cookie(
        DEVICE_COOKIE,
        token,
        max_age=int(settings.AUTH_DEVICE_TTL.total_seconds()),
        path=path,
        httponly=True,
        samesite="strict",
        secure=settings.is_production,
    )
