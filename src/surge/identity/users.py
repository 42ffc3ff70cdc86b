"""``GET /api/v1/me`` from a cache tier: process memory (LRU) → Redis → PostgreSQL.

Under seed 003's load (issue 19, ADR 0016) ``/me`` was 15 % of the requests and the only
signed-in read that took a pooled connection on every call: with the event loop busy, each
connection stayed checked out for the loop's lag, and the pool's queue (857 waiting at peak)
turned into 503s and 10 s timeouts. Now ``/me`` is answered like privileges are — the same
``kit.cache`` tiers, single-flight, stale-if-error and cross-process invalidation — and warm
requests need no connection at all.

What is cached is the ``UserRead`` view as JSON types (``id``, ``email``, ``role``,
``mfa_enabled``, ``created_at``), already validated; the route sends it as bytes, built once
per cached value.

Invalidation: every write to a field ``/me`` shows calls ``invalidate_on_commit`` in its
unit of work — today only MFA enrolment (``mfa_enabled``; email, role and ``created_at``
are written once, at registration, before anything can be cached, since a miss for an
unknown user raises and caches nothing). After the commit the entry is deleted from this
process's memory, Redis and, through kit.cache's pub/sub, every other process's memory.
``IDENTITY_USER_TTL`` only bounds memory; a missed invalidation (a write outside this
service, a migration) is bounded by it too.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from surge.identity import repository
from surge.identity.schemas import UserRead
from surge.kit.cache import Cache
from surge.kit.db import Database
from surge.kit.errors import NotFound


class UserStore:
    """``/me`` views of users, through ``cache`` (memory → Redis) and the database."""

    def __init__(self, db: Database, cache: Cache) -> None:
        self.db = db
        self.cache = cache
        #: user id → (cached value, its JSON bytes): a memory hit reuses the bytes until
        #: the cache entry is replaced (the value object is the L1 entry itself).
        self._rendered: dict[uuid.UUID, tuple[object, bytes]] = {}
        self._rendered_max = max(1, cache.l1.max_entries)

    async def start(self) -> None:
        await self.cache.start()

    async def close(self) -> None:
        await self.cache.close()

    async def json(self, user_id: uuid.UUID) -> bytes:
        """The ``UserRead`` JSON of ``user_id`` (``NotFound`` for an unknown id)."""

        async def load() -> dict[str, Any]:
            async with self.db.read_session() as session:
                user = await repository.user_by_id(session, user_id)
            if user is None:
                raise NotFound("User not found")
            return UserRead.model_validate(user).model_dump(mode="json")

        result = await self.cache.fetch(str(user_id), load)
        rendered = self._rendered.get(user_id)
        if rendered is not None and rendered[0] is result.value:
            return rendered[1]
        body = orjson.dumps(result.value)
        if len(self._rendered) >= self._rendered_max:
            self._rendered.pop(next(iter(self._rendered)))  # the oldest rendered
        self._rendered[user_id] = (result.value, body)
        return body

    async def warm(self, limit: int) -> int:
        """The most active users' views into memory and Redis, in bulk (at start, like the
        privileges: a cold start otherwise sends each signed-in user's first ``/me`` to
        PostgreSQL as the load arrives). Returns how many were loaded from the database."""
        async with self.db.read_session() as session:
            user_ids = await repository.most_active_users(session, limit)

        async def load_many(keys: Sequence[str]) -> dict[str, Any]:
            async with self.db.read_session() as session:
                users = await repository.users_by_ids(session, [uuid.UUID(k) for k in keys])
            return {str(u.id): UserRead.model_validate(u).model_dump(mode="json") for u in users}

        return await self.cache.warm([str(u) for u in user_ids], load_many)

    def invalidate_on_commit(self, session: AsyncSession, user_id: uuid.UUID) -> None:
        """Forget ``user_id``'s view everywhere once ``session`` commits (never on rollback)."""
        self.cache.invalidate_on_commit(session, keys=[str(user_id)])
        self._rendered.pop(user_id, None)

    async def invalidate(self, user_id: uuid.UUID) -> None:
        await self.cache.delete(str(user_id))
        self._rendered.pop(user_id, None)
