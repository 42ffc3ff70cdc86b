"""The message builder: what it writes must read back, through the ``email`` package, as
exactly what was rendered — headers, both parts, any text — and stay a well-formed,
7-bit, injection-free message."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from uuid import UUID, uuid4

import pytest

from surge.notifications.render import Rendered, build_message, render

SENDER = "Surge <no-reply@surge.localhost>"
WHEN = datetime(2026, 12, 7, 17, 30, tzinfo=UTC)
UNSUBSCRIBE = (
    "http://localhost:8000/api/v1/notifications/unsubscribe?token="
    "eyJhbGciOiJIUzI1NiJ9.eyJ1IjoxMjMsImMiOiJhY2NvdW50In0." + "x" * 60
)


def built(
    rendered: Rendered,
    *,
    outbox_id: UUID | None = None,
    to: str = "reader@example.com",
    sender: str = SENDER,
    unsubscribe_url: str | None = UNSUBSCRIBE,
) -> tuple[bytes, EmailMessage]:
    raw = build_message(
        outbox_id=outbox_id or uuid4(), sender=sender, to=to, rendered=rendered,
        created_at=WHEN, unsubscribe_url=unsubscribe_url, category="account",
    )  # fmt: skip
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def bodies(parsed: EmailMessage) -> tuple[str, str]:
    plain, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert plain is not None
    assert html is not None
    return plain.get_content(), html.get_content()


def test_a_rendered_template_reads_back_header_for_header_and_part_for_part() -> None:
    context = {"email": "reader@example.com", "public_url": "http://x", "unsubscribe_url": None}
    rendered = render("welcome", "en", context)
    outbox_id = uuid4()
    _, parsed = built(rendered, outbox_id=outbox_id)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert parsed["From"] == SENDER
    assert parsed["To"] == "reader@example.com"
    assert parsed["Subject"] == rendered.subject == "Welcome to Surge"
    assert parsed["Date"].datetime == WHEN
    assert parsed["Message-ID"] == f"<{outbox_id}@surge.localhost>"
    assert parsed["X-Surge-Category"] == "account"
    # The folded header unfolds to the whole URL: nothing lost, nothing added.
    assert parsed["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert bodies(parsed) == (rendered.text, rendered.html)


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — 10 € ✓ 🎉\n",
        "a = b; c=3D is not an escape\n",
        "trailing spaces   \nand a tab\t\n",
        ".a line that starts with a dot\n..two\nFrom the start of a line\n",
        "x" * 300 + "\n" + "word " * 100 + "\n",
        "no final newline",
        "--=_not-the-boundary\n=_\n",
    ],
)
def test_any_text_reads_back_exactly_in_seven_bit_lines(text: str) -> None:
    raw, parsed = built(Rendered(subject="s", text=text, html=f"<p>{text}</p>"))
    assert bodies(parsed) == (text, f"<p>{text}</p>")
    assert raw.isascii()
    head, body = raw.split(b"\n\n", 1)
    assert max(len(line) for line in body.split(b"\n")) <= 76  # quoted-printable's limit
    assert max(len(line) for line in head.split(b"\n")) <= 998  # RFC 5322's


def test_headers_fold_within_78_columns_and_unfold_to_the_same_value() -> None:
    subject = "Your withdrawal of 1,234.56 USD to the account ending in 4242 was approved today"
    raw, parsed = built(Rendered(subject=subject, text="t", html="h"), unsubscribe_url=None)
    head = raw.split(b"\n\n", 1)[0]
    assert max(len(line) for line in head.split(b"\n")) <= 78
    assert b"Subject: Your withdrawal" in head
    assert b"\n " in head
    assert parsed["Subject"] == subject


def test_non_ascii_headers_are_encoded_words() -> None:
    subject = "Votre retrait de 12,00 € a été approuvé — merci d'utiliser Surge aujourd'hui"
    raw, parsed = built(
        Rendered(subject=subject, text="t", html="h"), sender="Équipe Surge <no-reply@surge.fr>"
    )
    assert raw.isascii()
    assert parsed["Subject"] == subject
    assert parsed["From"].addresses[0].display_name == "Équipe Surge"
    assert parsed["Message-ID"].endswith("@surge.fr>")


def test_a_newline_in_a_value_cannot_add_a_header() -> None:
    _, parsed = built(
        Rendered(subject="hi\r\nBcc: victim@example.com", text="t", html="h"),
        to="reader@example.com\nBcc: other@example.com",
    )
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == "hi Bcc: victim@example.com"


def test_without_an_unsubscribe_url_there_is_no_one_click_header() -> None:
    raw, parsed = built(Rendered(subject="s", text="t", html="h"), unsubscribe_url=None)
    assert b"List-Unsubscribe" not in raw
    assert parsed["List-Unsubscribe-Post"] is None


def test_the_boundary_and_message_id_are_the_same_on_every_attempt() -> None:
    outbox_id = uuid4()
    rendered = Rendered(subject="s", text="t", html="h")
    first, _ = built(rendered, outbox_id=outbox_id)
    again, _ = built(rendered, outbox_id=outbox_id)
    assert first == again


def test_a_missing_variable_is_an_error_not_a_hole() -> None:
    from jinja2 import UndefinedError

    with pytest.raises(UndefinedError):
        render("welcome", "en", {"public_url": "http://x", "unsubscribe_url": None})


def test_rendering_leaves_the_context_as_it_was() -> None:
    context = {"email": "a@example.com", "public_url": "http://x", "unsubscribe_url": None}
    first = render("welcome", "en", dict(context))
    assert render("welcome", "en", context) == first
    assert context == {"email": "a@example.com", "public_url": "http://x", "unsubscribe_url": None}
    assert "a@example.com" in first.text
    escaped = render("welcome", "en", {**context, "email": "<b>x</b>@example.com"})
    assert "<b>x</b>@example.com" in escaped.text  # plain text: as given
    assert "&lt;b&gt;x&lt;/b&gt;@example.com" in escaped.html  # HTML: autoescaped
