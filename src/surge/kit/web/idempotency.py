"""``Idempotency-Key`` for unsafe requests, stored in PostgreSQL in the request's own
transaction (Stripe's semantics, Brandur's design reduced to one atomic phase).

    SurgeError
    ├── IdempotencyKeyRequired         428: the endpoint requires the header and it is absent
    ├── BadRequest
    │   └── InvalidIdempotencyKey      400: empty or longer than 255 characters
    ├── Conflict
    │   └── IdempotencyKeyInFlight     409 + Retry-After: the first request is still running
    │                                  (only with ``in_flight="conflict"``)
    └── UnprocessableEntity
        └── IdempotencyKeyMismatch     422: the key was used for a different request

How it works: ``claim()`` inserts ``(scope, key, fingerprint)`` in the caller's unit of work
before the handler runs, and ``store()`` writes the response into the same row before the
commit. So the effect and the remembered response commit together or not at all:

- same key, same request (method, path, canonical JSON body) → the first response, replayed
  byte for byte with ``Idempotent-Replayed: true``;
- same key, different request → 422;
- two identical requests at the same moment → by default (``in_flight="wait"``) the second
  one's INSERT waits on the first's unique-index entry, then replays its response (no 409
  window); with ``in_flight="conflict"`` (the IETF Idempotency-Key draft's rule, for
  handlers that call out and may hold the key for seconds) the second gets 409 at once with
  ``Retry-After`` instead of holding a database connection while it waits;
- the first attempt fails or crashes → its transaction rolls back, the key is free again,
  and a retry runs for real (errors are not remembered: nothing happened).

Keys are scoped (e.g. per authenticated subject) and live ``ttl`` (24 h, as Stripe); an
expired key is reclaimed by the next request that uses it, and ``purge()`` deletes old rows.
Requires the ``idempotency_keys`` table (created by the migration that first needed it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import orjson
from fastapi import Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from surge.kit.errors import BadRequest, Conflict, SurgeError, UnprocessableEntity

HEADER = "Idempotency-Key"
#: pg_try_advisory_xact_lock(namespace, hashtext(scope|key)) marks a key's request in flight.
IN_FLIGHT_LOCK_NAMESPACE = 7_421_014
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
#: ``openapi_extra`` of a route that requires the header (it is read from the request, so
#: FastAPI would not document it otherwise).
REQUIRED_HEADER_OPENAPI: dict[str, object] = {
    "parameters": [
        {
            "name": HEADER,
            "in": "header",
            "required": True,
            "description": "The client's name for this effect: a retry with the same key is "
            "answered with the first response and never repeats the effect; missing: 428.",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
        }
    ]
}


class IdempotencyKeyRequired(SurgeError):
    """428 Precondition Required (RFC 6585): the endpoint moves money and refuses to guess
    whether a request without a key is a retry."""

    status_code = 428

    def __init__(self) -> None:
        super().__init__(f"This endpoint requires an {HEADER} header.", extra={"header": HEADER})


class InvalidIdempotencyKey(BadRequest):
    """The header is present but unusable."""


class IdempotencyKeyMismatch(UnprocessableEntity):
    """The key was already used with a different request."""


class IdempotencyKeyInFlight(Conflict):
    """A request with this key is still being processed; retry after it finished."""

    def __init__(self) -> None:
        super().__init__(
            f"A request with this {HEADER} is still in progress; retry shortly.",
            headers={"Retry-After": "1"},
        )


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The first response given under a key."""

    status_code: int
    body: bytes
    content_type: str | None

    def response(self) -> Response:
        return Response(
            self.body,
            status_code=self.status_code,
            media_type=self.content_type,
            headers={REPLAYED_HEADER: "true"},
        )


