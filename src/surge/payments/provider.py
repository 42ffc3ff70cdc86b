"""The payment provider's API (Stripe-shaped), behind the ``payments.provider`` breaker.

One ``ProviderClient`` per process, kept on the ``Runtime`` (``provider_client(runtime)``).
It speaks through ``surge.kit.http.OutboundClient`` (timeouts, retries with jitter for calls
carrying an idempotency key) and judges the provider's health with one *named* breaker,
``payments.provider``, which ``surge.kit.breaker.BreakerFleet`` opens fleet-wide through
Redis: when one process sees the provider fail, every process stops calling it.

What counts as a failure for the breaker: a 5xx answer or a transport error (timeout,
refused connection). A 4xx (a declined card, a bad request) is the provider working.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from surge.config import Settings
from surge.kit.breaker import BreakerConfig, BreakerOpenError, BreakerRegistry, breakers
from surge.kit.errors import ServiceUnavailable
from surge.kit.http import OutboundClient, OutboundError
from surge.kit.runtime import Runtime

BREAKER = "payments.provider"
EXTENSION = "payments.provider"


class ProviderUnavailable(ServiceUnavailable):
    """The provider failed or its breaker is open: nothing was charged by this call."""

    def __init__(self, message: str, *, retry_after: float = 30.0) -> None:
        super().__init__(
            message,
            headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
            extra={"breaker": BREAKER},
        )


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """A non-5xx answer: ``status`` and the decoded JSON body."""

    status: int
    body: dict[str, Any]


class ProviderClient:
    """Create and read payment intents; see the module docstring."""

    def __init__(self, settings: Settings, *, registry: BreakerRegistry | None = None) -> None:
        self.base_url = settings.PAYMENTS_PROVIDER_URL.rstrip("/")
        self._auth = {"Authorization": f"Bearer {settings.PAYMENTS_API_KEY.get_secret_value()}"}
        registry = registry or breakers
        self.breaker = registry.get(
            BREAKER, replace(registry.default, record=(_ProviderFailed, OutboundError))
        )
        # The named breaker above judges the provider; the client's own per-target breaker
        # would only duplicate it, so its private one never trips.
        self.http = OutboundClient(
            connect_timeout=min(5.0, settings.PAYMENTS_TIMEOUT.total_seconds()),
            read_timeout=settings.PAYMENTS_TIMEOUT.total_seconds(),
            retries=1,
            backoff=0.05,
            backoff_max=0.5,
            breakers=BreakerRegistry(default=BreakerConfig(minimum_calls=2**31)),
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> ProviderAnswer:
        if not self.base_url:
            raise ProviderUnavailable("No payment provider is configured.", retry_after=60)
        headers = dict(self._auth)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            async with self.breaker.guard():
                response = await self.http.request(
                    method,
                    f"{self.base_url}{path}",
                    json=json,
                    headers=headers,
                    idempotent=method == "GET" or idempotency_key is not None,
                )
                if response.status_code >= 500:
                    raise _ProviderFailed(response.status_code)
        except BreakerOpenError as error:
            raise ProviderUnavailable(
                "The payment provider is unavailable; nothing was charged. Try again later.",
                retry_after=error.retry_after,
            ) from None
        except (_ProviderFailed, OutboundError) as error:
            raise ProviderUnavailable(
                f"The payment provider failed ({error}); nothing was charged by this request.",
                retry_after=5,
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        return ProviderAnswer(response.status_code, body if isinstance(body, dict) else {})

    async def create_intent(
        self,
        *,
        amount: int,
        currency: str,
        payment_method: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> ProviderAnswer:
        """Create and confirm a payment intent (one call, as Stripe's ``confirm=true``)."""
        return await self._call(
            "POST",
            "/v1/payment_intents",
            json={
                "amount": amount,
                "currency": currency.lower(),
                "payment_method": payment_method,
                "confirm": True,
                "metadata": metadata,
            },
            idempotency_key=idempotency_key,
        )

    async def retrieve_intent(self, intent_id: str) -> ProviderAnswer:
        return await self._call("GET", f"/v1/payment_intents/{intent_id}")

    async def list_intents(
        self,
        *,
        created_gte: int,
        created_lte: int,
        starting_after: str | None = None,
        limit: int = 100,
    ) -> ProviderAnswer:
        """One page of intents created in ``[created_gte, created_lte]``, newest first."""
        params = f"?created[gte]={created_gte}&created[lte]={created_lte}&limit={limit}"
        if starting_after:
            params += f"&starting_after={starting_after}"
        return await self._call("GET", f"/v1/payment_intents{params}")

    async def refund(self, intent_id: str, *, amount: int, idempotency_key: str) -> ProviderAnswer:
        return await self._call(
            "POST",
            "/v1/refunds",
            json={"payment_intent": intent_id, "amount": amount},
            idempotency_key=idempotency_key,
        )

    async def close(self) -> None:
        await self.http.close()


class _ProviderFailed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")


def provider_client(runtime: Runtime) -> ProviderClient:
    """The process's provider client (created on first use, closed with the runtime)."""
    client = runtime.extensions.get(EXTENSION)
    if client is None:
        client = ProviderClient(runtime.settings)
        runtime.extensions[EXTENSION] = client
    assert isinstance(client, ProviderClient)
    return client


__all__ = ["BREAKER", "ProviderAnswer", "ProviderClient", "ProviderUnavailable"]
