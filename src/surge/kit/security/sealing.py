"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) with a key
derived from the application's ``SECRET_KEY``.

    sealer = Sealer(settings.SECRET_KEY.get_secret_value(), purpose="credentials")
    token = sealer.seal("hunter2")          # store this
    sealer.open(token)                      # "hunter2"; InvalidToken if altered or foreign

``purpose`` separates keys: a token sealed for one purpose does not open under another.
Rotating SECRET_KEY needs the stored tokens re-sealed (MultiFernet could carry both keys).
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

__all__ = ["InvalidToken", "Sealer"]


class Sealer:
    def __init__(self, secret: str, *, purpose: str) -> None:
        key = hashlib.sha256(f"surge:{purpose}:".encode() + secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def open(self, token: str) -> str:
        return self._fernet.decrypt(token.encode()).decode()
