"""Access tokens (JWT, RFC 8725 rules) signed with a rotating key ring, and opaque tokens.

Why each check (RFC 8725 §3):
- the algorithm is pinned (``HS256``) and read from *our* configuration, never from the
  token header, so ``alg: none`` and algorithm-confusion tokens are refused before any
  signature work;
- ``kid`` must name a key of the ring; a key removed from the ring (rotated out) stops
  verifying at once, a key still in the ring but no longer first keeps verifying tokens
  it signed until they expire: that is rotation without logging everyone out;
- ``typ`` is ``at+jwt`` (RFC 9068) so a token minted for another purpose is not accepted
  as an access token; ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` and ``jti`` are required.

Refresh tokens are *not* JWTs: they are opaque random strings stored hashed (``hash_token``)
so a database leak does not hand out live sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from surge.kit.errors import NotAuthenticated

ALGORITHM = "HS256"
TOKEN_TYPE = "at+jwt"
#: HS256 keys shorter than the hash output weaken the MAC (RFC 7518 §3.2).
MIN_KEY_BYTES = 32


class InvalidToken(NotAuthenticated):
    """The bearer token is missing, malformed, forged, expired or not meant for us."""

    def __init__(self, message: str = "Invalid or expired access token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


@dataclass(frozen=True)
class KeyRing:
    """Signing keys by id; the first signs, all of them verify.

    Rotation: prepend a new key (it signs from now on), keep the old one for one access-token
    lifetime, then remove it: tokens it signed are refused from that moment.
    """

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key ring needs at least one key")
        for kid, secret in self.keys:
            if len(secret) < MIN_KEY_BYTES:
                raise ValueError(f"signing key {kid!r} is shorter than {MIN_KEY_BYTES} bytes")

    @classmethod
    def parse(cls, spec: str) -> KeyRing:
        """``"kid1=secret1,kid2=secret2"`` (first signs) → a ring."""
        pairs: list[tuple[str, bytes]] = []
        for raw in spec.split(","):
            part = raw.strip()
            if not part:
                continue
            kid, sep, secret = part.partition("=")
            if not sep or not kid.strip() or not secret.strip():
                raise ValueError("signing keys are 'kid=secret' pairs separated by commas")
            pairs.append((kid.strip(), secret.strip().encode()))
        return cls(tuple(pairs))

    @classmethod
    def derived(
        cls, master_secret: str, kid: str = "k0", *, purpose: str = "access-token"
    ) -> KeyRing:
        """One key derived from the application secret (development and small installs).
        ``purpose`` separates keys: a token signed for one purpose fails under another."""
        label = f"surge.{purpose}.{kid}".encode()
        key = hmac.new(master_secret.encode(), label, "sha256")
        return cls(((kid, key.hexdigest().encode()),))

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[0]

    def get(self, kid: str) -> bytes | None:
        # Bytes: compare_digest refuses non-ASCII str, and a kid is the client's input.
        wanted = kid.encode("utf-8", "surrogatepass")
        for known, secret in self.keys:
            if hmac.compare_digest(known.encode(), wanted):
                return secret
        return None


class TokenCodec:
    """Issues and verifies access JWTs for one issuer/audience with a key ring."""

    def __init__(
        self,
        ring: KeyRing,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        leeway: float = 5.0,
        memo_size: int = 65_536,
        clock: Callable[[], float] = time.time,
        token_type: str = TOKEN_TYPE,
    ) -> None:
        self.ring = ring
        #: The header's ``typ``, required on verification (RFC 8725 §3.11: explicit typing,
        #: so a token minted for one purpose is never accepted for another).
        self.token_type = token_type
        #: Wall-clock seconds for issuing and for the exp/nbf/iat checks (tests move it).
        self.clock = clock
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        #: Clock skew tolerated between processes/hosts on exp/iat checks.
        self.leeway = leeway
        #: Tokens already verified, by their exact bytes (signature included), so a client
        #: that sends one token for 15 minutes pays PyJWT's parse + HMAC (≈ 100-200 µs on
        #: the 2-core bench machine under load) once, not per request. Only expiry is
        #: re-checked on a hit; the ring is immutable, so nothing else can change.
        self.memo_size = memo_size
        self._memo: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def issue(
        self, subject: str, claims: Mapping[str, Any] | None = None, *, now: float | None = None
    ) -> str:
        """A signed access token for ``subject``; ``claims`` may not override the registered ones."""
        issued = int(now if now is not None else self.clock())
        payload: dict[str, Any] = dict(claims or {})
        payload.update(
            iss=self.issuer,
            aud=self.audience,
            sub=subject,
            iat=issued,
            nbf=issued,
            exp=issued + int(self.ttl),
            jti=uuid.uuid4().hex,
        )
        kid, key = self.ring.current
        return jwt.encode(
            payload, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": self.token_type}
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or ``InvalidToken`` (never another exception). Callers must
        not mutate the returned dict (it may be shared with later calls)."""
        claims = self._memo.get(token)
        if claims is not None:
            if claims["exp"] + self.leeway <= self.clock():
                self._memo.pop(token, None)
                raise InvalidToken("Access token expired")
            return claims
        try:
            claims = self._verify(token)
        except InvalidToken:
            raise
        except Exception as error:  # whatever a hostile token trips in the parser: 401
            raise InvalidToken("Malformed access token") from error
        if self.memo_size:
            self._memo[token] = claims
            if len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return claims

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken("Malformed access token") from error
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("Access token algorithm not accepted")
        if header.get("typ") != self.token_type:
            raise InvalidToken("Not an access token")
        kid = header.get("kid")
        key = self.ring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("Access token signed with an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                # The time claims are checked below against our clock, not PyJWT's.
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as error:
            raise InvalidToken() from error
        return self._check_times(claims)

    def _check_times(self, claims: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        try:
            exp = float(claims["exp"])
            not_before = float(claims.get("nbf", claims["iat"]))
            issued = float(claims["iat"])
        except (TypeError, ValueError) as error:
            raise InvalidToken() from error
        if exp + self.leeway <= now:
            raise InvalidToken("Access token expired")
        if not_before - self.leeway > now or issued - self.leeway > now:
            raise InvalidToken("Access token not yet valid")
        return claims


def new_opaque_token(nbytes: int = 32) -> str:
    """A random bearer secret (256 bits by default), URL-safe."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """SHA-256 of a high-entropy token: safe to store, cheap to look up (no salt needed:
    the input is random, not a password)."""
    return hashlib.sha256(token.encode()).hexdigest()
