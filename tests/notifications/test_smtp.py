"""The relay connection's mail transaction (``surge.notifications.smtp``) against a real
relay on loopback: what is on the wire when the ``sending`` mark is taken."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiosmtplib.protocol import SMTPProtocol

from surge.kit.breaker import Breaker
from surge.notifications import smtp
from surge.notifications.smtp import RelayConfig, SmtpRelay, Verdict
from surge.sim.smtp import SmtpSimulator
from tests.fixtures.smtp import smtp_relay


@pytest.fixture
def relay() -> Iterator[SmtpSimulator]:
    with smtp_relay() as sim:
        yield sim


def message(body: str) -> bytes:
    return (
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n"
        "Message-ID: <m@example.com>\r\n\r\n" + body
    ).encode()


async def send(
    relay: SmtpSimulator, content: bytes, writes: list[bytes], *, mark: bool = True
) -> tuple[Verdict, list[bytes]]:
    """One transaction; ``writes`` holds every write on the connection, and the returned list
    the writes made before the mark was taken."""
    client = SmtpRelay(RelayConfig(host=relay.host, port=relay.port, timeout=5), Breaker("smtp"))
    before_mark: list[bytes] = []

    async def before_end() -> bool:
        before_mark.extend(writes)
        return mark

    try:
        verdict = await client.send(
            sender="bounces@example.com", recipient="b@example.com", content=content,
            before_end=before_end,
        )  # fmt: skip
    finally:
        await client.close()
    return verdict, before_mark


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of an SMTP client connection, in order (a spy on the real protocol)."""
    seen: list[bytes] = []
    original = SMTPProtocol.write

    def spy(self: SMTPProtocol, data: bytes) -> None:
        seen.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(SMTPProtocol, "write", spy)
    return seen


async def test_a_short_body_goes_with_its_end_in_one_write_after_the_mark(
    relay: SmtpSimulator, writes: list[bytes]
) -> None:
    verdict, before_mark = await send(relay, message("short body\r\n"), writes)
    assert verdict.kind == "sent"
    assert not any(b"short body" in w for w in before_mark)  # nothing of it before the mark
    # The first write after the mark is the whole body with its terminator: one segment.
    assert writes[len(before_mark)].endswith(b"Subject: s\r\nMessage-ID: <m@example.com>"
                                             b"\r\n\r\nshort body\r\n.\r\n")  # fmt: skip
    assert relay.messages[-1].data.rstrip().endswith(b"short body")


async def test_a_long_body_is_written_ahead_of_the_mark_and_its_end_after(
    relay: SmtpSimulator, writes: list[bytes]
) -> None:
    body = ("x" * 70 + "\r\n") * (smtp.BODY_AHEAD // 72 + 10)
    verdict, before_mark = await send(relay, message(body), writes)
    assert verdict.kind == "sent"
    assert any(b"xxxx" in w for w in before_mark)  # its transfer overlaps the mark
    assert writes[len(before_mark)] == b".\r\n"
    assert len(relay.messages[-1].data) >= len(body)


@pytest.mark.parametrize("size", ["short", "long"])
async def test_a_refused_mark_never_ends_the_data_and_the_relay_keeps_nothing(
    relay: SmtpSimulator, writes: list[bytes], size: str
) -> None:
    body = "short\r\n" if size == "short" else ("y" * 70 + "\r\n") * (smtp.BODY_AHEAD // 72 + 10)
    verdict, _ = await send(relay, message(body), writes, mark=False)
    assert verdict.kind == "aborted"
    assert not any(w.endswith(b"\r\n.\r\n") or w == b".\r\n" for w in writes)
    assert relay.messages == []
