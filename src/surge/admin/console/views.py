"""The console's HTML, server-rendered (every value escaped; no inline script or style:
the CSP allows only this origin's ``console.js`` and ``console.css``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

from surge.admin.console.charts import line_chart
from surge.admin.console.session import Caller

#: The hidden field naming one rendered confirmation form (its Idempotency-Key).
FORM_KEY = "form_key"

NAV = (
    ("overview", "Overview"),
    ("jobs", "Jobs"),
    ("withdrawals", "Withdrawals"),
    ("operations", "Operations"),
    ("approvals", "Approvals"),
    ("keys", "API keys"),
    ("breakers", "Breakers"),
    ("caches", "Caches"),
    ("users", "Users"),
    ("audit", "Audit log"),
    ("alerts", "Alerts"),
)


def e(value: Any) -> str:
    return escape("" if value is None else str(value))


def when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return e(value[:19].replace("T", " "))
    return e(value.strftime("%Y-%m-%d %H:%M:%S"))


def money(amount: int, currency: str) -> str:
    """Minor units as a decimal amount with its currency (2 decimals: ISO 4217 for the
    wallet's currencies)."""
    sign = "-" if amount < 0 else ""
    whole, cents = divmod(abs(amount), 100)
    return f"{sign}{whole:,}.{cents:02d} {e(currency)}"


def hidden(fields: Mapping[str, Any]) -> str:
    out = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            out.append(f'<input type="hidden" name="{e(name)}" value="{e(item)}">')
    return "".join(out)


def form(
    action: str,
    csrf: str,
    button: str,
    *,
    fields: Mapping[str, Any] | None = None,
    extra: str = "",
    css: str = "",
    button_id: str = "",
) -> str:
    bid = f' id="{e(button_id)}"' if button_id else ""
    return (
        f'<form method="post" action="{e(action)}" class="inline {css}">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">{hidden(fields or {})}{extra}'
        f'<button type="submit"{bid}>{e(button)}</button></form>'
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, table_id: str = "") -> str:
    tid = f' id="{e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">Nothing here.</td></tr>'
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, caller: Caller | None, *, active: str = "", flash: str = "") -> str:
    nav = ""
    if caller is not None:
        links = "".join(
            f'<a href="/admin/{key}"{" class=active" if key == active else ""}>{label}</a>'
            for key, label in NAV
        )
        nav = (
            f'<nav>{links}<span class="who">{e(caller.session.email)} · '
            f"{e(caller.role_label)}</span>"
            + form("/admin/logout", caller.session.csrf, "Sign out", css="signout")
            + "</nav>"
        )
    note = f'<p class="flash" id="flash">{e(flash)}</p>' if flash else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · Surge console</title>"
        '<link rel="stylesheet" href="/admin/static/console.css">'
        '<script src="/admin/static/console.js" defer></script></head>'
        f'<body data-view="{e(active)}"><header><h1>Surge console</h1>{nav}</header>'
        f"<main><h2>{e(title)}</h2>{note}{body}</main></body></html>"
    )


def sign_in(csrf: str, *, error: str = "", need_otp: bool = False) -> str:
    otp = (
        "<label>One-time code (authenticator or backup code)"
        '<input id="otp" name="otp" autocomplete="one-time-code" maxlength="32"></label>'
    )
    body = (
        f'<form method="post" action="/admin/login" id="login" class="card">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        + (f'<p class="error" id="error">{e(error)}</p>' if error else "")
        + '<label>E-mail<input id="email" name="email" type="email" required '
        'autocomplete="username"></label>'
        '<label>Password<input id="password" name="password" type="password" required '
        'autocomplete="current-password"></label>'
        + otp
        + ("<p>This account has a second factor: enter its code.</p>" if need_otp else "")
        + '<button type="submit">Sign in</button></form>'
    )
    return page("Sign in", body, None)


