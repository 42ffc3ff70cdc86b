"""Domain-free security primitives: signed access tokens, password hashing, TOTP.

    SurgeError
    └── NotAuthenticated (401, WWW-Authenticate: Bearer)
        └── InvalidToken          a token that fails any check (signature, alg, iss, aud, exp, kid, typ)

Nothing here touches a database or Redis: the identity domain decides what a session is and
where revocations live; this package only knows how to sign, verify and hash.
"""

from surge.kit.security.mfa import BackupCodes, Totp
from surge.kit.security.passwords import PasswordHasher
from surge.kit.security.tokens import (
    InvalidToken,
    KeyRing,
    TokenCodec,
    hash_token,
    new_opaque_token,
)

__all__ = [
    "BackupCodes",
    "InvalidToken",
    "KeyRing",
    "PasswordHasher",
    "TokenCodec",
    "Totp",
    "hash_token",
    "new_opaque_token",
]
