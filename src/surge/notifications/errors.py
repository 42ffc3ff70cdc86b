"""The notifications domain's errors (ADR 0003; the tree is drawn in ``service.py``)."""

from __future__ import annotations

from surge.kit.errors import BadRequest, NotAuthenticated, NotFound, SurgeError, UnprocessableEntity


class NotificationError(SurgeError):
    """Base of the notifications domain's errors."""


class UnknownTemplate(NotificationError, UnprocessableEntity):
    """No template of that name in any locale."""


class NoAddress(NotificationError, UnprocessableEntity):
    """The recipient is not an e-mail address."""


class SuppressionNotFound(NotificationError, NotFound):
    """The address is not on the suppression list."""


class InvalidUnsubscribeToken(NotificationError, BadRequest):
    """The unsubscribe token is forged or malformed."""


class InvalidWebhookSignature(NotificationError, NotAuthenticated):
    """The webhook's signature is missing, wrong or outside the tolerance."""
