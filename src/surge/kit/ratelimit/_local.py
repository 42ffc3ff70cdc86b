"""The in-process fallback store: GCRA over a dict while Redis is away, each process holding
its share of every limit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from surge.kit.ratelimit.decision import Check, Verdict, _verdict
from surge.kit.ratelimit.policy import RatePolicy

#: Local fallback keys kept per process at most; expired ones are swept first.
LOCAL_MAX_KEYS = 100_000


class LocalStore:
    """Per-process GCRA used while Redis is unreachable; the same arithmetic as the script,
    with each policy's limit divided by the number of processes sharing the fleet's budget."""

    def __init__(self, processes: int, clock: Callable[[], float]) -> None:
        self.processes = max(1, processes)
        self.clock = clock
        self._tats: dict[str, int] = {}

    def share(self, policy: RatePolicy) -> tuple[int, int]:
        """(limit, interval µs) of this process's share of ``policy``."""
        limit = max(1, policy.limit // self.processes)
        return limit, max(1, policy.period_us // limit)

    def evaluate(self, checks: Sequence[Check]) -> tuple[bool, list[Verdict]]:
        now = int(self.clock() * 1_000_000)
        if len(self._tats) > LOCAL_MAX_KEYS:
            self._sweep(now)
        rows: list[tuple[Check, bool, int, int, int]] = []
        blocked = False
        for check in checks:
            _, interval = self.share(check.policy)
            tat = max(self._tats.get(check.key, now), now)
            new_tat = tat + interval * check.cost
            ok = new_tat - now <= check.policy.period_us
            if not ok and not check.policy.shadow:
                blocked = True
            rows.append((check, ok, tat - now, new_tat - now, interval))
        verdicts = []
        for check, ok, tat_rel, new_rel, interval in rows:
            if ok and not blocked:
                self._tats[check.key] = now + new_rel
            verdicts.append(
                _verdict(
                    check, ok, tat_rel, new_rel, blocked=blocked, store="local", interval=interval
                )
            )
        return not blocked, verdicts

    def _sweep(self, now: int) -> None:
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        while len(self._tats) > LOCAL_MAX_KEYS // 2:  # all live: drop the oldest inserted
            self._tats.pop(next(iter(self._tats)))

    def clear(self) -> None:
        self._tats.clear()

    def tat(self, key: str) -> int | None:
        return self._tats.get(key)

    def reset(self, key: str) -> None:
        self._tats.pop(key, None)
