"""Exponential backoff, the one copy: a reconnect loop's ``Backoff`` and a retry's ``delay``.

Why not tenacity or stamina (ADR 0013): both wrap *a call* to retry it; Surge's waits are
loops that never give up (a listener resubscribing, the Redis probe, a fleet child
restarting) or a delay stored with a job for another process to honour. What they share is
the arithmetic, which is all this module holds.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Literal

Jitter = Literal["none", "equal", "full"]


def delay(
    attempt: int,
    base: float | timedelta,
    cap: float | timedelta,
    *,
    factor: float = 2.0,
    jitter: Jitter = "equal",
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (1 = the first retry): ``base × factor^(n-1)``
    capped at ``cap``. ``equal`` jitter waits between half and all of it (spread out, yet never
    much shorter than nominal); ``full`` between 0 and all of it; ``none`` exactly."""
    base_s = base.total_seconds() if isinstance(base, timedelta) else base
    cap_s = cap.total_seconds() if isinstance(cap, timedelta) else cap
    nominal = min(cap_s, base_s * factor ** max(0, attempt - 1))
    if jitter == "none":
        return float(nominal)
    draw = (rng or random).uniform
    if jitter == "full":
        return float(draw(0, nominal))
    return float(nominal / 2 + draw(0, nominal / 2))


class Backoff:
    """The waits of one loop: ``next()`` after each failure, ``reset()`` after a success.

    ``Backoff(initial=0.1, maximum=3.0)`` gives 0.1, 0.2, 0.4 ... 3.0, 3.0 (no jitter by
    default: these loops run once per process, there is no herd to spread)."""

    __slots__ = ("_rng", "attempts", "factor", "initial", "jitter", "maximum")

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 3.0,
        *,
        factor: float = 2.0,
        jitter: Jitter = "none",
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter: Jitter = jitter
        self._rng = rng
        self.attempts = 0

    def next(self) -> float:
        """The wait after one more failure."""
        self.attempts += 1
        return delay(
            self.attempts, self.initial, self.maximum,
            factor=self.factor, jitter=self.jitter, rng=self._rng,
        )  # fmt: skip

    def reset(self) -> None:
        self.attempts = 0
