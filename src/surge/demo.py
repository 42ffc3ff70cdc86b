"""Demo data for ``make run`` / ``surge seed-demo``: a few accounts to log in with.

Idempotent: it does nothing when the demo admin already exists. Everything goes through the
domain services (passwords hashed, plan changes audited, partner wallets opened, revenue
events enqueue their earnings jobs, which the worker fleet then credits), so the demo shows
what the product does rather than rows typed into tables.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.config import settings as default_settings
from surge.identity.runtime import install_identity
from surge.identity.service import identity as identity_service
from surge.kit.runtime import Runtime
from surge.notifications.service import notifications as notifications_service
from surge.operations.service import DuplicateAccount, DuplicateProxy
from surge.operations.service import operations as operations_service
from surge.wallet.funds import funds as funds_service
from surge.wallet.service import wallet as wallet_service
from surge.worker import discover

DEMO_PASSWORD = "surge-demo-password"
#: reseller1's starting credit for the renewal wizard (minor units: 500.00).
RESELLER_CREDIT = 50_000
DEMO_DOMAIN = "demo.surge.dev"

#: (local part, role, plan)
ACCOUNTS = [
    ("admin", "admin", "ultra"),
    ("auditor", "admin_readonly", "free"),  # the console's read-only administrator
    ("checker", "admin", "free"),  # the second administrator of four-eyes requests (ADR 0059)
    ("alice", "user", "plus"),
    ("bob", "user", "pro"),
    ("carol", "user", "free"),
]
#: (local part, role, share of profit in basis points)
PARTNERS = [
    ("partner1", "partner", 5_000),
    ("partner2", "partner", 2_500),
    ("reseller1", "reseller", 1_000),
]
#: (event id, kind, profit in minor units)
REVENUE_EVENTS = [
    ("demo-sale-0001", "sale", 1_250_000),
    ("demo-game-0002", "game", 480_000),
    ("demo-sale-0003", "sale", 93_500),
]


def email(local: str) -> str:
    return f"{local}@{DEMO_DOMAIN}"


async def seed_async(settings: Settings) -> bool:
    """Create the demo accounts; returns False when they were already there."""
    discover(settings)
    runtime = Runtime(settings, application_name="surge-demo")
    await runtime.start()
    install_identity(runtime)  # the hasher and plan catalogue the service uses
    try:
        created = await _seed_users(runtime)
        async with runtime.db.session() as session:
            await seed_operations(session, runtime)
        return created
    finally:
        await runtime.stop()


async def _demo_notifications(session: AsyncSession) -> None:
    """Besides the welcome mails the sign-ups above sent: two the local relay refuses
    (``surge.sim.smtp``), so the admin sees a hard bounce that suppresses its address and a
    reputation block that does not (``/api/admin/messages``, ``/api/admin/suppressions``)."""
    for local in ("bounce-demo", "blocked-demo"):
        await notifications_service.send(
            session, to=email(local), template="welcome", context={"email": email(local)},
            category="account", key=f"demo:{local}",
        )  # fmt: skip


async def seed_operations(session: AsyncSession, runtime: Runtime) -> None:
    """Issue 13: the simulator's provider accounts, the egress proxies, reseller1's credit
    and tier — so the renewal wizard at /panel works right after ``make run``. Idempotent
    (by username, proxy label and the credit's ledger key)."""
    from surge.sim import PROVIDER_DEMO_ACCOUNTS, PROXY_URLS

    for pair in PROVIDER_DEMO_ACCOUNTS.split(","):
        username, _, password = pair.partition(":")
        with contextlib.suppress(DuplicateAccount):
            await operations_service.add_account(
                session, runtime, username=username, password=password
            )
    for url in runtime.settings.OPERATIONS_PROXY_URLS or PROXY_URLS:
        with contextlib.suppress(DuplicateProxy):
            await operations_service.add_proxy(session, runtime, url=url)
    reseller = await identity_service.find_user(session, email("reseller1"))
    if reseller is not None:
        await operations_service.set_tier(session, reseller.id, tier="silver")
        await funds_service.credit(
            session, reseller.id, amount=RESELLER_CREDIT,
            currency=runtime.settings.WALLET_CURRENCY, key="demo:reseller1:credit",
            kind="topup", reference="demo",
        )  # fmt: skip


async def _seed_users(runtime: Runtime) -> bool:
    async with runtime.db.session() as session:
        admin_email = email("admin")
        if await identity_service.find_user(session, admin_email) is not None:
            return False
        admin = await identity_service.register(
            session, runtime, email=admin_email, password=DEMO_PASSWORD, role="admin"
        )
        expires = datetime.now(UTC) + timedelta(days=365)
        for local, role, plan in ACCOUNTS:
            user = (
                admin
                if local == "admin"
                else await identity_service.register(
                    session, runtime, email=email(local), password=DEMO_PASSWORD, role=role
                )
            )
            if plan != "free":
                await identity_service.change_plan(
                    session, runtime, admin.id, user_id=user.id, plan=plan, expires_at=expires
                )
        for local, role, share_bps in PARTNERS:
            partner = await identity_service.register(
                session, runtime, email=email(local), password=DEMO_PASSWORD, role=role
            )
            await wallet_service.set_partner(session, runtime, partner.id, share_bps=share_bps)
        for event_id, kind, profit in REVENUE_EVENTS:
            await wallet_service.record_revenue_event(
                session, runtime, event_id=event_id, kind=kind, profit=profit
            )
        await _demo_notifications(session)
    return True


def seed(console: Console, settings: Settings | None = None) -> None:
    with console.status("Loading demo data..."):
        created = asyncio.run(seed_async(settings or default_settings))
    if created:
        console.print(
            f"[green]✓[/] Demo data: admin, auditor, checker (a second admin for four-eyes "
            f"approvals), alice, bob, carol, partner1, partner2, "
            f"reseller1 @{DEMO_DOMAIN}, password [bold]{DEMO_PASSWORD}[/] (auditor: read-only "
            f"admin; sign in at /admin, where the second factor is enrolled in the page); "
            f"reseller panel at /panel as reseller1"
        )
    else:
        console.print(f"[green]✓[/] Demo data already loaded (password {DEMO_PASSWORD})")
