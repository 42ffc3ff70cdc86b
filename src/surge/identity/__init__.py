"""Identity: accounts, sessions and tokens, MFA, plans and privileges (seeds 001, 003, 004)."""
