"""The `payments` baseline: Surge's app plus one route that verifies a provider webhook and
posts the credit *inline in the request handler* (no inbox, no job) — the usual integration
that ``surge bench payments`` compares the inbox path with. Bench-only: never mounted in
production (it would acknowledge an event only after the ledger, and lose order and retries).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
from fastapi import FastAPI, Request

from surge.app import create_app as create_surge_app
from surge.kit.runtime import Runtime
from surge.kit.security import webhooks
from surge.kit.web.deps import SessionDep
from surge.wallet.funds import funds as funds_service


def create_app() -> FastAPI:
    app = create_surge_app()

    @app.post("/bench/webhooks/inline")
    async def inline_webhook(request: Request, session: SessionDep) -> dict[str, Any]:
        runtime: Runtime = request.app.state.runtime
        settings = runtime.settings
        body = await request.body()
        webhooks.verify(
            body,
            request.headers.get("Stripe-Signature"),
            [s.get_secret_value() for s in settings.PAYMENTS_WEBHOOK_SECRETS],
            tolerance=settings.PAYMENTS_WEBHOOK_TOLERANCE.total_seconds(),
        )
        intent = orjson.loads(body)["data"]["object"]
        posted = await funds_service.credit(
            session,
            UUID(intent["metadata"]["owner_id"]),
            amount=int(intent["amount_received"]),
            currency=str(intent["currency"]).upper(),
            key=f"payment:{intent['id']}",
            kind="topup",
            reference=intent["id"],
        )
        return {"received": True, "created": posted.created}

    return app
