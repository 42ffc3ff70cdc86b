"""A local SMTP relay (aiosmtpd) that keeps what it receives: `surge up` starts it, the
notification tests start their own.

    python -m surge.sim.smtp --host 127.0.0.1 --port 8025 [--store DIR] [--http-port P]

Every accepted message is kept in memory, written to ``--store`` as ``<n>.eml`` (default
``.data/smtp-sim``; ``-`` for none) and listed as JSON by ``GET /messages`` on
``--http-port`` (0: off). The recipient's local part picks how the relay answers, so every
outcome can be tried by hand:

    bounce…@   550 5.1.1 at RCPT (no such user: a hard bounce)
    blocked…@  550 5.7.1 after DATA (a reputation block: not the address's fault)
    defer…@    450 4.2.1 at RCPT (try again later: a soft bounce)
    full…@     552 5.2.2 at RCPT (mailbox full: transient)
    hang…@     no answer at RCPT (a relay that hangs)
    anything else: 250, kept.

``mode`` answers every recipient the same way (tests: ``accept``, ``450``, ``550``,
``5.7.1``, ``hang``); ``hold()`` makes the relay keep messages but hold back the reply to
the end of DATA until ``release()`` (the crash-window test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import json
import os
import threading
import time
from dataclasses import dataclass, field
from email import policy
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

REPLIES = {
    "bounce": ("rcpt", "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"),
    "blocked": (
        "data",
        "550 5.7.1 Service unavailable; client host blocked using a reputation list",
    ),
    "defer": ("rcpt", "450 4.2.1 <{rcpt}>: Mailbox busy, try again later"),
    "full": ("rcpt", "552 5.2.2 <{rcpt}>: Mailbox full"),
    "hang": ("rcpt", ""),
}
MODES = {
    "accept": None,
    "450": ("rcpt", "450 4.3.2 System not accepting messages, try later"),
    "550": ("rcpt", "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"),
    "5.7.1": ("data", "550 5.7.1 Message rejected: sending IP listed on a block list"),
    "hang": ("rcpt", ""),
}


@dataclass
class Received:
    """One accepted message."""

    mail_from: str
    rcpt_tos: list[str]
    message_id: str
    subject: str
    data: bytes
    received_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "mail_from": self.mail_from,
            "rcpt_tos": self.rcpt_tos,
            "message_id": self.message_id,
            "subject": self.subject,
            "received_at": self.received_at,
            "size": len(self.data),
        }


class Relay:
    """The aiosmtpd handler: answers by recipient (or ``mode``) and keeps what it accepts."""

    def __init__(self, store: Path | None = None) -> None:
        self.messages: list[Received] = []
        self.mode = "accept"
        self.store = store
        self._held = threading.Event()
        self._held.set()
        #: Messages kept while holding the reply (the test reads it to know when to kill).
        self.holding = 0
        self._lock = threading.Lock()
        #: Sessions inside a mail transaction (MAIL seen, DATA or RSET not yet): a graceful
        #: stop waits for them, as an MTA finishes what it accepted before it exits.
        self.in_transaction: set[int] = set()
        self.closing = False

    # ---- control (thread-safe: tests call these from their own thread) ------------------
    def hold(self) -> None:
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    def count(self, message_id: str) -> int:
        return sum(1 for m in list(self.messages) if m.message_id == message_id)

    # ---- aiosmtpd hooks -----------------------------------------------------------------
    def _rule(self, rcpt: str) -> tuple[str, str] | None:
        if self.mode != "accept":
            return MODES[self.mode]
        local = rcpt.split("@", 1)[0].lower()
        for prefix, rule in REPLIES.items():
            if local.startswith(prefix):
                return rule
        return None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        self.in_transaction.add(id(session))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_transaction.discard(id(session))
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rule = self._rule(address)
        if rule is not None and rule[0] == "rcpt":
            if not rule[1]:
                await asyncio.sleep(3600)  # hang: this session only
            return rule[1].format(rcpt=address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            return await self._data(session, envelope)
        finally:
            self.in_transaction.discard(id(session))

    async def _data(self, session: Session, envelope: Envelope) -> str:
        for rcpt in envelope.rcpt_tos:
            rule = self._rule(rcpt)
            if rule is not None and rule[0] == "data":
                return rule[1].format(rcpt=rcpt)
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=policy.compat32)
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            message_id=str(parsed.get("Message-ID", "")).strip(),
            subject=str(parsed.get("Subject", "")),
            data=raw,
        )
        with self._lock:
            self.messages.append(received)
            number = len(self.messages)
        if self.store is not None:
            with contextlib.suppress(OSError):
                self.store.mkdir(parents=True, exist_ok=True)
                (self.store / f"{number:06d}.eml").write_bytes(raw)
        if not self._held.is_set():
            # The message is kept (the relay took responsibility) but the "250" is held
            # back: a client killed now has had its message delivered without knowing it.
            self.holding += 1
            await asyncio.get_running_loop().run_in_executor(None, self._held.wait)
            self.holding -= 1
        return "250 2.0.0 Ok: queued"


class SmtpSimulator:
    """The relay on its own thread and event loop; ``stop()`` then ``start()`` again on the
    same port is a relay restart (open connections are dropped)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, store: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.relay = Relay(store)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: list[SMTP] = []

    def _factory(self) -> SMTP:
        server = SMTP(self.relay, hostname="sim.smtp.localhost", data_size_limit=10 * 1024 * 1024)
        self._connections = [c for c in self._connections if c.transport is not None]
        self._connections.append(server)
        return server

    def start(self) -> None:
        self.relay.closing = False
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await loop.create_server(
                    self._factory, self.host, self.port, reuse_address=True
                )
                sock = self._server.sockets[0]
                self.port = int(sock.getsockname()[1])
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="smtp-sim", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the SMTP simulator did not start")

    def stop(self, *, drain: float = 2.0) -> None:
        """Stop listening, refuse new transactions (421), let those under way finish (at
        most ``drain`` seconds), then drop every connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.relay.release()
        self.relay.closing = True

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            deadline = loop.time() + drain
            # Sessions end on the relay's own thread-free hooks; a poll keeps it simple.
            while self.relay.in_transaction and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            for connection in self._connections:
                if connection.transport is not None:
                    connection.transport.close()
            self._connections.clear()
            self.relay.in_transaction.clear()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = self._thread = self._server = None

    @property
    def messages(self) -> list[Received]:
        return self.relay.messages


async def _http(relay: Relay, host: str, port: int) -> asyncio.AbstractServer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            body = json.dumps([m.as_json() for m in relay.messages[-200:]]).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, host, port)


async def _serve(host: str, port: int, store: Path | None, http_port: int) -> None:
    relay = Relay(store)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(relay, hostname="sim.smtp.localhost"), host, port, reuse_address=True
    )
    servers: list[asyncio.AbstractServer] = [server]
    if http_port:
        servers.append(await _http(relay, host, http_port))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m surge.sim.smtp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument(
        "--store",
        # Beside the rest of the run's data (`surge up` with SURGE_DATA_DIR elsewhere).
        default=str(Path(os.environ.get("SURGE_DATA_DIR") or ".data") / "smtp-sim"),
        help="folder for received messages ('-': keep none)",
    )
    parser.add_argument("--http-port", type=int, default=0)
    args = parser.parse_args(argv)
    store = None if args.store == "-" else Path(args.store)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, store, args.http_port))


if __name__ == "__main__":
    main()
