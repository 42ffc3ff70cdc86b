"""Producing: an e-mail written to the outbox in the caller's transaction, with its send
job (ADR 0019), and the sweeper that re-enqueues messages whose job was lost."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pydantic_core
from jinja2 import TemplateNotFound
from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.kit.security.sealing import Sealer
from surge.notifications import repository
from surge.notifications.errors import NoAddress, UnknownTemplate
from surge.notifications.keys import now
from surge.notifications.render import template_locale

SEND_JOB = "notifications.email.send"
#: The stored context's key for values sealed by ``send_sealed`` (opened when rendered).
SEALED = "__sealed__"


def _sealer(settings: Settings) -> Sealer:
    return Sealer(settings.SECRET_KEY.get_secret_value(), purpose="notifications.context")


def open_secrets(settings: Settings, sealed: Any) -> dict[str, str]:
    """The clear values of a stored context's sealed part (``InvalidToken`` if altered)."""
    if not sealed:
        return {}
    sealer = _sealer(settings)
    return {str(name): sealer.open(str(value)) for name, value in dict(sealed).items()}


class OutboxUseCases:
    """``send`` (any domain, in its own transaction) and ``sweep`` (a cron job)."""

    async def send(
        self,
        session: AsyncSession,
        *,
        template: str,
        context: dict[str, Any],
        category: str,
        key: str,
        to: str,
        user_id: UUID | None = None,
        locale: str = "en",
    ) -> UUID:
        """Write one e-mail to the outbox in ``session``'s transaction and enqueue its
        sending there too: it leaves only if the caller's transaction commits, and exactly
        once per ``key`` (a second call with the same key returns the first message's id).
        Preferences and suppressions are checked when it is sent, not now."""
        try:
            template_locale(template, locale)
        except TemplateNotFound as error:
            raise UnknownTemplate(f"no e-mail template {template!r}") from error
        if not to or "@" not in to:
            raise NoAddress("the e-mail has no recipient address")
        message_id_ = uuid4()
        inserted = await repository.insert_message(
            session,
            {
                "id": message_id_,
                "key": key,
                "user_id": user_id,
                "to_address": to.strip().lower(),
                "template": template,
                "locale": locale,
                "category": category,
                "context": pydantic_core.to_jsonable_python(context),
            },
        )
        if inserted is None:
            existing = await repository.message_id_by_key(session, key)
            assert existing is not None
            return existing
        await enqueue(
            session, SEND_JOB, {"message_id": str(inserted)}, dedup_key=f"notify:{inserted}"
        )
        return inserted

    async def send_sealed(
        self,
        session: AsyncSession,
        runtime: Runtime,
        *,
        secrets: dict[str, str],
        template: str,
        context: dict[str, Any],
        category: str,
        key: str,
        to: str,
        user_id: UUID | None = None,
        locale: str = "en",
    ) -> UUID:
        """``send`` for a mail that carries a secret (a password-reset link): ``secrets``
        join the template's context only when it is rendered; the outbox row keeps them
        sealed (Fernet, a key derived from ``SECRET_KEY``), so a read of the outbox — a
        backup, the admin console — never shows a usable link."""
        sealer = _sealer(runtime.settings)
        sealed = {name: sealer.seal(value) for name, value in secrets.items()}
        return await self.send(
            session, template=template, context={**context, SEALED: sealed},
            category=category, key=key, to=to, user_id=user_id, locale=locale,
        )  # fmt: skip

    async def sweep(self, session: AsyncSession, *, grace: timedelta, limit: int = 500) -> int:
        """Re-enqueue queued messages overdue by ``grace`` (a job lost to a failure the job
        engine gave up on). A duplicate job is harmless: ``mark_sending`` lets one send."""
        ids = await repository.overdue(session, before=now() - grace, limit=limit)
        for id_ in ids:
            await enqueue(session, SEND_JOB, {"message_id": str(id_)},
                          dedup_key=f"notify:{id_}:sweep")  # fmt: skip
        return len(ids)
