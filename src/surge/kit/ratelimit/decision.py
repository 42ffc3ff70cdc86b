"""What a limiter decides with: ``Check`` (one limit for one caller), ``Verdict`` (one limit's
answer), ``Decision`` (the request's), ``KeyState`` (a key's state, for admins)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from surge.kit.errors import SurgeError
from surge.kit.ratelimit.policy import RatePolicy


class RateLimitError(SurgeError):
    """A rate-limit configuration error (unknown policy name, bad declaration)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to apply: a policy, the partition it is spent on, and the cost."""

    policy: RatePolicy
    partition: str
    cost: int = 1
    key: str = field(init=False, compare=False, repr=False)
    """``policy:partition``, formatted once (read by dedupe, batching and the fallback)."""
    wire: bytes = field(init=False, compare=False, repr=False)
    """``key`` as the script receives it: UTF-8, lone surrogates kept (``surrogatepass``),
    length-prefixed in the batch, so no partition text can break a batch or share a key."""
    spec: tuple[int, int, int, int] = field(init=False, compare=False, repr=False)
    """The script's ``(interval, period, cost, enforce)`` for this check (GCRA_LUA)."""
    step: int = field(init=False, compare=False, repr=False)
    """µs of the budget one request spends: ``interval × cost``."""
    ceiling: int = field(init=False, compare=False, repr=False)
    """The largest TAT − now (µs) this limit still allows: ``period − step`` (``allows``
    as one comparison, inlined in the per-request loops)."""

    def __post_init__(self) -> None:
        policy = self.policy
        if self.cost < 0:
            raise RateLimitError(f"a rate-limit cost cannot be negative ({self.cost})")
        key = f"{policy.name}:{self.partition}"
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "wire", key.encode("utf-8", "surrogatepass"))
        object.__setattr__(
            self,
            "spec",
            (policy.interval_us, policy.period_us, self.cost, int(not policy.shadow)),
        )
        object.__setattr__(self, "step", policy.interval_us * self.cost)
        object.__setattr__(self, "ceiling", policy.period_us - self.step)

    def allows(self, rel: int) -> bool:
        """Would this limit pass, its TAT being ``rel`` µs ahead of now (the script's rule)?"""
        return rel <= self.ceiling


#: A decision waiting for its batch: its checks and the future its slice of the reply goes
#: to (a tuple: built on every limited request).
_Pending = tuple[Sequence[Check], asyncio.Future[list[int]]]


class Verdict(NamedTuple):
    """One policy's answer for one request (a named tuple: immutable, and built twice as
    fast as a frozen dataclass on every limited request)."""

    policy: RatePolicy
    allowed: bool
    """This policy alone would allow the request (shadow policies included)."""
    remaining: int
    """Units left in the policy's budget after this request."""
    reset_after: float
    """Seconds until the budget is full again."""
    retry_after: float
    """Seconds until a request of this cost would pass (0 when allowed)."""
    store: str
    """``redis``, ``local``, ``open`` or ``closed``: who decided."""


class Decision:
    """The limiter's answer for a request: allowed or not, and each policy's verdict.

    A decision the script took keeps the TAT each check found (``rels``) and builds its
    ``verdicts`` only when someone reads them: the middleware's headers read ``rels``
    directly, so an allowed request never builds a ``Verdict`` (~4 µs on every limited
    request; ADR 0012).
    """

    __slots__ = (
        "_verdicts", "allowed", "checks", "rels", "shadow_denied", "store", "unavailable",
    )  # fmt: skip

    def __init__(
        self,
        allowed: bool,
        verdicts: list[Verdict] | None = None,
        unavailable: bool = False,
    ) -> None:
        self.allowed = allowed
        self.unavailable = unavailable
        """Denied because a fail-closed policy could not reach Redis (503, not 429)."""
        self._verdicts = verdicts if verdicts is not None else []
        self.checks: Sequence[Check] = ()
        """With ``rels``: the checks the script decided (empty for other decisions)."""
        self.rels: list[int] | None = None
        """Per check, its TAT minus now (µs) as the script found it; None if not decided
        by the script (no Redis, nothing to check)."""
        self.shadow_denied = False
        """A shadow policy would have denied (it is logged, never enforced)."""
        self.store = "redis"
        """Who decided the ``rels``: ``redis`` (the script) or ``lease`` (this process's
        leases alone, ADR 0028)."""

    @classmethod
    def from_script(cls, checks: Sequence[Check], rels: list[int]) -> Decision:
        """The decision GCRA_LUA took for ``checks``, from the TAT each found."""
        blocked = shadow_denied = False
        for check, rel in zip(checks, rels, strict=True):
            if rel > check.ceiling:
                if check.policy.shadow:
                    shadow_denied = True
                else:
                    blocked = True
        decision = cls(not blocked, None)
        decision.checks, decision.rels, decision.shadow_denied = checks, rels, shadow_denied
        return decision

    @classmethod
    def leased(cls, checks: Sequence[Check], rels: list[int]) -> Decision:
        """Every check spent from this process's leases (``Leases.take_all``): allowed (a
        lease never denies), no shadow denial (a leased ``rel`` is at most the ceiling)."""
        decision = cls(True, None)
        decision.checks, decision.rels, decision.store = checks, rels, "lease"
        return decision

    @property
    def verdicts(self) -> list[Verdict]:
        rels = self.rels
        if rels is not None and not self._verdicts:
            blocked = not self.allowed
            self._verdicts = [
                _verdict(
                    check, check.allows(rel), rel, rel + check.step,
                    blocked=blocked, store=self.store, interval=check.policy.interval_us,
                )
                for check, rel in zip(self.checks, rels, strict=True)
            ]  # fmt: skip
        return self._verdicts

    @property
    def retry_after(self) -> float:
        return max(
            (v.retry_after for v in self.verdicts if not v.allowed and not v.policy.shadow),
            default=0.0,
        )

    @property
    def denied_by(self) -> list[str]:
        return [v.policy.name for v in self.verdicts if not v.allowed and not v.policy.shadow]

    def __repr__(self) -> str:
        return f"Decision(allowed={self.allowed}, verdicts={self.verdicts!r})"


@dataclass(frozen=True, slots=True)
class KeyState:
    """What an admin sees for one key: remaining budget and time until it is full."""

    policy: str
    partition: str
    remaining: int
    reset_after: float


def _verdict(
    check: Check, ok: bool, tat_rel: int, new_rel: int, *, blocked: bool, store: str, interval: int
) -> Verdict:
    policy = check.policy
    rel = new_rel if ok and not blocked else tat_rel
    period = policy.period_us
    return Verdict(
        policy,
        ok,
        max(0, (period - rel) // interval),
        max(0, rel) / 1e6,
        0.0 if ok else max(0, new_rel - period) / 1e6,
        store,
    )


def _unmetered(check: Check, *, allowed: bool, store: str) -> Verdict:
    return Verdict(
        policy=check.policy,
        allowed=allowed,
        remaining=check.policy.limit if allowed else 0,
        reset_after=0.0,
        retry_after=0.0 if allowed else 1.0,
        store=store,
    )
