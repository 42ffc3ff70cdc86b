"""The outbox table's storage (ADR 0046): the send path's two updates of a message row are
heap-only (HOT) — no index names a column they change, and the pages keep room for the new
version — and lifting a suppression still finds the address's held rows through an index."""

from __future__ import annotations

from uuid import uuid4

from sqlalchemy import text

from surge.kit.db import driver_fetch
from surge.kit.runtime import Runtime
from surge.notifications import repository
from surge.notifications.service import notifications as notifications_service

HOT_UPDATED = "SELECT pg_stat_get_xact_tuples_hot_updated('notification_messages'::regclass)"
UPDATED = "SELECT pg_stat_get_xact_tuples_updated('notification_messages'::regclass)"


class TestHotUpdates:
    async def test_the_mark_and_the_sent_record_are_heap_only_updates(self, rt: Runtime) -> None:
        # The send path's own statements, in one transaction so that the transaction-local
        # counters see them; rolled back at the end. With the old held index (partial on
        # status) both updates counted as updated but not as HOT.
        async with rt.db.session() as session:
            to = f"hot-{uuid4().hex[:10]}@example.com"
            message = await notifications_service.send(
                session, to=to, template="welcome", context={"email": to},
                category="account", key=f"test:{uuid4()}",
            )  # fmt: skip
            marked = await driver_fetch(session, repository._MARK_MANY, [message])
            sent = await driver_fetch(
                session, repository._SENT_MANY, [message], [250], ["250 OK"], ["Welcome"]
            )
            assert [row["id"] for row in marked] == [message]
            assert [row["message_id"] for row in sent] == [message]
            assert (await session.execute(text(UPDATED))).scalar_one() == 2
            assert (await session.execute(text(HOT_UPDATED))).scalar_one() == 2
            await session.rollback()

    async def test_the_table_keeps_room_in_its_pages_for_new_versions(self, rt: Runtime) -> None:
        async with rt.db.session() as session:
            options = await session.scalar(
                text("SELECT reloptions FROM pg_class WHERE relname = 'notification_messages'")
            )
        assert "fillfactor=70" in (options or [])


class TestLiftingFindsHeldMailByIndex:
    async def test_the_requeue_of_an_address_uses_the_address_index(self, rt: Runtime) -> None:
        async with rt.db.session() as session:
            await session.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(
                row[0]
                for row in await session.execute(
                    text(
                        "EXPLAIN UPDATE notification_messages SET status = 'queued' "
                        "WHERE to_address = 'someone@example.com' AND status = 'held'"
                    )
                )
            )
            await session.rollback()
        assert "ix_notification_messages_address" in plan
