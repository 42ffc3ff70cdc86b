"""The ledger's errors and how the ledger functions' SQLSTATEs map to them (the package
face is ``surge.wallet.ledger``, which re-exports every name here; see its docstring for the
tree)."""

from __future__ import annotations

from typing import Any

from surge.kit.errors import Conflict, NotFound, SurgeError, UnprocessableEntity


class WalletError(SurgeError):
    """Root of the wallet domain's errors."""


class InsufficientFunds(WalletError, Conflict):
    """The debit would take a guarded account below zero available."""


class WalletInDebt(InsufficientFunds):
    """The account owes the platform (a reversal it could not cover, ADR 0042): it may spend
    only what its free balance exceeds its debt by, and withdraw nothing."""


class IdempotencyKeyReused(WalletError, Conflict):
    """The idempotency key already names a transfer with other fields."""


class AlreadyResolved(WalletError, Conflict):
    """The pending transfer was already posted or voided (under another key)."""


class LedgerNotFound(WalletError, NotFound):
    """An account or pending transfer that does not exist (or not in that currency)."""


class InvalidTransfer(WalletError, UnprocessableEntity):
    """A transfer the ledger refuses by shape: same account twice, non-positive amount."""


def _sqlstate(error: BaseException) -> tuple[str | None, str | None, str]:
    """(SQLSTATE, constraint, message) of a SQLAlchemy-wrapped or a bare asyncpg error."""
    orig: Any = getattr(error, "orig", None) or error
    cause: Any = getattr(orig, "__cause__", None) or orig
    state = getattr(orig, "sqlstate", None) or getattr(cause, "sqlstate", None)
    constraint = getattr(cause, "constraint_name", None)
    message = str(getattr(cause, "message", None) or orig)
    return state, constraint, message


def translate(error: BaseException) -> WalletError | None:
    """Map the ledger functions' SQLSTATEs and constraint names to domain errors."""
    state, constraint, message = _sqlstate(error)
    if state == "23514":
        if constraint == "ck_wallet_accounts_non_negative":
            return InsufficientFunds("Insufficient funds for this transfer.")
        return InvalidTransfer(f"Transfer refused by {constraint}.")
    if state == "WL402":
        return WalletInDebt(
            "This wallet owes the platform for a reversed top-up: it may spend only what "
            "exceeds its debt, and withdraw nothing until the debt is repaid."
        )
    if state == "WL404":
        return LedgerNotFound(message)
    if state == "WL409":
        return IdempotencyKeyReused(message)
    if state == "WL410":
        return AlreadyResolved(message)
    if state == "WL422":
        return InvalidTransfer(message)
    if state == "22003":  # a balance would leave BIGINT: refused, never wrapped
        return InvalidTransfer("This transfer would overflow an account balance.")
    return None
