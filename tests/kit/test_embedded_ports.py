"""``free_port`` never hands out a port this process reserved for a server it binds later
(``surge up`` reserves the API's port before starting PostgreSQL, Redis and the simulators:
a clean-clone CI run once had the embedded PostgreSQL take it, and the API failed to bind)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from surge.kit import embedded


class _Offers:
    """A stand-in socket whose ``bind(0)`` gets the next port of a fixed list: the kernel's
    choice, made repeatable."""

    ports: list[int] = []

    def __init__(self, *_: Any) -> None:
        self.port = 0

    def __enter__(self) -> _Offers:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def bind(self, _address: tuple[str, int]) -> None:
        self.port = self.ports.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_reserved_port_is_never_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_reserved", set())
    monkeypatch.setattr(socket, "socket", _Offers)
    _Offers.ports = [41000, 41000, 41001]
    embedded.reserve_port(41000)
    assert embedded.free_port() == 41001
    assert _Offers.ports == []


def test_unreserved_ports_come_straight_from_the_kernel() -> None:
    port = embedded.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # it really was free
