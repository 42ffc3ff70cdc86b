"""Templates (Jinja2, shipped as package data) and the MIME message built from them.

A template ``NAME`` is three files per locale under ``templates/<locale>/``:
``NAME.subject.txt``, ``NAME.txt`` (plain text) and ``NAME.html``. A locale without the
template falls back to ``en``. Undefined variables are errors (``StrictUndefined``): a
message with a hole in it is a bug, not a mail to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from typing import Any
from uuid import UUID

from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound, select_autoescape

FALLBACK_LOCALE = "en"
#: Bodies in quoted-printable: readable in the raw message, safe through any relay.
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
#: Currencies whose minor unit is not 1/100 (ISO 4217 exponent).
_EXPONENTS = {"JPY": 0, "KRW": 0, "BHD": 3, "KWD": 3, "TND": 3}


def money(amount: int, currency: str) -> str:
    """``12345, "USD"`` → ``"123.45 USD"``: integer minor units, never floats."""
    exponent = _EXPONENTS.get(currency.upper(), 2)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(int(amount)), 10**exponent)
    return (
        f"{sign}{whole}.{fraction:0{exponent}d} {currency}"
        if exponent
        else f"{sign}{whole} {currency}"
    )


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("surge.notifications", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["money"] = money
    return env


def template_locale(template: str, locale: str) -> str:
    """The locale the template exists in (``locale``, else ``en``); raises TemplateNotFound."""
    env = environment()
    for candidate in (locale, FALLBACK_LOCALE):
        try:
            env.get_template(f"{candidate}/{template}.txt")
        except TemplateNotFound:
            continue
        return candidate
    raise TemplateNotFound(template)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


def render(template: str, locale: str, context: dict[str, Any]) -> Rendered:
    env = environment()
    found = template_locale(template, locale)
    subject = env.get_template(f"{found}/{template}.subject.txt").render(context)
    return Rendered(
        subject=" ".join(subject.split()),  # one line: a newline in a header is an injection
        text=env.get_template(f"{found}/{template}.txt").render(context),
        html=env.get_template(f"{found}/{template}.html").render(context),
    )


def message_id(outbox_id: UUID, sender: str) -> str:
    """The Message-ID of an outbox row: stable across attempts, so a receiver that sees the
    same message twice can tell (RFC 5322 §3.6.4)."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "surge.localhost"
    return f"<{outbox_id}@{domain}>"


def build_message(
    *,
    outbox_id: UUID,
    sender: str,
    to: str,
    rendered: Rendered,
    created_at: datetime,
    unsubscribe_url: str | None = None,
    category: str = "",
) -> bytes:
    """The message as sent: multipart/alternative (text, then HTML), UTF-8.

    Built with the ``compat32`` MIME classes: ``EmailMessage``'s header registry parses and
    refolds every header and cost more CPU than the rest of the send path together
    (profiled in ``bench/notifications.py``)."""
    message = MIMEMultipart("alternative")
    message["From"] = sender
    message["To"] = formataddr(("", to))
    message["Subject"] = (
        Header(rendered.subject, "utf-8").encode()
        if not rendered.subject.isascii()
        else rendered.subject
    )
    message["Date"] = format_datetime(created_at)
    message["Message-ID"] = message_id(outbox_id, sender)
    message["X-Surge-Category"] = category
    if unsubscribe_url is not None:
        # RFC 8058 one-click: mailbox providers POST "List-Unsubscribe=One-Click" to the URL.
        message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.attach(MIMEText(rendered.text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    message.attach(MIMEText(rendered.html, "html", _UTF8_QP))  # type: ignore[arg-type]
    return message.as_bytes()
