"""Identity's SQL. Functions take the session first; they flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from surge.identity.plans import Grant
from surge.kit.db import driver_fetch
from surge.kit.web.cursor import moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.identity import AuthSession, RefreshToken, Subscription, User
from surge.models.password_reset import PasswordResetToken

#: Rows changed this long before the view's last refresh are still read from the table:
#: longer than any transaction may run (statement_timeout 30 s), so a plan change that
#: committed while the refresh was running is never missed.
VIEW_OVERLAY_MARGIN = "5 minutes"
SESSIONS_OLDEST_FIRST = Keyset((AuthSession.created_at, AuthSession.id), (moment, uuid.UUID))


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == email.lower()))
    return result.scalar_one_or_none()


async def is_new_device(session: AsyncSession, user_id: uuid.UUID, user_agent: str | None) -> bool:
    """True when the user signed in before, but never with this user agent (the first
    sign-in after registering is not a "new device")."""
    row = (
        await session.execute(
            select(
                func.count(),
                func.count().filter(AuthSession.user_agent.is_not_distinct_from(user_agent)),
            ).where(AuthSession.user_id == user_id)
        )
    ).one()
    return bool(row[0]) and not row[1]


async def user_by_email_skeleton(session: AsyncSession, key: str) -> User | None:
    result = await session.execute(select(User).where(User.email_skeleton == key))
    return result.scalar_one_or_none()


async def user_by_id(
    session: AsyncSession, user_id: uuid.UUID, *, for_update: bool = False
) -> User | None:
    statement = select(User).where(User.id == user_id)
    if for_update:
        statement = statement.with_for_update()
    result = await session.execute(statement)
    return result.scalar_one_or_none()


async def users_by_ids(session: AsyncSession, user_ids: Sequence[uuid.UUID]) -> list[User]:
    """The users among ``user_ids`` (any order; unknown ids left out): bulk loads."""
    result = await session.execute(select(User).where(User.id.in_(list(user_ids))))
    return list(result.scalars().all())


async def live_sessions(
    session: AsyncSession, user_id: uuid.UUID, *, now: datetime
) -> Sequence[AuthSession]:
    """The user's unrevoked, unexpired sessions, oldest first."""
    result = await session.execute(
        select(AuthSession)
        .where(
            AuthSession.user_id == user_id,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > now,
        )
        .order_by(AuthSession.created_at, AuthSession.id)
    )
    return result.scalars().all()


async def session_page(
    session: AsyncSession, user_id: uuid.UUID, *, now: datetime, limit: int, cursor: str | None
) -> Slice[AuthSession]:
    """The user's live sessions, oldest first, one page."""
    statement = select(AuthSession).where(
        AuthSession.user_id == user_id,
        AuthSession.revoked_at.is_(None),
        AuthSession.expires_at > now,
    )
    return await keyset_page(
        session, statement, SESSIONS_OLDEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def refresh_token_for_update(
    session: AsyncSession, token_hash: str
) -> tuple[RefreshToken, AuthSession] | None:
    """The token and its session, both locked: two concurrent refreshes serialise here."""
    result = await session.execute(
        select(RefreshToken, AuthSession)
        .join(AuthSession, AuthSession.id == RefreshToken.session_id)
        .where(RefreshToken.token_hash == token_hash)
        .with_for_update()
    )
    row = result.first()
    return (row[0], row[1]) if row is not None else None


async def revocation_state(
    session: AsyncSession, session_id: uuid.UUID
) -> tuple[datetime | None, datetime | None] | None:
    """``(session.revoked_at, user.tokens_valid_after)``; None when the session is unknown."""
    result = await session.execute(
        select(AuthSession.revoked_at, User.tokens_valid_after)
        .join(User, User.id == AuthSession.user_id)
        .where(AuthSession.id == session_id)
    )
    row = result.first()
    return (row[0], row[1]) if row is not None else None


async def revoke_sessions(
    session: AsyncSession, session_ids: Sequence[uuid.UUID], *, now: datetime, reason: str
) -> list[uuid.UUID]:
    """Revoke the still-live ones among ``session_ids``; returns those it revoked."""
    if not session_ids:
        return []
    result = await session.execute(
        update(AuthSession)
        .where(AuthSession.id.in_(session_ids), AuthSession.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .returning(AuthSession.id)
    )
    return list(result.scalars().all())


async def recent_revocations(
    session: AsyncSession, *, since: datetime
) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, datetime]]]:
    """Sessions revoked and users' not-before set since ``since`` (to replay into Redis)."""
    sessions = await session.execute(select(AuthSession.id).where(AuthSession.revoked_at > since))
    users = await session.execute(
        select(User.id, User.tokens_valid_after).where(User.tokens_valid_after > since)
    )
    return list(sessions.scalars().all()), [
        (row[0], row[1]) for row in users.all() if row[1] is not None
    ]


