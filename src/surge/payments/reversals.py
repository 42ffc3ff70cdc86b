"""Money a payment brought in going back out (refunds, lost disputes) and coming back in
(won disputes), always within what the payment credited (ADR 0033, ADR 0035), and always
posted: what the owner already spent becomes the wallet's debt (``funds.reverse``, ADR
0042), which the won dispute's credit, like any later top-up or earning, repays first.

Every movement is a ledger transfer keyed by the provider's object, so a replayed or
re-sent event never moves money twice:

- ``payment:<pi>:refund:<re id>`` and ``payment:<pi>:dispute:<dp id>`` take money back, each
  capped at ``amount_credited − amount_reversed`` of the top-up;
- ``payment:<pi>:dispute:<dp id>:reinstated`` gives back exactly what that dispute took and
  lowers ``amount_reversed`` by as much, so a later refund is capped right.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.models.payments import Topup
from surge.wallet.funds import funds as funds_service

log = structlog.get_logger()


def reversal_key(topup: Topup, obj: Mapping[str, Any], *, what: str) -> str:
    return f"payment:{topup.provider_payment_id}:{what}:{obj['id']}"


async def reverse(
    session: AsyncSession, topup: Topup, obj: Mapping[str, Any], *, what: str
) -> None:
    """Take back a refund or a dispute, never more than the payment credited: a refund
    larger than the payment, or a refund and a dispute of the same money, would
    otherwise take the owner's other funds (the provider only ever took this payment)."""
    key = reversal_key(topup, obj, what=what)
    if await funds_service.moved(session, key=key) is not None:
        return  # this refund or dispute was taken back already (a replayed event)
    asked = int(obj["amount"])
    amount = min(asked, topup.amount_credited - topup.amount_reversed)
    if amount < asked:
        log.warning(
            "payments.topup.reversal_capped", topup_id=str(topup.id), what=what,
            asked=asked, reversed=max(amount, 0), credited=topup.amount_credited,
        )  # fmt: skip
    if amount <= 0:
        return
    posted = await funds_service.reverse(
        session,
        topup.owner_id,
        amount=amount,
        currency=topup.currency,
        key=key,
        kind=f"topup_{what}",
        reference=str(obj["id"]),
    )
    if posted.created:
        topup.amount_reversed += amount
        topup.updated_at = datetime.now(UTC)
        log.info("payments.topup.reversed", topup_id=str(topup.id), amount=amount, what=what)


async def reinstate(session: AsyncSession, topup: Topup, dispute: Mapping[str, Any]) -> bool:
    """A won dispute (``charge.dispute.funds_reinstated``): give back what this dispute took,
    once; True when it took (and so gives back) something. A won dispute implies its
    withdrawal: when that event is late (or lost), the withdrawal is applied here first
    under its own key — the late event then finds it done — so the owner never receives
    money that was not taken."""
    taken_key = reversal_key(topup, dispute, what="dispute")
    key = f"{taken_key}:reinstated"
    if await funds_service.moved(session, key=key) is not None:
        return True  # given back already (a re-sent event)
    await reverse(session, topup, dispute, what="dispute")
    taken = await funds_service.moved(session, key=taken_key)
    if not taken:
        log.info("payments.topup.reinstated_nothing", topup_id=str(topup.id))
        return False  # the dispute was capped to nothing (the payment was refunded already)
    posted = await funds_service.credit(
        session,
        topup.owner_id,
        amount=taken,
        currency=topup.currency,
        key=key,
        kind="topup_dispute_won",
        reference=str(dispute["id"]),
    )
    if posted.created:
        topup.amount_reversed -= taken
        topup.updated_at = datetime.now(UTC)
        log.info("payments.topup.reinstated", topup_id=str(topup.id), amount=taken)
    return True
