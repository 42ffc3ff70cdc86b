"""Top-ups: money coming in through the payment provider, credited once whatever arrives
twice, late or out of order (ADR 0018).

    SurgeError
    └── PaymentError
        ├── TopupNotFound           404  not one of the caller's top-ups
        ├── TopupOutOfBounds        422  amount outside PAYMENTS_TOPUP_MIN..MAX, other currency
        ├── TopupKeyMismatch        422  the provider saw this Idempotency-Key with other fields
        ├── EventNotFound           404  (admin) no such provider event
        ├── EventNotDead            409  (admin) only a dead event can be retried
        └── ProviderRejected        502  the provider refused a request Surge built
    ProviderUnavailable (kit ServiceUnavailable) 503 + Retry-After: breaker open or provider
                                         down; nothing was charged by that request
    InvalidSignature (kit BadRequest)    400: a webhook whose signature does not verify

The one rule: **the provider's payment id is the idempotency key of the ledger posting**
(``payment:<pi id>`` for the credit, ``payment:<pi id>:refund:<re id>`` and
``payment:<pi id>:dispute:<dp id>`` for the reversals, ``…:dispute:<dp id>:reinstated`` for a
won dispute: ``surge.payments.reversals``). The request that saw the payment
succeed, the webhook, its duplicates and the reconciliation poll all call ``funds.credit``
with that key, so exactly one of them moves money — never more than the top-up's own amount
nor in another currency: a signed event that says otherwise is dead-lettered (ADR 0051).

Paths that touch a top-up, all under its row lock (``repository.lock_topup``):
- ``create_topup`` (request): creates and confirms the intent at the provider with an
  idempotency key derived from the top-up id, which is itself derived from the owner and
  the client's ``Idempotency-Key`` — a client retry after a crash reaches the same intent;
- ``receive_event`` (webhook): verify the signature over the raw body, store the event in
  the inbox (its id is the primary key: a replay is refused), enqueue its processing in the
  same transaction;
- ``process_events`` (job, one at a time per payment): apply the payment's pending events in
  the provider's order; a failing event is retried with backoff, then dead-lettered;
- ``reconcile_topup`` (job): ask the provider about a top-up still open after
  ``PAYMENTS_RECONCILE_AFTER`` and apply its answer — a lost webhook costs minutes.

Status only moves forward (``_RANK``): a late ``processing`` never undoes ``succeeded``, a
late ``funds_withdrawn`` never undoes ``dispute_won``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.errors import SurgeError
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.kit.security import webhooks
from surge.models.payments import PaymentEvent, Topup
from surge.payments import repository
from surge.payments.credits import LateCredit, credit, post_late
from surge.payments.errors import (
    EventNotDead,
    EventNotFound,
    InvalidEvent,
    PaymentError,
    PermanentEventError,
    ProviderRejected,
    TopupKeyMismatch,
    TopupNotFound,
    TopupOutOfBounds,
)
from surge.payments.events import intent_of, parse_event, payment_id_of
from surge.payments.provider import ProviderUnavailable, provider_client
from surge.payments.reversals import reinstate, reverse

log = structlog.get_logger()

WEBHOOKS = Counter(
    "surge_payments_webhooks_total",
    "Provider webhooks by outcome: accepted, duplicate (replayed event id), refused_<reason>.",
    ["outcome"],
)
EVENTS_DEAD = Counter("surge_payments_events_dead_total", "Provider events dead-lettered.")

PROCESS_JOB = "payments.events.process"
RECONCILE_JOB = "payments.topup.reconcile"
#: Namespace of top-up ids: uuid5(owner id + client key) is the same on every retry.
TOPUP_NAMESPACE = UUID("5f0c2a4e-3d36-4c1e-9a57-7c1b8f3c9e21")

_RANK = {
    "pending": 0,
    "requires_action": 1,
    "processing": 2,
    "failed": 3,
    "succeeded": 4,
    "disputed": 5,
    # A won dispute is final for the dispute (ADR 0042); a full refund after it is final
    # for the payment, so it still moves the top-up to refunded.
    "dispute_won": 6,
    "refunded": 7,
}


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the webhook endpoint answers: ``duplicate`` when the id was seen before."""

    event_id: str
    duplicate: bool


