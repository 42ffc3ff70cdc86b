"""``surge load``'s CPU accounting by role (``bench/load/cpu.py``), against real processes.

One role is a process tree whose child spins on the CPU, another a process that sleeps: the
meter must put the spinning child's time under its parent's role (the way ``surge serve``'s
workers count as ``web``), next to nothing under the sleeper, and turn the difference of two
samples into cores and µs per request.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from bench.load.cpu import CpuMeter, Sample, per_request

SPIN_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
sys.stdout.write(f"{child.pid}\\n"); sys.stdout.flush()
child.wait()
"""


@pytest.fixture
def processes() -> Iterator[tuple[subprocess.Popen[bytes], int, subprocess.Popen[bytes]]]:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN_PARENT], stdout=subprocess.PIPE)
    assert spinner.stdout is not None
    child = int(spinner.stdout.readline())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield spinner, child, sleeper
    finally:
        subprocess.run(["kill", str(child)], check=False)
        for p in (spinner, sleeper):
            p.kill()
            p.wait()
        spinner.stdout.close()


def test_a_role_counts_its_process_tree_and_the_figures_follow(
    processes: tuple[subprocess.Popen[bytes], int, subprocess.Popen[bytes]],
) -> None:
    spinner, _child, sleeper = processes
    meter = CpuMeter()
    meter.add("busy", lambda: [spinner.pid])
    meter.add("idle", lambda: [sleeper.pid])
    meter.add("busy-parent-alone", lambda: [spinner.pid], alone=True)
    first = meter.sample(0.0)
    started = time.monotonic()
    # Until the spinning child has used a measurable amount of CPU (ticks are 10 ms).
    while time.monotonic() - started < 30:
        last = meter.sample(time.monotonic() - started)
        if last.roles["busy"][0] - first.roles["busy"][0] >= 0.5:
            break
        time.sleep(0.05)
    figures = per_request(first, last, requests=1000)
    roles = figures["roles"]
    assert isinstance(roles, dict)
    busy, idle = roles["busy"], roles["idle"]
    assert busy["user_us_per_request"] >= 500.0  # ≥ 0.5 s of user CPU over 1 000 requests
    assert busy["cores"] > 0.05
    assert idle["us_per_request"] < 0.2 * busy["us_per_request"]
    # The tree's busy process is the spinning child (about one core), the parent idles.
    busiest = figures["process_cores"]["busy"]  # type: ignore[index]
    assert len(busiest) == 2
    assert busiest[0] > 0.05
    assert busiest[1] < 0.2 * busiest[0]
    # A pid is claimed by the first role naming it: the third role gets nothing of the tree.
    assert roles["busy-parent-alone"]["cores"] == 0.0


def test_per_request_divides_the_difference_of_two_samples() -> None:
    first = Sample(10.0, {"web": (1.0, 0.5)}, machine=(5.0, 2.0))
    last = Sample(20.0, {"web": (3.0, 1.5)}, machine=(9.0, 4.0))
    figures = per_request(first, last, requests=2000)
    assert figures["roles"] == {
        "web": {
            "cores": 0.3,
            "user_cores": 0.2,
            "kernel_cores": 0.1,
            "us_per_request": 1500.0,
            "user_us_per_request": 1000.0,
            "kernel_us_per_request": 500.0,
        }
    }
    assert figures["machine"]["cores"] == 0.6  # type: ignore[index]
    assert figures["unexplained_cores"] == 0.3
