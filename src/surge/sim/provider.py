"""The upstream provider's website, hostile on purpose (issue 13, seed 000's product).

A reseller site the workers drive with provider accounts through egress proxies:

- ``GET /login`` a form with a CSRF token bound to a pre-session cookie; ``POST /login``
  (username, password, csrf) sets the ``sid`` session cookie. Sessions expire after
  ``idle_timeout`` seconds without a request and are bound to the client address they were
  made from (a cookie replayed from another IP is a logged-out visitor).
- ``GET /dashboard``; ``POST /renew`` (card, package, months, reference, csrf);
  ``POST /signal`` (card, reference, csrf); ``GET /card?card=N`` card status with the
  history of references the provider performed for that card.
- Hostility, set at start (``--config JSON``) or live (``POST /_control/config``): latency
  range, a 5xx rate, a maintenance page, a per-source-IP request budget per window answered
  by 403 or a 200 block page, account lock after N bad logins, and ``drop_rate``: the
  renewal is *performed and recorded* and then the connection is dropped before any reply.
  ``drop_schedule`` drops the replies of chosen renewals (by their order, 1 = the first the
  provider performs) whatever the random draws say: a test that must see a lost reply gets
  one however fast or slow the machine is.
- Control (loopback, direct): ``POST /_control/config`` (any Config field),
  ``/_control/accounts``, ``/_control/block`` ({"ip", "seconds"}), ``/_control/unblock``,
  ``/_control/expire`` (every session idles out now).
- Its own record (``GET /_control/state``): every renewal/refresh performed, logins, locks,
  blocked addresses and a request log (time, client IP, path, status), so tests compare.

A small asyncio HTTP/1.1 server rather than an ASGI app: dropping a connection after doing
the work is the point, and an ASGI server cannot do that on purpose.

    python -m surge.sim.provider --host 127.0.0.1 --port 9100 --accounts u1:p1,u2:p2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import html
import json
import random
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from surge.sim._streams import StreamServer, read_request

CARD = re.compile(r"^\d{10,16}$")
PACKAGES = ("basic", "sport", "premium")


@dataclass
class Config:
    latency_min_ms: float = 0.0
    latency_max_ms: float = 0.0
    error_rate: float = 0.0
    """Share of requests answered 500 before anything is done."""
    maintenance: bool = False
    ip_budget: int = 0
    """Requests per ``ip_window`` seconds one source address may send; 0: unlimited."""
    ip_window: float = 60.0
    block_seconds: float = 300.0
    """How long an address that went over budget stays blocked."""
    block_mode: str = "403"
    """``403`` or ``page`` (a 200 block page)."""
    lock_after: int = 5
    """Bad logins in a row before the account is locked."""
    drop_rate: float = 0.0
    """Share of renewals performed then answered by a dropped connection."""
    idle_timeout: float = 1800.0
    history_down: bool = False
    """The card-status page answers 503 (nobody can tell what happened)."""
    refused_cards: list[str] = field(default_factory=list)
    """Cards the provider refuses to renew (its own rules: a business refusal)."""
    drop_schedule: list[int] = field(default_factory=list)
    """Renewals (1 = the first performed) whose reply is dropped after the work, always."""
    seed: int | None = None
    """Seeds the draws (latency, errors, drops); their order still follows arrivals."""


@dataclass
class Session:
    user: str
    ip: str
    last_seen: float


@dataclass
class Provider:
    config: Config = field(default_factory=Config)
    accounts: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    pre: dict[str, str] = field(default_factory=dict)
    bad_logins: dict[str, int] = field(default_factory=dict)
    locked: set[str] = field(default_factory=set)
    blocked: dict[str, float] = field(default_factory=dict)
    hits: dict[str, list[float]] = field(default_factory=dict)
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    performed: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[float, str, str, str, int]] = field(default_factory=list)
    logins: int = 0
    renewals: int = 0
    """Renewals performed so far (what ``drop_schedule`` counts)."""
    rng: random.Random = field(default_factory=random.Random)

    def state(self) -> dict[str, Any]:
        now = time.time()
        return {
            "config": asdict(self.config),
            "performed": self.performed,
            "renewals": self.renewals,
            "logins": self.logins,
            "locked": sorted(self.locked),
            "blocked": {ip: until for ip, until in self.blocked.items() if until > now},
            "requests": self.requests,
        }

    # ---- guards ---------------------------------------------------------------------------
    def _over_budget(self, ip: str, now: float) -> bool:
        if self.blocked.get(ip, 0.0) > now:
            return True
        if self.config.ip_budget <= 0:
            return False
        window = [t for t in self.hits.get(ip, []) if t > now - self.config.ip_window]
        window.append(now)
        self.hits[ip] = window
        if len(window) > self.config.ip_budget:
            self.blocked[ip] = now + self.config.block_seconds
            return True
        return False

    def _session(self, cookies: dict[str, str], ip: str, now: float) -> Session | None:
        sid = cookies.get("sid", "")
        found = self.sessions.get(sid)
        if found is None:
            return None
        if found.ip != ip or now - found.last_seen > self.config.idle_timeout:
            self.sessions.pop(sid, None)
            return None
        if found.user in self.locked:
            return None
        found.last_seen = now
        return found

    # ---- pages ----------------------------------------------------------------------------
    async def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, ip: str
    ) -> Reply:
        parts = urlsplit(target)
        path = parts.path
        query = dict(parse_qsl(parts.query))
        if path.startswith("/_control"):
            return self._control(method, path, body)
        now = time.time()
        if self.config.latency_max_ms > 0:
            low, high = self.config.latency_min_ms, self.config.latency_max_ms
            await asyncio.sleep(self.rng.uniform(low, max(low, high)) / 1000)
        if self._over_budget(ip, now):
            if self.config.block_mode == "page":
                return Reply(200, _page("Access denied", "<p>Your IP has been blocked.</p>"))
            return Reply(403, _page("Forbidden", "<p>Access denied.</p>"))
        if self.config.maintenance:
            return Reply(503, _page("Maintenance", "<p>Down for maintenance.</p>"))
        if self.config.error_rate > 0 and self.rng.random() < self.config.error_rate:
            return Reply(500, _page("Error", "<p>Internal error.</p>"))
        cookies = _cookies(headers.get("cookie", ""))
        form = dict(parse_qsl(body.decode())) if method == "POST" else {}
        if path == "/login":
            return self._login(method, cookies, form, ip, now)
        session = self._session(cookies, ip, now)
        if session is None:
            return Reply(302, b"", {"location": "/login"})
        if method == "POST" and form.get("csrf") != _csrf(cookies.get("sid", "")):
            return Reply(400, _page("Error", "<p>Invalid CSRF token.</p>"))
        if path == "/dashboard" and method == "GET":
            token = _csrf(cookies["sid"])
            return Reply(200, _page("Dashboard", f'<p id="user">{html.escape(session.user)}</p>'
                                    f'<input type="hidden" name="csrf" value="{token}">'))  # fmt: skip
        if path == "/card" and method == "GET" and self.config.history_down:
            return Reply(503, _page("Maintenance", "<p>Card status unavailable.</p>"))
        if path == "/card" and method == "GET":
            return self._card(query.get("card", ""))
        if path == "/renew" and method == "POST":
            return self._renew(session, form, ip, now)
        if path == "/signal" and method == "POST":
            return self._signal(session, form, ip, now)
        return Reply(404, _page("Not found", "<p>Not found.</p>"))

    def _login(
        self, method: str, cookies: dict[str, str], form: dict[str, str], ip: str, now: float
    ) -> Reply:
        if method == "GET":
            pre = secrets.token_urlsafe(12)
            token = secrets.token_urlsafe(12)
            self.pre[pre] = token
            form_html = (
                '<form method="post" action="/login">'
                f'<input type="hidden" name="csrf" value="{token}">'
                '<input name="username"><input name="password" type="password"></form>'
            )
            return Reply(200, _page("Sign in", form_html), {"set-cookie": f"pre={pre}; Path=/"})
        expected = self.pre.pop(cookies.get("pre", ""), None)
        if expected is None or form.get("csrf") != expected:
            return Reply(400, _page("Error", "<p>Invalid CSRF token.</p>"))
        user = form.get("username", "")
        if user in self.locked:
            return Reply(200, _page("Sign in", '<p class="error">Account locked.</p>'))
        if self.accounts.get(user) != form.get("password") or not user:
            count = self.bad_logins.get(user, 0) + 1
            self.bad_logins[user] = count
            if user in self.accounts and count >= self.config.lock_after:
                self.locked.add(user)
            return Reply(200, _page("Sign in", '<p class="error">Invalid credentials.</p>'))
        self.bad_logins.pop(user, None)
        self.logins += 1
        sid = secrets.token_urlsafe(16)
        self.sessions[sid] = Session(user=user, ip=ip, last_seen=now)
        return Reply(302, b"", {"location": "/dashboard", "set-cookie": f"sid={sid}; Path=/"})

    def _card(self, card: str) -> Reply:
        if not CARD.match(card):
            return Reply(200, _page("Card", '<p class="error">Unknown card.</p>'))
        info = self.cards.get(card, {"package": "none", "months": 0})
        refs = [p["reference"] for p in self.performed if p["card"] == card]
        items = "".join(f'<li data-ref="{html.escape(r)}">{html.escape(r)}</li>' for r in refs)
        body = (
            f'<p id="package">{html.escape(str(info["package"]))}</p>'
            f'<p id="months">{info["months"]}</p><ul id="history">{items}</ul>'
        )
        return Reply(200, _page("Card", body))

    def _record(self, kind: str, session: Session, form: dict[str, str], ip: str) -> None:
        self.performed.append({
            "kind": kind, "reference": form.get("reference", ""), "card": form.get("card", ""),
            "package": form.get("package", ""), "months": int(form.get("months", "0") or 0),
            "account": session.user, "ip": ip, "at": time.time(),
        })  # fmt: skip

    def _renew(self, session: Session, form: dict[str, str], ip: str, now: float) -> Reply:
        card, package = form.get("card", ""), form.get("package", "")
        months = int(form.get("months", "0")) if form.get("months", "").isdigit() else 0
        refused = card in self.config.refused_cards
        if refused or not CARD.match(card) or package not in PACKAGES or not 1 <= months <= 12:
            return Reply(200, _page("Renew", '<p class="error">Invalid renewal.</p>'))
        info = self.cards.setdefault(card, {"package": "none", "months": 0})
        info["package"] = package
        info["months"] = int(info["months"]) + months
        self._record("renew", session, form, ip)
        self.renewals += 1
        if self.renewals in self.config.drop_schedule or (
            self.config.drop_rate > 0 and self.rng.random() < self.config.drop_rate
        ):
            return Reply(0, b"")  # performed; the reply is lost
        ref = html.escape(form.get("reference", ""))
        return Reply(200, _page("Renew", f'<p class="ok" data-ref="{ref}">Renewal done.</p>'))

    def _signal(self, session: Session, form: dict[str, str], ip: str, now: float) -> Reply:
        if not CARD.match(form.get("card", "")):
            return Reply(200, _page("Signal", '<p class="error">Unknown card.</p>'))
        self._record("signal", session, form, ip)
        ref = html.escape(form.get("reference", ""))
        return Reply(200, _page("Signal", f'<p class="ok" data-ref="{ref}">Signal sent.</p>'))

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        if path == "/_control/state" and method == "GET":
            return Reply(200, json.dumps(self.state()).encode(), json_body=True)
        if path == "/_control/config" and method == "POST":
            changes = json.loads(body or b"{}")
            for key, value in changes.items():
                if not hasattr(self.config, key):
                    return Reply(400, json.dumps({"error": f"unknown {key}"}).encode(), json_body=True)  # fmt: skip
                setattr(self.config, key, value)
            if "seed" in changes:
                self.rng.seed(changes["seed"])
            return Reply(200, json.dumps(asdict(self.config)).encode(), json_body=True)
        if path == "/_control/accounts" and method == "POST":
            self.accounts.update(json.loads(body or b"{}"))
            return Reply(200, b"{}", json_body=True)
        if path == "/_control/block" and method == "POST":
            target = json.loads(body or b"{}")
            self.blocked[str(target["ip"])] = time.time() + float(target.get("seconds", 3600))
            return Reply(200, b"{}", json_body=True)
        if path == "/_control/expire" and method == "POST":
            self.sessions.clear()  # every session idles out at once
            return Reply(200, b"{}", json_body=True)
        if path == "/_control/unblock" and method == "POST":
            self.blocked.clear()
            self.hits.clear()
            return Reply(200, b"{}", json_body=True)
        return Reply(404, b"{}", json_body=True)


@dataclass
class Reply:
    status: int
    """0: drop the connection without answering."""
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    json_body: bool = False


def _page(title: str, inner: str) -> bytes:
    return (
        f"<!doctype html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1>{inner}</body></html>"
    ).encode()


_CSRF_KEY = secrets.token_bytes(16)


def _csrf(sid: str) -> str:
    """The form token of a session (derived, so nothing more to store)."""
    return hmac.new(_CSRF_KEY, sid.encode(), "sha256").hexdigest()[:24]


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


class ProviderServer(StreamServer):
    """The provider on ``host:port`` (``await start()``, ``await stop()``)."""

    def __init__(self, provider: Provider, host: str = "127.0.0.1", port: int = 0) -> None:
        self.provider = provider
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    def _host(self) -> str:
        return self.host

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = str(writer.get_extra_info("peername")[0])
        try:
            while True:
                try:
                    method, target, headers, body = await read_request(reader)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                arrived = time.time()
                reply = await self.provider.handle(method, target, headers, body, ip)
                if not target.startswith("/_control"):
                    if len(self.provider.requests) > 200_000:  # a long `make run`
                        del self.provider.requests[:100_000]
                    self.provider.requests.append(
                        (arrived, ip, method, urlsplit(target).path, reply.status)
                    )
                if reply.status == 0:
                    writer.transport.abort()
                    return
                ctype = "application/json" if reply.json_body else "text/html; charset=utf-8"
                out = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'OK')}",
                       f"Content-Type: {ctype}", f"Content-Length: {len(reply.body)}"]  # fmt: skip
                out += [f"{k}: {v}" for k, v in reply.headers.items()]
                close = headers.get("connection", "").lower() == "close"
                if close:
                    out.append("Connection: close")
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + reply.body)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def parse_accounts(text: str) -> dict[str, str]:
    out = {}
    for pair in filter(None, text.split(",")):
        user, _, password = pair.partition(":")
        out[user] = password
    return out


async def _main(args: argparse.Namespace) -> None:
    config = Config(**json.loads(args.config)) if args.config else Config()
    provider = Provider(config=config, accounts=parse_accounts(args.accounts))
    if config.seed is not None:
        provider.rng.seed(config.seed)
    server = await ProviderServer(provider, args.host, args.port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--accounts", default="", help="user:password,user:password")
    parser.add_argument("--config", default="", help="JSON of Config fields")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