def enrol(
    csrf: str,
    email: str,
    *,
    qr_svg: str = "",
    secret: str = "",
    codes: Sequence[str] = (),
    error: str = "",
) -> str:
    if not secret:
        body = (
            '<div class="card" id="enrol"><p>Administration needs a second factor. Set up an '
            "authenticator app (TOTP) now: you will scan a QR code and keep backup codes.</p>"
            + form("/admin/mfa/setup", csrf, "Set up the second factor", button_id="mfa-start")
            + "</div>"
        )
        return page("Second factor", body, None)
    items = "".join(f"<li><code>{e(c)}</code></li>" for c in codes)
    body = (
        '<div class="card" id="enrol">'
        + (f'<p class="error" id="error">{e(error)}</p>' if error else "")
        + f"<p>Scan this code with your authenticator app ({e(email)}):</p>"
        f'<div class="qr" id="qr">{qr_svg}</div>'
        f'<p>Or type the key: <code id="secret">{e(secret)}</code></p>'
        f'<p>Backup codes — shown once, each works once:</p><ol id="backup-codes">{items}</ol>'
        '<form method="post" action="/admin/mfa/verify" id="verify">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<label>Code from the app<input id="code" name="code" autocomplete="one-time-code" '
        'maxlength="32" required></label><button type="submit">Confirm</button></form></div>'
    )
    return page("Second factor", body, None)


def overview_charts(points: Sequence[Mapping[str, Any]], thresholds: Mapping[str, float]) -> str:
    times = [float(p["t"]) for p in points]

    def col(key: str) -> list[float | None]:
        return [p.get(key) for p in points]

    processes = sorted({name for p in points for name in (p.get("memory") or {})})
    memory: dict[str, Sequence[float | None]] = {}
    for name in processes:
        values: list[float | None] = []
        for p in points:
            rss = (p.get("memory") or {}).get(name)
            values.append(float(rss) if rss is not None else None)
        memory[name] = values
    charts = [
        line_chart("chart-rps", "Requests per second", times, {"rps": col("rps")}),
        line_chart(
            "chart-latency", "Latency (ms)", times,
            {"p50": col("p50_ms"), "p95": col("p95_ms"), "p99": col("p99_ms")},
            unit="ms", threshold=thresholds.get("p95_ms"),
        ),
        line_chart(
            "chart-errors", "Error ratio (5xx)", times, {"errors": col("error_ratio")},
            unit="%", floor_max=0.02, threshold=thresholds.get("error_ratio"),
        ),
        line_chart(
            "chart-cache", "Cache hit ratio per tier", times,
            {"L1": col("hit_l1"), "L2": col("hit_l2")}, unit="%", floor_max=1.0,
            threshold=thresholds.get("hit_ratio"),
        ),
        line_chart(
            "chart-pool", "DB pool", times,
            {"in use": col("pool_in_use"), "open": col("pool_size"), "waiting": col("pool_waiting")},
        ),
        line_chart(
            "chart-queue", "Job queues", times,
            {"ready jobs": col("queue_depth"), "lag (s)": col("queue_lag_s")},
        ),
        line_chart("chart-memory", "Memory per process", times, memory, unit="B"),
    ]  # fmt: skip
    return '<div class="charts" id="charts">' + "".join(charts) + "</div>"


def confirm(
    caller: Caller,
    *,
    title: str,
    question: str,
    action: str,
    fields: Mapping[str, Any],
    active: str,
    count: int | None = None,
    danger: bool = False,
) -> str:
    counted = (
        f'<p class="count">Dry run: <b id="dry-run-count">{count}</b> item(s) match now.</p>'
        if count is not None
        else ""
    )
    body = (
        f'<div class="card confirm" id="confirm"><p>{e(question)}</p>{counted}'
        + form(
            action,
            caller.session.csrf,
            "Confirm",
            fields={
                **fields,
                "confirm": "yes",
                FORM_KEY: uuid.uuid4().hex,  # one rendered form, one effect (ADR 0035)
                **({"expected": count} if count is not None else {}),
            },
            css="danger" if danger else "",
            button_id="confirm-button",
        )
        + f' <a href="/admin/{e(active)}" class="cancel">Cancel</a></div>'
    )
    return page(title, body, caller, active=active)


def results(caller: Caller, title: str, rows: Sequence[tuple[str, bool, str]], active: str) -> str:
    body = (
        table(
            ["item", "result", "detail"],
            [(e(i), "✅ done" if ok else "❌ failed", e(d)) for i, ok, d in rows],
            table_id="results",
        )
        + f'<p><a href="/admin/{e(active)}">Back</a></p>'
    )
    return page(title, body, caller, active=active)


def error_page(status: int, message: str, caller: Caller | None) -> str:
    body = f'<div class="card"><p class="error" id="error">{e(message)}</p>'
    body += '<p><a href="/admin">Back to the console</a></p></div>'
    return page(f"{status}", body, caller)
