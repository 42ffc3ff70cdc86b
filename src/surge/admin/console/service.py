"""The console's actions: each one checked (an administrator, not a read-only one), done
through the owning service, and audited with actor, request id, before and after — in the
request's unit of work, so an action and its audit row commit together.

    ConsoleError (surge.admin.console.session)
    ├── ConsoleSignInRequired (401)
    ├── ConsoleForbidden (403)      read-only administrators see everything, change nothing
    └── CrossSiteRefused (403)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.admin.console import repository
from surge.admin.console.session import Caller, ConsoleForbidden
from surge.audit.approvals import approvals as approvals_service
from surge.audit.service import audit as audit_service
from surge.credential.service import IssuedKey
from surge.credential.service import credential as credential_service
from surge.identity.principal import Principal
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from surge.kit.breaker import breakers
from surge.kit.errors import NotFound, SurgeError, UnprocessableEntity
from surge.kit.jobs.queue import (
    BULK_ACTIONS,
    JobFilter,
    bulk_apply,
    bulk_count,
    pause_queue,
    paused_queues,
    resume_queue,
)
from surge.kit.runtime import Runtime
from surge.kit.web.pagination import Slice
from surge.models.audit import AdminApproval
from surge.models.credential import ServiceKey
from surge.models.operations import Operation
from surge.operations.service import operations as operations_service
from surge.wallet.service import changed_owners, stats_key
from surge.wallet.service import wallet as wallet_service

log = structlog.get_logger()

#: A bulk job action changes at most this many jobs per confirmation.
BULK_LIMIT = 10_000


@dataclass(frozen=True)
class ItemResult:
    id: str
    ok: bool
    detail: str


def _require_admin(caller: Caller) -> Principal:
    if not caller.can_act:
        raise ConsoleForbidden("Read-only administrators cannot change anything")
    return caller.principal


class ConsoleService:
    # ---- reads (the views) ----------------------------------------------------------------
    async def withdrawals(
        self, session: AsyncSession, status: str, *, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await repository.withdrawals(session, status, limit=limit)

    async def debts(self, session: AsyncSession, *, limit: int = 100) -> list[dict[str, Any]]:
        """Wallets in debt (ADR 0042), largest first."""
        return await repository.debts(session, limit=limit)

    async def withdrawal(self, session: AsyncSession, withdrawal_id: UUID) -> dict[str, Any] | None:
        return await repository.withdrawal(session, withdrawal_id)

    async def users(
        self, session: AsyncSession, *, search: str | None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await repository.users(session, search=search, limit=limit)

    async def user(self, session: AsyncSession, user_id: UUID) -> dict[str, Any] | None:
        return await repository.user(session, user_id)

    async def audit_log(self, session: AsyncSession, **filters: Any) -> list[dict[str, Any]]:
        """The audit log, filtered (see ``repository.audit``)."""
        return await repository.audit(session, **filters)

    # ---- jobs ---------------------------------------------------------------------------
    async def set_queue_paused(
        self,
        session: AsyncSession,
        caller: Caller,
        *,
        queue: str,
        paused: bool,
        request_id: str | None,
    ) -> bool:
        admin = _require_admin(caller)
        before = queue in await paused_queues(session)
        if paused:
            changed = await pause_queue(session, queue, by=caller.session.email)
        else:
            changed = await resume_queue(session, queue)
        await audit_service.record(
            session, admin.user_id, action="jobs.queue.pause" if paused else "jobs.queue.resume",
            subject_type="queue", subject_id=queue,
            before={"paused": before}, after={"paused": paused}, request_id=request_id,
        )  # fmt: skip
        return changed

    async def job_count(self, session: AsyncSession, *, action: str, flt: JobFilter) -> int:
        if action not in BULK_ACTIONS:
            raise UnprocessableEntity(f"unknown job action {action!r}")
        return await bulk_count(session, action, flt)

    async def job_bulk(
        self,
        session: AsyncSession,
        caller: Caller,
        *,
        action: str,
        flt: JobFilter,
        expected: int,
        request_id: str | None,
    ) -> int:
        """Apply ``action`` to the jobs matching ``flt``; ``expected`` is the dry-run count
        the operator confirmed (the audit row keeps both: more may have matched since)."""
        admin = _require_admin(caller)
        counted = await self.job_count(session, action=action, flt=flt)
        changed = await bulk_apply(session, action, flt, limit=BULK_LIMIT)
        await audit_service.record(
            session, admin.user_id, action=f"jobs.bulk.{action}", subject_type="jobs",
            subject_id=_describe(flt),
            before={"matching": counted, "confirmed": expected, "filter": flt.__dict__},
            after={"changed": changed}, request_id=request_id,
        )  # fmt: skip
        return changed

    # ---- withdrawals --------------------------------------------------------------------
    async def decide_withdrawal(
        self,
        session: AsyncSession,
        runtime: Runtime,
        caller: Caller,
        *,
        withdrawal_id: UUID,
        approve: bool,
        reason: str | None,
        request_id: str | None,
    ) -> dict[str, Any]:
        admin = _require_admin(caller)
        if not approve and not (reason and reason.strip()):
            raise UnprocessableEntity("A rejection needs a reason (the partner sees it)")
        before = await repository.withdrawal(session, withdrawal_id)
        if before is None:
            raise NotFound(f"no withdrawal {withdrawal_id}")
        # The wallet audits the decision itself (before, after, request id).
        withdrawal, changed = await wallet_service.decide(
            session, runtime, admin.user_id, withdrawal_id, approve=approve, reason=reason,
            request_id=request_id,
        )  # fmt: skip
        if changed:
            self._invalidate(session, runtime)
        return {"status": withdrawal.status, "changed": changed}

    async def batch_approve(
        self,
        session: AsyncSession,
        runtime: Runtime,
        caller: Caller,
        *,
        ids: list[UUID],
        request_id: str | None,
    ) -> list[ItemResult]:
        admin = _require_admin(caller)
        results = await wallet_service.batch_approve(
            session, runtime, admin.user_id, ids, request_id=request_id
        )  # each approval audited by the wallet
        out = []
        for item in results:
            detail = (item.status or "") if item.ok else f"{item.code}: {item.error}"
            out.append(ItemResult(str(item.id), item.ok, detail))
        self._invalidate(session, runtime)
        return out

    @staticmethod
    def _invalidate(session: AsyncSession, runtime: Runtime) -> None:
        owners = changed_owners(session)
        if owners:
            runtime.cache.invalidate_on_commit(session, keys=[stats_key(o) for o in owners])

    # ---- breakers and caches ------------------------------------------------------------
    async def reset_breakers(
        self, session: AsyncSession, caller: Caller, *, name: str | None, request_id: str | None
    ) -> list[str]:
        admin = _require_admin(caller)
        before = {b["name"]: b["state"] for b in breakers.status()}
        try:
            names = breakers.reset(name or None)
        except KeyError:
            raise NotFound(f"no circuit breaker named {name!r}") from None
        await audit_service.record(
            session, admin.user_id, action="admin.breaker.reset", subject_type="breaker",
            subject_id=name or "*", before={n: before.get(n) for n in names},
            after={b["name"]: b["state"] for b in breakers.status() if b["name"] in names},
            request_id=request_id,
        )  # fmt: skip
        return names

    async def clear_caches(
        self,
        session: AsyncSession,
        runtime: Runtime,
        caller: Caller,
        *,
        name: str | None,
        request_id: str | None,
    ) -> list[str]:
        admin = _require_admin(caller)
        privileges = identity_state(runtime).privileges.cache

        async def clear_privileges() -> None:
            await identity_service.clear_privilege_cache(runtime)

        caches = {
            str(runtime.cache.stats()["name"]): (runtime.cache, runtime.cache.clear),
            str(privileges.stats()["name"]): (privileges, clear_privileges),
        }
        chosen = [name] if name else sorted(caches)
        unknown = [c for c in chosen if c not in caches]
        if unknown:
            raise NotFound(f"no cache named {unknown[0]!r}")
        before = {c: caches[c][0].stats().get("l1_entries") for c in chosen}
        for cache in chosen:
            await caches[cache][1]()
        await audit_service.record(
            session, admin.user_id, action="admin.cache.cleared", subject_type="cache",
            subject_id=name or "*", before={"l1_entries": before},
            after={"caches": chosen, "via": "console"}, request_id=request_id,
        )  # fmt: skip
        return chosen

    # ---- users --------------------------------------------------------------------------
    async def revoke_sessions(
        self,
        session: AsyncSession,
        runtime: Runtime,
        caller: Caller,
        *,
        user_id: UUID,
        request_id: str | None,
    ) -> int:
        admin = _require_admin(caller)
        found = await repository.user(session, user_id)
        if found is None:
            raise NotFound(f"no user {user_id}")
        # identity's "log out everywhere", for that user: sessions revoked, access tokens
        # issued before now refused in every process (announced after the commit).
        target = Principal(
            user_id=user_id, session_id=uuid4(), role=found["role"], mfa=False, issued_at=0.0
        )
        await identity_service.logout(session, runtime, target, everywhere=True)
        await audit_service.record(
            session, admin.user_id, action="identity.sessions.revoked", subject_type="user",
            subject_id=str(user_id), before={"sessions": found["sessions"]},
            after={"sessions": 0}, request_id=request_id,
        )  # fmt: skip
        return int(found["sessions"])

    # ---- operations in review ----------------------------------------------------------
    async def operations(
        self, session: AsyncSession, *, status: str, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Operation], str | None]:
        return await operations_service.page(
            session, owner_id=None, status=status, limit=limit, cursor=cursor
        )

    async def operation_counts(self, session: AsyncSession) -> dict[str, int]:
        return await operations_service.counts(session)

    async def operation(self, session: AsyncSession, operation_id: UUID) -> Operation:
        operation, _ = await operations_service.get(session, operation_id, owner_id=None)
        return operation

    async def resolve_operation(
        self, session: AsyncSession, runtime: Runtime, caller: Caller, *, operation_id: UUID,
        performed: bool, note: str | None, request_id: str | None,
    ) -> Operation:  # fmt: skip
        """Settle (the provider did it) or release (it did not); operations audits it."""
        admin = _require_admin(caller)
        return await operations_service.resolve(
            session, runtime, admin.user_id, operation_id, performed=performed, note=note,
            request_id=request_id,
        )  # fmt: skip

    # ---- service API keys ---------------------------------------------------------------
    async def service_keys(
        self, session: AsyncSession, *, limit: int = 50, cursor: str | None = None
    ) -> Slice[ServiceKey]:
        return await credential_service.list(session, limit=limit, cursor=cursor)

    async def create_service_key(
        self, session: AsyncSession, runtime: Runtime, caller: Caller, *, name: str,
        scopes: list[str], request_id: str | None,
    ) -> IssuedKey:  # fmt: skip
        """A new key; its secret is in the answer only (credential audits the creation)."""
        admin = _require_admin(caller)
        if not name.strip():
            raise UnprocessableEntity("A key needs a name (who uses it)")
        return await credential_service.create(
            session, runtime, admin.user_id, name=name.strip(), scopes=scopes, request_id=request_id
        )

    async def revoke_service_key(
        self, session: AsyncSession, caller: Caller, *, key_id: UUID, request_id: str | None
    ) -> ServiceKey:
        admin = _require_admin(caller)
        return await credential_service.revoke(
            session, admin.user_id, key_id, request_id=request_id
        )

    # ---- four-eyes requests (ADR 0059) ---------------------------------------------------
    async def approvals(
        self, session: AsyncSession, *, status: str, cursor: str | None
    ) -> Slice[AdminApproval]:
        return await approvals_service.page(session, status=status, limit=100, cursor=cursor)

    async def approval(self, session: AsyncSession, approval_id: UUID) -> AdminApproval:
        return await approvals_service.get(session, approval_id)

    async def decide_approval(
        self, session: AsyncSession, runtime: Runtime, caller: Caller, *, approval_id: UUID,
        approve: bool, reason: str | None, request_id: str | None,
    ) -> AdminApproval:  # fmt: skip
        """The second administrator's decision; the owning domain carries an approved
        action out (and audits it), the approvals service audits the decision."""
        admin = _require_admin(caller)
        approval, _ = await approvals_service.decide(
            session, runtime, admin.user_id, approval_id, approve=approve, reason=reason,
            request_id=request_id,
        )  # fmt: skip
        self._invalidate(session, runtime)
        return approval


def _describe(flt: JobFilter) -> str:
    parts = [f"{k}={v}" for k, v in flt.__dict__.items() if v]
    return ",".join(parts) or "*"


def safe_message(error: SurgeError) -> str:
    return error.message


console = ConsoleService()
