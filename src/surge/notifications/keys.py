"""Small shared helpers: the clock and the keys derived from ``SECRET_KEY``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

from surge.config import Settings


def now() -> datetime:
    return datetime.now(UTC)


def derive(settings: Settings, purpose: str) -> bytes:
    root = settings.SECRET_KEY.get_secret_value().encode()
    return hmac.new(root, purpose.encode(), hashlib.sha256).digest()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
