"""The SMTP side of the outbox: a per-process pool of relay connections, one message per
transaction, every reply classified (ADR 0019).

Classification (RFC 5321 reply codes, RFC 3463 enhanced status codes):

- ``250`` after the end of DATA → ``sent``;
- ``4xx`` anywhere, ``5.2.2`` (mailbox full), connection refused, dropped or timed out
  before the end of DATA → ``transient`` (retried on ``NOTIFY_RETRY_SCHEDULE``); a ``4xx``
  *reply about the recipient* (RCPT, DATA) also counts as a soft bounce of the address;
- ``5.7.x`` or a reply that names a block list / reputation / spam → ``blocked``: the
  relay refuses *us*, the address is fine, so it is not suppressed (SES and most ESPs
  conflate the two, and users lose good addresses after a blocklisting);
- any other ``5xx`` at RCPT or DATA → ``hard`` (no such user, domain does not exist...);
- the connection lost or timed out *after* the end of DATA was written → ``unconfirmed``:
  the relay may have taken it, and Surge never sends a message twice once its end of DATA
  is on the wire (ADR 0019, crash windows).

The connection's health goes through the breaker ``smtp``: refused connections, timeouts
and ``421`` count as failures; a recipient's 5xx is a *successful* call to a healthy relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
import structlog
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from surge.kit.breaker import Breaker, BreakerOpenError

log = structlog.get_logger()

Kind = Literal["sent", "transient", "hard", "blocked", "unconfirmed", "aborted", "failed"]

#: A body longer than this is written before the ``sending`` mark is awaited, so that its
#: transfer overlaps the mark's round trip; a shorter one goes with its terminating ``.`` in
#: one write after it (one segment, one read and one wake-up of the relay instead of two).
BODY_AHEAD = 64 * 1024

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_BLOCK_WORDS = re.compile(
    r"block ?list|blacklist|reputation|spam|blocked|rbl|dnsbl|policy", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happened to one attempt."""

    kind: Kind
    code: int | None = None
    detail: str = ""
    stage: str = ""
    """connect, mail, rcpt, data, end (the reply to the end of DATA), breaker."""
    address_fault: bool = False
    """The relay's reply was about this recipient (soft bounces are counted from these)."""
    retry_after: float | None = None


def enhanced_status(text: str) -> str | None:
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else None


def classify(code: int | None, text: str, stage: str) -> Verdict:
    """Turn one SMTP reply (or its absence: ``code=None``) into a verdict."""
    detail = f"{code} {text}".strip() if code is not None else text
    detail = detail[:500]
    if code is None or code == 421:
        return Verdict("transient", code, detail, stage)
    if 200 <= code < 400:
        return Verdict("sent", code, detail, stage)
    status = enhanced_status(text)
    recipient_reply = stage in {"rcpt", "data", "end"}
    if code >= 500:
        if (status is not None and status.startswith("5.7.")) or _BLOCK_WORDS.search(text):
            return Verdict("blocked", code, detail, stage)
        if status == "5.2.2":  # mailbox full: the recipient exists; try again later
            return Verdict("transient", code, detail, stage, address_fault=recipient_reply)
        if recipient_reply:
            return Verdict("hard", code, detail, stage, address_fault=True)
        # MAIL FROM refused: our sender/relay configuration, not this recipient.
        return Verdict("blocked", code, detail, stage)
    return Verdict("transient", code, detail, stage, address_fault=recipient_reply)


