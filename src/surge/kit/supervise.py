"""Keep a set of components alive: restart what died, with backoff, logged and counted.

``surge up`` runs everything on one machine: the embedded PostgreSQL and Redis, the API and
the job worker fleet. Each is a ``Component``: a way to tell whether it is alive and a way
to (re)start it. ``Supervisor.tick()`` is called from the owner's loop a few times a second;
a component found dead is restarted at once, then, should it die again (or fail to start),
after a backoff that doubles from ``backoff_min`` to ``backoff_max`` and is forgotten once
the component has stayed up ``stable_after`` seconds (the shape of ``kit.jobs.fleet``'s).

PostgreSQL killed with SIGKILL needs nothing special: its next start runs crash recovery
from the WAL before it accepts connections (``pg_ctl start -w`` waits for that). Redis
holds nothing durable in Surge (ADR 0004): a restarted empty Redis is a slower Redis.

Counted in Prometheus (multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set, so the
API's ``/metrics``, which aggregates that folder, shows the supervisor's counts too):
``surge_supervised_restarts_total{component}`` and ``surge_supervised_up{component}``.
Import this module only after the metrics folder is chosen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from prometheus_client import Counter, Gauge

log = structlog.get_logger()

RESTARTS = Counter(
    "surge_supervised_restarts_total",
    "Restarts of a supervised component (embedded server, API, worker fleet).",
    ["component"],
)
UP = Gauge(
    "surge_supervised_up",
    "1 while a supervised component is alive, 0 while it is down.",
    ["component"],
    multiprocess_mode="livemax",
)


@dataclass
class Component:
    """One thing to keep alive: ``alive()`` must be cheap (called several times a second)
    and ``start()`` returns once the component is usable, or raises."""

    name: str
    alive: Callable[[], bool]
    start: Callable[[], None]
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 60.0
    #: Not watched while True (an operator's planned stop, a chaos step's "down for 30 s").
    paused: bool = False
    restarts: int = 0
    failures: int = 0
    down_since: float | None = None
    started_at: float = 0.0
    next_attempt: float = 0.0
    backoff: float = field(init=False)
    #: Seconds each outage lasted, from detection to a successful start (for reports).
    outages: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.backoff = self.backoff_min


class Supervisor:
    """Restarts dead components; see the module docstring. ``clock`` is injectable."""

    def __init__(
        self,
        components: Sequence[Component] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, Component], None] | None = None,
    ) -> None:
        self.components: list[Component] = list(components)
        self.clock = clock
        self.on_event = on_event
        now = clock()
        for component in self.components:
            component.started_at = now
            UP.labels(component.name).set(1)

    def add(self, component: Component) -> None:
        component.started_at = self.clock()
        self.components.append(component)
        UP.labels(component.name).set(1)

    def tick(self) -> None:
        """Check every component once; restart the dead ones whose backoff has elapsed."""
        for component in self.components:
            self._check(component)

    def _check(self, component: Component) -> None:
        if component.paused:
            return
        now = self.clock()
        if component.alive():
            if (
                component.down_since is None
                and now - component.started_at >= component.stable_after
            ):
                component.backoff = component.backoff_min  # stayed up: forget past crashes
            return
        if component.down_since is None:
            component.down_since = now
            # Immediate the first time; after a recent restart, once its backoff has passed
            # (a crash loop must not spin).
            component.next_attempt = max(now, component.next_attempt)
            UP.labels(component.name).set(0)
            log.warning("supervisor.down", component=component.name)
            self._emit("down", component)
        if now < component.next_attempt:
            return
        try:
            component.start()
        except Exception as error:
            component.failures += 1
            component.next_attempt = self.clock() + component.backoff
            log.warning(
                "supervisor.restart_failed",
                component=component.name,
                error=f"{type(error).__name__}: {error}"[:500],
                retry_in=round(component.backoff, 2),
            )
            component.backoff = min(component.backoff * 2, component.backoff_max)
            self._emit("failed", component)
            return
        done = self.clock()
        component.restarts += 1
        component.outages.append(done - component.down_since)
        RESTARTS.labels(component.name).inc()
        UP.labels(component.name).set(1)
        log.warning(
            "supervisor.restarted",
            component=component.name,
            restarts=component.restarts,
            down_for=round(done - component.down_since, 3),
        )
        component.down_since = None
        component.started_at = done
        # A crash loop waits: the next restart of this component is not immediate.
        component.next_attempt = done + component.backoff
        component.backoff = min(component.backoff * 2, component.backoff_max)
        self._emit("restarted", component)

    def _emit(self, event: str, component: Component) -> None:
        if self.on_event is not None:
            self.on_event(event, component)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            c.name: {"up": c.down_since is None, "restarts": c.restarts, "failures": c.failures}
            for c in self.components
        }


class ChildProcess:
    """A command run in its own session (process group), restartable.

    Before a restart the whole group of the dead process is killed: a supervisor killed with
    SIGKILL (uvicorn's, the worker fleet's) leaves its children behind, holding the listening
    socket or running jobs; they must go before a new one starts."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str] | None = None):
        self.name = name
        self.command = list(command)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.process is not None:
            _kill_group(self.process.pid)
            self.process.wait()
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def component(self, *, backoff_min: float = 0.5, backoff_max: float = 30.0) -> Component:
        return Component(
            self.name, self.alive, self.start, backoff_min=backoff_min, backoff_max=backoff_max
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
