"""Schemathesis over ``/openapi.json`` against a real ``surge serve`` (issue 16): as an
anonymous caller, as a partner and as an MFA admin, no failure in the five checks a
generated client relies on. Bounded: a few examples per operation (SURGE_SCHEMATHESIS_EXAMPLES
raises it for a longer run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from surge.identity.runtime import install_identity
from surge.identity.service import identity as identity_service
from surge.kit.embedded import free_port
from surge.kit.runtime import Runtime
from tests.fixtures.servers import serve_env, surge_process

PASSWORD = "correct horse battery staple"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        # A 405's Allow names every method of the path (GET and POST declared apart).
        "allow_header_conformance",
    ]
)
EXAMPLES = os.environ.get("SURGE_SCHEMATHESIS_EXAMPLES", "5")
#: Calls that would end the caller's own session or re-enrol its MFA mid-run.
SELF_DESTRUCTIVE = r"^/api/v1/auth/(logout|sessions/\{session_id\}|mfa/.*)$"
#: Calls that reach an outside provider this server has none of: a documented 503 (since the
#: Idempotency-Key is documented as required, schemathesis sends one and gets that far). Their
#: contract is tested against the payment simulator in ``tests/payments``.
NEEDS_A_PROVIDER = r"^/api/v1/topups$"


def _schemathesis() -> list[str]:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert found is not None, "schemathesis is a dev dependency"
    return [found]


def _run(base: str, tmp_path: Path, name: str, headers: dict[str, str]) -> None:
    args = [
        *_schemathesis(),
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        EXAMPLES,
        "--seed",
        "16",
        "--no-color",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--exclude-path-regex",
        f"{SELF_DESTRUCTIVE}|{NEEDS_A_PROVIDER}" if headers else "^$",
    ]
    for key, value in headers.items():
        args += ["--header", f"{key}: {value}"]
    # Schemathesis would otherwise sign up through /auth/register and call as that user: the
    # anonymous run must stay anonymous.
    (tmp_path / "schemathesis.toml").write_text("[auth]\nauto-signup = false\n")
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    (tmp_path / f"schemathesis-{name}.txt").write_text(output)
    assert result.returncode == 0, f"schemathesis as {name}:\n{output[-12000:]}"


@pytest.mark.timeout(900)
async def test_schemathesis_finds_no_contract_failure(
    server_urls: tuple[str, str], runtime: Runtime, tmp_path: Path
) -> None:
    identity = install_identity(runtime)
    suffix = os.urandom(4).hex()
    partner_email = f"st-partner-{suffix}@example.com"
    admin_email = f"st-admin-{suffix}@example.com"
    async with runtime.db.session() as session:
        for address, role in ((partner_email, "partner"), (admin_email, "admin")):
            await identity_service.register(
                session, runtime, email=address, password=PASSWORD, role=role
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
        async with httpx.AsyncClient(base_url=base) as api:
            partner = await api.post(
                "/api/v1/auth/login", json={"email": partner_email, "password": PASSWORD}
            )
            assert partner.status_code == 200, partner.text
            signed = await api.post(
                "/api/v1/auth/login", json={"email": admin_email, "password": PASSWORD}
            )
            headers = {"Authorization": f"Bearer {signed.json()['access_token']}"}
            setup = (await api.post("/api/v1/auth/mfa/setup", headers=headers)).json()
            verified = await api.post(
                "/api/v1/auth/mfa/verify",
                json={"code": identity.totp.now(setup["secret"])},
                headers=headers,
            )
            assert verified.status_code == 200, verified.text
        _run(base, tmp_path, "anonymous", {})
        _run(
            base,
            tmp_path,
            "partner",
            {"Authorization": f"Bearer {partner.json()['access_token']}"},
        )
        _run(
            base,
            tmp_path,
            "admin",
            {"Authorization": f"Bearer {verified.json()['access_token']}"},
        )
