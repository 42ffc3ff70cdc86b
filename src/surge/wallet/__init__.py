"""Partner wallet (seed 001) on a double-entry ledger: earnings, withdrawals, stats (ADR 0010)."""
