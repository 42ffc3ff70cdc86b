"""The console driven by a real browser (headless Chromium through Playwright) against a
real ``surge serve`` (issue 16's "done when"): the demo admin signs in, enrols MFA in the
page, sees charts with data after a short load, pauses and resumes a queue, retries a
failed job after a dry-run count, rejects a withdrawal with a reason, and finds each action
in the audit log; a read-only admin sees the same views and is refused every action; a
cross-site form post is refused.

Needs a Chromium binary (Debian's ``chromium``, or SURGE_CHROMIUM=/path); Playwright's own
browser download is not used. Without one the test is skipped and says why.
SURGE_CONSOLE_SCREENSHOTS=1 writes the screenshots to docs/console/ (the README shows them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pyotp
import pytest
from sqlalchemy import text

from surge.cli import run_migrations
from surge.demo import DEMO_PASSWORD, email, seed_async
from surge.identity.runtime import install_identity
from surge.kit.embedded import free_port
from surge.kit.runtime import Runtime
from surge.wallet.service import wallet as wallet_service
from tests.conftest import make_settings
from tests.fixtures.servers import ROOT, serve_env, surge_process
from tests.wallet.factories import fund

CHROMIUM = (
    os.environ.get("SURGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
SHOTS = os.environ.get("SURGE_CONSOLE_SCREENSHOTS") == "1"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or SURGE_CHROMIUM)"
)


@contextmanager
def evil_site(target: str) -> Iterator[str]:
    """Another origin serving a form that posts to the console (a CSRF attempt)."""
    page = (
        "<!doctype html><form method=post action='" + target + "/admin/caches/clear'>"
        "<input type=hidden name=confirm value=yes><button id=go>win a prize</button></form>"
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


async def prepare(runtime: Runtime) -> dict[str, str]:
    """Demo data, a fresh (MFA-less) demo admin, a failed job, a pending withdrawal, and a
    read-only admin with MFA."""
    await seed_async(runtime.settings)
    marker = uuid.uuid4().hex[:12]
    auditor_secret = pyotp.random_base32()
    async with runtime.db.session() as session:
        await session.execute(
            text(
                "UPDATE users SET mfa_enabled = false, mfa_secret = NULL, mfa_backup_codes = '{}' "
                "WHERE email = :e"
            ),
            {"e": email("admin")},
        )
        await session.execute(
            text(
                "UPDATE users SET mfa_enabled = true, mfa_secret = :s, mfa_last_step = NULL "
                "WHERE email = :e"
            ),
            {"e": email("auditor"), "s": auditor_secret},
        )
        await session.execute(
            text(
                "INSERT INTO jobs (queue, name, payload, state, attempts, finished_at, last_error) "
                "VALUES ('console-demo', 'console.demo', CAST(:p AS jsonb), 'failed', 3, now(), "
                "'UpstreamError: provider answered 502')"
            ),
            {"p": f'{{"order": "{marker}"}}'},
        )
        partner_id = await session.scalar(
            text("SELECT id FROM users WHERE email = :e"), {"e": email("partner1")}
        )
        assert partner_id is not None
        await fund(session, partner_id, 500_000, currency=runtime.settings.WALLET_CURRENCY)
        withdrawal = await wallet_service.request_withdrawal(
            session, runtime, partner_id, amount=25_000
        )
        await session.commit()
    return {
        "marker": marker,
        "auditor_secret": auditor_secret,
        "withdrawal": str(withdrawal.id),
    }


@pytest.mark.timeout(300)
async def test_console_in_a_browser(server_urls: tuple[str, str], tmp_path: Path) -> None:
    from playwright.async_api import Page, async_playwright, expect
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    # A database of its own: the demo seed must find it empty (and tests/test_demo.py must
    # find the shared one empty too).
    database_url = server_urls[0].rsplit("/", 1)[0] + f"/console_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(run_migrations, database_url)
    own = Runtime(make_settings(database_url, server_urls[1]))
    await own.start()
    try:
        install_identity(own)
        data = await prepare(own)
    finally:
        await own.stop()
    shots = ROOT / "docs" / "console" if SHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = serve_env(
        database_url,
        server_urls[1],
        SURGE_AUTH_ARGON2_TIME_COST="1",
        SURGE_AUTH_ARGON2_MEMORY_KIB="1024",
        SURGE_AUTH_ARGON2_PARALLELISM="1",
        SURGE_CONSOLE_SAMPLE_INTERVAL="PT1S",
    )

    async def confirm(page: Page) -> None:
        await page.wait_for_selector("#confirm")
        await page.click("#confirm-button")

    with surge_process(
        ["serve", "--workers", "1", "--port", str(port), "--no-servers"],
        env,
        ready_url=f"{base}/readyz",
        log_path=tmp_path / "serve.log",
    ):
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                context = await browser.new_context(viewport={"width": 1360, "height": 900})
                page = await context.new_page()
                # ---- sign in as the demo admin, enrol MFA in the page ----
                await page.goto(f"{base}/admin")
                await page.fill("#email", email("admin"))
                await page.fill("#password", DEMO_PASSWORD)
                await page.click("#login button[type=submit]")
                await page.click("#mfa-start")
                await page.wait_for_selector("#qr svg")
                assert await page.locator("#backup-codes li").count() >= 8
                if SHOTS:
                    await page.screenshot(path=str(shots / "mfa-enrolment.png"))
                secret = (await page.text_content("#secret") or "").strip()
                await page.fill("#code", pyotp.TOTP(secret).now())
                await page.click("#verify button[type=submit]")
                await page.wait_for_selector("#charts")

                # ---- a short load, then charts with data (live, over SSE) ----
                async with httpx.AsyncClient(base_url=base) as api:
                    for _ in range(6):
                        await asyncio.gather(*(api.get("/api/health") for _ in range(20)))
                        await asyncio.sleep(0.4)
                # Live over SSE; under a loaded machine a reload is the fallback (not a sleep).
                for chart in ("#chart-rps", "#chart-latency", "#chart-memory"):
                    for attempt in range(6):
                        try:
                            # attached: a flat line has no height, so it is never "visible"
                            await page.wait_for_selector(
                                f"{chart} polyline", state="attached", timeout=10_000
                            )
                            break
                        except PlaywrightTimeout:
                            if attempt == 5:
                                raise
                            await page.reload()
                await page.screenshot(path=str(shots / "overview.png"), full_page=True)

                # ---- pause and resume a queue, each confirmed ----
                await page.goto(f"{base}/admin/jobs?queue=console-demo")
                await page.click("#pause-console-demo")
                await confirm(page)
                await page.wait_for_selector("#resume-console-demo")
                await page.click("#resume-console-demo")
                await confirm(page)
                await page.wait_for_selector("#pause-console-demo")

                # ---- retry the failed job after a dry-run count ----
                await page.goto(f"{base}/admin/jobs?state=failed&search={data['marker']}")
                await page.wait_for_selector("#jobs td:has-text('UpstreamError')")
                await page.screenshot(path=str(shots / "jobs.png"), full_page=True)
                await page.click("#bulk-retry")
                await expect(page.locator("#dry-run-count")).to_have_text("1")
                await confirm(page)
                await expect(page.locator("#flash")).to_contain_text("Retry: 1 job")

                # ---- reject a withdrawal with a reason ----
                await page.goto(f"{base}/admin/withdrawals")
                row = page.locator("#withdrawals tr", has_text="partner1@")
                await expect(row).to_contain_text("250.00 USD")
                await page.screenshot(path=str(shots / "withdrawals.png"), full_page=True)
                reject = page.locator(
                    f"form[action='/admin/withdrawals/{data['withdrawal']}/reject']"
                )
                await reject.locator("input[name=reason]").fill("bank details do not match")
                await reject.locator("button").click()
                await expect(page.locator("#confirm")).to_contain_text("bank details do not match")
                await confirm(page)
                await expect(page.locator("#flash")).to_contain_text("rejected")

                # ---- every action is in the audit log ----
                await page.goto(f"{base}/admin/audit?actor={email('admin')}")
                audit = page.locator("#audit")
                for action in ("jobs.queue.pause", "jobs.queue.resume", "jobs.bulk.retry",
                               "wallet.withdrawal.reject"):  # fmt: skip
                    await expect(audit).to_contain_text(action)
                await expect(audit).to_contain_text("bank details do not match")
                await page.screenshot(path=str(shots / "audit.png"), full_page=True)
                await page.goto(f"{base}/admin/alerts")
                await page.screenshot(path=str(shots / "alerts.png"), full_page=True)

                # ---- a cross-site form post is refused ----
                with evil_site(base) as evil:
                    await page.goto(evil)
                    async with page.expect_navigation():
                        await page.click("#go")
                    body = await page.text_content("body") or ""
                    assert "Cleared" not in body
                    assert await page.locator("#error").count() == 1

                # ---- the read-only admin sees everything, changes nothing ----
                auditor = await (await browser.new_context()).new_page()
                await auditor.goto(f"{base}/admin")
                await auditor.fill("#email", email("auditor"))
                await auditor.fill("#password", DEMO_PASSWORD)
                await auditor.fill("#otp", pyotp.TOTP(data["auditor_secret"]).now())
                await auditor.click("#login button[type=submit]")
                await auditor.wait_for_selector("#charts")
                for view in ("jobs", "withdrawals", "breakers", "caches", "users", "audit",
                             "alerts"):  # fmt: skip
                    response = await auditor.goto(f"{base}/admin/{view}")
                    assert response is not None, view
                    assert response.status == 200, view
                await auditor.goto(f"{base}/admin/jobs?queue=console-demo")
                await auditor.click("#pause-console-demo")
                await auditor.wait_for_selector("#confirm")
                async with auditor.expect_response(lambda r: r.request.method == "POST") as info:
                    await auditor.click("#confirm-button")
                assert (await info.value).status == 403
                await expect(auditor.locator("#error")).to_contain_text("Read-only")
                await auditor.goto(f"{base}/admin/caches")
                await auditor.click("form[action='/admin/caches/clear'] >> text=Clear all…")
                async with auditor.expect_response(lambda r: r.request.method == "POST") as info:
                    await auditor.click("#confirm-button")
                assert (await info.value).status == 403
            finally:
                await browser.close()

    own = Runtime(make_settings(database_url, server_urls[1]))
    await own.start()
    async with own.db.session() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT a.action, a.request_id, a.before, a.after FROM audit_log a "
                    "JOIN users u ON u.id = a.actor_id WHERE u.email = :e ORDER BY a.id"
                ),
                {"e": email("admin")},
            )
        ).all()
        auditor_rows = await session.scalar(
            text(
                "SELECT count(*) FROM audit_log a JOIN users u ON u.id = a.actor_id "
                "WHERE u.email = :e"
            ),
            {"e": email("auditor")},
        )
    await own.stop()
    actions = [row.action for row in rows]
    for action in ("jobs.queue.pause", "jobs.queue.resume", "jobs.bulk.retry",
                   "wallet.withdrawal.reject"):  # fmt: skip
        assert action in actions
    assert "admin.cache.cleared" not in actions  # the cross-site post did nothing
    console_rows = [row for row in rows if row.action.startswith(("jobs.", "wallet."))]
    assert all(row.request_id for row in console_rows)  # each action names its request
    rejected = next(row for row in rows if row.action == "wallet.withdrawal.reject")
    assert rejected.before["status"] == "pending"
    assert rejected.after["status"] == "rejected"
    assert auditor_rows == 0