def fingerprint(method: str, path: str, body: bytes) -> str:
    """A digest of what makes two requests "the same": method, path and the body, with
    JSON canonicalised (key order and whitespace do not make a different request)."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS) if body else b""
    except orjson.JSONDecodeError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class IdempotencyKeys:
    """Claim / store / replay over the ``idempotency_keys`` table."""

    def __init__(self, *, ttl: timedelta = timedelta(hours=24)) -> None:
        self.ttl = ttl

    async def claim(
        self,
        session: AsyncSession,
        *,
        scope: str,
        key: str,
        fingerprint: str,
        in_flight: Literal["wait", "conflict"] = "wait",
    ) -> StoredResponse | None:
        """None when this request owns the key now (run it, then ``store()``); the stored
        response when an identical request already committed; raises on a mismatch, and
        with ``in_flight="conflict"`` raises ``IdempotencyKeyInFlight`` while another
        transaction holds the key."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidIdempotencyKey(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters.")
        if in_flight == "conflict":
            # Held until this transaction ends, so "in flight" is exactly "the first request's
            # transaction is open"; PostgreSQL makes its rows visible before releasing it, so
            # whoever gets the lock next sees the stored response.
            owned = await session.scalar(
                text("SELECT pg_try_advisory_xact_lock(:ns, hashtext(:scope || '|' || :key))"),
                {"ns": IN_FLIGHT_LOCK_NAMESPACE, "scope": scope, "key": key},
            )
            if not owned:
                raise IdempotencyKeyInFlight()
        claimed = (
            await session.execute(
                text(
                    "INSERT INTO idempotency_keys AS k (scope, key, fingerprint) "
                    "VALUES (:scope, :key, :fp) "
                    "ON CONFLICT (scope, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                    "  status_code = NULL, body = NULL, content_type = NULL, created_at = now() "
                    "  WHERE k.created_at < now() - make_interval(secs => :ttl) "
                    "RETURNING 1"
                ),
                {"scope": scope, "key": key, "fp": fingerprint, "ttl": self.ttl.total_seconds()},
            )
        ).scalar_one_or_none()
        if claimed is not None:
            return None
        row = (
            await session.execute(
                text(
                    "SELECT fingerprint, status_code, body, content_type FROM idempotency_keys "
                    "WHERE scope = :scope AND key = :key"
                ),
                {"scope": scope, "key": key},
            )
        ).one()
        if row.fingerprint != fingerprint:
            raise IdempotencyKeyMismatch(
                f"This {HEADER} was already used with a different request."
            )
        if row.status_code is None:  # claimed earlier in this very transaction
            raise IdempotencyKeyMismatch(f"This {HEADER} is already in use by this request.")
        return StoredResponse(int(row.status_code), bytes(row.body or b""), row.content_type)

    async def store(
        self, session: AsyncSession, *, scope: str, key: str, response: Response
    ) -> None:
        """Remember ``response`` under the claimed key (same transaction as the effect)."""
        await session.execute(
            text(
                "UPDATE idempotency_keys SET status_code = :status, body = :body, "
                "content_type = :ctype WHERE scope = :scope AND key = :key"
            ),
            {
                "status": response.status_code,
                "body": bytes(response.body),
                "ctype": response.headers.get("content-type"),
                "scope": scope,
                "key": key,
            },
        )

    async def purge(self, session: AsyncSession) -> int:
        """Delete expired keys; returns how many (run it from a periodic job)."""
        result = await session.execute(
            text(
                "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => :ttl)"
            ),
            {"ttl": self.ttl.total_seconds()},
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def run(
        self,
        request: Request,
        session: AsyncSession,
        *,
        scope: str,
        handler: Callable[[], Awaitable[Response]],
        required: bool = False,
        in_flight: Literal["wait", "conflict"] = "wait",
    ) -> Response:
        """Run ``handler`` at most once per ``Idempotency-Key`` within ``scope``.

        Without the header the handler simply runs (unless ``required``). ``in_flight``:
        what a concurrent duplicate does (see the module docstring)."""
        key = request.headers.get(HEADER)
        if key is None:
            if required:
                raise IdempotencyKeyRequired()
            return await handler()
        body = await request.body()
        stored = await self.claim(
            session,
            scope=scope,
            key=key,
            fingerprint=fingerprint(request.method, request.url.path, body),
            in_flight=in_flight,
        )
        if stored is not None:
            return stored.response()
        response = await handler()
        await self.store(session, scope=scope, key=key, response=response)
        return response


idempotency_keys = IdempotencyKeys()
