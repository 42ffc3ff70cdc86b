"""The upstream provider's website, driven like a browser: one HTTP exchange per method.

Every answer is classified, because what the worker does next depends on who is at fault:

    ProviderFault
    ├── Blocked            403 or a block page: the *proxy's address* is refused (PROXY_BLOCKED)
    ├── ProxyFailed        the proxy could not be reached / refused the tunnel (nothing sent)
    ├── AccountFailed      bad credentials or a locked account: the *account* is at fault
    ├── SessionExpired     redirected to the login page: log in again (nothing was done)
    ├── Rejected           the provider refused the operation itself (bad card, package)
    └── Unclear            5xx, maintenance, timeout, dropped connection: for a state-changing
                           call nobody knows whether it happened (the lost-reply rule)

Cookies are never kept by httpx: a provider session is the pair (``sid``, ``csrf``) the
worker stores per (account, proxy) in Redis and sends explicitly, so a session made through
one proxy is only ever used through that proxy (the site binds sessions to the address).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

BLOCK_MARKERS = ("your ip has been blocked", "access denied", "request blocked")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_REF = re.compile(r'<li data-ref="([^"]+)">')


class ProviderFault(Exception):
    """Base: the call did not produce the answer the worker wanted."""


class Blocked(ProviderFault):
    pass


class ProxyFailed(ProviderFault):
    pass


class AccountFailed(ProviderFault):
    pass


class SessionExpired(ProviderFault):
    pass


class Rejected(ProviderFault):
    pass


class Unclear(ProviderFault):
    pass


@dataclass(frozen=True, slots=True)
class ProviderSession:
    sid: str
    csrf: str


def _no_cookies() -> httpx.Cookies:
    """A jar that refuses every cookie: sessions are carried explicitly (module docstring)."""
    return httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))


class ProviderClient:
    """One per process (``operations.service.provider_client(runtime)``): an httpx client per
    egress proxy, reused across jobs; ``logins`` and ``calls`` count upstream traffic."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.logins = 0
        self.calls = 0

    def _http(self, proxy_url: str | None) -> httpx.AsyncClient:
        key = proxy_url or ""
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                base_url=self.base_url,
                proxy=proxy_url,
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                cookies=_no_cookies(),
                trust_env=False,
            )
            self._clients[key] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def _send(
        self, proxy_url: str | None, method: str, path: str, *, cookies: dict[str, str],
        form: dict[str, str] | None = None, params: dict[str, str] | None = None,
    ) -> httpx.Response:  # fmt: skip
        headers = {"cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        self.calls += 1
        try:
            response = await self._http(proxy_url).request(
                method, path, headers=headers, data=form, params=params
            )
        except httpx.ProxyError as error:
            raise ProxyFailed(f"proxy: {type(error).__name__}") from error
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            # Through a proxy, a refused connect is the proxy's: nothing reached the site.
            raise ProxyFailed(f"connect: {type(error).__name__}") from error
        except httpx.HTTPError as error:
            raise Unclear(f"transport: {type(error).__name__}") from error
        text = response.text.lower()
        if response.status_code == 403 or any(m in text for m in BLOCK_MARKERS):
            raise Blocked(f"HTTP {response.status_code}")
        if response.status_code >= 500:
            raise Unclear(f"HTTP {response.status_code}")
        if response.status_code in (301, 302, 303) and "/login" in response.headers.get(
            "location", ""
        ):
            raise SessionExpired("redirected to the login page")
        return response

    async def login(self, proxy_url: str | None, username: str, password: str) -> ProviderSession:
        """Login form (CSRF + pre-session cookie), then the dashboard for the form token."""
        page = await self._send(proxy_url, "GET", "/login", cookies={})
        pre = _cookie(page, "pre")
        match = _CSRF.search(page.text)
        if not pre or match is None:
            raise Unclear("login page without a form")
        self.logins += 1
        answer = await self._send(
            proxy_url, "POST", "/login", cookies={"pre": pre},
            form={"username": username, "password": password, "csrf": match.group(1)},
        )  # fmt: skip
        sid = _cookie(answer, "sid")
        if sid is None:
            if "locked" in answer.text.lower():
                raise AccountFailed("ACCOUNT_LOCKED")
            if "invalid credentials" in answer.text.lower():
                raise AccountFailed("BAD_CREDENTIALS")
            raise Unclear(f"login answered HTTP {answer.status_code}")
        dashboard = await self._send(proxy_url, "GET", "/dashboard", cookies={"sid": sid})
        token = _CSRF.search(dashboard.text)
        if token is None:
            raise Unclear("dashboard without a form token")
        return ProviderSession(sid=sid, csrf=token.group(1))

    async def renew(
        self, proxy_url: str | None, session: ProviderSession, *, card: str, package: str,
        months: int, reference: str,
    ) -> None:  # fmt: skip
        """Renew ``card``; ``reference`` (our operation id) is kept in the card's history."""
        answer = await self._send(
            proxy_url, "POST", "/renew", cookies={"sid": session.sid},
            form={"card": card, "package": package, "months": str(months),
                  "reference": reference, "csrf": session.csrf},
        )  # fmt: skip
        self._verdict(answer, reference)

    async def refresh_signal(
        self, proxy_url: str | None, session: ProviderSession, *, card: str, reference: str
    ) -> None:
        answer = await self._send(
            proxy_url, "POST", "/signal", cookies={"sid": session.sid},
            form={"card": card, "reference": reference, "csrf": session.csrf},
        )  # fmt: skip
        self._verdict(answer, reference)

    async def history(
        self, proxy_url: str | None, session: ProviderSession, *, card: str
    ) -> set[str]:
        """The references the provider performed for ``card`` (its card-status page)."""
        answer = await self._send(
            proxy_url, "GET", "/card", cookies={"sid": session.sid}, params={"card": card}
        )
        if answer.status_code != 200:
            raise Unclear(f"card status answered HTTP {answer.status_code}")
        return set(_REF.findall(answer.text))

    @staticmethod
    def _verdict(answer: httpx.Response, reference: str) -> None:
        if answer.status_code == 200 and f'class="ok" data-ref="{reference}"' in answer.text:
            return
        if answer.status_code == 400:  # the form token was refused: nothing was done
            raise SessionExpired("form token refused")
        if answer.status_code == 200 and 'class="error"' in answer.text:
            raise Rejected(re.sub(r"<[^>]+>", "", answer.text.split('class="error">', 1)[1])[:120])
        raise Unclear(f"unexpected answer HTTP {answer.status_code}")


def _cookie(response: httpx.Response, name: str) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        key, _, rest = header.partition("=")
        if key.strip() == name:
            return rest.split(";", 1)[0]
    return None
