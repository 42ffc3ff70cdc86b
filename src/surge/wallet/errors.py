"""The wallet service's errors (the ledger's own are in ``surge.wallet.ledger``).

WalletError (see ``surge.wallet.ledger`` for the ledger's own subclasses)
├── WithdrawalNotFound (NotFound)          404, also for another partner's withdrawal
├── WithdrawalAlreadyDecided (Conflict)    409: approved/rejected the other way already
├── WithdrawalOutOfBounds (Unprocessable)  422: below the minimum or above the maximum
├── WithdrawalKeyMismatch (Unprocessable)  422: Idempotency-Key already named another amount
├── NotWithdrawable (Conflict)             409: the amount needs unspent top-up credit
├── WithdrawalLimitReached (Conflict)      409: past WALLET_WITHDRAWAL_DAILY_MAX in 24 h
├── RevenueEventConflict (Conflict)        409: event id reused with other figures
├── RevenueEventOutOfBounds (Unprocessable) 422: profit beyond WALLET_REVENUE_EVENT_MAX
├── NotAPartner (Unprocessable)            422: terms for a user without a partner role
├── NoWallet (NotFound)                    404: a write-off for an owner without a wallet
└── NothingToWriteOff (Conflict)           409: no debt, or more than the debt (ADR 0059)
"""

from __future__ import annotations

from surge.kit.errors import Conflict, NotFound, UnprocessableEntity
from surge.wallet.ledger import WalletError


class WithdrawalNotFound(WalletError, NotFound):
    """No such withdrawal for this owner (another partner's is reported the same way)."""


class WithdrawalAlreadyDecided(WalletError, Conflict):
    """The withdrawal was already decided the other way."""


class WithdrawalOutOfBounds(WalletError, UnprocessableEntity):
    """The amount is outside the configured minimum/maximum."""


class WithdrawalKeyMismatch(WalletError, UnprocessableEntity):
    """The client's Idempotency-Key already made a withdrawal of another amount."""


class RevenueEventConflict(WalletError, Conflict):
    """A revenue event id was reused with different figures."""


class RevenueEventOutOfBounds(WalletError, UnprocessableEntity):
    """The profit is beyond ``WALLET_REVENUE_EVENT_MAX``."""


class NotAPartner(WalletError, UnprocessableEntity):
    """Only partners and resellers have commercial terms."""


class NotWithdrawable(WalletError, Conflict):
    """The wallet holds the amount, but part of it is top-up credit: it buys operations and
    is never paid out (a card top-up cashed out would come back as a chargeback)."""


class WithdrawalLimitReached(WalletError, Conflict):
    """The owner's withdrawals of the last 24 hours plus this one would pass
    ``WALLET_WITHDRAWAL_DAILY_MAX`` (ADR 0051)."""


class NoWallet(WalletError, NotFound):
    """The owner has no wallet in the platform's currency."""


class NothingToWriteOff(WalletError, Conflict):
    """A debt write-off of a wallet without a debt, or of more than it owes."""
