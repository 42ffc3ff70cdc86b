"""Notifications HTTP API: the signed provider webhook and DSN intake, one-click
unsubscribe (RFC 8058), a user's preferences, and the admin's suppressions and messages.

``POST /api/v1/webhooks/email`` — a provider (or a relay's feedback loop) reports events::

    Surge-Signature: t=1765065600,v1=<hex HMAC-SHA256(NOTIFY_WEBHOOK_SECRET, "<t>.<raw body>")>
    {"events": [{"id": "evt-1", "type": "complained", "recipient": "a@example.com",
                 "message_id": "<3f0c…@surge.localhost>"}]}

``type`` is ``bounced`` (with ``bounce_type`` hard/soft/blocked), ``complained``,
``delivered`` or ``unsubscribed``. Each event id is applied once (redeliveries are counted
as duplicates); a missing, wrong or stale (± NOTIFY_WEBHOOK_TOLERANCE) signature is a 401.
``POST /api/v1/webhooks/email/dsn`` takes a raw RFC 3464 report (``message/rfc822``) signed
the same way (an inbound-mail route of the bounce mailbox posts it).
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request

from surge.identity.deps import AdminMfa, CurrentUser
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep
from surge.notifications.schemas import (
    LiftRead,
    MessagePage,
    MessageRead,
    PreferencesRead,
    PreferencesUpdate,
    RatesRead,
    SuppressionCreate,
    SuppressionPage,
    SuppressionRead,
    UnsubscribeRead,
    WebhookIn,
    WebhookRead,
)
from surge.notifications.service import ProviderEvent
from surge.notifications.service import notifications as notifications_service

router = APIRouter(prefix="/api/v1", tags=["notifications"])
admin_router = APIRouter(prefix="/api/admin", tags=["notifications admin"])

Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=300)]
SIGNATURE = "Surge-Signature"


def _outbox_id(value: str | None) -> UUID | None:
    if not value:
        return None
    text = value.strip().strip("<>").split("@", 1)[0]
    try:
        return UUID(text)
    except ValueError:
        return None


# ---- providers ----------------------------------------------------------------------------
@router.post(
    "/webhooks/email",
    response_model=WebhookRead,
    openapi_extra={
        "parameters": [
            {
                "name": SIGNATURE,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": 't=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>',
            }
        ]
    },
)
async def email_webhook(
    request: Request, body: WebhookIn, session: SessionDep, runtime: RuntimeDep
) -> WebhookRead:
    """Provider events: bounces, complaints, deliveries, unsubscribes (signed; ADR 0019)."""
    notifications_service.verify_webhook(
        runtime.settings, await request.body(), request.headers.get(SIGNATURE)
    )
    applied = duplicates = 0
    for event in body.events:
        done = await notifications_service.handle_event(
            session,
            runtime,
            ProviderEvent(
                id=event.id,
                type=event.type,
                recipient=event.recipient,
                message_id=_outbox_id(event.message_id),
                bounce_type=event.bounce_type,
                code=event.code,
                diagnostic=event.diagnostic,
            ),
        )
        applied += done
        duplicates += not done
    return WebhookRead(applied=applied, duplicates=duplicates)


@router.post("/webhooks/email/dsn", response_model=WebhookRead)
async def email_dsn(request: Request, session: SessionDep, runtime: RuntimeDep) -> WebhookRead:
    """A raw RFC 3464 delivery status notification from the bounce mailbox (signed)."""
    raw = await request.body()
    notifications_service.verify_webhook(runtime.settings, raw, request.headers.get(SIGNATURE))
    applied = await notifications_service.ingest_dsn(session, runtime, raw)
    return WebhookRead(applied=applied, duplicates=0)


# ---- users --------------------------------------------------------------------------------
@router.get("/notifications/unsubscribe", response_model=UnsubscribeRead)
async def unsubscribe_preview(
    runtime: RuntimeDep, token: Annotated[str, Query(max_length=500)]
) -> UnsubscribeRead:
    """What the link would do (GET never changes anything: mail scanners follow links)."""
    _, category = notifications_service.read_unsubscribe_token(runtime.settings, token)
    return UnsubscribeRead(category=category, unsubscribed=False)


@router.post("/notifications/unsubscribe", response_model=UnsubscribeRead)
async def unsubscribe(
    session: SessionDep, runtime: RuntimeDep, token: Annotated[str, Query(max_length=500)]
) -> UnsubscribeRead:
    """RFC 8058 one-click: mailbox providers POST ``List-Unsubscribe=One-Click`` here."""
    category = await notifications_service.unsubscribe(session, runtime, token)
    return UnsubscribeRead(category=category, unsubscribed=True)


@router.get("/me/notification-preferences", response_model=PreferencesRead)
async def get_preferences(
    principal: CurrentUser, session: ReadSessionDep, runtime: RuntimeDep
) -> PreferencesRead:
    categories = await notifications_service.preferences(session, runtime, principal.user_id)
    return PreferencesRead(categories=categories)


@router.put("/me/notification-preferences", response_model=PreferencesRead)
async def put_preferences(
    body: PreferencesUpdate, principal: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> PreferencesRead:
    """Turn categories on or off (security mail always goes)."""
    categories = await notifications_service.set_preferences(
        session, runtime, principal.user_id, body.categories
    )
    return PreferencesRead(categories=categories)


# ---- admin --------------------------------------------------------------------------------
@admin_router.get("/messages", response_model=MessagePage)
async def list_messages(
    admin: AdminMfa,
    session: ReadSessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
) -> MessagePage:
    """The last e-mails, newest first (the console shows the withdrawal mail arriving)."""
    found = await notifications_service.recent(session, limit=limit, cursor=cursor, status=status)
    return MessagePage(
        items=[MessageRead.model_validate(r) for r in found.items], next_cursor=found.next_cursor
    )


@admin_router.get("/notifications/rates", response_model=RatesRead)
async def rates(admin: AdminMfa, session: ReadSessionDep) -> RatesRead:
    """Bounce and complaint rates of the last 24 h (SES reviews at 5 % and 0.1 %)."""
    found = await notifications_service.rates(session)
    return RatesRead(
        since=found.since,
        sent=found.sent,
        bounced=found.bounced,
        complained=found.complained,
        bounce_rate=found.bounce_rate,
        complaint_rate=found.complaint_rate,
    )


@admin_router.get("/suppressions", response_model=SuppressionPage)
async def list_suppressions(
    admin: AdminMfa, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> SuppressionPage:
    found = await notifications_service.list_suppressions(session, limit=limit, cursor=cursor)
    return SuppressionPage(
        items=[SuppressionRead.model_validate(r) for r in found.items],
        next_cursor=found.next_cursor,
    )


@admin_router.post("/suppressions", response_model=SuppressionRead, status_code=201)
async def add_suppression(
    body: SuppressionCreate, admin: AdminMfa, request: Request, session: SessionDep
) -> SuppressionRead:
    """Suppress an address by hand (audited)."""
    row = await notifications_service.suppress(
        session, admin.user_id, body.address, detail=body.detail, expires_at=body.expires_at,
        request_id=getattr(request.state, "request_id", None),
    )  # fmt: skip
    return SuppressionRead.model_validate(row)


@admin_router.delete("/suppressions/{address}", response_model=LiftRead)
async def lift_suppression(
    address: str, admin: AdminMfa, request: Request, session: SessionDep
) -> LiftRead:
    """Lift a suppression and re-send every message held for the address (audited)."""
    lifted, requeued = await notifications_service.lift(
        session, admin.user_id, address, request_id=getattr(request.state, "request_id", None)
    )
    return LiftRead(address=lifted.address, reason=lifted.reason, requeued=len(requeued))