class RelayDown(Exception):
    """The relay could not be used (refused, dropped, timed out): a breaker failure."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.detail)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str
    port: int
    timeout: float = 30.0
    tls: str = "none"
    username: str = ""
    password: str = ""
    connections: int = 8
    local_hostname: str | None = None


class SmtpRelay:
    """A small pool of SMTP connections to one relay (per process).

    ``send()`` checks a connection out (opening one when none is idle), runs one mail
    transaction on it and puts it back; a connection that failed is closed, never reused.
    """

    def __init__(self, config: RelayConfig, breaker: Breaker) -> None:
        self.config = config
        self.breaker = breaker
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(max(1, config.connections))

    async def _open(self) -> aiosmtplib.SMTP:
        config = self.config
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            timeout=config.timeout,
            use_tls=config.tls == "tls",
            start_tls=config.tls == "starttls",
            local_hostname=config.local_hostname,
            tls_context=ssl.create_default_context() if config.tls != "none" else None,
        )
        await client.connect()
        if config.username:
            await client.login(config.username, config.password)
        return client

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), timeout=1)
            client.close()

    async def send(
        self,
        *,
        sender: str,
        recipient: str,
        content: bytes,
        before_end: Callable[[], Awaitable[bool]],
        connected: Callable[[], None] | None = None,
    ) -> Verdict:
        """One mail transaction. ``before_end`` runs after the whole body is written and
        before its terminating ``.``: it records that the message is about to be handed
        over (and returns False to abort: the connection is then dropped, and a relay
        discards a transaction whose DATA never ended). ``connected`` is called once the
        transaction has a connection slot of the pool."""
        try:
            return await self.breaker.call(
                self._send, sender, recipient, content, before_end, connected
            )
        except BreakerOpenError as error:
            return Verdict("transient", None, str(error), "breaker", retry_after=error.retry_after)
        except RelayDown as down:
            return down.verdict

    async def _send(
        self,
        sender: str,
        recipient: str,
        content: bytes,
        before_end: Callable[[], Awaitable[bool]],
        connected: Callable[[], None] | None = None,
    ) -> Verdict:
        async with self._slots:
            if connected is not None:
                connected()
            reused = bool(self._idle)
            client = self._idle.pop() if reused else None
            for round_ in (1, 2):
                if client is None:
                    try:
                        client = await self._open()
                    except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                        raise RelayDown(_failure(error, "connect")) from error
                try:
                    verdict = await self._transaction(
                        client, sender, recipient, content, before_end
                    )
                except _Stale:
                    # An idle connection the relay had closed (restart, idle timeout):
                    # nothing was sent on it yet, so a fresh connection is safe.
                    client.close()
                    client = None
                    if round_ == 2 or not reused:
                        raise RelayDown(
                            Verdict("transient", None, "connection lost", "mail")
                        ) from None
                    continue
                except RelayDown:
                    client.close()
                    raise
                if client.is_connected:
                    self._idle.append(client)
                return verdict
        raise AssertionError("unreachable")

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        sender: str,
        recipient: str,
        content: bytes,
        before_end: Callable[[], Awaitable[bool]],
    ) -> Verdict:
        timeout = self.config.timeout
        stage = "mail"
        try:
            try:
                await client.mail(sender, timeout=timeout)
            except aiosmtplib.SMTPServerDisconnected as error:
                raise _Stale from error
            stage = "rcpt"
            await client.rcpt(recipient, timeout=timeout)
            stage = "data"
            reply = await client.execute_command(b"DATA", timeout=timeout)
            if reply.code != 354:
                raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
            protocol = client.protocol
            assert protocol is not None
            body = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content))
            if not body.endswith(b"\r\n"):
                body += b"\r\n"
            ahead = len(body) > BODY_AHEAD
            if ahead:
                protocol.write(body)
            if not await before_end():
                client.close()  # DATA never ends: the relay discards the transaction
                return Verdict("aborted", None, "claimed by another attempt", "data")
            # A write refused here (the connection is already closed) sent nothing: the
            # stage stays "data" and the message is retried; once the terminator is on the
            # wire, a lost reply means "unconfirmed".
            protocol.write(b".\r\n" if ahead else body + b".\r\n")
            stage = "end"
            reply = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPResponseException as error:
            if stage == "end" and error.code < 0:  # aiosmtplib's own codes: no real reply
                raise RelayDown(Verdict("unconfirmed", None, str(error)[:500], stage)) from error
            verdict = classify(error.code, error.message, stage)
            if error.code == 421 or (verdict.kind == "transient" and not verdict.address_fault):
                raise RelayDown(verdict) from error
            if stage != "end":
                try:
                    await client.rset(timeout=timeout)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
            return verdict
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            if stage == "end":
                raise RelayDown(Verdict("unconfirmed", None, _text(error), stage)) from error
            raise RelayDown(_failure(error, stage)) from error
        return classify(reply.code, reply.message, "end")


class _Stale(Exception):
    pass


def _text(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}")[:500]


def _failure(error: BaseException, stage: str) -> Verdict:
    code = getattr(error, "code", None)
    return Verdict(
        "transient", code if isinstance(code, int) and code > 0 else None, _text(error), stage
    )
