"""The open-loop traffic ``bench/chaos.py`` breaks Surge under: privilege reads, wallet reads
and idempotent withdrawals, arriving on a Poisson schedule whatever the server does.

Open loop (wrk2, k6's ``constant-arrival-rate``): each request is *due* at a moment drawn
from the arrival process and is sent then, even if earlier ones have not come back; its
latency counts from when it was due, so a stall shows as the latency users felt. Every
request is kept (``Sent``): when it was due and done, its status, ``Retry-After``, and what
the checker needs afterwards — the withdrawal id a 201 acknowledged, the plan a privilege
read showed. ``bench/load`` (the capacity generator) records status and timings but not
bodies; the chaos checker needs bodies (Jepsen's checkers work from the acknowledged
history), so this driver is its own. ``rate`` is a function of time: the arrival spike is
just another rate.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

#: Status of a request that got no HTTP answer (refused, reset, timed out).
NO_ANSWER = 0
#: Minor units of each card top-up.
TOPUP = 2_500


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    token: str
    plan: str
    partner: bool


@dataclass(slots=True)
class Sent:
    kind: str  # read | wallet | withdraw | topup
    due: float  # seconds since the run started
    done: float = 0.0
    status: int = NO_ANSWER
    retry_after: str | None = None
    user_id: str = ""
    #: The caller's real plan, and the plan a 200 privilege read showed (for a top-up: the
    #: status the 201 reported).
    plan: str = ""
    served: str = ""
    #: For a withdrawal or top-up: the Idempotency-Key sent, and the id a 201 acknowledged.
    key: str = ""
    acked_id: str = ""
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done - self.due


@dataclass
class OpenLoad:
    """Run ``start()``; ``records`` grows until ``stop()``."""

    base_url: str
    callers: list[Caller]
    rate: Callable[[float], float]
    mix: tuple[tuple[str, float], ...] = (
        ("read", 0.65), ("wallet", 0.1), ("withdraw", 0.17), ("topup", 0.08),
    )  # fmt: skip
    timeout: float = 10.0
    seed: int = 20
    #: Requests on the wire at once; later ones wait their turn (their latency still counts
    #: from when they were due). httpx's pool scans its whole queue for every request it
    #: places: with thousands queued (a 10× spike) the generator, not Surge, became the
    #: bottleneck; a semaphore queues them in O(1).
    connections: int = 256
    records: list[Sent] = field(default_factory=list)
    started_at: float = 0.0
    _task: asyncio.Task[None] | None = None
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    #: Due time of every request not answered yet (to wait for a window's last answers).
    _pending: dict[int, float] = field(default_factory=dict)
    _ids: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def oldest_pending(self) -> float | None:
        """When the oldest request still waiting for its answer was due (None: none is)."""
        return min(self._pending.values(), default=None)

    async def start(self) -> None:
        self.started_at = time.monotonic()
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            limits=httpx.Limits(
                max_connections=self.connections, max_keepalive_connections=self.connections
            ),
        )
        self._slots = asyncio.Semaphore(self.connections)
        self._task = asyncio.create_task(self._arrivals())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._inflight):  # the run is over: answers still owed are dropped
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._client.aclose()

    async def _arrivals(self) -> None:
        rng = random.Random(self.seed)
        kinds = [k for k, _ in self.mix]
        weights = [w for _, w in self.mix]
        partners = [c for c in self.callers if c.partner]
        due = 0.0
        while True:
            due += rng.expovariate(max(0.1, self.rate(due)))
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = rng.choices(kinds, weights)[0]
            caller = rng.choice(partners if kind != "read" else self.callers)
            task = asyncio.create_task(self._one(kind, caller, due))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _one(self, kind: str, caller: Caller, due: float) -> None:
        self._ids += 1
        ident = self._ids
        self._pending[ident] = due
        try:
            async with self._slots:
                await self._send(kind, caller, due)
        finally:
            del self._pending[ident]

    async def _send(self, kind: str, caller: Caller, due: float) -> None:
        sent = Sent(kind, due, user_id=caller.user_id, plan=caller.plan)
        headers = {"Authorization": f"Bearer {caller.token}"}
        try:
            if kind == "read":
                response = await self._client.get("/api/v1/me/privileges", headers=headers)
            elif kind == "wallet":
                response = await self._client.get("/api/v1/wallet", headers=headers)
            elif kind == "withdraw":
                sent.key = uuid.uuid4().hex
                response = await self._client.post(
                    "/api/v1/withdrawals",
                    json={"amount": 1_000},
                    headers={**headers, "Idempotency-Key": sent.key},
                )
            else:
                sent.key = uuid.uuid4().hex
                response = await self._client.post(
                    "/api/v1/topups",
                    json={"amount": TOPUP, "currency": "USD", "payment_method": "pm_card_visa"},
                    headers={**headers, "Idempotency-Key": sent.key},
                )
            sent.status = response.status_code
            sent.retry_after = response.headers.get("retry-after")
            if sent.status == 200 and kind == "read":
                sent.served = str(json.loads(response.content).get("plan", ""))
            elif sent.status == 201 and kind in ("withdraw", "topup"):
                body = json.loads(response.content)
                sent.acked_id = str(body["id"])
                sent.served = str(body.get("status", ""))
            elif sent.status >= 500 and sent.status != 503:
                sent.error = response.text[:300]
        except httpx.HTTPError as error:
            sent.error = type(error).__name__
        sent.done = self.now()
        self.records.append(sent)
