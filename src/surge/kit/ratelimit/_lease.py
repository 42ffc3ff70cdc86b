"""Local token leases (ADR 0028): a process takes a few units of a shared budget from Redis at
once and spends them in memory, so most decisions cost no round trip.

How a lease comes and goes:

- A decision whose key holds no usable lease goes to Redis as before; the script decides it
  exactly and, if it is allowed and the policy leases, takes up to ``size`` more units *as
  long as they fit under the limit* (``GCRA_LUA``'s grants). Those units are spent in Redis
  at that moment: other processes see them gone.
- The next decisions on that key in this process spend the lease in memory, until it is
  empty or ``period`` old (a lease never outlives the window it was granted in).
- A decision with several limits is still all-or-nothing: the units it took from leases are
  given back to those leases if a limit decided in Redis denies it.

The bound (what the CEO approved): every unit spent was granted by the exact GCRA in Redis,
so within any window of ``period`` the units spent exceed the exact limit only by units
granted *before* the window and spent inside it — at most one lease per process:
**overshoot ≤ processes × lease_cap**. The other way, units leased by a process that then
sees no more requests for that key expire unspent: a caller whose requests spread over several
processes may be refused up to ``processes × lease_cap`` units early. ``size`` is sized from the
limit: ``limit // (processes × LEASE_SHARE)`` (so both errors stay within
1 / ``LEASE_SHARE`` of the limit, 5 %); below 2 the policy stays exact. A key's first lease
carries at most ``LEASE_MAX`` units; a key that spends its whole lease inside the lease's
window asks for twice as much the next time, up to ``LEASE_GROW_MAX`` and never past the
limit's share (ADR 0039): a busy key makes one round trip per hundreds of decisions, an idle
one strands no more than before. ``RatePolicy.lease`` fixes the size per policy (0: exact).

A lease remembers the TAT its decision left (``tat``, local clock, µs) and moves it on with
its own spends, so the ``RateLimit`` headers of a leased decision are what the exact limiter
would have answered had this process been the only one spending the key since the lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from surge.kit.ratelimit.decision import Check
from surge.kit.ratelimit.policy import RatePolicy

#: A lease is at most this share of the limit per process: overshoot (and early refusal)
#: stays within 1 / LEASE_SHARE of the limit summed over the processes.
LEASE_SHARE = 20
#: The most units a key's first lease carries, whatever the limit.
LEASE_MAX = 64
#: The most units one lease of a busy key grows to (doubling from ``LEASE_MAX`` each time
#: the key spends a whole lease inside its window), whatever the limit: a lease is local
#: state the admin ``reset`` of another process cannot see (ADR 0039).
LEASE_GROW_MAX = 1024
#: Leases kept per process at most; expired ones are swept first.
LEASE_MAX_KEYS = 200_000


def lease_size(policy: RatePolicy, processes: int) -> int:
    """Units one process may lease of ``policy`` (0: exact, every decision in Redis)."""
    if policy.shadow:
        return 0  # counted, never enforced: nothing to save by leasing
    if policy.lease is not None:
        return policy.lease
    size = min(LEASE_MAX, policy.limit // (max(1, processes) * LEASE_SHARE))
    return size if size >= 2 else 0


def lease_cap(policy: RatePolicy, processes: int) -> int:
    """The most units one lease of ``policy`` may grow to in one process: the bound of the
    overshoot is ``processes × lease_cap`` (≤ 1 / ``LEASE_SHARE`` of the limit)."""
    start = lease_size(policy, processes)
    if start == 0 or policy.lease is not None:
        return start  # exact, or a size the policy fixed: no growth
    return max(start, min(LEASE_GROW_MAX, policy.limit // (max(1, processes) * LEASE_SHARE)))


@dataclass(slots=True)
class Lease:
    units: int
    """Units left to spend in memory."""
    tat: int
    """The key's TAT as this process's own spends left it (local clock, µs)."""
    expires: int
    """Local clock (µs) after which the lease is dropped unspent."""
    size: int
    """Units of the last grant: the next ask of a key that spent it all doubles it."""


class Leases:
    """This process's leases by key: spend, give back, grant, forget."""

    def __init__(self) -> None:
        self._by_key: dict[str, Lease] = {}

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def take(self, check: Check, now: int) -> int | None:
        """Spend ``check`` from its key's lease: its TAT − now before the spend (µs, as the
        script would report it), or None when no usable lease covers it."""
        lease = self._by_key.get(check.key)
        if lease is None:
            return None
        if lease.expires <= now:
            del self._by_key[check.key]
            return None
        if lease.units < check.cost:
            return None
        lease.units -= check.cost
        # only this process's view of the key: it never reports a denial
        rel = min(lease.tat - now if lease.tat > now else 0, check.ceiling)
        lease.tat = now + rel + check.step
        return rel

    def take_all(self, checks: Sequence[Check], now: int) -> tuple[list[int | None], int]:
        """``take`` for each check of one decision, in one pass (the hot path of a leased
        request): the TAT − now each leased check found (None where no lease covers it) and
        how many were covered."""
        by_key = self._by_key
        taken: list[int | None] = []
        covered = 0
        for check in checks:
            lease = by_key.get(check.key)
            if lease is None or lease.units < check.cost:
                taken.append(None)
                continue
            if lease.expires <= now:
                del by_key[check.key]
                taken.append(None)
                continue
            lease.units -= check.cost
            tat = lease.tat
            rel = tat - now if tat > now else 0
            ceiling = check.ceiling
            rel = rel if rel <= ceiling else ceiling
            lease.tat = now + rel + check.step
            taken.append(rel)
            covered += 1
        return taken, covered

    def ask(self, check: Check, start: int, cap: int, now: int) -> int:
        """Units to ask for with ``check``'s decision in Redis: ``start`` for a key without a
        live lease; twice the last grant (at most ``cap``) for a key that spent a whole lease
        inside its window — it is busy enough to use more before the window ends."""
        lease = self._by_key.get(check.key)
        if lease is None or lease.expires <= now:
            return start
        grown = lease.size * 2
        return cap if grown >= cap else (grown if grown > start else start)

    def give_back(self, check: Check) -> None:
        """Undo ``take`` (another limit of the same decision denied it)."""
        lease = self._by_key.get(check.key)
        if lease is not None:
            lease.units += check.cost
            lease.tat -= check.step

    def grant(self, check: Check, rel: int, units: int, now: int, cap: int) -> None:
        """Redis allowed ``check`` (found at ``rel``) and granted ``units`` more. A process
        never holds more than ``cap`` units of a key: requests that went to Redis together
        (no lease yet, or an empty one) each bring a grant, and holding their sum would
        break the bound of ``processes × cap``; the surplus is left spent in Redis (a few
        early refusals at worst, the safe side of the bound)."""
        tat = now + rel + check.step
        lease = self._by_key.get(check.key)
        if lease is not None and lease.expires > now:
            lease.units = min(lease.units + units, max(cap, units))
            lease.tat = max(lease.tat, tat)
            lease.size = units
            return
        if len(self._by_key) >= LEASE_MAX_KEYS:
            self._sweep(now)
        self._by_key[check.key] = Lease(units, tat, now + check.policy.period_us, units)

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)

    def clear(self) -> None:
        self._by_key.clear()

    def units(self, key: str) -> int:
        lease = self._by_key.get(key)
        return 0 if lease is None else lease.units

    def size(self, key: str) -> int:
        """Units of the key's last grant (0: no lease)."""
        lease = self._by_key.get(key)
        return 0 if lease is None else lease.size

    def _sweep(self, now: int) -> None:
        self._by_key = {k: v for k, v in self._by_key.items() if v.expires > now and v.units}
        while len(self._by_key) > LEASE_MAX_KEYS // 2:  # all live: drop the oldest granted
            self._by_key.pop(next(iter(self._by_key)))
