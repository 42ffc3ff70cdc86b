"""Money a payment brings in: one ledger credit per payment, keyed ``payment:<pi>`` (ADR
0018), so the request, the webhook, its duplicates, the reconciliation poll and the scan
can all report the same success and only one of them moves money.

The ledger posting debits the owner's stripe of the ``payments`` system account (ADR 0058),
a row every top-up of the owners on that stripe locks until its transaction commits. The
inbox job therefore makes it *last*
(``late``): the top-up's record, the owner's mail and the inbox rows are written first,
and the posting is followed only by the job's completion and the commit, so the next
payment's job waits for two statements instead of every statement of this one (ADR 0053).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.models.payments import Topup
from surge.notifications.service import notifications as notifications_service
from surge.payments.errors import PermanentEventError
from surge.wallet.funds import funds as funds_service

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class LateCredit:
    """A credit recorded on its top-up whose posting the caller makes last (``post_late``)."""

    topup: Topup
    amount: int
    currency: str


async def credit(
    session: AsyncSession,
    topup: Topup,
    amount: int,
    currency: str,
    *,
    late: list[LateCredit] | None = None,
) -> None:
    """Credit the payment of ``topup`` once. With ``late``, a credit not made yet is
    recorded on the top-up now (amount, mail) and its posting appended to ``late``: the
    caller must ``post_late`` it in the same transaction, after its other writes."""
    currency = currency.upper()
    if currency != topup.currency:
        raise PermanentEventError(f"currency {currency} differs from the top-up's {topup.currency}")
    if amount <= 0:
        return
    if amount > topup.amount:  # signed, yet more than Surge asked for (ADR 0051)
        raise PermanentEventError(
            f"the provider reports {amount} received for a top-up of {topup.amount}"
        )
    if late is not None and topup.amount_credited == 0:
        # The caller holds the top-up's row lock, and ``payment:<pi>`` is posted only from
        # here, each time with ``amount_credited`` set in the same transaction: nothing
        # credited yet means this posting will be the one (``post_late`` corrects the
        # record should the ledger ever say otherwise).
        await _credited(session, topup, amount, currency)
        late.append(LateCredit(topup, amount, currency))
        return
    if await _post(session, topup, amount, currency, recorded=False):
        await _credited(session, topup, amount, currency)


async def post_late(session: AsyncSession, late: Sequence[LateCredit]) -> None:
    """Post the credits ``credit`` deferred (the last writes before the commit)."""
    for item in late:
        await _post(session, item.topup, item.amount, item.currency, recorded=True)


async def _post(
    session: AsyncSession, topup: Topup, amount: int, currency: str, *, recorded: bool
) -> bool:
    """The ledger posting; True when it moved the money now."""
    key = f"payment:{topup.provider_payment_id}"
    posted = await funds_service.credit(
        session, topup.owner_id, amount=amount, currency=currency, key=key, kind="topup",
        reference=topup.provider_payment_id,
    )  # fmt: skip
    if recorded and not posted.created:
        # Recorded as this posting's ahead of it, but the key was used already (not by this
        # module): the top-up shows what the ledger moved under it.
        topup.amount_credited = await funds_service.moved(session, key=key) or 0
        log.warning("payments.topup.credit_found_posted", payment_id=topup.provider_payment_id)
    return posted.created


async def _credited(session: AsyncSession, topup: Topup, amount: int, currency: str) -> None:
    # The mail first: its queries would autoflush the top-up's change as an UPDATE of its
    # own, and the status update follows anyway (one UPDATE of the row instead of two).
    await notifications_service.topup_credited(
        session, owner_id=topup.owner_id, topup_id=topup.id, amount=amount, currency=currency
    )
    topup.amount_credited = amount
    topup.updated_at = datetime.now(UTC)
    log.info(
        "payments.topup.credited",
        topup_id=str(topup.id),
        amount=amount,
        payment_id=topup.provider_payment_id,
    )
