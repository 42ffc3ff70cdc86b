"""Demo data for ``make run`` / ``surge seed-demo``: a few accounts to log in with.

Idempotent: it does nothing when the demo admin already exists. Everything goes through the
domain services (passwords hashed, plan changes audited, partner wallets opened, revenue
events enqueue their earnings jobs, which the worker fleet then credits), so the demo shows
what the product does rather than rows typed into tables.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from rich.console import Console

from surge.config import Settings
from surge.config import settings as default_settings
from surge.identity.runtime import install_identity
from surge.identity.service import identity as identity_service
from surge.kit.runtime import Runtime
from surge.wallet.service import wallet as wallet_service
from surge.worker import discover

DEMO_PASSWORD = "surge-demo-password"
DEMO_DOMAIN = "demo.surge.dev"

#: (local part, role, plan)
ACCOUNTS = [
    ("admin", "admin", "ultra"),
    ("auditor", "admin_readonly", "free"),  # the console's read-only administrator
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
        return True
    finally:
        await runtime.stop()


def seed(console: Console, settings: Settings | None = None) -> None:
    with console.status("Loading demo data..."):
        created = asyncio.run(seed_async(settings or default_settings))
    if created:
        console.print(
            f"[green]✓[/] Demo data: admin, auditor, alice, bob, carol, partner1, partner2, "
            f"reseller1 @{DEMO_DOMAIN}, password [bold]{DEMO_PASSWORD}[/] (auditor: read-only admin; "
            f"sign in at /admin, where the second factor is enrolled in the page)"
        )
    else:
        console.print(f"[green]✓[/] Demo data already loaded (password {DEMO_PASSWORD})")
