"""Verify signed webhooks in Stripe's scheme, over the raw request body.

    SurgeError
    └── BadRequest
        └── InvalidSignature        reason: missing | malformed | mismatch | too_old | too_new

Header: ``Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` where each ``v1`` is
``HMAC-SHA256(secret, "<t>.<raw body>")``. The sender adds one ``v1`` per secret it signs with
while a secret rotates; the receiver accepts the request when *any* ``v1`` matches *any*
secret it holds, so both sides can change secrets without a flag day. The timestamp is
signed too, and a request further than ``tolerance`` from now is refused: a captured request
replayed later fails even with a valid signature (replays inside the window are the
receiver's job: remember event ids).

The body must be the bytes as received: a parsed-and-re-serialised JSON differs (key order,
spaces, escapes) and never verifies — the most common integration bug.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

from surge.kit.errors import BadRequest

SCHEME = "v1"
MAX_HEADER = 4096


class InvalidSignature(BadRequest):
    """The webhook's signature does not verify; ``reason`` says which check failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, extra={"reason": reason})
        self.reason = reason


def compute(secret: str, timestamp: int, payload: bytes) -> str:
    """The hex ``v1`` signature of ``payload`` at ``timestamp`` with ``secret``."""
    return hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + payload, hashlib.sha256
    ).hexdigest()


def header(secrets: Sequence[str], payload: bytes, timestamp: int) -> str:
    """A signature header for ``payload`` (senders and tests)."""
    return ",".join(
        [f"t={timestamp}", *(f"{SCHEME}={compute(s, timestamp, payload)}" for s in secrets)]
    )


def parse(value: str) -> tuple[int, list[str]]:
    """``(timestamp, [v1 signatures])``; ``InvalidSignature`` when unusable."""
    if len(value) > MAX_HEADER:
        raise InvalidSignature("malformed", "The signature header is too long.")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in value.split(","):
        name, sep, content = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not (content.isascii() and content.isdigit() and len(content) <= 12):
                raise InvalidSignature("malformed", "The signature timestamp is not a number.")
            timestamp = int(content)
        elif name == SCHEME:
            signatures.append(content)
    if timestamp is None or not signatures:
        raise InvalidSignature("malformed", f"The signature header lacks t= or {SCHEME}=.")
    return timestamp, signatures


def verify(
    payload: bytes,
    signature_header: str | None,
    secrets: Sequence[str],
    *,
    tolerance: float = 300.0,
    now: Callable[[], float] = time.time,
) -> int:
    """Check ``signature_header`` for the raw ``payload``; returns the signed timestamp.

    Every (signature, secret) pair is compared in constant time (``hmac.compare_digest``),
    and the timestamp is checked only after a signature matched, so an attacker learns
    nothing about the clock from an unsigned request."""
    if not signature_header:
        raise InvalidSignature("missing", "The request is not signed.")
    timestamp, signatures = parse(signature_header)
    matched = False
    for secret in secrets:
        expected = compute(secret, timestamp, payload)
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise InvalidSignature("mismatch", "No signature matches the payload.")
    age = now() - timestamp
    if age > tolerance:
        raise InvalidSignature("too_old", "The signature's timestamp is outside the tolerance.")
    if age < -tolerance:
        raise InvalidSignature("too_new", "The signature's timestamp is in the future.")
    return timestamp
