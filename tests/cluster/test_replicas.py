"""Replica routing on a real primary + streaming replica (two embedded PostgreSQL, the
replica made by ``pg_basebackup -R``): stale-tolerant reads go to the replica, a caller who
wrote reads its write (the primary until the replica replayed it), a lagging replica gets no
reads, and one caught-up replica never releases the stick for the others (ADR 0022).
Runs in ``make test`` (no root needed; about ten seconds)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text

from surge.kit.cache import Cache
from surge.kit.db import Database, PoolConfig
from surge.kit.db.replicas import MemorySticks, ReplicaRouter, bind_reader, parse_lsn
from surge.kit.embedded import EmbeddedPostgres
from surge.kit.redis import RedisGateway
from tests.fixtures.waiting import eventually


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    folder = tmp_path_factory.mktemp("replication")
    primary = EmbeddedPostgres(folder / "primary", durable=False)
    primary.start()
    replica = EmbeddedPostgres(folder / "replica", durable=False)
    replica.data_dir.mkdir(parents=True)
    replica._make_traversable()
    replica._chown(replica.data_dir)
    made = replica._run(
        "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
        "-D", str(replica.pgdata), "-R", "-X", "stream", "--checkpoint=fast", check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    replica.start()
    try:
        yield primary, replica
    finally:
        replica.stop("immediate")
        primary.stop("immediate")


@pytest.fixture
async def db(pair: tuple[EmbeddedPostgres, EmbeddedPostgres]) -> AsyncIterator[Database]:
    primary, replica = pair
    database = Database(
        primary.url, [replica.url],
        PoolConfig(min_size=0, max_size=4, sticky_reads=30, replica_poll=3600,
                   replica_max_lag=64 * 1024),
    )  # fmt: skip
    await database.start()
    async with database.session() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY)"))
        await session.execute(text("TRUNCATE notes"))
    await _caught_up(database)
    try:
        yield database
    finally:
        async with database.replicas[0].connect() as connection:
            await connection.execute(text("SELECT pg_wal_replay_resume()"))
        bind_reader(None)
        await database.close()


async def _caught_up(database: Database) -> None:
    async def check() -> bool:
        await database.poll_replicas()
        return database.router.states[0].lag_bytes == 0

    await eventually(check, timeout=20, message="replica never caught up")


async def _served_by_replica(database: Database) -> bool:
    async with database.read_session() as session:
        return bool((await session.execute(text("SELECT pg_is_in_recovery()"))).scalar())


async def _pause_replay(database: Database) -> None:
    async with database.replicas[0].connect() as connection:
        await connection.execute(text("SELECT pg_wal_replay_pause()"))
        await connection.commit()

    async def paused() -> bool:  # a pause is only requested until the startup process takes it
        async with database.replicas[0].connect() as connection:
            state = await connection.execute(text("SELECT pg_get_wal_replay_pause_state()"))
            return state.scalar() == "paused"

    await eventually(paused, timeout=20, message="replay never paused")


async def _resume_replay(database: Database) -> None:
    async with database.replicas[0].connect() as connection:
        await connection.execute(text("SELECT pg_wal_replay_resume()"))
        await connection.commit()


async def test_reads_go_to_the_replica_and_a_writer_reads_its_write(db: Database) -> None:
    assert await _served_by_replica(db)
    await _pause_replay(db)
    bind_reader("alice")
    async with db.session() as session:
        await session.execute(text("INSERT INTO notes VALUES (1)"))
    await db.poll_replicas()  # the replica has not replayed alice's write: lag > 0
    assert db.router.states[0].lag_bytes
    # alice must see her note: the replica has not replayed it, so the primary answers
    async with db.read_session() as session:
        assert (await session.execute(text("SELECT count(*) FROM notes"))).scalar() == 1
    assert not await _served_by_replica(db)
    bind_reader("bob")  # bob never wrote: the (stale) replica is fine for him
    assert await _served_by_replica(db)
    bind_reader(None)
    assert await _served_by_replica(db)

    await _resume_replay(db)
    await _caught_up(db)
    bind_reader("alice")  # still stuck (30 s), but this replica has her write now
    assert await _served_by_replica(db)
    async with db.read_session() as session:
        assert (await session.execute(text("SELECT count(*) FROM notes"))).scalar() == 1


async def test_a_read_only_unit_of_work_does_not_stick(db: Database) -> None:
    bind_reader("carol")
    async with db.session() as session:
        await session.execute(text("SELECT count(*) FROM notes"))
    assert await db.sticks.get("carol") is None
    assert await _served_by_replica(db)


async def test_a_replica_beyond_the_lag_limit_gets_no_reads(db: Database) -> None:
    await _pause_replay(db)
    async with db.session() as session:  # ~100 kB of WAL the replica does not replay
        await session.execute(text("INSERT INTO notes SELECT g FROM generate_series(10, 2010) g"))
    await db.poll_replicas()
    lag = db.router.states[0].lag_bytes
    assert lag is not None
    assert lag > db.config.replica_max_lag
    assert not await _served_by_replica(db)
    await _resume_replay(db)
    await _caught_up(db)
    assert await _served_by_replica(db)


def test_one_caught_up_replica_does_not_release_the_stick_for_the_others() -> None:
    router = ReplicaRouter(["r0", "r1"], max_lag=1 << 30)
    router.observe(1_000, [1_000, 400])  # r0 replayed everything, r1 is at 400
    need = 900  # the caller's last write
    for _ in range(4):
        assert router.candidates(need) == [0]  # only the replica that has it, every time
    assert sorted(router.candidates(None)) == [0, 1]  # stale-tolerant reads use both
    far = 3 << 30  # r1 falls 3 GiB behind (the limit is 1 GiB): no reads at all
    router.observe(far, [far, 1_000])
    assert router.candidates(None) == [0]
    router.observe(far, [far, None])  # r1's position unknown: stale reads only
    assert sorted(router.candidates(None)) == [0, 1]
    assert router.candidates(need) == [0]


async def test_sticks_expire_and_keep_the_highest_position() -> None:
    now = [0.0]
    sticks = MemorySticks(clock=lambda: now[0])
    await sticks.put("alice", 500, ttl=30)
    await sticks.put("alice", 300, ttl=30)  # an older position never lowers the stick
    assert await sticks.get("alice") == 500
    now[0] = 31
    assert await sticks.get("alice") is None


def test_parse_lsn() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert parse_lsn(None) is None


async def test_a_cache_fill_after_another_callers_write_reads_the_primary(
    db: Database, server_urls: tuple[str, str]
) -> None:
    """ADR 0060 on a real streaming replica: an administrator's write is invalidated after
    its commit; the next reader is another caller, whose own reads may be stale, but the
    cache fill they trigger reads the primary (before: the paused replica, and the old count
    was cached for the entry's TTL)."""
    gateway = RedisGateway(server_urls[1])
    cache = Cache(gateway, namespace=f"test:{uuid.uuid4().hex[:8]}", ttl_jitter=0.0)
    await cache.start()

    async def count() -> int:
        async with db.read_session() as session:
            return int((await session.execute(text("SELECT count(*) FROM notes"))).scalar() or 0)

    try:
        assert await cache.get_or_load("notes", count) == 0
        await _pause_replay(db)
        bind_reader("admin")
        async with db.session() as session:
            await session.execute(text("INSERT INTO notes VALUES (7)"))
        await cache.delete("notes")  # the writer's invalidation, after its commit
        bind_reader("user")  # another caller: stale reads are fine for their own queries
        assert await count() == 0  # the replica has not replayed the write
        assert await cache.get_or_load("notes", count) == 1  # the fill read the primary
    finally:
        await _resume_replay(db)
        await cache.close()
        await gateway.close()