def _now() -> datetime:
    return datetime.now(UTC)


def topup_id_for(owner_id: UUID, key: str) -> UUID:
    """The top-up id a client's ``Idempotency-Key`` names (stable across retries)."""
    return uuid.uuid5(TOPUP_NAMESPACE, f"{owner_id}:{key}")


class TopupService:
    """Stateless; see the module docstring."""

    # ---- requests ---------------------------------------------------------------------------
    async def create_topup(
        self,
        session: AsyncSession,
        runtime: Runtime,
        owner_id: UUID,
        *,
        amount: int,
        currency: str,
        payment_method: str,
        idempotency_key: str,
    ) -> Topup:
        """Create and confirm a payment intent for ``amount``; credit the wallet now when
        the provider says it succeeded (otherwise the webhook or the poll will)."""
        settings = runtime.settings
        if currency != settings.PAYMENTS_CURRENCY:
            raise TopupOutOfBounds(f"Top-ups are in {settings.PAYMENTS_CURRENCY} only.")
        if not settings.PAYMENTS_TOPUP_MIN <= amount <= settings.PAYMENTS_TOPUP_MAX:
            raise TopupOutOfBounds(
                f"amount must be between {settings.PAYMENTS_TOPUP_MIN} and "
                f"{settings.PAYMENTS_TOPUP_MAX} minor units."
            )
        topup_id = topup_id_for(owner_id, idempotency_key)
        existing = await repository.owned_topup(session, owner_id, topup_id)
        if existing is not None:
            # The key made a top-up before (its HTTP record may have expired): that top-up
            # is the answer; charging again under the same key would be a second payment.
            if (existing.amount, existing.currency) != (amount, currency):
                raise TopupKeyMismatch(
                    "This Idempotency-Key was already used for a top-up with other fields."
                )
            return existing
        answer = await provider_client(runtime).create_intent(
            amount=amount,
            currency=currency,
            payment_method=payment_method,
            metadata={"topup_id": str(topup_id), "owner_id": str(owner_id)},
            idempotency_key=f"surge-topup-{topup_id}",
        )
        intent = intent_of(answer)
        if intent is None:
            error = answer.body.get("error") or {}
            if error.get("type") == "idempotency_error":
                raise TopupKeyMismatch(
                    "This Idempotency-Key was already used for a top-up with other fields."
                )
            log.warning("payments.provider.rejected", status=answer.status, code=error.get("code"))
            raise ProviderRejected(
                "The payment provider refused the request.", extra={"code": error.get("code")}
            )
        try:
            topup = await repository.lock_topup(
                session,
                topup_id=topup_id,
                owner_id=owner_id,
                amount=amount,
                currency=currency,
                provider_payment_id=str(intent["id"]),
            )
        except LookupError:
            raise TopupKeyMismatch(
                "This Idempotency-Key already belongs to another payment."
            ) from None
        await self._apply_intent(session, topup, intent)
        return topup

    async def get_topup(self, session: AsyncSession, owner_id: UUID, topup_id: UUID) -> Topup:
        topup = await repository.owned_topup(session, owner_id, topup_id)
        if topup is None:
            raise TopupNotFound("No such top-up.")
        return topup

    async def list_topups(
        self, session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
    ) -> tuple[list[Topup], str | None]:
        found = await repository.topups(session, owner_id, limit=limit, cursor=cursor)
        return found.items, found.next_cursor

    # ---- webhooks ---------------------------------------------------------------------------
    async def receive_event(
        self, session: AsyncSession, runtime: Runtime, *, body: bytes, signature: str | None
    ) -> Receipt:
        """Verify, store in the inbox, enqueue processing — one transaction. Raises
        ``InvalidSignature`` (400) for a bad, missing, too old or too new signature."""
        settings = runtime.settings
        try:
            webhooks.verify(
                body,
                signature,
                [s.get_secret_value() for s in settings.PAYMENTS_WEBHOOK_SECRETS],
                tolerance=settings.PAYMENTS_WEBHOOK_TOLERANCE.total_seconds(),
            )
        except webhooks.InvalidSignature as error:
            WEBHOOKS.labels(f"refused_{error.reason}").inc()
            log.warning("payments.webhook.refused", reason=error.reason, bytes=len(body))
            raise
        event = parse_event(body)
        payment_id = payment_id_of(event)
        stored = await repository.insert_event(
            session,
            event_id=event["id"],
            type_=event["type"],
            payment_id=payment_id,
            created=event["created"],
            payload=body.decode(),
        )
        if not stored:
            # A replay (or the provider's retry after our answer was lost): refused, nothing
            # happens twice. 200 all the same: a non-2xx makes the provider retry for days.
            WEBHOOKS.labels("duplicate").inc()
            log.warning("payments.webhook.replay_refused", event_id=event["id"], type=event["type"])
            return Receipt(event["id"], duplicate=True)
        await enqueue(
            session, PROCESS_JOB, {"payment_id": payment_id}, lock_key=f"payment:{payment_id}"
        )
        WEBHOOKS.labels("accepted").inc()
        return Receipt(event["id"], duplicate=False)

    # ---- jobs -------------------------------------------------------------------------------
    async def process_events(
        self, session: AsyncSession, runtime: Runtime, *, payment_id: str
    ) -> int:
        """Apply ``payment_id``'s pending events in order; returns how many were processed.

        Each event runs in a savepoint. One that fails is retried later (the events after it
        wait: order per payment is kept) and dead-lettered after
        ``PAYMENTS_EVENT_MAX_ATTEMPTS``; one that can never succeed is dead at once."""
        settings = runtime.settings
        done = 0
        events = await repository.pending_events(session, payment_id)
        # The last event's new credit is posted after everything else this job writes: the
        # posting locks the hot ``payments`` account row until the commit, and every other
        # statement (the owner's mail, the top-up, the inbox rows) would run under that lock
        # and queue every other payment's job behind it (ADR 0053).
        late: list[LateCredit] = []
        for event in events:
            # Only the last event's: an earlier one's credit must be in the ledger before the
            # events after it (a refund is sized by what was credited). Kept apart until the
            # event's savepoint is released: a failed event posts nothing.
            deferred: list[LateCredit] | None = [] if event is events[-1] else None
            try:
                async with session.begin_nested():
                    await self._apply_event(session, event, late=deferred)
            except (PermanentEventError, SurgeError, KeyError, TypeError, ValueError) as error:
                event.attempts += 1
                event.last_error = f"{type(error).__name__}: {error}"[:500]
                permanent = isinstance(error, PermanentEventError)
                if permanent or event.attempts >= settings.PAYMENTS_EVENT_MAX_ATTEMPTS:
                    event.state = "dead"
                    EVENTS_DEAD.inc()
                    event.processed_at = _now()
                    log.error(
                        "payments.event.dead",
                        event_id=event.id,
                        type=event.type,
                        payment_id=payment_id,
                        error=event.last_error,
                    )
                    continue  # the next events are not blocked by a dead one
                log.warning(
                    "payments.event.failed",
                    event_id=event.id,
                    attempts=event.attempts,
                    error=event.last_error,
                )
                await enqueue(
                    session,
                    PROCESS_JOB,
                    {"payment_id": payment_id},
                    lock_key=f"payment:{payment_id}",
                    delay=settings.PAYMENTS_EVENT_RETRY * 2 ** (event.attempts - 1),
                )
                break
            event.state = "processed"
            event.processed_at = _now()
            done += 1
            late += deferred or ()
        await session.flush()
        # Outside the event's savepoint: a failure here fails the whole job, which the job
        # engine retries (nothing of it is committed, the event stays pending).
        await post_late(session, late)
        return done

    async def enqueue_reconciliation(self, session: AsyncSession, runtime: Runtime) -> int:
        """One reconciliation job per top-up left open too long, and a processing job per
        payment whose inbox events waited too long (the cron's work); returns jobs queued."""
        settings = runtime.settings
        queued = 0
        stale = await repository.stale_open_topups(
            session,
            older_than=settings.PAYMENTS_RECONCILE_AFTER,
            limit=settings.PAYMENTS_RECONCILE_BATCH,
        )
        for topup_id, payment_id in stale:
            job = await enqueue(
                session,
                RECONCILE_JOB,
                {"topup_id": str(topup_id)},
                dedup_key=f"reconcile:{topup_id}",
                lock_key=f"payment:{payment_id}",
            )
            queued += job is not None
        for payment_id in await repository.stale_pending_payments(
            session, older_than=settings.PAYMENTS_RECONCILE_AFTER
        ):
            job = await enqueue(
                session,
                PROCESS_JOB,
                {"payment_id": payment_id},
                dedup_key=f"events:{payment_id}",
                lock_key=f"payment:{payment_id}",
            )
            queued += job is not None
        return queued

    async def reconcile_topup(self, session: AsyncSession, runtime: Runtime, topup_id: UUID) -> str:
        """Ask the provider where an open top-up stands and apply it; returns the status."""
        topup = await repository.topup_for_update(session, topup_id)
        if topup is None or topup.provider_payment_id is None:
            return "missing"
        if topup.status not in repository.OPEN_STATUSES:
            return topup.status
        answer = await provider_client(runtime).retrieve_intent(topup.provider_payment_id)
        topup.checked_at = _now()
        intent = intent_of(answer)
        if intent is None:
            log.warning("payments.reconcile.unknown", topup_id=str(topup_id), status=answer.status)
            return topup.status
        await self._apply_intent(session, topup, intent)
        log.info("payments.reconcile.applied", topup_id=str(topup_id), status=topup.status)
        return topup.status

    async def scan_provider(
        self, session: AsyncSession, runtime: Runtime, *, pages: int = 20
    ) -> int:
        """List the provider's recent intents and settle every Surge intent that has no row
        or an open one; returns how many were applied. Closes the last gap: a request that
        died after the provider answered, a client that never retried, and no webhook."""
        settings = runtime.settings
        now = _now().timestamp()
        client = provider_client(runtime)
        applied = 0
        after: str | None = None
        for _ in range(pages):
            answer = await client.list_intents(
                created_gte=int(now - settings.PAYMENTS_SCAN_WINDOW.total_seconds()),
                created_lte=int(now - settings.PAYMENTS_RECONCILE_AFTER.total_seconds()),
                starting_after=after,
            )
            intents = [i for i in answer.body.get("data") or [] if isinstance(i, dict)]
            if answer.status != 200 or not intents:
                break
            known = await repository.statuses(session, [str(i["id"]) for i in intents])
            for intent in intents:
                status = known.get(str(intent["id"]))
                metadata = intent.get("metadata") or {}
                if "topup_id" not in metadata or (
                    status is not None and status not in repository.OPEN_STATUSES
                ):
                    continue
                try:
                    async with session.begin_nested():
                        topup = await self._topup_of(session, intent, amount=int(intent["amount"]))
                        before = (topup.status, topup.amount_credited)
                        await self._apply_intent(session, topup, intent)
                except (PermanentEventError, SurgeError) as error:
                    log.error("payments.scan.failed", payment_id=intent["id"], error=str(error))
                    continue
                if (topup.status, topup.amount_credited) != before or status is None:
                    applied += 1
                    log.warning(
                        "payments.scan.applied",
                        payment_id=intent["id"],
                        status=topup.status,
                        had_row=status is not None,
                    )
            if not answer.body.get("has_more"):
                break
            after = str(intents[-1]["id"])
        return applied

    # ---- admin ------------------------------------------------------------------------------
    async def list_events(
        self, session: AsyncSession, *, state: str | None, limit: int, cursor: str | None
    ) -> tuple[list[PaymentEvent], str | None]:
        found = await repository.events(session, state=state, limit=limit, cursor=cursor)
        return found.items, found.next_cursor

    async def retry_event(self, session: AsyncSession, event_id: str) -> PaymentEvent:
        """Put a dead event back in the inbox and enqueue its payment's processing."""
        event = await repository.event_for_update(session, event_id)
        if event is None:
            raise EventNotFound("No such provider event.")
        if event.state != "dead":
            raise EventNotDead(f"The event is {event.state}; only a dead event can be retried.")
        event.state = "pending"
        event.attempts = 0
        event.processed_at = None
        await session.flush()
        await enqueue(
            session,
            PROCESS_JOB,
            {"payment_id": event.payment_id},
            lock_key=f"payment:{event.payment_id}",
        )
        return event

    async def totals(self, session: AsyncSession) -> dict[str, Any]:
        return await repository.totals(session)

    # ---- applying what the provider says ----------------------------------------------------
    async def _apply_event(
        self, session: AsyncSession, event: PaymentEvent, *, late: list[LateCredit] | None
    ) -> None:
        obj: dict[str, Any] = event.payload["data"]["object"]
        kind = event.type
        if kind.startswith("payment_intent."):
            topup = await self._topup_of(session, obj, amount=int(obj["amount"]))
            await self._apply_intent(session, topup, obj, late=late)
        elif kind == "charge.refunded":
            topup = await self._topup_of(session, obj, amount=int(obj["amount"]))
            await credit(session, topup, int(obj["amount_captured"]), str(obj["currency"]))
            for refund in obj.get("refunds", {}).get("data", []):
                await reverse(session, topup, refund, what="refund")
            if int(obj["amount_refunded"]) >= int(obj["amount_captured"]):
                self._move(topup, "refunded")
        elif kind == "charge.dispute.funds_withdrawn":
            topup = await self._topup_of(session, obj, amount=None)
            await credit(session, topup, topup.amount, str(obj["currency"]))
            await reverse(session, topup, obj, what="dispute")
            self._move(topup, "disputed")
        elif kind == "charge.dispute.funds_reinstated":
            topup = await self._topup_of(session, obj, amount=None)
            await credit(session, topup, topup.amount, str(obj["currency"]))
            if await reinstate(session, topup, obj):
                self._move(topup, "dispute_won")
            else:  # the dispute took nothing back (refunded first): nothing was won back
                self._move(topup, "disputed")
        else:
            log.info("payments.event.ignored", event_id=event.id, type=kind)

    async def _topup_of(
        self, session: AsyncSession, obj: Mapping[str, Any], *, amount: int | None
    ) -> Topup:
        """The top-up an event is about; created from the intent's metadata when the request
        that made the intent never committed (crashed after the provider answered)."""
        payment_id = str(obj.get("payment_intent") or obj["id"])
        topup = await repository.topup_by_payment(session, payment_id)
        if topup is not None:
            return topup
        metadata = obj.get("metadata") or {}
        if amount is None or "topup_id" not in metadata or "owner_id" not in metadata:
            raise PermanentEventError(f"payment {payment_id} is not a Surge top-up")
        try:
            return await repository.lock_topup(
                session,
                topup_id=UUID(str(metadata["topup_id"])),
                owner_id=UUID(str(metadata["owner_id"])),
                amount=amount,
                currency=str(obj["currency"]).upper(),
                provider_payment_id=payment_id,
            )
        except LookupError as error:
            raise PermanentEventError(f"payment {payment_id} does not match its top-up") from error

    async def _apply_intent(
        self,
        session: AsyncSession,
        topup: Topup,
        intent: Mapping[str, Any],
        *,
        late: list[LateCredit] | None = None,
    ) -> None:
        status = str(intent["status"])
        if status == "succeeded":
            await credit(
                session, topup, int(intent["amount_received"]), str(intent["currency"]), late=late
            )
            self._move(topup, "succeeded")
        elif status == "processing":
            self._move(topup, "processing")
        elif status == "requires_action":
            if self._move(topup, "requires_action"):
                action = intent.get("next_action") or {}
                topup.next_action_url = (action.get("redirect_to_url") or {}).get("url")
        elif status in ("requires_payment_method", "canceled"):
            error = intent.get("last_payment_error") or {}
            if self._move(topup, "failed"):
                topup.failure_code = str(error.get("code") or status)
                topup.next_action_url = None
        await session.flush()

    def _move(self, topup: Topup, status: str) -> bool:
        """Forward only (``_RANK``): a late or duplicated event never takes a top-up back."""
        if _RANK[status] <= _RANK[topup.status]:
            return False
        topup.status = status
        topup.updated_at = topup.checked_at = _now()
        return True


topup = TopupService()

__all__ = [
    "PROCESS_JOB",
    "RECONCILE_JOB",
    "EventNotDead",
    "EventNotFound",
    "InvalidEvent",
    "PaymentError",
    "ProviderRejected",
    "ProviderUnavailable",
    "Receipt",
    "TopupKeyMismatch",
    "TopupNotFound",
    "TopupOutOfBounds",
    "TopupService",
    "topup",
    "topup_id_for",
]
