"""Simulators of the world outside the machine: real servers on loopback.

The upstream provider's website, its egress proxies, the payment provider and an SMTP relay
are things Surge talks to but does not own. For ``make run`` and for the tests they are
simulated by real servers (HTTP, SMTP) under this package. Domain code never imports
``surge.sim``: it reaches a simulator only through the URL in its settings, exactly as it
would reach the real service.

One way to add a simulator: a module ``surge.sim.<name>`` that runs as
``python -m surge.sim.<name> --host H --port P`` (printing nothing on stdout it needs read),
and one ``Simulator`` entry below. ``surge up`` starts every entry on a free port, waits for
it to accept connections there (its own listening socket: a port taken meanwhile by someone
else is retried, never mistaken for it), and hands the settings returned by ``env`` to the
API and the workers (their environment), so the product points at the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Simulator:
    """A loopback server ``surge up`` starts before the API and the workers."""

    name: str
    #: ``python -m MODULE --host H --port P`` runs it.
    module: str
    #: The settings (environment variables) that point Surge at it, given host and port.
    env: Callable[[str, int], dict[str, str]]
    #: Extra command-line arguments.
    args: tuple[str, ...] = field(default=())
    #: It may not listen where asked (a fixed port another run holds): ``surge up`` passes
    #: ``--ready-file PATH`` and waits for that JSON, whose ``env`` replaces ``env(host,
    #: port)`` and whose ``args`` are appended to restart it on the same addresses.
    ready_file: bool = False


#: Every simulator ``surge up`` starts, in order. Each domain adds its own entry.
SIMULATORS: list[Simulator] = []

# ---- payments ----
SIMULATORS.append(
    Simulator(
        name="payments",
        module="surge.sim.payments",
        env=lambda host, port: {"SURGE_PAYMENTS_PROVIDER_URL": f"http://{host}:{port}"},
    )
)

# ---- operations (issue 13): the upstream provider's website and its egress proxies -------
#: Provider accounts the simulator knows at start; ``surge.demo`` registers the same ones.
PROVIDER_DEMO_ACCOUNTS = "agent1:agent1-secret,agent2:agent2-secret,agent3:agent3-secret"
#: Egress proxies ``surge up`` starts (each with its own source address). They listen on
#: fixed addresses (127.0.1.1:3128, 127.0.1.2:3128, ...: squid's port), so the proxies the
#: demo registers in the database stay valid from one ``make run`` to the next. When another
#: run on this machine holds them, they listen on free ports for this run (``ready_file``).
PROXY_COUNT = 4
PROXY_PORT = 3128
PROXY_URLS = tuple(f"http://127.0.1.{i + 1}:{PROXY_PORT}" for i in range(PROXY_COUNT))


def _proxy_env(host: str, port: int) -> dict[str, str]:
    return {"SURGE_OPERATIONS_PROXY_URLS": ",".join(PROXY_URLS)}


SIMULATORS.append(
    Simulator(
        name="provider",
        module="surge.sim.provider",
        env=lambda host, port: {"SURGE_OPERATIONS_PROVIDER_URL": f"http://{host}:{port}"},
        args=("--accounts", PROVIDER_DEMO_ACCOUNTS),
    )
)
SIMULATORS.append(
    Simulator(
        name="proxies",
        module="surge.sim.proxies",
        env=_proxy_env,
        args=("--count", str(PROXY_COUNT), "--listen-port", str(PROXY_PORT)),
        ready_file=True,
    )
)

# ---- notifications: the local SMTP relay (keeps what it receives; see surge.sim.smtp) ----
SIMULATORS.append(
    Simulator(
        name="smtp",
        module="surge.sim.smtp",
        env=lambda host, port: {
            "SURGE_NOTIFY_SMTP_HOST": host,
            "SURGE_NOTIFY_SMTP_PORT": str(port),
        },
    )
)
