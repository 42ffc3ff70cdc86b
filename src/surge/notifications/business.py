"""E-mails about other domains' state changes, one call each from where the state
changes, in that transaction (the outbox's point: a rollback sends nothing).

Each looks the owner's address up through identity's service and writes one outbox row
keyed by the business event, so a replayed job, a duplicated webhook or a second call
queues nothing more. Preferences (``operations``, ``payments`` categories) and
suppressions are applied when the mail is sent, as for every other mail.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.errors import NotFound
from surge.notifications.outbox import OutboxUseCases


async def _address(session: AsyncSession, user_id: UUID) -> str | None:
    # identity's service sends mail through this domain (sign-up, new device): importing it
    # at module level would be an import cycle, so it is resolved at the call.
    from surge.identity.service import identity as identity_service

    try:
        return (await identity_service.get_user(session, user_id)).email
    except NotFound:  # the account is gone: nobody to tell
        return None


class BusinessMailUseCases(OutboxUseCases):
    """``operation_finished`` (operations) and ``topup_credited`` (payments)."""

    async def _tell_owner(
        self,
        session: AsyncSession,
        owner_id: UUID,
        *,
        template: str,
        category: str,
        key: str,
        context: dict[str, Any],
    ) -> UUID | None:
        to = await _address(session, owner_id)
        if to is None:
            return None
        return await self.send(
            session, to=to, user_id=owner_id, template=template, context=context,
            category=category, key=key,
        )  # fmt: skip

    async def operation_finished(
        self,
        session: AsyncSession,
        *,
        owner_id: UUID,
        operation_id: UUID,
        status: str,
        detail: str | None = None,
    ) -> UUID | None:
        """An operation reached ``succeeded`` or ``failed``: one e-mail per operation."""
        return await self._tell_owner(
            session, owner_id, template="operation_finished", category="operations",
            key=f"operation-finished:{operation_id}",
            context={"operation_id": str(operation_id), "status": status, "detail": detail},
        )  # fmt: skip

    async def topup_credited(
        self,
        session: AsyncSession,
        *,
        owner_id: UUID,
        topup_id: UUID,
        amount: int,
        currency: str,
    ) -> UUID | None:
        """A top-up's money reached the wallet: one e-mail per top-up (integer minor units)."""
        return await self._tell_owner(
            session, owner_id, template="topup_credited", category="payments",
            key=f"topup-credited:{topup_id}",
            context={"topup_id": str(topup_id), "amount": amount, "currency": currency},
        )  # fmt: skip
