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
**overshoot ≤ processes × size**. The other way, units leased by a process that then sees no
more requests for that key expire unspent: a caller whose requests spread over several
processes may be refused up to ``processes × size`` units early. ``size`` is sized from the
limit: ``limit // (processes × LEASE_SHARE)`` (so both errors stay within
1 / ``LEASE_SHARE`` of the limit, 5 %), at most ``LEASE_MAX``; below 2 the policy stays exact.
``RatePolicy.lease`` overrides it per policy (0: exact).

A lease remembers the TAT its decision left (``tat``, local clock, µs) and moves it on with
its own spends, so the ``RateLimit`` headers of a leased decision are what the exact limiter
would have answered had this process been the only one spending the key since the lease.
"""

from __future__ import annotations

from dataclasses import dataclass

from surge.kit.ratelimit.decision import Check
from surge.kit.ratelimit.policy import RatePolicy

#: A lease is at most this share of the limit per process: overshoot (and early refusal)
#: stays within 1 / LEASE_SHARE of the limit summed over the processes.
LEASE_SHARE = 20
#: The most units one lease carries, whatever the limit (a lease is local state the admin
#: ``reset`` of another process cannot see).
LEASE_MAX = 64
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


@dataclass(slots=True)
class Lease:
    units: int
    """Units left to spend in memory."""
    tat: int
    """The key's TAT as this process's own spends left it (local clock, µs)."""
    expires: int
    """Local clock (µs) after which the lease is dropped unspent."""


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

    def give_back(self, check: Check) -> None:
        """Undo ``take`` (another limit of the same decision denied it)."""
        lease = self._by_key.get(check.key)
        if lease is not None:
            lease.units += check.cost
            lease.tat -= check.step

    def grant(self, check: Check, rel: int, units: int, now: int) -> None:
        """Redis allowed ``check`` (found at ``rel``) and granted ``units`` more."""
        tat = now + rel + check.step
        lease = self._by_key.get(check.key)
        if lease is not None and lease.expires > now:
            lease.units += units
            lease.tat = max(lease.tat, tat)
            return
        if len(self._by_key) >= LEASE_MAX_KEYS:
            self._sweep(now)
        self._by_key[check.key] = Lease(units, tat, now + check.policy.period_us)

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)

    def clear(self) -> None:
        self._by_key.clear()

    def units(self, key: str) -> int:
        lease = self._by_key.get(key)
        return 0 if lease is None else lease.units

    def _sweep(self, now: int) -> None:
        self._by_key = {k: v for k, v in self._by_key.items() if v.expires > now and v.units}
        while len(self._by_key) > LEASE_MAX_KEYS // 2:  # all live: drop the oldest granted
            self._by_key.pop(next(iter(self._by_key)))
