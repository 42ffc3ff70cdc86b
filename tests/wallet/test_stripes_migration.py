"""Migration 0019_system_stripes (ADR 0058): a system account may have a row per stripe, a
wallet only stripe 0; down again only once no stripe but 0 holds a row."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from tests.fixtures.migration_db import scratch_database

REVISION = "0019_system_stripes"
STRIPE = (
    "INSERT INTO wallet_accounts (code, currency, guarded, stripe) "
    "VALUES ('holds', 'USD', true, {stripe})"
)
COLUMN = (
    "SELECT count(*) FROM information_schema.columns "
    "WHERE table_name = 'wallet_accounts' AND column_name = 'stripe'"
)


def test_the_stripes_migration_goes_down_and_up_again(server_urls: tuple[str, str]) -> None:
    with scratch_database(server_urls[0], REVISION) as db:
        db.upgrade()
        db.run(STRIPE.format(stripe=0), STRIPE.format(stripe=1))
        with pytest.raises(IntegrityError):  # one row per (code, currency, stripe)
            db.run(STRIPE.format(stripe=1))
        with pytest.raises(IntegrityError):  # a wallet is never striped
            db.run(
                "INSERT INTO wallet_accounts (owner_id, code, currency, stripe) "
                "VALUES (gen_random_uuid(), 'wallet', 'USD', 1)"
            )
        with pytest.raises(DBAPIError):  # stripe 1 holds a row (entries may point at it)
            db.downgrade()
        assert db.run(query=COLUMN) == [(1,)]  # refused whole: nothing was dropped
        db.run("DELETE FROM wallet_accounts WHERE stripe = 1")
        db.downgrade()
        assert db.run(query=COLUMN) == [(0,)]
        with pytest.raises(IntegrityError):  # one row per (code, currency) again
            db.run(STRIPE.replace(", stripe", "").replace(", {stripe}", ""))
        db.upgrade()
        assert db.run(query=COLUMN) == [(1,)]