async def consume_totp_step(session: AsyncSession, user_id: uuid.UUID, step: int) -> bool:
    """Record ``step`` as used unless it (or a later one) already was: compare-and-set, so
    two requests racing with one code cannot both succeed."""
    result = await session.execute(
        update(User)
        .where(
            User.id == user_id,
            (User.mfa_last_step.is_(None)) | (User.mfa_last_step < step),
        )
        .values(mfa_last_step=step)
        .returning(User.id)
    )
    return result.first() is not None


async def consume_backup_code(session: AsyncSession, user_id: uuid.UUID, digest: str) -> bool:
    result = await session.execute(
        text(
            "UPDATE users SET mfa_backup_codes = array_remove(mfa_backup_codes, :d) "
            "WHERE id = :id AND :d = ANY(mfa_backup_codes) RETURNING id"
        ),
        {"d": digest, "id": user_id},
    )
    return result.first() is not None


# ---- subscriptions and privileges --------------------------------------------------------


async def subscription_for_update(session: AsyncSession, user_id: uuid.UUID) -> Subscription | None:
    result = await session.execute(
        select(Subscription).where(Subscription.user_id == user_id).with_for_update()
    )
    return result.scalar_one_or_none()


async def upsert_subscription(
    session: AsyncSession, user_id: uuid.UUID, *, plan: str, expires_at: datetime | None
) -> None:
    statement = insert(Subscription).values(user_id=user_id, plan=plan, expires_at=expires_at)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[Subscription.user_id],
            set_={"plan": plan, "expires_at": expires_at, "updated_at": text("now()")},
        )
    )


# Straight to the driver (issue 19): a batch of 50 through the ORM session cost more CPU in
# the web process than the rest of the batch check; the ordinal maps rows back to the ids
# asked for without converting 50 UUIDs. Row: ordinal, found, changed, live plan/expiry,
# view plan/expiry.
_GRANTS_SQL = f"""
    WITH ids AS (SELECT id, n FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n)),
    mark AS (
        SELECT refreshed_at - interval '{VIEW_OVERLAY_MARGIN}' AS since
        FROM view_refreshes WHERE name = 'active_subscriptions'
    )
    SELECT ids.n,
           u.id IS NOT NULL,
           s.user_id IS NOT NULL,
           s.plan, s.expires_at,
           a.plan, a.expires_at
    FROM ids
    LEFT JOIN users u ON u.id = ids.id
    LEFT JOIN active_subscriptions a ON a.user_id = ids.id
    LEFT JOIN subscriptions s
           ON s.user_id = ids.id
          AND s.updated_at > COALESCE((SELECT since FROM mark), '-infinity')
    """
_Id = TypeVar("_Id", uuid.UUID, str)


async def grants(session: AsyncSession, user_ids: Sequence[_Id]) -> dict[_Id, Grant]:
    """Each user's plan from the ``active_subscriptions`` view (seed 003), overlaid with the
    subscriptions changed since the view's last refresh so a plan change counts at once.
    Keyed by the ids as given: UUIDs, or their text (the cache's keys, no conversion).

    Through ``kit.db.driver_fetch`` like every driver statement: counted by the slow-query
    log, and a broken connection raised as the ``DBAPIError`` ``is_unavailable`` reads as an
    outage (a 503, stale-if-error), never a 500."""
    ids = list(user_ids)
    rows = await driver_fetch(session, _GRANTS_SQL, ids)
    out: dict[_Id, Grant] = {}
    for n, found, changed, live_plan, live_expires, view_plan, view_expires in rows:
        if changed:
            plan, expires = live_plan, live_expires
        else:
            plan, expires = view_plan, view_expires
        out[ids[n - 1]] = Grant(plan=plan or "free", expires_at=expires, found=found)
    return out


async def active_user_count(session: AsyncSession, since: datetime) -> int:
    """Distinct users with a live session used since ``since`` (seed 002 "active users")."""
    count = await session.scalar(
        select(func.count(func.distinct(AuthSession.user_id))).where(
            AuthSession.revoked_at.is_(None), AuthSession.last_used_at >= since
        )
    )
    return int(count or 0)


async def most_active_users(session: AsyncSession, limit: int) -> list[uuid.UUID]:
    """Users with the most recently used live sessions (cache warming)."""
    result = await session.execute(
        text(
            "SELECT user_id FROM auth_sessions WHERE revoked_at IS NULL "
            "GROUP BY user_id ORDER BY max(last_used_at) DESC LIMIT :n"
        ),
        {"n": limit},
    )
    return list(result.scalars().all())


async def free_user_ids(session: AsyncSession) -> bytes:
    """Every user with no subscription row at all (never paid, so "free" with no doubt), as
    one ``bytea``: their ids as 16-byte big-endian UUIDs, ascending (PostgreSQL orders
    ``uuid`` bytewise), concatenated. One statement, so one consistent snapshot; no row
    object per user on the way (``identity.free_users``)."""
    blob = await session.scalar(
        text(
            "SELECT string_agg(uuid_send(u.id), ''::bytea ORDER BY u.id) FROM users u "
            "WHERE NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = u.id)"
        )
    )
    return bytes(blob or b"")


