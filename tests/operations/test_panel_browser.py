"""The reseller panel driven by headless Chromium against a real `surge serve` process:
sign in, see balance and prices, run the renewal wizard (card → package → months →
confirm) and watch the status turn `succeeded` — the worker, the proxies and the provider
simulator are real too (seed 000's "renewal wizard completes")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from surge.kit.embedded import free_port
from surge.kit.runtime import Runtime
from tests.fixtures.provider import egress_proxies, provider_server
from tests.fixtures.servers import serve_env, surge_process
from tests.operations.conftest import ops_settings, ops_worker, register_fleet, reset

CHROMIUM = (
    os.environ.get("SURGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
PASSWORD = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or SURGE_CHROMIUM)"
)


@pytest.mark.timeout(240)
async def test_reseller_runs_the_renewal_wizard(
    server_urls: tuple[str, str], tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    from surge.identity.runtime import install_identity
    from surge.identity.service import identity as identity_service
    from surge.wallet.funds import funds as funds_service

    async with provider_server() as provider, egress_proxies(2) as proxies:
        settings = ops_settings(*server_urls, provider.url)
        runtime = Runtime(settings)
        install_identity(runtime)
        await runtime.start()
        try:
            await reset(runtime)
            await register_fleet(runtime, proxies)
            email = f"panel-{os.urandom(4).hex()}@example.com"
            async with runtime.db.session() as session:
                user = await identity_service.register(
                    session, runtime, email=email, password=PASSWORD, role="reseller"
                )
                await funds_service.credit(
                    session, user.id, amount=10_000, currency=settings.WALLET_CURRENCY,
                    key=f"panel:{user.id}", kind="topup",
                )  # fmt: skip

            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = serve_env(
                *server_urls,
                SURGE_AUTH_ARGON2_TIME_COST="1",
                SURGE_AUTH_ARGON2_MEMORY_KIB="1024",
                SURGE_AUTH_ARGON2_PARALLELISM="1",
            )
            with surge_process(
                ["serve", "--workers", "1", "--port", str(port), "--no-servers"],
                env,
                ready_url=f"{base}/readyz",
                log_path=tmp_path / "serve.log",
            ):
                async with ops_worker(runtime), async_playwright() as playwright:
                    browser = await playwright.chromium.launch(
                        executable_path=CHROMIUM,
                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
                    )
                    try:
                        page = await browser.new_page()
                        await page.goto(f"{base}/panel")
                        await page.fill("#email", email)
                        await page.fill("#password", PASSWORD)
                        await page.click("#signin")
                        await page.wait_for_selector("#balance:has-text('100.00')", timeout=15_000)
                        assert "sport" in (await page.text_content("#prices") or "")

                        await page.fill("#card", "12ab")  # refused before any request
                        await page.click("#next-card")
                        assert "10 to 16 digits" in (await page.text_content("#wizard-error") or "")
                        await page.fill("#card", "1234567890")
                        await page.click("#next-card")
                        await page.select_option("#package", "sport")
                        await page.click("#next-package")
                        await page.select_option("#months", "2")
                        await page.click("#next-months")
                        summary = await page.text_content("#confirm-summary") or ""
                        assert "36.00" in summary, summary  # retail sport 18.00 × 2
                        await page.click("#confirm")
                        await page.wait_for_selector(".status-succeeded", timeout=60_000)
                        await page.wait_for_selector("#balance:has-text('64.00')", timeout=15_000)
                        timeline = await page.text_content("#op-timeline") or ""
                        assert "performed" in timeline
                        await page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)
                    finally:
                        await browser.close()
        finally:
            await runtime.stop()
    performed = provider.provider.performed
    assert [(p["card"], p["package"], p["months"]) for p in performed] == [
        ("1234567890", "sport", 2)
    ]
