"""Payments HTTP API: top-ups, the provider's webhook, and the admin inbox view.

- ``POST /api/v1/topups`` requires ``Idempotency-Key`` (``surge.kit.web.idempotency``): the
  first answer is replayed for the same key and body, another body is a 422, and the top-up
  id itself derives from the key, so even a retry after a crash reaches the same intent.
- ``POST /api/v1/webhooks/payments`` reads the *raw* body (never a parsed model: a parsed
  and re-serialised body does not verify) and answers 200 once the event is in the inbox.
- ``/api/admin/payments/events`` (``admin_router``, mounted with ``require_admin_mfa``): the
  inbox, ``?state=dead`` for the dead letters, and a retry of one dead event.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from surge.identity.deps import AdminMfa, require_role
from surge.identity.service import Principal, audit
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep
from surge.kit.web.idempotency import REQUIRED_HEADER_OPENAPI, idempotency_keys
from surge.payments.schemas import (
    EventPage,
    EventRead,
    TopupCreate,
    TopupPage,
    TopupRead,
    WebhookReceipt,
)
from surge.payments.service import topup as topup_service
from surge.wallet.service import changed_owners, stats_key

router = APIRouter(prefix="/api/v1", tags=["payments"])
admin_router = APIRouter(prefix="/api/admin/payments", tags=["payments admin"])

Owner = Annotated[Principal, Depends(require_role("partner", "reseller"))]
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=300)]


@router.post(
    "/topups",
    status_code=201,
    openapi_extra=REQUIRED_HEADER_OPENAPI,
    response_model=TopupRead,
    responses={
        400: {"description": "Idempotency-Key invalid (empty or too long)"},
        428: {"description": "Idempotency-Key missing: nothing was charged"},
        422: {"description": "Amount or currency out of bounds, or Idempotency-Key reused"},
        503: {"description": "Payment provider unavailable (Retry-After); nothing charged"},
    },
)
async def create_topup(
    body: TopupCreate, request: Request, principal: Owner, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Charge ``payment_method`` for ``amount`` and credit the wallet when the provider
    confirms. A declined card is a 201 with ``status: failed`` (the attempt is recorded);
    ``requires_action`` carries the URL of the second step."""

    async def handler() -> Response:
        topup = await topup_service.create_topup(
            session,
            runtime,
            principal.user_id,
            amount=body.amount,
            currency=body.currency,
            payment_method=body.payment_method,
            idempotency_key=request.headers["Idempotency-Key"],
        )
        owners = changed_owners(session)
        if owners:
            runtime.cache.invalidate_on_commit(session, keys=[stats_key(o) for o in owners])
        return JSONResponse(
            TopupRead.model_validate(topup).model_dump(mode="json"), status_code=201
        )

    return await idempotency_keys.run(
        request,
        session,
        scope=f"topup:{principal.user_id}",
        handler=handler,
        required=True,
        in_flight="conflict",
    )


@router.get("/topups", response_model=TopupPage)
async def list_topups(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> TopupPage:
    """The caller's top-ups, newest first."""
    items, next_cursor = await topup_service.list_topups(
        session, principal.user_id, limit=limit, cursor=cursor
    )
    return TopupPage(items=[TopupRead.model_validate(t) for t in items], next_cursor=next_cursor)


@router.get("/topups/{topup_id}", response_model=TopupRead)
async def get_topup(topup_id: UUID, principal: Owner, session: SessionDep) -> TopupRead:
    """One of the caller's top-ups (404 for anyone else's), read on the primary."""
    return TopupRead.model_validate(
        await topup_service.get_topup(session, principal.user_id, topup_id)
    )


@router.post(
    "/webhooks/payments",
    response_model=WebhookReceipt,
    responses={400: {"description": "Bad, missing, too old or too new signature"}},
)
async def payment_webhook(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> WebhookReceipt:
    """The provider's signed events (Stripe-Signature over the raw body)."""
    receipt = await topup_service.receive_event(
        session,
        runtime,
        body=await request.body(),
        signature=request.headers.get("Stripe-Signature"),
    )
    return WebhookReceipt(event_id=receipt.event_id, duplicate=receipt.duplicate)


@admin_router.get("/events", response_model=EventPage)
async def list_events(
    session: ReadSessionDep,
    state: Literal["pending", "processed", "dead"] | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> EventPage:
    """The provider-event inbox, newest first; ``?state=dead`` is the dead-letter view."""
    items, next_cursor = await topup_service.list_events(
        session, state=state, limit=limit, cursor=cursor
    )
    return EventPage(items=[EventRead.model_validate(e) for e in items], next_cursor=next_cursor)


@admin_router.post("/events/{event_id}/retry", response_model=EventRead)
async def retry_event(event_id: str, admin: AdminMfa, session: SessionDep) -> EventRead:
    """Put a dead event back in the inbox and process it again (audited)."""
    event = await topup_service.retry_event(session, event_id)
    await audit(
        session,
        admin.user_id,
        action="payments.event.retry",
        subject_type="payment_event",
        subject_id=event_id,
        after={"state": event.state},
    )
    return EventRead.model_validate(event)
