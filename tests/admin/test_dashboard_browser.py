"""The admin page driven by a real browser (headless Chromium through Playwright) against a
real `surge serve` process: sign in with MFA, see the health score, clear the caches.

Needs a Chromium binary (Debian's `chromium` package, or SURGE_CHROMIUM=/path); Playwright's
own browser download is not used. Without one the test is skipped and says why.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from surge.identity.runtime import install_identity
from surge.identity.service import identity as identity_service
from surge.kit.embedded import free_port
from surge.kit.runtime import Runtime
from tests.fixtures.servers import serve_env, surge_process

CHROMIUM = (
    os.environ.get("SURGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
PASSWORD = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or SURGE_CHROMIUM)"
)


@pytest.mark.timeout(180)
async def test_admin_signs_in_with_mfa_and_clears_caches(
    server_urls: tuple[str, str], runtime: Runtime, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    identity = install_identity(runtime)
    email = f"browser-admin-{os.urandom(4).hex()}@example.com"
    async with runtime.db.session() as session:
        await identity_service.register(
            session, runtime, email=email, password=PASSWORD, role="admin"
        )

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
        # Enrol MFA over the API, as an operator would with an authenticator app.
        async with httpx.AsyncClient(base_url=base) as api:
            signed = await api.post(
                "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
            )
            headers = {"Authorization": f"Bearer {signed.json()['access_token']}"}
            setup = (await api.post("/api/v1/auth/mfa/setup", headers=headers)).json()
            verified = await api.post(
                "/api/v1/auth/mfa/verify",
                json={"code": identity.totp.now(setup["secret"])},
                headers=headers,
            )
            assert verified.status_code == 200, verified.text
        # The TOTP step just used cannot be replayed: sign in with a backup code.
        backup_code = setup["backup_codes"][0]

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = await browser.new_page()
                await page.goto(f"{base}/admin")
                await page.fill("#email", email)
                await page.fill("#password", PASSWORD)
                await page.fill("#otp", backup_code)
                await page.click("button[type=submit]")
                await page.wait_for_selector("#console:not([hidden])", timeout=15_000)
                # (no wait_for_function: the page's CSP forbids eval, as it should)
                await page.wait_for_selector("#score:has-text('/ 100')", timeout=15_000)
                assert not await page.is_visible("#login"), "the sign-in form must go away"
                score = await page.text_content("#score")
                assert score is not None
                assert score.strip() == "100 / 100"
                assert "requests" in (await page.text_content("#http") or "")
                await page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)

                await page.click("#clear-cache")
                await page.wait_for_timeout(500)
            finally:
                await browser.close()

    async with runtime.db.session() as session:
        cleared = await session.scalar(
            text(
                "SELECT count(*) FROM audit_log a JOIN users u ON u.id = a.actor_id "
                "WHERE a.action = 'admin.cache.cleared' AND u.email = :e"
            ),
            {"e": email},
        )
    assert cleared == 1
