"""A Stripe-shaped payment provider on loopback, with signed webhooks and fault injection.

    python -m surge.sim.payments --host 127.0.0.1 --port 12111 \\
        --webhook-url http://127.0.0.1:8000/api/v1/webhooks/payments --webhook-secret whsec_x

What it does (the subset of Stripe's PaymentIntents Surge uses, same shapes and names):

- ``POST /v1/payment_intents`` (JSON: ``amount``, ``currency``, ``payment_method``,
  ``confirm``, ``metadata``; ``Idempotency-Key`` honoured: same key and parameters → the
  first answer, other parameters → 400 ``idempotency_error``). Test cards decide the outcome:

  ============================================  ============================================
  ``pm_card_visa`` / ``4242424242424242``        succeeds at once
  ``pm_card_chargeDeclined`` / ``4000000000000002``  declined: 402 ``card_declined``
  ``pm_card_authenticationRequired`` / ``4000002500003155``  ``requires_action`` (3-D Secure):
                                                 ``POST /_sim/authenticate/{id}`` completes it
  ``pm_card_slow`` / ``4000000000000077``        ``processing``, succeeds after ``slow_after`` s
  ============================================  ============================================

- ``GET /v1/payment_intents/{id}``; ``GET /v1/payment_intents`` (newest first,
  ``created[gte]``/``created[lte]``, ``limit``, ``starting_after``); ``POST /v1/refunds`` (``payment_intent``, ``amount``);
  ``POST /_sim/payment_intents/{id}/dispute`` (the cardholder disputes: funds withdrawn);
  ``POST /_sim/disputes/{id}/win`` (the merchant won it: funds reinstated).
- Every state change emits an event (``payment_intent.succeeded``, ``.payment_failed``,
  ``.processing``, ``.requires_action``, ``charge.refunded``,
  ``charge.dispute.funds_withdrawn``, ``charge.dispute.funds_reinstated``) POSTed to the webhook URL with
  ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`` — one ``v1``
  per active secret, so both verify during a rotation — and retried with exponential
  backoff until a 2xx (Stripe retries for 3 days; here ``retry_max`` attempts).
- ``POST /_sim/control`` changes the faults for the events emitted from then on:
  ``duplicate`` / ``reorder`` / ``drop`` (probabilities 0-1), ``delay`` (seconds before
  delivery), ``old_timestamp`` (sign with t = now − 600 s), ``secrets`` (the active signing
  secrets, newest first: a rotation), ``down`` (every API call answers 503),
  ``latency`` (seconds per API call), ``slow_after``, ``seed``, ``webhook_url``.
- ``GET /_sim/state``: the provider's own books (``captured``, ``refunded``, ``disputed``
  per currency, intents by status) and delivery counters, so tests compare the ledger with
  what the provider says it took. ``POST /_sim/flush`` sends held (reordered) events now;
  ``GET /_sim/idle`` answers once nothing is left to deliver.

No card number is ever logged or stored: the simulator keeps the test card's *behaviour*.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import random
import secrets as pysecrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("surge.sim.payments")

SUCCEED, DECLINE, ACTION, SLOW = "succeed", "decline", "action", "slow"
CARDS = {
    "pm_card_visa": SUCCEED,
    "4242424242424242": SUCCEED,
    "pm_card_chargeDeclined": DECLINE,
    "4000000000000002": DECLINE,
    "pm_card_authenticationRequired": ACTION,
    "4000002500003155": ACTION,
    "pm_card_slow": SLOW,
    "4000000000000077": SLOW,
}


def sign(payload: bytes, secrets: list[str], timestamp: int) -> str:
    """The ``Stripe-Signature`` header value for ``payload``, one ``v1`` per secret."""
    signed = f"{timestamp}.".encode() + payload
    parts = [f"t={timestamp}"]
    for secret in secrets:
        parts.append("v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


@dataclass
class Faults:
    duplicate: float = 0.0
    reorder: float = 0.0
    drop: float = 0.0
    delay: float = 0.0
    old_timestamp: bool = False
    down: bool = False
    latency: float = 0.0
    slow_after: float = 1.0


@dataclass
class Provider:
    """The simulator's whole state (one process, one event loop: no locks needed)."""

    webhook_url: str
    secrets: list[str]
    retry_base: float = 0.2
    retry_cap: float = 5.0
    retry_max: int = 30
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    captured: Counter[str] = field(default_factory=Counter)
    refunded: Counter[str] = field(default_factory=Counter)
    disputed: Counter[str] = field(default_factory=Counter)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    held: list[dict[str, Any]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    client: httpx.AsyncClient | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ---- ids and events -------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids):08d}{pysecrets.token_hex(6)}"

    def emit(self, type_: str, obj: dict[str, Any]) -> None:
        event = {
            "id": self.new_id("evt"),
            "object": "event",
            "type": type_,
            "created": int(time.time()),
            "data": {"object": json.loads(json.dumps(obj))},  # a snapshot, as Stripe sends
            "livemode": False,
        }
        self.counters["events"] += 1
        faults = self.faults
        if faults.drop and self.rng.random() < faults.drop:
            self.counters["dropped"] += 1
            return
        copies = 2 if faults.duplicate and self.rng.random() < faults.duplicate else 1
        self.counters["duplicated"] += copies - 1
        if faults.reorder and self.rng.random() < faults.reorder:
            # Held back until the next event has been sent (or a flush): it arrives late.
            self.counters["reordered"] += 1
            self.held.extend([event] * copies)
            self.spawn(self._release_held_later())
            return
        for _ in range(copies):
            self.spawn(self.deliver(event, delay=faults.delay))
        for late in self.held:
            self.spawn(self.deliver(late, delay=faults.delay + 0.05))
        self.held.clear()

    async def _release_held_later(self) -> None:
        await asyncio.sleep(0.5)
        self.flush()

    def flush(self) -> None:
        for late in self.held:
            self.spawn(self.deliver(late, delay=0))
        self.held.clear()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        self.idle.clear()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self.tasks and not self.held:
            self.idle.set()

    async def deliver(self, event: dict[str, Any], *, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        body = json.dumps(event, separators=(",", ":")).encode()
        assert self.client is not None
        for attempt in range(self.retry_max):
            now = int(time.time())
            stamp = now - 600 if self.faults.old_timestamp else now
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign(body, self.secrets, stamp),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) surge-sim",
            }
            try:
                response = await self.client.post(self.webhook_url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as error:
                status = 0
                log.info("webhook %s attempt %d failed: %s", event["id"], attempt + 1, error)
            self.counters[f"status_{status}"] += 1
            if 200 <= status < 300:
                self.counters["delivered"] += 1
                return
            self.counters["retries"] += 1
            backoff = min(self.retry_cap, self.retry_base * 2**attempt)
            await asyncio.sleep(self.rng.uniform(backoff / 2, backoff))
        self.counters["abandoned"] += 1

    # ---- payment intents ------------------------------------------------------------------
    def succeed(self, intent: dict[str, Any]) -> None:
        intent.update(status="succeeded", amount_received=intent["amount"], next_action=None)
        intent["latest_charge"] = intent.get("latest_charge") or self.new_id("ch")
        self.captured[intent["currency"]] += intent["amount"]
        self.emit("payment_intent.succeeded", intent)

    def fail(self, intent: dict[str, Any], code: str) -> None:
        intent.update(
            status="requires_payment_method",
            next_action=None,
            last_payment_error={"type": "card_error", "code": code, "decline_code": code},
        )
        self.emit("payment_intent.payment_failed", intent)

    async def finish_slow(self, intent_id: str) -> None:
        await asyncio.sleep(self.faults.slow_after)
        intent = self.intents[intent_id]
        if intent["status"] == "processing":
            self.succeed(intent)

    def create(self, params: dict[str, Any], base_url: str) -> tuple[int, dict[str, Any]]:
        amount = params.get("amount")
        currency = str(params.get("currency", "")).lower()
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
            return 400, _error("invalid_request_error", "parameter_invalid_integer", "amount")
        if len(currency) != 3:
            return 400, _error("invalid_request_error", "parameter_invalid", "currency")
        metadata = params.get("metadata") or {}
        if not isinstance(metadata, dict):
            return 400, _error("invalid_request_error", "parameter_invalid", "metadata")
        intent: dict[str, Any] = {
            "id": self.new_id("pi"),
            "object": "payment_intent",
            "amount": amount,
            "amount_received": 0,
            "amount_refunded": 0,
            "currency": currency,
            "status": "requires_payment_method",
            "metadata": {str(k): str(v) for k, v in metadata.items()},
            "created": int(time.time()),
            "latest_charge": None,
            "last_payment_error": None,
            "next_action": None,
            "livemode": False,
        }
        self.intents[intent["id"]] = intent
        self.counters["created"] += 1
        method = params.get("payment_method")
        if not params.get("confirm") or method is None:
            return 200, intent
        behaviour = CARDS.get(str(method))
        if behaviour is None:
            self.fail(intent, "invalid_number")
            return 402, {
                **_error("card_error", "invalid_number", "payment_method"),
                "payment_intent": intent,
            }
        if behaviour == SUCCEED:
            self.succeed(intent)
        elif behaviour == DECLINE:
            self.fail(intent, "card_declined")
            return 402, {
                **_error("card_error", "card_declined", "payment_method"),
                "payment_intent": intent,
            }
        elif behaviour == ACTION:
            intent["status"] = "requires_action"
            intent["next_action"] = {
                "type": "redirect_to_url",
                "redirect_to_url": {"url": f"{base_url}/_sim/authenticate/{intent['id']}"},
            }
            self.emit("payment_intent.requires_action", intent)
        else:
            intent["status"] = "processing"
            self.emit("payment_intent.processing", intent)
            self.spawn(self.finish_slow(intent["id"]))
        return 200, intent


def _error(type_: str, code: str, param: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "param": param, "message": f"{code}: {param}"}}


