"""One attempt of an operation on the provider's website (``operations.run``'s walk):
lease an account, pick egress proxies, reuse or make a provider session, ask before
resending (ADR 0017), perform. The verdict is the service's to write."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import orjson
import structlog

from surge.kit.redis import RedisUnavailable
from surge.kit.runtime import Runtime
from surge.models.operations import EgressProxy, Operation
from surge.operations import repository
from surge.operations.provider import (
    AccountFailed,
    Blocked,
    ProviderFault,
    ProviderSession,
    ProxyFailed,
    Rejected,
    SessionExpired,
    Unclear,
)
from surge.operations.runtime import provider_client, sealer

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Lease:
    account_id: UUID
    username: str
    password: str
    token: UUID
    since: datetime


def session_key(account_id: UUID, proxy_id: UUID) -> str:
    return f"operations:session:{account_id}:{proxy_id}"


def affinity_key(account_id: UUID) -> str:
    """The proxy an account last worked through (its session there is likely cached)."""
    return f"operations:affinity:{account_id}"


def backoff(base: timedelta, cap: timedelta) -> Callable[[int], timedelta]:
    """Randomized exponential backoff of a proxy's re-check (scrapy-rotating-proxies):
    ``d = min(cap, base × 2^(n-1))``, waited ``d/2 + random(0, d/2)`` (equal jitter: never
    almost zero, so a blocked address is not hammered by the next probe)."""

    def delay(n: int) -> timedelta:
        d = min(cap.total_seconds(), base.total_seconds() * 2 ** max(0, n - 1))
        return timedelta(seconds=d / 2 + random.uniform(0, d / 2))

    return delay


class Attempts:
    """One attempt's walk: lease an account, pick proxies, reuse or make a session, ask
    before resending, perform. Returns (verdict, detail): ``done``, ``rejected``,
    ``unclear``, or ``wait`` when no account could be leased or no proxy picked at all and
    one will be due again in ``fleet_due_in``."""

    def __init__(self, runtime: Runtime, operation: Operation, attempt: int) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.operation = operation
        self.attempt = attempt
        self.client = provider_client(runtime)
        self.sealer = sealer(runtime)
        self.backoff = backoff(
            self.settings.OPERATIONS_PROXY_BACKOFF, self.settings.OPERATIONS_PROXY_BACKOFF_MAX
        )
        #: A state-changing call left in this attempt (its answer may be lost).
        self.sent = False
        #: Set with the ``wait`` verdict: when the fleet may have an account or a proxy again.
        self.fleet_due_in: timedelta | None = None

    async def record(
        self, lease: Lease | None, proxy: EgressProxy | None, outcome: str, detail: str | None,
        started: datetime,
    ) -> None:  # fmt: skip
        async with self.runtime.db.session() as s:
            await repository.add_attempt(
                s, self.operation.id, attempt=self.attempt,
                account_id=lease.account_id if lease else None,
                proxy_id=proxy.id if proxy else None, outcome=outcome, detail=detail,
                started_at=started,
            )  # fmt: skip

    async def lease(self) -> Lease | None:
        """An account, waiting up to the account lease for one to be free."""
        deadline = time.monotonic() + self.settings.OPERATIONS_ACCOUNT_LEASE.total_seconds() / 4
        delay = 0.05
        while True:
            async with self.runtime.db.session() as s:
                got = await repository.lease_account(
                    s, lease=self.settings.OPERATIONS_ACCOUNT_LEASE, exclude=[]
                )
                now = await repository.now(s)
            if got is not None:
                account, token = got
                password = self.sealer.open(account.secret)
                return Lease(account.id, account.username, password, token, now)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    async def release(self, lease: Lease) -> None:
        async with self.runtime.db.session() as s:
            await repository.release_account(s, lease.account_id, lease.token)

    async def drive(self) -> tuple[str, str]:
        lease = await self.lease()
        if lease is None:
            # Every active account is held by other jobs: wait for a lease to end, nothing
            # spent, as for a cooling proxy fleet (ADR 0037, 0060). None is due by itself
            # (all disabled or failed): the attempt counts.
            async with self.runtime.db.session() as s:
                self.fleet_due_in = await repository.accounts_due_in(s)
            if self.fleet_due_in is not None:
                due = self.fleet_due_in.total_seconds()
                return (
                    "wait",
                    f"NO_ACCOUNT: every provider account is busy, next lease ends in {due:.0f} s",
                )
            await self.record(None, None, "no_account", "no provider account is active",
                              datetime.now(UTC))  # fmt: skip
            return "unclear", "NO_ACCOUNT: no provider account is active"
        try:
            return await self._with_account(lease)
        finally:
            await self.release(lease)

    async def _with_account(self, lease: Lease) -> tuple[str, str]:
        tried: list[UUID] = []
        last = "NO_PROXY: no egress proxy available"
        # Crawlee's binding, fleet-wide: back to the proxy this account's session lives on.
        prefer = await self._affinity(lease.account_id)
        for _ in range(max(1, self.settings.OPERATIONS_PROXY_TRIES)):
            async with self.runtime.db.session() as s:
                proxy = await repository.pick_proxy(
                    s, exclude=tried, probe_hold=self.settings.OPERATIONS_TIMEOUT * 2,
                    prefer=prefer,
                )  # fmt: skip
            if proxy is None:
                if not tried:  # the whole fleet is cooling down: wait for it, nothing spent
                    async with self.runtime.db.session() as s:
                        self.fleet_due_in = await repository.fleet_due_in(s)
                    if self.fleet_due_in is not None:
                        due = self.fleet_due_in.total_seconds()
                        return (
                            "wait",
                            f"NO_PROXY: every egress proxy is cooling down, next re-check in {due:.0f} s",
                        )
                break
            tried.append(proxy.id)
            # The step starts when the proxy was picked, by the database's clock (the pick's
            # ``last_used_at``), not when this coroutine next ran: under load the two are
            # apart by the event loop's lag, and the timeline must order picks against marks.
            started = proxy.last_used_at or datetime.now(UTC)
            try:
                verdict = await self._through(lease, proxy)
            except Blocked as fault:
                await self._proxy_down(proxy, fault, blocked=True)
                last = f"PROXY_BLOCKED: {fault}"
                await self.record(lease, proxy, "proxy_blocked", str(fault), started)
                continue
            except ProxyFailed as fault:
                await self._proxy_down(proxy, fault, blocked=False)
                last = f"PROXY_FAILED: {fault}"
                await self.record(lease, proxy, "proxy_failed", str(fault), started)
                continue
            except AccountFailed as fault:
                await self._account_failed(lease, str(fault))
                await self.record(lease, proxy, "account_failed", str(fault), started)
                return "unclear", f"ACCOUNT_FAILED: {fault}"
            except Rejected as fault:
                await self._proxy_ok(proxy)
                await self.record(lease, proxy, "rejected", str(fault), started)
                return "rejected", f"REJECTED: {fault}"
            except (Unclear, SessionExpired) as fault:
                await self.record(lease, proxy, "unclear", str(fault), started)
                last = f"UNCLEAR: {fault}"
                if self.sent:
                    return "unclear", last
                continue  # nothing state-changing left: another proxy may do better
            await self._proxy_ok(proxy, lease=lease, outcome=verdict, started=started)
            if proxy.id != prefer:
                await self._remember(lease.account_id, proxy.id)
            return "done", verdict
        return "unclear", last

    async def _through(self, lease: Lease, proxy: EgressProxy) -> str:
        """Run the operation through ``proxy``; returns ``performed`` or ``confirmed``."""
        url = self.sealer.open(proxy.secret)
        key = session_key(lease.account_id, proxy.id)
        for fresh in (False, True):
            session = None if fresh else await self._cached(key)
            if session is None:
                session = await self.client.login(url, lease.username, lease.password)
                await self._store(key, session)
            try:
                return await self._perform(url, session)
            except SessionExpired:
                await self._forget(key)
                if fresh:
                    raise
        raise AssertionError("unreachable")

    async def _perform(self, url: str, session: ProviderSession) -> str:
        op = self.operation
        reference = str(op.id)
        # The lost-reply rule: once sent, it may have happened. Ask, never resend blindly.
        if op.sent_at is not None and reference in await self.client.history(
            url, session, card=op.card
        ):
            return "confirmed"
        async with self.runtime.db.session() as s:
            await repository.mark_sent(s, op.id)
        op.sent_at = op.sent_at or datetime.now(UTC)
        self.sent = True
        try:
            await self._send(url, session)
        except Unclear:
            # No answer (dropped, 5xx, timeout): ask right away, through the same session.
            if reference in await self.client.history(url, session, card=op.card):
                return "confirmed"
            raise
        return "performed"

    async def _send(self, url: str, session: ProviderSession) -> None:
        op = self.operation
        if op.kind == "renew":
            assert op.package is not None
            await self.client.renew(
                url, session, card=op.card, package=op.package, months=op.months,
                reference=str(op.id),
            )  # fmt: skip
        else:
            await self.client.refresh_signal(url, session, card=op.card, reference=str(op.id))

    # ---- shared state ---------------------------------------------------------------------
    async def _cached(self, key: str) -> ProviderSession | None:
        try:
            raw = await self.runtime.redis.call(lambda r: r.get(key))
        except RedisUnavailable:
            return None  # Redis down costs a login, never the operation
        if not raw:
            return None
        data = orjson.loads(raw)
        return ProviderSession(sid=data["sid"], csrf=data["csrf"])

    async def _store(self, key: str, session: ProviderSession) -> None:
        ttl = int(self.settings.OPERATIONS_SESSION_TTL.total_seconds())
        payload = orjson.dumps({"sid": session.sid, "csrf": session.csrf})
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(lambda r: r.set(key, payload, ex=ttl))

    async def _affinity(self, account_id: UUID) -> UUID | None:
        try:
            raw = await self.runtime.redis.call(lambda r: r.get(affinity_key(account_id)))
        except RedisUnavailable:
            return None
        return UUID(raw.decode() if isinstance(raw, bytes) else str(raw)) if raw else None

    async def _remember(self, account_id: UUID, proxy_id: UUID) -> None:
        ttl = int(self.settings.OPERATIONS_SESSION_TTL.total_seconds())
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(
                lambda r: r.set(affinity_key(account_id), str(proxy_id), ex=ttl)
            )

    async def _forget(self, key: str) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(lambda r: r.delete(key))

    async def _proxy_ok(
        self, proxy: EgressProxy, *, lease: Lease | None = None, outcome: str | None = None,
        started: datetime | None = None,
    ) -> None:  # fmt: skip
        """The proxy worked (and, in the same transaction, the step's timeline row)."""
        async with self.runtime.db.session() as s:
            if await repository.proxy_ok(s, proxy.id, probe=proxy.status == "inactive"):
                log.info("operations.proxy.reactivated", proxy=proxy.label)
            if outcome is not None and started is not None:
                await repository.add_attempt(
                    s, self.operation.id, attempt=self.attempt,
                    account_id=lease.account_id if lease else None, proxy_id=proxy.id,
                    outcome=outcome, detail=None, started_at=started,
                )  # fmt: skip

    async def _proxy_down(self, proxy: EgressProxy, fault: ProviderFault, *, blocked: bool) -> None:
        async with self.runtime.db.session() as s:
            found = await repository.proxy_down(
                s, proxy.id, reason="PROXY_BLOCKED" if blocked else "PROXY_FAILED",
                error=str(fault), blocked=blocked, max_failures=3, backoff=self.backoff,
            )  # fmt: skip
        if found is not None and found.status == "inactive":
            log.warning(
                "operations.proxy.blocked" if blocked else "operations.proxy.inactive",
                proxy=proxy.label, reason=found.reason, retry_at=str(found.retry_at),
            )  # fmt: skip

    async def _account_failed(self, lease: Lease, reason: str) -> None:
        async with self.runtime.db.session() as s:
            await repository.set_account_status(
                s, lease.account_id, status="failed", error=reason, failed=True
            )
        log.warning("operations.account.failed", account=lease.username, reason=reason)
