"""The console's read queries (lists with filters). Writes go through the owning services
(identity, wallet, kit.jobs); these reads join what an operator needs on one screen."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def withdrawals(session: AsyncSession, status: str, *, limit: int) -> list[dict[str, Any]]:
    """Withdrawals in ``status`` with their partner's e-mail, oldest first."""
    rows = await session.execute(
        text(
            "SELECT w.id, w.owner_id, u.email, w.amount, w.currency, w.status, w.reason, "
            "w.created_at, w.decided_at FROM wallet_withdrawals w "
            "JOIN users u ON u.id = w.owner_id WHERE w.status = :s "
            "ORDER BY w.created_at, w.id LIMIT :n"
        ),
        {"s": status, "n": limit},
    )
    return [dict(row._mapping) for row in rows]


async def debts(session: AsyncSession, *, limit: int) -> list[dict[str, Any]]:
    """Wallets that owe the platform (ADR 0042), largest debt first, with the owner's e-mail.
    A scan of the account rows (one per owner and currency): an admin page, not a hot path."""
    rows = await session.execute(
        text(
            "SELECT a.owner_id, u.email, a.currency, a.debt, a.balance, "
            "a.balance - a.pending_out AS available, a.updated_at FROM wallet_accounts a "
            "JOIN users u ON u.id = a.owner_id WHERE a.debt > 0 "
            "ORDER BY a.debt DESC, a.id LIMIT :n"
        ),
        {"n": limit},
    )
    return [dict(row._mapping) for row in rows]


async def withdrawal(session: AsyncSession, withdrawal_id: UUID) -> dict[str, Any] | None:
    row = (
        await session.execute(
            text(
                "SELECT w.id, w.owner_id, u.email, w.amount, w.currency, w.status, w.reason "
                "FROM wallet_withdrawals w JOIN users u ON u.id = w.owner_id WHERE w.id = :i"
            ),
            {"i": withdrawal_id},
        )
    ).first()
    return dict(row._mapping) if row else None


async def users(session: AsyncSession, *, search: str | None, limit: int) -> list[dict[str, Any]]:
    """Users with their plan and live sessions, newest first."""
    where = "TRUE"
    params: dict[str, Any] = {"n": limit, "now": datetime.now().astimezone()}
    if search:
        where = "u.email ILIKE :q"
        params["q"] = "%" + search.replace("%", "\\%").replace("_", "\\_") + "%"
    rows = await session.execute(
        text(
            "SELECT u.id, u.email, u.role, u.mfa_enabled, u.created_at, "
            "COALESCE(CASE WHEN s.expires_at IS NULL OR s.expires_at > :now THEN s.plan END, "
            "'free') AS plan, "
            "(SELECT count(*) FROM auth_sessions a WHERE a.user_id = u.id "
            " AND a.revoked_at IS NULL AND a.expires_at > :now) AS sessions "
            f"FROM users u LEFT JOIN subscriptions s ON s.user_id = u.id WHERE {where} "
            "ORDER BY u.created_at DESC LIMIT :n"
        ),
        params,
    )
    return [dict(row._mapping) for row in rows]


async def user(session: AsyncSession, user_id: UUID) -> dict[str, Any] | None:
    found = await users_by_ids(session, [user_id])
    return found[0] if found else None


async def users_by_ids(session: AsyncSession, ids: list[UUID]) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(
            "SELECT u.id, u.email, u.role, (SELECT count(*) FROM auth_sessions a "
            "WHERE a.user_id = u.id AND a.revoked_at IS NULL AND a.expires_at > now()) "
            "AS sessions FROM users u WHERE u.id = ANY(CAST(:ids AS uuid[]))"
        ),
        {"ids": ids},
    )
    return [dict(row._mapping) for row in rows]


async def audit(
    session: AsyncSession,
    *,
    actor: str | None,
    action: str | None,
    subject: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The audit log, newest first, filtered by actor e-mail, action prefix, subject
    (``type`` or ``type:id``) and time."""
    clauses: list[str] = ["TRUE"]
    params: dict[str, Any] = {"n": limit}
    if actor:
        clauses.append("u.email ILIKE :actor")
        params["actor"] = f"%{actor}%"
    if action:
        clauses.append("a.action LIKE :action")
        params["action"] = action.replace("%", "") + "%"
    if subject:
        kind, _, ident = subject.partition(":")
        clauses.append("a.subject_type = :st")
        params["st"] = kind
        if ident:
            clauses.append("a.subject_id = :sid")
            params["sid"] = ident
    if since:
        clauses.append("a.at >= :since")
        params["since"] = since
    if until:
        clauses.append("a.at <= :until")
        params["until"] = until
    rows = await session.execute(
        text(
            "SELECT a.id, a.at, a.actor_id, u.email AS actor, a.action, a.subject_type, "
            "a.subject_id, a.before, a.after, a.request_id FROM audit_log a "
            f"LEFT JOIN users u ON u.id = a.actor_id WHERE {' AND '.join(clauses)} "
            "ORDER BY a.id DESC LIMIT :n"
        ),
        params,
    )
    return [dict(row._mapping) for row in rows]
