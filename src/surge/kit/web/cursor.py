"""Opaque keyset-pagination cursors: base64url of the last row's sort key, e.g.
``(created_at, id)``, joined with ``|``.

A cursor comes back from the client, so it is input like any other: ``decode_cursor``
parses each part with the parser the listing names and turns anything this API could not
have issued into ``InvalidCursor`` (400 problem+json), including well-formed values the
database or the driver would refuse later (a naive or out-of-range timestamp, an integer
past BIGINT) — those would otherwise surface as 500s.

    after = decode_cursor(cursor, moment, uuid.UUID)     # (datetime, UUID)
    next_cursor = encode_cursor(last.created_at, last.id)
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from surge.kit.errors import BadRequest

#: Timestamps a cursor may carry: rows are never older or much newer than this.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
_BIGINT_DIGITS = 18  # every 18-digit number fits in a signed 64-bit integer


class InvalidCursor(BadRequest):
    """The cursor was not produced by this API (or was altered)."""


def encode_cursor(*values: object) -> str:
    """The cursor after a row whose sort key is ``values`` (datetimes as ISO 8601)."""
    text = "|".join(v.isoformat() if isinstance(v, datetime) else str(v) for v in values)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *parsers: Callable[[str], Any]) -> tuple[Any, ...]:
    """The values of ``cursor``, one per parser (``moment``, ``bigint``, ``uuid.UUID``...)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        parts = text.split("|")
        if len(parts) != len(parsers):
            raise ValueError("wrong number of parts")
        return tuple(parse(part) for parse, part in zip(parsers, parts, strict=True))
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as error:
        raise InvalidCursor("Invalid cursor.") from error


def moment(text: str) -> datetime:
    """A timezone-aware timestamp between ``EARLIEST`` and ``LATEST``."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None or not EARLIEST <= value <= LATEST:
        raise ValueError("timestamp out of range")
    return value


def bigint(text: str) -> int:
    """A non-negative integer that fits in PostgreSQL's BIGINT (ASCII digits only)."""
    if not (text.isascii() and text.isdigit() and len(text) <= _BIGINT_DIGITS):
        raise ValueError("not a BIGINT key")
    return int(text)
