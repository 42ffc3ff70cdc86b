"""Seed 003 as its users would try it: privilege checks and ``/me`` from signed-in users.

Population (``prepare``): ``population`` users (default 300 000) on a plan mix (60 % free,
20 % plus, 15 % pro, 5 % ultra), inserted by set-based SQL in chunks (one argon2 hash for all:
nobody logs in with a password here), the ``active_subscriptions`` view refreshed; ``users``
of them (default 10 000, drawn with the run's seed) signed in: one ``auth_sessions`` row each,
and an access token minted directly with the kit's token signer (``TokenCodec``, the server's
key ring), not through ``/auth/login``. One service caller (an admin with MFA) sends the
batch checks.

Steps (per user action, after an exponential think time):
- 80 % ``GET /api/v1/me/privileges``
- 15 % ``GET /api/v1/me``
- 5 % ``POST /api/v1/privileges/batch``: the service caller checks 50 random users.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bench.load.scenario import Call, Context, Step, User, bearer

NAME = "seed003"
THINK = 5.0
PLAN_MIX = (("free", 0.60), ("plus", 0.20), ("pro", 0.15), ("ultra", 0.05))
CHUNK = 25_000
BATCH_SIZE = 50
#: Tokens outlive any run (a capacity search takes several minutes).
TOKEN_TTL = timedelta(hours=6)


def privileges(user: User, rng: random.Random, ctx: Context) -> list[Call]:
    return [Call("GET", "/api/v1/me/privileges", bearer(user.token))]


def me(user: User, rng: random.Random, ctx: Context) -> list[Call]:
    return [Call("GET", "/api/v1/me", bearer(user.token))]


def batch(user: User, rng: random.Random, ctx: Context) -> list[Call]:
    ids = [u.id for u in rng.sample(ctx.users, min(BATCH_SIZE, len(ctx.users)))]
    body = orjson.dumps({"user_ids": ids, "feature": "api_access"})
    headers = {**bearer(ctx.service_token), "Content-Type": "application/json"}
    return [Call("POST", "/api/v1/privileges/batch", headers, body)]


STEPS = [
    Step("privileges", 80, privileges, static=True),
    Step("me", 15, me, static=True),
    Step("batch", 5, batch),
]


# ---- warm start (``surge load --warm-cache``) ------------------------------------------------


async def warm(base: str, population: list[User], service_token: str) -> int:
    """The cache tiers in steady state before the run: every population user's plan read
    once through the batch endpoint (so it sits in Redis, and in the memory of whichever
    process served it). In steady state the batch caller's 5 000 random lookups a second
    over 300 000 users check each user every minute, inside the 5-minute Redis TTL; a cold
    start instead loads nearly every batch from PostgreSQL (12 ms of CPU per batch against
    1.2 ms from Redis: ADR 0016). Returns the users warmed."""
    import asyncio

    import httpx

    ids = [u.id for u in population]
    chunks = [ids[i : i + 100] for i in range(0, len(ids), 100)]
    headers = {**bearer(service_token), "Content-Type": "application/json"}
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as client:

        async def one(chunk: list[str]) -> None:
            async with gate:
                body = orjson.dumps({"user_ids": chunk})
                response = await client.post("/api/v1/privileges/batch", content=body)
                response.raise_for_status()

        await asyncio.gather(*(one(c) for c in chunks))
    return len(ids)


# ---- population -----------------------------------------------------------------------------


async def prepare(
    database_url: str,
    settings: Any,
    *,
    population: int,
    signed_in: int,
    seed: int,
    progress: Callable[[str, int, int], None],
) -> tuple[list[User], list[User], str]:
    """(signed-in users, the whole population, the service caller's token)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from surge.identity.service import key_ring
    from surge.kit.security import PasswordHasher
    from surge.kit.security.tokens import TokenCodec

    password_hash = PasswordHasher().hash_sync(uuid.uuid4().hex)  # nobody signs in with it
    engine = create_async_engine(database_url)
    rng = random.Random(seed)
    try:
        for lo in range(1, population + 1, CHUNK):
            hi = min(population, lo + CHUNK - 1)
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO users (email, password_hash, role) "
                        "SELECT 'load' || g || '@seed003.test', :h, 'user' "
                        "FROM generate_series(CAST(:lo AS int), CAST(:hi AS int)) g"
                    ),
                    {"h": password_hash, "lo": lo, "hi": hi},
                )
            progress("users", hi, population)
        async with engine.begin() as conn:
            # The plan mix by a hash of the id: stable for a seed, no per-row round trip.
            bounds, acc = [], 0.0
            for plan, share in PLAN_MIX:
                acc += share
                bounds.append((plan, int(acc * 1000)))
            case = " ".join(
                f"WHEN abs(hashtext(id::text || :seed)) % 1000 < {bound} THEN '{plan}'"
                for plan, bound in bounds
            )
            await conn.execute(
                text(
                    "INSERT INTO subscriptions (user_id, plan, expires_at) "
                    f"SELECT id, p, now() + interval '30 days' FROM ("
                    f"  SELECT id, CASE {case} END AS p FROM users WHERE role = 'user') s "
                    "WHERE p <> 'free'"
                ),
                {"seed": str(seed)},
            )
            await conn.execute(text("REFRESH MATERIALIZED VIEW active_subscriptions"))
            await conn.execute(text("UPDATE view_refreshes SET refreshed_at = now()"))
            progress("plans", 1, 1)
            ids = await conn.execute(text("SELECT id::text FROM users WHERE role = 'user'"))
            everyone = [str(i) for i in ids.scalars().all()]
            chosen = rng.sample(everyone, min(signed_in, len(everyone)))
            expires = datetime.now(UTC) + timedelta(days=30)
            rows = (
                await conn.execute(
                    text(
                        "INSERT INTO auth_sessions (user_id, expires_at) "
                        "SELECT CAST(u AS uuid), :e FROM unnest(CAST(:ids AS text[])) u "
                        "RETURNING id::text, user_id::text"
                    ),
                    {"ids": chosen, "e": expires},
                )
            ).all()
            admin_id = (
                await conn.execute(
                    text(
                        "INSERT INTO users (email, password_hash, role, mfa_enabled) "
                        "VALUES ('service@seed003.test', :h, 'admin', true) RETURNING id::text"
                    ),
                    {"h": password_hash},
                )
            ).scalar_one()
            admin_sid = (
                await conn.execute(
                    text(
                        "INSERT INTO auth_sessions (user_id, expires_at, mfa_verified) "
                        "VALUES (CAST(:u AS uuid), :e, true) RETURNING id::text"
                    ),
                    {"u": admin_id, "e": expires},
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    codec = TokenCodec(
        key_ring(settings),
        issuer=settings.AUTH_JWT_ISSUER,
        audience=settings.AUTH_JWT_AUDIENCE,
        ttl=TOKEN_TTL.total_seconds(),
    )
    users = []
    for n, (sid, user_id) in enumerate(rows, 1):
        token = codec.issue(user_id, {"sid": sid, "role": "user", "mfa": False, "amr": ["pwd"]})
        users.append(User(user_id, token))
        if n % 2000 == 0 or n == len(rows):
            progress("tokens", n, len(rows))
    service = codec.issue(
        admin_id, {"sid": admin_sid, "role": "admin", "mfa": True, "amr": ["pwd", "otp"]}
    )
    population_users = [User(i) for i in everyone]
    return users, population_users, service
