"""The wallet's pure values: the earning arithmetic (see ``surge.wallet.service``'s
docstring), the withdrawal id a client's key names, one batch item's outcome. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid5

BPS = 10_000
#: Namespace of withdrawal ids: uuid5(owner id + client key) is the same on every retry.
WITHDRAWAL_NAMESPACE = UUID("0b6f9a53-6c0e-4d8e-a3f3-2f4f3b1d7c10")


def withdrawal_id_for(owner_id: UUID, key: str) -> UUID:
    """The withdrawal a client's ``Idempotency-Key`` names (stable across retries, for ever:
    the HTTP record of the key expires after a day, the withdrawal it made does not)."""
    return uuid5(WITHDRAWAL_NAMESPACE, f"{owner_id}:{key}")


def earning_for(profit: int, share_bps: int, commission_bps: int) -> tuple[int, int]:
    """(shown profit, earning) in minor units, rounded toward zero once (module docstring)."""
    if profit <= 0:
        return 0, 0
    return profit * share_bps // BPS, profit * share_bps * commission_bps // (BPS * BPS)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One row of a batch decision: ``ok`` or the error that stopped this item alone."""

    id: UUID
    ok: bool
    status: str | None = None
    error: str | None = None
    code: int | None = None
    changed: bool = False
    """Decided by this batch (False: it already was approved): only changes are audited."""
