"""Where the cores go during a load run: CPU time per role from ``/proc/<pid>/stat``.

A role (``generator``, ``web``, ``postgres``, ``redis``, ``harness``) is a set of root
processes and, unless said otherwise, every process below them (``surge serve``'s workers,
the postmaster's backends). ``sample()`` reads each process's user and kernel ticks
(fields 14 and 15 of ``/proc/<pid>/stat``); the difference of two samples, divided by the
requests answered between them, is each role's CPU per request, split user / kernel. The
machine's own busy time (``/proc/stat``) is sampled beside it: what no role explains is
somebody else's (on a quiet slot, next to nothing).

Linux only (``/proc``); elsewhere ``sample()`` returns empty figures and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
TICK = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, user ticks, kernel ticks) of ``pid``, or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]), int(fields[12])


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    return children


def _tree(roots: Iterable[int], children: dict[int, list[int]]) -> set[int]:
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def machine_busy() -> tuple[float, float]:
    """(user, kernel) seconds of all cores since boot, from ``/proc/stat``'s ``cpu`` line
    (user + nice; system + irq + softirq)."""
    try:
        line = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in line[1:8])
    return (user + nice) * TICK, (system + irq + softirq) * TICK


@dataclass
class Sample:
    """Seconds of CPU by role: ``{role: (user, kernel)}``, and the machine's."""

    at: float
    roles: dict[str, tuple[float, float]] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    #: Seconds of CPU (user + kernel) of each process of each role, by pid.
    processes: dict[str, dict[int, float]] = field(default_factory=dict)


class CpuMeter:
    """Roles are callables returning their root pids, so a role whose processes start later
    (the generators of each run) is found at each sample. ``alone`` roles count the roots
    only (the harness process itself, not the servers it started)."""

    def __init__(self) -> None:
        self.roles: dict[str, Callable[[], list[int]]] = {}
        self.alone: set[str] = set()
        #: Every pid ever counted per role, with its last ticks: a process that exits
        #: between samples keeps its last reading instead of making the role's sum drop.
        self._seen: dict[str, dict[int, tuple[int, int]]] = {}

    def add(self, role: str, roots: Callable[[], list[int]], *, alone: bool = False) -> None:
        self.roles[role] = roots
        if alone:
            self.alone.add(role)

    def sample(self, at: float) -> Sample:
        if not PROC.is_dir():
            return Sample(at)
        children = _parents()
        out = Sample(at, machine=machine_busy())
        claimed: set[int] = set()
        # Roles with explicit roots first; a pid belongs to the first role that claims it.
        for role, roots_of in self.roles.items():
            roots = [p for p in roots_of() if p not in claimed]
            pids = set(roots) if role in self.alone else _tree(roots, children) - claimed
            claimed |= pids
            seen = self._seen.setdefault(role, {})
            for pid in pids:
                stat = _stat(pid)
                if stat is not None:
                    seen[pid] = (stat[1], stat[2])
            out.processes[role] = {pid: (u + k) * TICK for pid, (u, k) in seen.items()}
            user = sum(u for u, _ in seen.values()) * TICK
            kernel = sum(k for _, k in seen.values()) * TICK
            out.roles[role] = (user, kernel)
        return out


def per_request(first: Sample, last: Sample, requests: int) -> dict[str, object]:
    """Cores used and CPU µs per answered request by role between two samples, user and
    kernel apart; ``unexplained`` is the machine's busy time no role accounts for."""
    seconds = max(1e-9, last.at - first.at)
    roles: dict[str, dict[str, float]] = {}
    total_user = total_kernel = 0.0
    for role, (user, kernel) in last.roles.items():
        user0, kernel0 = first.roles.get(role, (0.0, 0.0))
        du, dk = max(0.0, user - user0), max(0.0, kernel - kernel0)
        total_user += du
        total_kernel += dk
        roles[role] = _figures(du, dk, seconds, requests)
    # Each role's busiest processes, in cores (e.g. how evenly the web workers share the
    # load: one saturated worker is a knee while the role's total still looks low).
    processes = {
        role: sorted(
            (round(max(0.0, t - first.processes.get(role, {}).get(pid, 0.0)) / seconds, 3)
             for pid, t in by_pid.items()),
            reverse=True,
        )[:8]
        for role, by_pid in last.processes.items()
    }  # fmt: skip
    machine_user = last.machine[0] - first.machine[0]
    machine_kernel = last.machine[1] - first.machine[1]
    return {
        "seconds": round(seconds, 1),
        "requests": requests,
        "roles": roles,
        "process_cores": processes,
        "all_roles": _figures(total_user, total_kernel, seconds, requests),
        "machine": _figures(machine_user, machine_kernel, seconds, requests),
        "unexplained_cores": round(
            max(0.0, machine_user + machine_kernel - total_user - total_kernel) / seconds, 3
        ),
    }


def _figures(user: float, kernel: float, seconds: float, requests: int) -> dict[str, float]:
    n = max(1, requests)
    return {
        "cores": round((user + kernel) / seconds, 3),
        "user_cores": round(user / seconds, 3),
        "kernel_cores": round(kernel / seconds, 3),
        "us_per_request": round((user + kernel) / n * 1e6, 1),
        "user_us_per_request": round(user / n * 1e6, 1),
        "kernel_us_per_request": round(kernel / n * 1e6, 1),
    }
