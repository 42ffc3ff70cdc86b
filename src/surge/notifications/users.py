"""The users' side: per-category preferences and the signed RFC 8058 unsubscribe link."""

from __future__ import annotations

import hashlib
import hmac
import json
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.kit.runtime import Runtime
from surge.notifications import repository
from surge.notifications.errors import InvalidUnsubscribeToken
from surge.notifications.keys import b64, derive, unb64
from surge.notifications.metrics import count


def unsubscribe_token(settings: Settings, user_id: UUID, category: str) -> str:
    """The signed (user, category) token of an unsubscribe link."""
    payload = b64(json.dumps([str(user_id), category], separators=(",", ":")).encode())
    mac = hmac.new(derive(settings, "notifications.unsubscribe"), payload.encode(), hashlib.sha256)
    return f"{payload}.{b64(mac.digest()[:18])}"


class UserUseCases:
    """Preferences and unsubscribing."""

    def unsubscribe_token(self, settings: Settings, user_id: UUID, category: str) -> str:
        return unsubscribe_token(settings, user_id, category)

    def read_unsubscribe_token(self, settings: Settings, token: str) -> tuple[UUID, str]:
        payload, _, signature = token.partition(".")
        mac = hmac.new(
            derive(settings, "notifications.unsubscribe"), payload.encode(), hashlib.sha256
        )
        try:
            if not hmac.compare_digest(b64(mac.digest()[:18]), signature):
                raise InvalidUnsubscribeToken("invalid unsubscribe link")
            user, category = json.loads(unb64(payload))
            return UUID(user), str(category)
        except (ValueError, TypeError) as error:
            raise InvalidUnsubscribeToken("invalid unsubscribe link") from error

    async def unsubscribe(self, session: AsyncSession, runtime: Runtime, token: str) -> str:
        """One-click unsubscribe (RFC 8058): turn the token's category off for its user."""
        user_id, category = self.read_unsubscribe_token(runtime.settings, token)
        await repository.set_preference(session, user_id, category, False)
        await repository.add_event(session, address=str(user_id), event="unsubscribed",
                                   source="link", detail=category)  # fmt: skip
        count(session, "unsubscribed")
        return category

    async def preferences(
        self, session: AsyncSession, runtime: Runtime, user_id: UUID
    ) -> dict[str, bool]:
        stored = await repository.preferences(session, user_id)
        for category in runtime.settings.NOTIFY_SECURITY_CATEGORIES:
            stored[category] = True
        return stored

    async def set_preferences(
        self, session: AsyncSession, runtime: Runtime, user_id: UUID, changes: dict[str, bool]
    ) -> dict[str, bool]:
        """Store the user's choices; security categories cannot be turned off (ignored)."""
        for category, enabled in changes.items():
            if category in runtime.settings.NOTIFY_SECURITY_CATEGORIES:
                continue
            await repository.set_preference(session, user_id, category, enabled)
        return await self.preferences(session, runtime, user_id)
