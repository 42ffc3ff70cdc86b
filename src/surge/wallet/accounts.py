"""The platform's own ledger accounts, and the stripes of the hot ones (ADR 0058).

A system account is one row per currency, except a *striped* one: ``STRIPES[code]`` rows
(``wallet_accounts.stripe`` 0 … n−1), each an ordinary ledger account with its own exact
balance and before/after history; the account's balance is the sum of its stripes (what
reports, the invariants and the admin console read). A movement that concerns one owner
uses the owner's stripe (``stripe_of``), so movements of different owners lock different
rows instead of queuing on one until each other's COMMIT.
"""

from __future__ import annotations

from enum import StrEnum
from uuid import UUID


class SystemAccount(StrEnum):
    """The platform's own accounts, one per currency (or one per stripe, ``STRIPES``).

    - revenue: debited for every commission paid (unguarded: it goes negative by what the
      platform has paid its partners);
    - holds: credited by a withdrawal when it is approved, then emptied into payouts;
    - payouts: what is owed to partners' bank accounts until a payment provider settles it;
    - external: the outside world (manual adjustments, imports, the benchmark's seeding);
    - sales: credited with what owners pay for the platform's services (operations);
    - payments: the payment provider's side of top-ups (unguarded: it goes negative by what
      the provider has collected for the platform and owes it);
    - receivables: what owners owe the platform — the part of a reversal their wallet could
      not cover (unguarded: it goes negative by the sum of the wallets' ``debt``, ADR 0042);
    - bad_debt: the platform's loss on debts written off (unguarded: it goes negative by
      what was forgiven; ADR 0059).
    """

    revenue = "revenue"
    holds = "holds"
    payouts = "payouts"
    external = "external"
    sales = "sales"
    payments = "payments"
    receivables = "receivables"
    bad_debt = "bad_debt"


UNGUARDED = frozenset({SystemAccount.revenue, SystemAccount.external, SystemAccount.payments,
                       SystemAccount.receivables, SystemAccount.bad_debt})  # fmt: skip

#: Rows per striped account. Holds: every withdrawal request of every owner reserved into
#: one row (ADR 0032's 5.9/s); payments: every top-up's credit debited one row (ADR 0053).
#: 32: with 16 requests in flight, a row is shared by 0.5 others on average instead of
#: 15. Holds is guarded per stripe — a withdrawal's reservation, its posting and its move
#: to payouts all use the stripe the reservation named, so each stripe stays ≥ 0 by
#: itself. Changing a figure is safe: a stripe is found from the reservation, never
#: recomputed, and payments (unguarded) may be debited and credited on any stripe.
#: Receivables (``wallet_collect`` finds its one row by code) is never striped.
STRIPES: dict[SystemAccount, int] = {SystemAccount.holds: 32, SystemAccount.payments: 32}


def stripe_of(code: SystemAccount, owner_id: UUID) -> int:
    """The stripe of ``code`` that movements concerning ``owner_id`` use: stable for the
    owner (its movements keep their order on one row), spread evenly over owners (ids are
    random)."""
    return owner_id.int % STRIPES.get(code, 1)
