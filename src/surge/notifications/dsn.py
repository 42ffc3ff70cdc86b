"""RFC 3464 delivery status notifications (the bounce a relay mails back to the
envelope sender after it accepted a message), parsed with the ``email`` standard library.

A DSN is ``multipart/report; report-type=delivery-status`` with a human part, a
``message/delivery-status`` part (one block of per-message fields, then one block per
recipient: ``Final-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``) and usually the
original message or its headers (``message/rfc822`` / ``text/rfc822-headers``), from which
the original ``Message-ID`` — our outbox id — is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from email.parser import HeaderParser

_ID = re.compile(r"<([0-9a-fA-F-]{36})@")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    address: str
    action: str
    """failed, delayed, delivered, relayed or expanded."""
    status: str
    """The RFC 3463 code, e.g. ``5.1.1``."""
    diagnostic: str
    original_message_id: str | None
    """The outbox id (the left part of our Message-ID), when the report carries it."""

    @property
    def code(self) -> int | None:
        """The SMTP reply code in the diagnostic (``smtp; 550 5.1.1 ...`` → 550)."""
        match = re.search(r"\b([245]\d\d)\b", self.diagnostic)
        return int(match.group(1)) if match else None


def _address(value: str) -> str:
    # "rfc822; user@example.com" → "user@example.com"
    _, _, address = value.partition(";")
    return (address or value).strip().strip("<>").lower()


def _original_id(report: Message) -> str | None:
    for part in report.walk():
        content_type = part.get_content_type()
        headers: Message | None = None
        if content_type == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                headers = payload[0]
        elif content_type == "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                headers = HeaderParser().parsestr(raw.decode("utf-8", "replace"))
        if headers is not None and headers.get("Message-ID"):
            match = _ID.search(str(headers["Message-ID"]))
            if match:
                return match.group(1)
    return None


def parse_dsn(raw: bytes) -> list[DsnRecipient]:
    """Every recipient block of a DSN; ``[]`` when ``raw`` is not a delivery-status report."""
    report = message_from_bytes(raw, policy=policy.compat32)
    if report.get_content_type() != "multipart/report":
        return []
    original = _original_id(report)
    recipients: list[DsnRecipient] = []
    for part in report.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks[1:]:  # the first block holds the per-message fields
            if not isinstance(block, Message):
                continue
            recipient = block.get("Final-Recipient") or block.get("Original-Recipient")
            if not recipient:
                continue
            recipients.append(
                DsnRecipient(
                    address=_address(str(recipient)),
                    action=str(block.get("Action", "")).strip().lower(),
                    status=str(block.get("Status", "")).strip(),
                    diagnostic=" ".join(str(block.get("Diagnostic-Code", "")).split()),
                    original_message_id=original,
                )
            )
    return recipients
