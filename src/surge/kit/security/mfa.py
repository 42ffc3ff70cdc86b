"""TOTP (RFC 6238, pyotp) with replay prevention, and single-use backup codes.

pyotp leaves replay prevention to the application: a code stays valid for its 30 s step
(± ``valid_window``), so an observed code could be used twice. ``Totp.verify`` returns the
time step the code matched and refuses any step not strictly after the last accepted one;
the caller stores that step atomically with the login (compare-and-set), which also stops
two concurrent requests from both using one code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import pyotp

#: Alphabet without look-alike characters (0/O, 1/I/L) for codes read off paper.
_BACKUP_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


class Totp:
    """Stateless TOTP helper; the per-user secret and last-used step live with the caller."""

    def __init__(self, *, issuer: str, interval: int = 30, valid_window: int = 1) -> None:
        self.issuer = issuer
        self.interval = interval
        #: Steps accepted either side of now: 1 tolerates a phone clock 30 s off.
        self.valid_window = valid_window

    @staticmethod
    def new_secret() -> str:
        return pyotp.random_base32()

    def provisioning_uri(self, secret: str, account: str) -> str:
        return pyotp.TOTP(secret, interval=self.interval).provisioning_uri(
            name=account, issuer_name=self.issuer
        )

    def now(self, secret: str, *, at: float | None = None) -> str:
        """The current code (tests, tooling)."""
        return pyotp.TOTP(secret, interval=self.interval).at(
            int(at if at is not None else time.time())
        )

    def verify(
        self, secret: str, code: str, *, last_step: int | None, at: float | None = None
    ) -> int | None:
        """The matched time step when ``code`` is valid and newer than ``last_step``, else None."""
        code = code.strip().replace(" ", "")
        if not code.isdigit() or len(code) != 6:
            return None
        totp = pyotp.TOTP(secret, interval=self.interval)
        moment = int(at if at is not None else time.time())
        current = moment // self.interval
        for offset in range(-self.valid_window, self.valid_window + 1):
            step = current + offset
            if last_step is not None and step <= last_step:
                continue
            if hmac.compare_digest(totp.generate_otp(step), code):
                return step
        return None


class BackupCodes:
    """Ten single-use recovery codes, stored as hashes (HMAC with a server key)."""

    def __init__(self, key: bytes, *, count: int = 10, length: int = 10) -> None:
        self.key = key
        self.count = count
        self.length = length

    def generate(self) -> list[str]:
        return [
            "".join(secrets.choice(_BACKUP_ALPHABET) for _ in range(self.length))
            for _ in range(self.count)
        ]

    def digest(self, code: str) -> str:
        normalized = code.strip().replace("-", "").replace(" ", "").upper()
        return hmac.new(self.key, normalized.encode(), hashlib.sha256).hexdigest()

    def match(self, code: str, stored: list[str]) -> str | None:
        """The stored digest ``code`` matches (to be removed by the caller), or None."""
        candidate = self.digest(code)
        for digest in stored:
            if hmac.compare_digest(candidate, digest):
                return digest
        return None
