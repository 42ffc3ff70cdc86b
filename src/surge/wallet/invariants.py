"""The ledger's money rules, checked over the whole database (docs/architecture.md §6).

``Ledger.check_invariants`` runs this after every money test and benchmark: a rule that
does not hold is a bug, whatever path broke it. Read-only; slow on a large ledger (it scans
every entry), so it is a check for tests, benches and the operator, never a request path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.wallet.accounts import STRIPES


async def check_invariants(session: AsyncSession) -> list[str]:
    """Every violation of the money rules, as readable lines; empty when all hold.

    1. per currency, the sum of all balances and of the pending credits (ADR 0065) is
       zero, and pending out = pending in;
    2. each balance equals the sum of its entries, and its latest entry's balance_after;
    3. each reservation equals its open pending transfers;
    3b. each account's ``topup_net`` / ``purchases_posted`` / ``debt`` equal the sums of
        its entries against the payments / sales / receivables accounts (ADR 0036, ADR
        0042: what ``withdrawable`` and the debt rule read);
    3c. per currency, the receivables accounts' balance is minus the sum of the debts, no
        debt is negative, and only owners' wallets owe (ADR 0042);
    3d. each account's ``topup_unspent`` / ``topup_spent`` equal a replay of its entries
        against payments, sales and receivables in posting (id) order, by this module's own
        reading of ADR 0045's rule (not the ledger's function); and 0 ≤ unspent + spent ≤
        max(0, topup_net) (what ``withdrawable`` reads);
    3e. a system account has rows only on the stripes ``accounts.STRIPES`` gives it (one
        row, stripe 0, for an account that is not striped: receivables is found by code);
    4. no guarded account shows negative availability — each stripe of a striped guarded
       account by itself (ADR 0058);
    5. no idempotency key has two effects: one transfer per key (unique index), one
       resolution per pending transfer, one earning per (event, owner), and every
       transfer has exactly its two entries (or none while pending/void) — a pending
       credit counting as its credit entry (ADR 0065);
    6. every pending credit (ADR 0065) is the credit leg of its posted transfer, which
       has no credit entry; rule 1's sum counts pending credits with the balances.
    """
    problems: list[str] = []

    async def rows(sql: str) -> Sequence[Any]:
        return (await session.execute(text(sql))).all()

    for currency, total, out, in_, credits in await rows(
        "SELECT a.currency, sum(a.balance), sum(a.pending_out), sum(a.pending_in), "
        "  coalesce((SELECT sum(p.amount) FROM wallet_pending_credits p "
        "            WHERE p.currency = a.currency), 0) "
        "FROM wallet_accounts a GROUP BY a.currency"
    ):
        if total + credits != 0:
            problems.append(
                f"{currency}: sum of balances {total} + pending credits {credits} is not 0"
            )
        if out != in_:
            problems.append(f"{currency}: pending out {out} != pending in {in_}")
    for account_id, balance, entries, last in await rows(
        "SELECT a.id, a.balance, coalesce(e.total, 0), "
        "  (SELECT x.balance_after FROM wallet_entries x WHERE x.account_id = a.id "
        "   ORDER BY x.id DESC LIMIT 1) "
        "FROM wallet_accounts a LEFT JOIN "
        "  (SELECT account_id, sum(amount) AS total FROM wallet_entries GROUP BY account_id) e "
        "  ON e.account_id = a.id "
        "WHERE a.balance <> coalesce(e.total, 0) "
        "   OR a.balance <> coalesce((SELECT x.balance_after FROM wallet_entries x "
        "       WHERE x.account_id = a.id ORDER BY x.id DESC LIMIT 1), 0)"
    ):
        problems.append(
            f"account {account_id}: balance {balance}, entries sum {entries}, "
            f"last balance_after {last}"
        )
    for account_id, out, in_, open_out, open_in in await rows(
        "WITH open AS (SELECT p.* FROM wallet_transfers p WHERE p.phase = 'pending' "
        "  AND NOT EXISTS (SELECT 1 FROM wallet_transfers r WHERE r.pending_id = p.id)) "
        "SELECT a.id, a.pending_out, a.pending_in, "
        "  coalesce((SELECT sum(amount) FROM open WHERE debit_account_id = a.id), 0), "
        "  coalesce((SELECT sum(amount) FROM open WHERE credit_account_id = a.id), 0) "
        "FROM wallet_accounts a"
    ):
        if out != open_out or in_ != open_in:
            problems.append(
                f"account {account_id}: reserved out/in {out}/{in_}, "
                f"open pending transfers {open_out}/{open_in}"
            )
    for account_id, topup, bought, debt, entries_topup, entries_bought, entries_debt in await rows(
        "SELECT a.id, a.topup_net, a.purchases_posted, a.debt, coalesce(f.topup, 0), "
        "  coalesce(f.bought, 0), coalesce(f.owed, 0) "
        "FROM wallet_accounts a LEFT JOIN "
        "  (SELECT e.account_id, sum(e.amount) FILTER (WHERE c.code = 'payments')::bigint AS topup, "
        "     (-sum(e.amount) FILTER (WHERE c.code = 'sales'))::bigint AS bought, "
        "     sum(e.amount) FILTER (WHERE c.code = 'receivables')::bigint AS owed "
        "   FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id "
        "   WHERE c.code IN ('payments', 'sales', 'receivables') GROUP BY e.account_id) f "
        "  ON f.account_id = a.id "
        "WHERE a.topup_net <> coalesce(f.topup, 0) OR a.purchases_posted <> coalesce(f.bought, 0) "
        "   OR a.debt <> coalesce(f.owed, 0)"
    ):
        problems.append(
            f"account {account_id}: top-up/purchase/debt totals {topup}/{bought}/{debt}, "
            f"entries {entries_topup}/{entries_bought}/{entries_debt}"
        )
    for currency, receivable, owed in await rows(
        "SELECT currency, coalesce(sum(balance) FILTER (WHERE code = 'receivables'), 0), "
        "  coalesce(sum(debt) FILTER (WHERE code <> 'receivables'), 0) "
        "FROM wallet_accounts GROUP BY currency"
    ):
        if receivable != -owed:
            problems.append(f"{currency}: receivables balance {receivable}, debts sum {owed}")
    for account_id, code, debt in await rows(
        "SELECT id, code, debt FROM wallet_accounts WHERE debt < 0 OR (debt <> 0 AND code <> 'wallet')"
    ):
        problems.append(f"account {account_id} ({code}) owes {debt}")
    problems += await _check_topup_unspent(session)
    stripes = {code.value: count for code, count in STRIPES.items()}
    for account_id, code, stripe in await rows(
        "SELECT id, code, stripe FROM wallet_accounts WHERE stripe <> 0"
    ):
        if stripe >= stripes.get(code, 1):
            problems.append(f"account {account_id} ({code}) is on stripe {stripe}")
    for (account_id,) in await rows(
        "SELECT id FROM wallet_accounts WHERE guarded AND balance - pending_out < 0"
    ):
        problems.append(f"account {account_id}: guarded and negative")
    for transfer_id, phase, count in await rows(
        "SELECT t.id, t.phase, count(e.id) + (SELECT count(*) FROM wallet_pending_credits p "
        "  WHERE p.transfer_id = t.id) FROM wallet_transfers t "
        "LEFT JOIN wallet_entries e ON e.transfer_id = t.id GROUP BY t.id, t.phase "
        "HAVING count(e.id) + (SELECT count(*) FROM wallet_pending_credits p "
        "  WHERE p.transfer_id = t.id) "
        "  <> CASE WHEN t.phase IN ('single', 'post') THEN 2 ELSE 0 END"
    ):
        problems.append(f"transfer {transfer_id} ({phase}) has {count} entries and pending credits")
    for credit_id, transfer_id in await rows(
        "SELECT p.id, p.transfer_id FROM wallet_pending_credits p "
        "LEFT JOIN wallet_transfers t ON t.id = p.transfer_id "
        "LEFT JOIN wallet_entries e ON e.transfer_id = p.transfer_id "
        "  AND e.account_id = p.account_id "
        "WHERE t.id IS NULL OR t.phase <> 'single' OR e.id IS NOT NULL "
        "   OR (t.credit_account_id, t.debit_account_id, t.amount, t.currency, t.kind, "
        "       t.reference) IS DISTINCT FROM (p.account_id, p.counterparty_account_id, "
        "       p.amount, p.currency, p.kind, p.reference)"
    ):
        problems.append(f"pending credit {credit_id} does not match transfer {transfer_id}")
    for key, count in await rows(
        "SELECT idempotency_key, count(*) FROM wallet_transfers "
        "GROUP BY idempotency_key HAVING count(*) > 1"
    ):
        problems.append(f"idempotency key {key} has {count} transfers")
    for pending_id, count in await rows(
        "SELECT pending_id, count(*) FROM wallet_transfers WHERE pending_id IS NOT NULL "
        "GROUP BY pending_id HAVING count(*) > 1"
    ):
        problems.append(f"pending transfer {pending_id} resolved {count} times")
    for event_id, owner_id, count in await rows(
        "SELECT event_id, owner_id, count(*) FROM wallet_earnings "
        "GROUP BY event_id, owner_id HAVING count(*) > 1"
    ):
        problems.append(f"event {event_id} credited {owner_id} {count} times")
    for withdrawal_id, status, phase in await rows(
        "SELECT w.id, w.status, r.phase FROM wallet_withdrawals w "
        "LEFT JOIN wallet_transfers r ON r.pending_id = w.transfer_id "
        "WHERE (w.status = 'pending') <> (r.id IS NULL) "
        "   OR (w.status = 'approved' AND r.phase <> 'post') "
        "   OR (w.status = 'rejected' AND r.phase <> 'void')"
    ):
        problems.append(f"withdrawal {withdrawal_id} is {status} but its transfer is {phase}")
    return problems


def topup_step(unspent: int, spent: int, topup_net: int, code: str, amount: int) -> tuple[int, int]:
    """ADR 0045's rule for one entry of ``amount`` (signed, on the account) against ``code``:
    (unspent, spent) after it, given them before it and ``topup_net`` after it."""
    if code == "payments":  # a top-up (or a won dispute) adds; a reversal takes it first
        unspent = unspent + amount if amount > 0 else unspent - min(unspent, -amount)
    elif code == "sales" and amount < 0:  # a posted purchase spends top-up credit first
        used = min(unspent, -amount)
        unspent, spent = unspent - used, spent + used
    elif code == "sales":  # a purchase given back restores what purchases consumed
        used = min(spent, amount)
        unspent, spent = unspent + used, spent - used
    elif code == "receivables" and amount > 0:  # an advance: the reversal after it takes it
        unspent, spent = unspent + amount, spent - min(spent, amount)
    cap = max(topup_net, 0)
    unspent = min(unspent, cap)
    return unspent, min(spent, cap - unspent)


async def _check_topup_unspent(session: AsyncSession) -> list[str]:
    """Rule 3d: replay every account's top-up history in posting order (streamed)."""
    problems: list[str] = []
    stored = {
        int(account): (int(unspent), int(spent), int(net))
        for account, unspent, spent, net in (
            await session.execute(
                text(
                    "SELECT id, topup_unspent, topup_spent, topup_net FROM wallet_accounts "
                    "WHERE topup_unspent <> 0 OR topup_spent <> 0 OR topup_net <> 0"
                )
            )
        ).all()
    }
    replayed: dict[int, tuple[int, int, int]] = {}
    entries = await session.stream(
        text(
            "SELECT e.account_id, c.code, e.amount "
            "FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id "
            "WHERE c.code IN ('payments', 'sales', 'receivables') ORDER BY e.account_id, e.id"
        )
    )
    async for account, code, amount in entries:
        unspent, spent, net = replayed.get(int(account), (0, 0, 0))
        if code == "payments":
            net += int(amount)
        unspent, spent = topup_step(unspent, spent, net, str(code), int(amount))
        replayed[int(account)] = (unspent, spent, net)
    for account in sorted(set(stored) | {a for a, v in replayed.items() if v != (0, 0, 0)}):
        unspent, spent, net = stored.get(account, (0, 0, 0))
        expected = replayed.get(account, (0, 0, 0))
        if (unspent, spent) != expected[:2]:
            problems.append(
                f"account {account}: unspent/spent top-up credit {unspent}/{spent}, "
                f"replayed {expected[0]}/{expected[1]}"
            )
        if min(unspent, spent) < 0 or unspent + spent > max(net, 0):
            problems.append(
                f"account {account}: unspent + spent top-up credit {unspent} + {spent} "
                f"exceeds its net top-ups {net}"
            )
    return problems
