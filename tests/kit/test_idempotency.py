"""kit.web.idempotency on real PostgreSQL: claim/store/replay, scopes, expiry, rollback."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest
from sqlalchemy import text
from starlette.responses import Response

from surge.kit.runtime import Runtime
from surge.kit.web.idempotency import (
    IdempotencyKeyInFlight,
    IdempotencyKeyMismatch,
    IdempotencyKeys,
    InvalidIdempotencyKey,
    fingerprint,
)


class TestFingerprint:
    def test_json_key_order_and_spacing_do_not_matter(self) -> None:
        a = fingerprint("POST", "/x", b'{"a": 1, "b": [1, 2]}')
        assert a == fingerprint("post", "/x", b'{"b":[1,2],"a":1}')
        assert a != fingerprint("POST", "/y", b'{"a": 1, "b": [1, 2]}')
        assert a != fingerprint("POST", "/x", b'{"a": 2, "b": [1, 2]}')


class TestKeys:
    async def test_claim_store_replay_and_scopes(self, runtime: Runtime) -> None:
        keys = IdempotencyKeys()
        key, fp = f"k-{uuid4()}", fingerprint("POST", "/x", b"{}")
        async with runtime.db.session() as session:
            assert await keys.claim(session, scope="a", key=key, fingerprint=fp) is None
            await keys.store(session, scope="a", key=key, response=Response(b"first", 201))
        async with runtime.db.session() as session:
            stored = await keys.claim(session, scope="a", key=key, fingerprint=fp)
            assert stored is not None
            assert (stored.status_code, stored.body) == (201, b"first")
            # The same key in another scope (another user) is another key.
            assert await keys.claim(session, scope="b", key=key, fingerprint=fp) is None
        with pytest.raises(IdempotencyKeyMismatch):
            async with runtime.db.session() as session:
                await keys.claim(session, scope="a", key=key, fingerprint="other")
        with pytest.raises(InvalidIdempotencyKey):
            async with runtime.db.session() as session:
                await keys.claim(session, scope="a", key="x" * 256, fingerprint=fp)

    async def test_rolled_back_claim_frees_the_key(self, runtime: Runtime) -> None:
        keys = IdempotencyKeys()
        key = f"k-{uuid4()}"

        async def failing_handler() -> None:
            async with runtime.db.session() as session:
                await keys.claim(session, scope="a", key=key, fingerprint="f1")
                raise RuntimeError("the handler failed")

        with pytest.raises(RuntimeError):
            await failing_handler()
        async with runtime.db.session() as session:  # another body is fine: nothing happened
            assert await keys.claim(session, scope="a", key=key, fingerprint="f2") is None

    async def test_expired_key_is_reclaimed_and_purged(self, runtime: Runtime) -> None:
        keys = IdempotencyKeys(ttl=timedelta(hours=24))
        key = f"k-{uuid4()}"
        async with runtime.db.session() as session:
            await keys.claim(session, scope="a", key=key, fingerprint="old")
            await keys.store(session, scope="a", key=key, response=Response(b"old", 200))
            await session.execute(
                text(
                    "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                    "WHERE scope = 'a' AND key = :k"
                ),
                {"k": key},
            )
        async with runtime.db.session() as session:
            assert await keys.claim(session, scope="a", key=key, fingerprint="new") is None
            await session.execute(
                text(
                    "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                    "WHERE scope = 'a' AND key = :k"
                ),
                {"k": key},
            )
        async with runtime.db.session() as session:
            assert await keys.purge(session) >= 1
            left = await session.scalar(
                text("SELECT count(*) FROM idempotency_keys WHERE scope = 'a' AND key = :k"),
                {"k": key},
            )
        assert left == 0


class TestInFlight:
    """The IETF Idempotency-Key draft: 409 while the first request is in flight."""

    async def test_conflict_while_the_first_is_open_then_replay(self, runtime: Runtime) -> None:
        keys = IdempotencyKeys()
        key, fp = f"k-{uuid4()}", fingerprint("POST", "/x", b"{}")
        async with runtime.db.session() as first:
            assert (
                await keys.claim(first, scope="a", key=key, fingerprint=fp, in_flight="conflict")
                is None
            )
            with pytest.raises(IdempotencyKeyInFlight) as info:
                async with runtime.db.session() as second:
                    await keys.claim(
                        second, scope="a", key=key, fingerprint=fp, in_flight="conflict"
                    )
            assert info.value.status_code == 409
            assert info.value.headers["Retry-After"] == "1"
            await keys.store(first, scope="a", key=key, response=Response(b"done", 201))
        async with runtime.db.session() as third:
            stored = await keys.claim(
                third, scope="a", key=key, fingerprint=fp, in_flight="conflict"
            )
            assert stored is not None
            assert stored.body == b"done"

    async def test_a_rolled_back_first_frees_the_key(self, runtime: Runtime) -> None:
        keys = IdempotencyKeys()
        key = f"k-{uuid4()}"

        async def crashing_request() -> None:
            async with runtime.db.session() as session:
                await keys.claim(session, scope="a", key=key, fingerprint="f", in_flight="conflict")
                raise RuntimeError("crashed")

        with pytest.raises(RuntimeError):
            await crashing_request()
        async with runtime.db.session() as session:
            assert (
                await keys.claim(session, scope="a", key=key, fingerprint="g", in_flight="conflict")
                is None
            )
