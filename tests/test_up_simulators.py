"""`surge up` starts its simulators where they can listen, and knows it.

Two `surge up` on one machine (two test runs, a `make run` beside a test run) used to
collide: the egress proxies listen on fixed addresses (127.0.1.x:3128), the second run's
proxies died on "address already in use", and `surge up` waited 20 s for them and gave up. And a
simulator is given a port that was free a moment before: if it is taken meanwhile, the one
listening there is someone else and must not be taken for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from surge.cli.servers import _listening, _start_simulators, _stop_children, _where_to_look
from surge.kit.embedded import free_port, port_open
from surge.sim import PROXY_PORT, SIMULATORS
from surge.sim.proxies import listen_address


@pytest.fixture
def only_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("surge.sim.SIMULATORS", [s for s in SIMULATORS if s.name == "proxies"])
    monkeypatch.setenv("SURGE_OPERATIONS_PROXY_URLS", "")  # restored after the test


@pytest.fixture
def proxy_port_taken() -> Iterator[None]:
    """127.0.1.1:3128 held by someone else (or already held: the same situation)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind((listen_address(0), PROXY_PORT))
        holder.listen()
    except OSError:
        holder.close()
        assert port_open(PROXY_PORT, listen_address(0)), "3128 neither free nor listened on"
        yield
        return
    try:
        yield
    finally:
        holder.close()


@pytest.mark.usefixtures("only_proxies", "proxy_port_taken")
def test_proxies_take_free_ports_when_theirs_are_taken_and_restart_there(
    tmp_path: Path,
) -> None:
    started = _start_simulators("127.0.0.1", tmp_path)
    (name, child, restart), = started  # fmt: skip
    try:
        urls = os.environ["SURGE_OPERATIONS_PROXY_URLS"].split(",")
        assert len(urls) == 4, urls
        assert f"{listen_address(0)}:{PROXY_PORT}" not in urls[0], urls
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        for i, port in enumerate(ports):
            assert port_open(port, listen_address(i)), urls[i]
        assert restart[-2:] == ["--listen-ports", ",".join(map(str, ports))]

        # What the supervisor does when it dies: the restart listens where Surge points.
        child.send_signal(signal.SIGKILL)
        child.wait()
        again = subprocess.Popen(restart, start_new_session=True)
        try:
            assert _listening(again, ports[0], None, timeout=20)
            for i, port in enumerate(ports):
                assert port_open(port, listen_address(i)), urls[i]
        finally:
            _stop_children([("again", again)], grace=5)
    finally:
        _stop_children([(name, child)], grace=5)


def test_someone_elses_socket_is_not_taken_for_the_simulator(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        # A simulator that could not bind (exits) while another process listens there.
        child = subprocess.Popen(
            [sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(3)"]
        )
        assert not _listening(child, port, None, timeout=20)
        assert child.returncode == 3


def test_the_panel_fits_80_columns_and_shows_urls_that_open() -> None:
    """What `surge up` prints: an address that cannot be opened (0.0.0.0) is shown as
    loopback, and no line wraps in an 80-column terminal (the panel's border takes 4)."""
    text = _where_to_look("0.0.0.0", 8000, Path(".data"), seeded=True)
    assert max(len(line) for line in text.splitlines()) <= 76, text
    words = text.split()
    for path in ("/docs", "/admin", "/panel", "/api/health", "/metrics"):
        assert f"http://127.0.0.1:8000{path}" in words, path
    assert "admin@demo.surge.dev" in text
    assert "surge-demo-password" in text