async def subscribed_user_ids(session: AsyncSession) -> list[uuid.UUID]:
    """Every user with a subscription row (paying, expired or cancelled): the users the
    free snapshot leaves to the cache tiers (start-up warming)."""
    result = await session.execute(text("SELECT user_id FROM subscriptions"))
    return list(result.scalars().all())


async def try_view_refresh_lock(session: AsyncSession, key: int) -> bool:
    """A transaction-scoped advisory lock: one view refresh at a time across processes."""
    return bool(await session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}))


async def view_refreshed_within(session: AsyncSession, name: str, seconds: float) -> bool:
    fresh = await session.scalar(
        text(
            "SELECT refreshed_at > now() - make_interval(secs => :age) "
            "FROM view_refreshes WHERE name = :name"
        ),
        {"age": seconds, "name": name},
    )
    return bool(fresh)


#: Seconds of ``VIEW_OVERLAY_MARGIN``: a row written this long before the last refresh may
#: have committed after the refresh's snapshot, so it still counts as a change.
VIEW_CHANGE_MARGIN = 300.0

_UNCHANGED_SQL = """
    WITH mark AS (
        SELECT refreshed_at FROM view_refreshes WHERE name = 'active_subscriptions'
    )
    SELECT (SELECT refreshed_at FROM mark) IS NOT NULL
       AND NOT EXISTS (
           SELECT 1 FROM subscriptions s
           LEFT JOIN active_subscriptions a ON a.user_id = s.user_id
           WHERE s.updated_at > (SELECT refreshed_at FROM mark) - make_interval(secs => :margin)
             AND CASE WHEN a.user_id IS NULL
                      THEN s.plan <> 'free' AND (s.expires_at IS NULL
                                                 OR s.expires_at > (SELECT refreshed_at FROM mark))
                      ELSE a.plan IS DISTINCT FROM s.plan
                           OR a.expires_at IS DISTINCT FROM s.expires_at
                 END)
       AND (SELECT count(*) FROM active_subscriptions) = (
           SELECT count(*) FROM subscriptions
           WHERE plan <> 'free'
             AND (expires_at IS NULL OR expires_at > (SELECT refreshed_at FROM mark)))
    """


async def active_subscriptions_unchanged(
    session: AsyncSession, margin: float | None = None
) -> bool:
    """True when a refresh of ``active_subscriptions`` would change nothing a reader sees:
    every subscription written since the last refresh (less ``margin`` seconds, default
    ``VIEW_CHANGE_MARGIN``: a write may commit after a snapshot taken after it started) is
    in the view exactly as in the table — or rightly absent — and none was deleted (the view
    holds as many rows as the table had live ones at the refresh). A subscription that
    merely expired since is still in the view, with its ``expires_at``: the read path
    answers it as expired already. The recent writes (by ``ix_subscriptions_updated_at``)
    and two counts, instead of rebuilding and diffing the whole view (issue 19: a refresh of
    every paying user each minute was the load run's latency spike)."""
    unchanged = await session.scalar(
        text(_UNCHANGED_SQL), {"margin": VIEW_CHANGE_MARGIN if margin is None else margin}
    )
    return bool(unchanged)


async def refresh_active_subscriptions(session: AsyncSession) -> None:
    """``REFRESH MATERIALIZED VIEW CONCURRENTLY`` (readers are not blocked) and record when:
    now() is the transaction start, before the refresh's snapshot: conservative."""
    await session.execute(text("REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions"))
    await session.execute(
        text(
            "INSERT INTO view_refreshes (name, refreshed_at) "
            "VALUES ('active_subscriptions', now()) "
            "ON CONFLICT (name) DO UPDATE SET refreshed_at = excluded.refreshed_at"
        )
    )


async def user_session(session: AsyncSession, session_id: uuid.UUID) -> AuthSession | None:
    return await session.get(AuthSession, session_id)


# ---- password reset (surge.identity.recovery) --------------------------------------------
async def reset_token_for_update(
    session: AsyncSession, token_hash: str
) -> PasswordResetToken | None:
    """The reset token with that hash, locked (one reset per token under a race)."""
    return await session.scalar(
        select(PasswordResetToken)
        .where(PasswordResetToken.token_hash == token_hash)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


async def supersede_reset_tokens(
    session: AsyncSession, user_id: uuid.UUID, *, now: datetime
) -> int:
    """Spend every live reset token of the user (a newer request, or the reset itself)."""
    result = await session.execute(
        update(PasswordResetToken)
        .where(PasswordResetToken.user_id == user_id, PasswordResetToken.used_at.is_(None))
        .values(used_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)
