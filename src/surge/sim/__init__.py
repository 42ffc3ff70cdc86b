"""Simulators of the world outside the machine: real servers on loopback.

The upstream provider's website, its egress proxies, the payment provider and an SMTP relay
are things Surge talks to but does not own. For ``make run`` and for the tests they are
simulated by real servers (HTTP, SMTP) under this package. Domain code never imports
``surge.sim``: it reaches a simulator only through the URL in its settings, exactly as it
would reach the real service.

One way to add a simulator: a module ``surge.sim.<name>`` that runs as
``python -m surge.sim.<name> --host H --port P`` (printing nothing on stdout it needs read),
and one ``Simulator`` entry below. ``surge up`` starts every entry on a free port, waits for
it to accept connections, and hands the settings returned by ``env`` to the API and the
workers (their environment), so the product points at the simulator.
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
