"""Notifications: a transactional e-mail outbox sent over real SMTP, with bounces,
complaints, suppressions and per-user preferences (ADR 0019).

Other domains call one method, in the transaction of the change that causes the mail::

    from surge.notifications.service import notifications as notifications_service

    await notifications_service.send(
        session,                          # the business transaction: rollback = no mail
        to=partner.email,                 # the address (identity_service.get_user(...).email)
        user_id=owner_id,                 # optional: preferences and the unsubscribe link
        template="withdrawal_decided",    # templates/<locale>/withdrawal_decided.{subject.txt,txt,html}
        context={"amount": 1250, "currency": "USD", "status": "approved", ...},
        category="wallet",                # users can opt out of a category, never of "security"
        key=f"withdrawal-decided:{withdrawal_id}",   # one mail per key, ever
    )

Templates in use: ``welcome`` (identity, category ``account``), ``new_device`` and
``password_reset`` (``security``), ``withdrawal_decided`` (``wallet``),
``operation_finished`` (``operations``), ``topup_credited`` (``payments``).

    NotificationError (SurgeError)
    ├── UnknownTemplate (UnprocessableEntity)     422: no such template in any locale
    ├── NoAddress (UnprocessableEntity)           422: ``to`` is not an address
    ├── SuppressionNotFound (NotFound)            404: lifting an address that is not suppressed
    ├── InvalidUnsubscribeToken (BadRequest)      400: forged, truncated or for another user
    └── InvalidWebhookSignature (NotAuthenticated) 401: missing, forged or stale signature

The service is one class assembled from one module per responsibility: ``outbox``
(producing, sweeping), ``sending`` (the send job's steps), ``batch`` (a send job's batch), ``suppressions``, ``feedback``
(webhook, DSN), ``users`` (preferences, unsubscribe), ``reporting`` (admin reads) and
``business`` (other domains' state changes: ``operation_finished``, ``topup_credited``);
``errors`` and ``metrics`` are shared by them.
"""

from __future__ import annotations

from uuid import UUID

from surge.config import Settings
from surge.notifications.batch import BatchSendingUseCases
from surge.notifications.business import BusinessMailUseCases
from surge.notifications.errors import (
    InvalidUnsubscribeToken,
    InvalidWebhookSignature,
    NoAddress,
    NotificationError,
    SuppressionNotFound,
    UnknownTemplate,
)
from surge.notifications.feedback import FeedbackUseCases, ProviderEvent
from surge.notifications.outbox import SEND_JOB, OutboxUseCases
from surge.notifications.render import message_id
from surge.notifications.reporting import Rates, ReportingUseCases, check_rates
from surge.notifications.sending import Prepared, smtp_relay
from surge.notifications.smtp import enhanced_status
from surge.notifications.suppressions import SuppressionUseCases
from surge.notifications.users import UserUseCases


class NotificationService(
    BusinessMailUseCases,
    OutboxUseCases,
    BatchSendingUseCases,
    SuppressionUseCases,
    FeedbackUseCases,
    UserUseCases,
    ReportingUseCases,
):
    """The notifications domain's use cases (stateless; settings come from the runtime)."""


def message_id_header(outbox_id: UUID, settings: Settings) -> str:
    """The Message-ID header Surge gives an outbox row (for tests and tools)."""
    return message_id(outbox_id, settings.NOTIFY_FROM)


__all__ = [
    "SEND_JOB",
    "InvalidUnsubscribeToken",
    "InvalidWebhookSignature",
    "NoAddress",
    "NotificationError",
    "NotificationService",
    "Prepared",
    "ProviderEvent",
    "Rates",
    "SuppressionNotFound",
    "UnknownTemplate",
    "check_rates",
    "enhanced_status",
    "message_id_header",
    "notifications",
    "smtp_relay",
]

notifications = NotificationService()
