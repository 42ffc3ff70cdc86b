"""Templates (Jinja2, shipped as package data) and the MIME message built from them.

A template ``NAME`` is three files per locale under ``templates/<locale>/``:
``NAME.subject.txt``, ``NAME.txt`` (plain text) and ``NAME.html``. A locale without the
template falls back to ``en``. Undefined variables are errors (``StrictUndefined``): a
message with a hole in it is a bug, not a mail to send.
"""

from __future__ import annotations

from binascii import b2a_qp
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from typing import Any
from uuid import UUID

from jinja2 import (
    Environment,
    PackageLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    select_autoescape,
)

FALLBACK_LOCALE = "en"
#: RFC 5322 §2.1.1: header lines SHOULD stay within 78 characters (folded at spaces).
_HEADER_WIDTH = 78
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
        # The templates ship inside the package: a changed file means a new release (and a
        # restart), so no stat() per message to see whether one changed on disk.
        auto_reload=False,
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


@dataclass(frozen=True, slots=True)
class _Found:
    subject: Template
    text: Template
    html: Template
    globals: dict[str, Any]
    """The templates' globals (Jinja's and the environment's), flattened once."""


@lru_cache(maxsize=256)
def _templates(template: str, locale: str) -> _Found:
    """The subject, text and HTML templates of ``template`` in ``locale`` (or ``en``),
    looked up once per process."""
    env = environment()
    found = template_locale(template, locale)
    subject = env.get_template(f"{found}/{template}.subject.txt")
    return _Found(
        subject,
        env.get_template(f"{found}/{template}.txt"),
        env.get_template(f"{found}/{template}.html"),
        dict(subject.globals),
    )


def render(template: str, locale: str, context: dict[str, Any]) -> Rendered:
    """The three parts of ``template`` rendered with ``context``.

    One context dict serves the three templates (``new_context(shared=True)``):
    ``Template.render`` copies the globals' ChainMap and the variables into a new dict per
    template, which was 60 % of rendering (25 → 10 µs per message). Rendering never writes
    to it (a template's own assignments live in its context's ``vars``). A missing variable
    still raises ``UndefinedError`` (``StrictUndefined``)."""
    found = _templates(template, locale)
    parent = {**found.globals, **context}
    concat = environment().concat

    def one(part: Template) -> str:
        return str(concat(part.root_render_func(part.new_context(parent, shared=True))))

    return Rendered(
        # One line: a newline in a header is an injection.
        subject=" ".join(one(found.subject).split()),
        text=one(found.text),
        html=one(found.html),
    )


@lru_cache(maxsize=16)
def _domain(sender: str) -> str:
    return parseaddr(sender)[1].rpartition("@")[2] or "surge.localhost"


def message_id(outbox_id: UUID, sender: str) -> str:
    """The Message-ID of an outbox row: stable across attempts, so a receiver that sees the
    same message twice can tell (RFC 5322 §3.6.4)."""
    return f"<{outbox_id}@{_domain(sender)}>"


def _header(name: str, value: str) -> str:
    """One header field, folded at spaces within ``_HEADER_WIDTH`` where it can be (a word
    longer than that stays whole: lines may reach 998 characters, RFC 5322 §2.1.1, and a
    value that starts on a continuation line reads back with a leading space). Runs of
    whitespace, CR and LF collapse to one space, so a value cannot start a second header;
    a non-ASCII value is RFC 2047-encoded."""
    if not value.isascii():
        return f"{name}: {Header(value, 'utf-8', header_name=name).encode(linesep=chr(10))}\n"
    lines: list[str] = []
    line = f"{name}:"
    bare = len(line)
    for word in value.split():
        if len(line) + 1 + len(word) > _HEADER_WIDTH and len(line) > bare:
            lines.append(line)
            line = ""
        line = f"{line} {word}"
    lines.append(line)
    return "\n".join(lines) + "\n"


def _part(subtype: str, text: str) -> str:
    """A text part in UTF-8, quoted-printable: readable in the raw message, safe through
    any relay (no line over 76 characters, no 8-bit byte)."""
    body = b2a_qp(text.encode(), istext=True).decode("ascii")
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\n'
        "MIME-Version: 1.0\n"
        "Content-Transfer-Encoding: quoted-printable\n"
        f"\n{body}"
    )


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
    """The message as sent: multipart/alternative (text, then HTML), UTF-8, lines ending in
    LF (the SMTP client writes CRLF).

    Written directly rather than with the ``email`` package's classes: their generator
    refolds every header and encoded each message in ~440 µs, ten times the rest of the
    build (``tests/notifications/test_render.py`` parses what this writes back with the
    ``email`` package). The boundary is ``=_`` and the message's id: a quoted-printable
    body cannot contain ``=_`` (every ``=`` in it is ``=3D`` or a soft break), so it never
    collides with the content, and it is the same on every attempt."""
    from_ = sender if sender.isascii() else formataddr(parseaddr(sender), charset="utf-8")
    boundary = f"=_{outbox_id.hex}"
    headers = [
        f'Content-Type: multipart/alternative;\n boundary="{boundary}"\n',
        "MIME-Version: 1.0\n",
        _header("From", from_),
        _header("To", formataddr(("", to))),
        _header("Subject", rendered.subject),
        _header("Date", format_datetime(created_at)),
        _header("Message-ID", message_id(outbox_id, sender)),
        _header("X-Surge-Category", category),
    ]
    if unsubscribe_url is not None:
        # RFC 8058 one-click: mailbox providers POST "List-Unsubscribe=One-Click" to the URL.
        headers.append(_header("List-Unsubscribe", f"<{unsubscribe_url}>"))
        headers.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click\n")
    return (
        f"{''.join(headers)}\n"
        f"--{boundary}\n{_part('plain', rendered.text)}\n"
        f"--{boundary}\n{_part('html', rendered.html)}\n"
        f"--{boundary}--\n"
    ).encode("ascii")