def build_app(provider: Provider) -> Starlette:
    async def api_gate(request: Request) -> Response | None:
        faults = provider.faults
        if faults.latency:
            await asyncio.sleep(faults.latency)
        if faults.down:
            provider.counters["refused_down"] += 1
            return JSONResponse(_error("api_error", "unavailable", ""), status_code=503)
        if not request.headers.get("authorization", "").startswith("Bearer sk_test_"):
            return JSONResponse(_error("invalid_request_error", "api_key", ""), status_code=401)
        return None

    async def create_intent(request: Request) -> Response:
        if (refused := await api_gate(request)) is not None:
            return refused
        raw = await request.body()
        try:
            params = json.loads(raw or b"{}")
        except ValueError:
            return JSONResponse(_error("invalid_request_error", "json", ""), status_code=400)
        key = request.headers.get("idempotency-key")
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        if key is not None and key in provider.idempotency:
            seen, status, body = provider.idempotency[key]
            if seen != digest:
                return JSONResponse(
                    _error("idempotency_error", "idempotency_key_in_use", ""), status_code=400
                )
            provider.counters["idempotent_replays"] += 1
            current = provider.intents.get(
                body.get("id") or body.get("payment_intent", {}).get("id")
            )
            return JSONResponse(
                body if current is None else {**body, **_refresh(body, current)},
                status_code=status,
                headers={"Idempotent-Replayed": "true"},
            )
        base = f"{request.url.scheme}://{request.url.netloc}"
        status, body = provider.create(params, base)
        if key is not None:
            provider.idempotency[key] = (digest, status, body)
        return JSONResponse(body, status_code=status)

    async def list_intents(request: Request) -> Response:
        """Newest first, as Stripe: ``created[gte]``, ``created[lte]``, ``limit`` (≤ 100),
        ``starting_after`` (an id: the page after it)."""
        if (refused := await api_gate(request)) is not None:
            return refused
        query = request.query_params
        gte = int(query.get("created[gte]", "0"))
        lte = int(query.get("created[lte]", str(2**62)))
        limit = max(1, min(100, int(query.get("limit", "10"))))
        items = [i for i in reversed(provider.intents.values()) if gte <= i["created"] <= lte]
        after = query.get("starting_after")
        if after:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "has_more": len(items) > limit,
                "url": "/v1/payment_intents",
            }
        )

    async def get_intent(request: Request) -> Response:
        if (refused := await api_gate(request)) is not None:
            return refused
        intent = provider.intents.get(request.path_params["id"])
        if intent is None:
            return JSONResponse(_error("invalid_request_error", "resource_missing", "id"), 404)
        return JSONResponse(intent)

    async def create_refund(request: Request) -> Response:
        if (refused := await api_gate(request)) is not None:
            return refused
        params = json.loads(await request.body() or b"{}")
        intent = provider.intents.get(str(params.get("payment_intent")))
        if intent is None or intent["status"] != "succeeded":
            return JSONResponse(_error("invalid_request_error", "charge_not_refundable", ""), 400)
        left = intent["amount_received"] - intent["amount_refunded"]
        amount = int(params.get("amount") or left)
        if not 0 < amount <= left:
            return JSONResponse(_error("invalid_request_error", "amount_too_large", ""), 400)
        refund = {
            "id": provider.new_id("re"),
            "object": "refund",
            "amount": amount,
            "currency": intent["currency"],
            "payment_intent": intent["id"],
            "status": "succeeded",
        }
        intent["amount_refunded"] += amount
        intent.setdefault("refunds", []).append(refund)
        provider.refunded[intent["currency"]] += amount
        provider.emit("charge.refunded", _charge(intent))
        return JSONResponse(refund)

    async def dispute(request: Request) -> Response:
        intent = provider.intents.get(request.path_params["id"])
        if intent is None or intent["status"] != "succeeded":
            return JSONResponse(_error("invalid_request_error", "not_disputable", ""), 400)
        left = intent["amount_received"] - intent["amount_refunded"]
        dispute_ = {
            "id": provider.new_id("dp"),
            "object": "dispute",
            "amount": left,
            "currency": intent["currency"],
            "payment_intent": intent["id"],
            "charge": intent["latest_charge"],
            "status": "needs_response",
            "reason": "fraudulent",
        }
        provider.disputed[intent["currency"]] += left
        provider.disputes[dispute_["id"]] = dispute_
        provider.emit("charge.dispute.funds_withdrawn", dispute_)
        return JSONResponse(dispute_)

    async def win(request: Request) -> Response:
        """The merchant's evidence won: the disputed amount comes back (Stripe's
        ``charge.dispute.funds_reinstated``, the dispute object with ``status: won``)."""
        dispute_ = provider.disputes.get(request.path_params["id"])
        if dispute_ is None or dispute_["status"] != "needs_response":
            return JSONResponse(_error("invalid_request_error", "not_winnable", ""), 400)
        dispute_ = dict(dispute_, status="won")
        provider.disputes[dispute_["id"]] = dispute_
        provider.disputed[dispute_["currency"]] -= dispute_["amount"]
        provider.emit("charge.dispute.funds_reinstated", dispute_)
        return JSONResponse(dispute_)

    async def authenticate(request: Request) -> Response:
        intent = provider.intents.get(request.path_params["id"])
        if intent is None or intent["status"] != "requires_action":
            return JSONResponse(_error("invalid_request_error", "unexpected_state", ""), 400)
        if request.query_params.get("outcome", "succeed") == "fail":
            provider.fail(intent, "authentication_required")
        else:
            provider.succeed(intent)
        return JSONResponse(intent)

    async def control(request: Request) -> Response:
        changes = json.loads(await request.body() or b"{}")
        for name, value in changes.items():
            if name == "secrets":
                provider.secrets = [str(s) for s in value]
            elif name == "seed":
                provider.rng.seed(value)
            elif name == "webhook_url":
                provider.webhook_url = str(value)
            elif name in ("retry_base", "retry_cap"):
                setattr(provider, name, float(value))
            elif hasattr(provider.faults, name):
                current = getattr(provider.faults, name)
                setattr(provider.faults, name, type(current)(value))
            else:
                return JSONResponse({"error": f"unknown control {name!r}"}, status_code=400)
        return JSONResponse(state())

    def state() -> dict[str, Any]:
        statuses = Counter(i["status"] for i in provider.intents.values())
        return {
            "captured": dict(provider.captured),
            "refunded": dict(provider.refunded),
            "disputed": dict(provider.disputed),
            "intents": dict(statuses),
            "counters": dict(provider.counters),
            "in_flight": len(provider.tasks),
            "held": len(provider.held),
            "faults": provider.faults.__dict__,
            "webhook_url": provider.webhook_url,
        }

    async def get_state(request: Request) -> Response:
        return JSONResponse(state())

    async def flush(request: Request) -> Response:
        provider.flush()
        return JSONResponse(state())

    async def idle(request: Request) -> Response:
        """Waits (up to ``timeout`` s) until no delivery or slow payment is left."""
        provider.flush()
        if provider.tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    provider.idle.wait(), float(request.query_params.get("timeout", "30"))
                )
        return JSONResponse(state(), status_code=200 if not provider.tasks else 408)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        provider.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        try:
            yield
        finally:
            for task in list(provider.tasks):
                task.cancel()
            await provider.client.aclose()

    return Starlette(
        routes=[
            Route("/v1/payment_intents", create_intent, methods=["POST"]),
            Route("/v1/payment_intents", list_intents, methods=["GET"]),
            Route("/v1/payment_intents/{id}", get_intent, methods=["GET"]),
            Route("/v1/refunds", create_refund, methods=["POST"]),
            Route("/_sim/payment_intents/{id}/dispute", dispute, methods=["POST"]),
            Route("/_sim/disputes/{id}/win", win, methods=["POST"]),
            Route("/_sim/authenticate/{id}", authenticate, methods=["GET", "POST"]),
            Route("/_sim/control", control, methods=["POST"]),
            Route("/_sim/state", get_state, methods=["GET"]),
            Route("/_sim/flush", flush, methods=["POST"]),
            Route("/_sim/idle", idle, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def _refresh(body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A replayed create shows the intent as it is now (Stripe replays the stored body;
    showing the current state is kinder to a client retrying after a timeout)."""
    if "payment_intent" in body:
        return {"payment_intent": current}
    return current


def _charge(intent: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": intent["latest_charge"],
        "object": "charge",
        "payment_intent": intent["id"],
        "amount": intent["amount"],
        "amount_captured": intent["amount_received"],
        "amount_refunded": intent["amount_refunded"],
        "currency": intent["currency"],
        "metadata": intent["metadata"],
        "refunds": {"object": "list", "data": list(intent.get("refunds", []))},
    }


def main(argv: list[str] | None = None) -> None:
    from surge.config import Settings

    settings = Settings()
    default_hook = f"http://{settings.HOST or '127.0.0.1'}:{settings.PORT}/api/v1/webhooks/payments"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", default=default_hook)
    parser.add_argument(
        "--webhook-secret",
        action="append",
        help="Signing secret (repeat during a rotation). Default: Surge's first secret.",
    )
    parser.add_argument("--retry-base", type=float, default=0.5, help="First retry delay, s.")
    parser.add_argument("--retry-cap", type=float, default=60.0, help="Longest retry delay, s.")
    parser.add_argument(
        "--retry-max", type=int, default=60, help="Attempts per webhook (Stripe: 3 days' worth)."
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    secrets = args.webhook_secret or [settings.PAYMENTS_WEBHOOK_SECRETS[0].get_secret_value()]
    provider = Provider(
        webhook_url=args.webhook_url,
        secrets=secrets,
        retry_base=args.retry_base,
        retry_cap=args.retry_cap,
        retry_max=args.retry_max,
    )
    if args.seed is not None:
        provider.rng.seed(args.seed)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            build_app(provider),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
        )


if __name__ == "__main__":
    main()
