"""Migration 0017_outbox_hot_updates (ADR 0046): down to the held index partial on status
and the default fillfactor, and up again."""

from __future__ import annotations

from tests.fixtures.migration_db import scratch_database

REVISION = "0017_outbox_hot_updates"
INDEXES = (
    "SELECT indexname, indexdef LIKE '%WHERE%' FROM pg_indexes "
    "WHERE tablename = 'notification_messages' AND indexdef LIKE '%(to_address)%'"
)
OPTIONS = "SELECT reloptions FROM pg_class WHERE relname = 'notification_messages'"


def test_the_outbox_hot_updates_migration_goes_down_and_up_again(
    server_urls: tuple[str, str],
) -> None:
    with scratch_database(server_urls[0], REVISION) as db:
        db.upgrade()
        assert db.run(query=INDEXES) == [("ix_notification_messages_address", False)]
        assert db.run(query=OPTIONS) == [(["fillfactor=70"],)]
        db.downgrade()
        assert db.run(query=INDEXES) == [("ix_notification_messages_held", True)]
        assert db.run(query=OPTIONS) == [(None,)]
        db.upgrade()
        assert db.run(query=INDEXES) == [("ix_notification_messages_address", False)]
