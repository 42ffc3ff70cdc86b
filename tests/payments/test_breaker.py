"""The provider down: the ``payments.provider`` breaker opens (503 + Retry-After, nothing
charged, no top-up row), then closes when the provider is back."""

from __future__ import annotations

from sqlalchemy import text

from surge.kit.breaker import BreakerConfig, BreakerRegistry, BreakerState
from surge.payments.provider import EXTENSION, ProviderClient
from tests.payments.conftest import Live


async def topups_of(live: Live, owner: object) -> int:
    async with live.runtime.db.session() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM payment_topups WHERE owner_id = :o"), {"o": owner}
        )
    return int(count or 0)


async def test_breaker_opens_when_down_and_closes_when_back(live: Live) -> None:
    # A private breaker with a short open time, so the test does not wait 30 s nor open
    # the fleet-wide one other tests use.
    now = [1_000.0]
    registry = BreakerRegistry(
        default=BreakerConfig(window_size=4, minimum_calls=4, open_duration=30, half_open_calls=1),
        clock=lambda: now[0],
    )
    client = ProviderClient(live.runtime.settings, registry=registry)
    live.runtime.extensions[EXTENSION] = client
    caller = await live.reseller()
    await live.sim.control(down=True)

    statuses = [(await live.topup(caller)).status_code for _ in range(6)]
    assert statuses == [503] * 6
    assert client.breaker.state is BreakerState.OPEN
    refused = (await live.sim.state())["counters"]["refused_down"]
    rejected = await live.topup(caller)
    assert rejected.status_code == 503
    assert rejected.headers["content-type"].startswith("application/problem+json")
    assert int(rejected.headers["Retry-After"]) >= 1
    assert "nothing was charged" in rejected.json()["detail"]
    # Open: the provider is not even called.
    assert (await live.sim.state())["counters"]["refused_down"] == refused
    assert await topups_of(live, caller.id) == 0

    await live.sim.control(down=False)
    now[0] += 31  # the open duration passes: the next call is a trial
    back = await live.topup(caller, amount=1_500)
    assert back.status_code == 201, back.text
    assert client.breaker.status()["state"] == BreakerState.CLOSED.value
    await live.settled()
    assert await topups_of(live, caller.id) == 1
    wallet = await live.api.get("/api/v1/wallet", headers=caller.headers)
    assert wallet.json()["balance"] == 1_500
