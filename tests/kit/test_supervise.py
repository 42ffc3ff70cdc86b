"""``kit.supervise``: restart at once, then with a doubling backoff; forget it after a stable
stretch; leave paused components alone; count restarts (a fake clock, no sleeps)."""

from __future__ import annotations

from surge.kit.supervise import RESTARTS, Component, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A component that is dead until started, and whose starts fail ``failures`` times."""

    def __init__(self, failures: int = 0) -> None:
        self.up = True
        self.failures = failures
        self.starts = 0

    def alive(self) -> bool:
        return self.up

    def start(self) -> None:
        self.starts += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("port still in use")
        self.up = True


def _restarts(name: str) -> float:
    return float(RESTARTS.labels(name)._value.get())


def test_restart_is_immediate_then_backs_off() -> None:
    clock, thing = Clock(), Flaky()
    component = Component("t-backoff", thing.alive, thing.start, stable_after=60)
    events: list[str] = []
    supervisor = Supervisor([component], clock=clock, on_event=lambda e, _: events.append(e))
    before = _restarts("t-backoff")

    thing.up = False
    supervisor.tick()
    assert thing.up
    assert thing.starts == 1
    assert events == ["down", "restarted"]
    assert _restarts("t-backoff") == before + 1

    thing.up = False  # dies again at once: the next restart waits the backoff
    clock.now += 0.1
    supervisor.tick()
    assert not thing.up
    assert thing.starts == 1
    clock.now += 0.5
    supervisor.tick()
    assert thing.up
    assert thing.starts == 2
    assert component.backoff == 2.0  # 0.5 → 1 → 2

    clock.now += 61  # stable for a minute: the past is forgiven
    supervisor.tick()
    assert component.backoff == component.backoff_min


def test_failed_starts_retry_with_backoff_and_outage_is_measured() -> None:
    clock, thing = Clock(), Flaky(failures=2)
    component = Component("t-fail", thing.alive, thing.start)
    supervisor = Supervisor([component], clock=clock)
    thing.up = False
    supervisor.tick()  # fails; retry in 0.5 s
    clock.now += 0.4
    supervisor.tick()
    assert thing.starts == 1
    clock.now += 0.2
    supervisor.tick()  # fails again; retry in 1 s
    assert thing.starts == 2
    assert component.failures == 2
    clock.now += 1.0
    supervisor.tick()
    assert thing.up
    assert thing.starts == 3
    assert component.outages == [1.6]


def test_paused_component_is_left_alone() -> None:
    clock, thing = Clock(), Flaky()
    component = Component("t-paused", thing.alive, thing.start)
    supervisor = Supervisor([component], clock=clock)
    component.paused = True
    thing.up = False
    supervisor.tick()
    assert thing.starts == 0
    component.paused = False
    supervisor.tick()
    assert thing.starts == 1
    assert thing.up
