"""Break `surge cluster` under load, one fault after another, and check what users saw
(issue 18). Used by ``tests/cluster/test_failover.py`` (``make cluster-test``).

Load: ``bench/_chaos_load.OpenLoad`` (open loop, every answer kept) through nginx — privilege
reads, wallet reads, idempotent withdrawals (a ledger movement each). Faults, in order:

- ``pg_primary_kill``: the Patroni leader's host crashes (``crash_host``: its link down, then
  SIGKILL to PostgreSQL *and* Patroni; killing the postmaster alone, Patroni restarts it in
  place). The
  leader key expires (TTL), the synchronous replica is promoted, HAProxy's ``/primary`` check
  moves the write endpoint. The old host is then restarted: Patroni rejoins it as a replica
  (pg_rewind).
- ``api_kill``: SIGKILL to one API node; nginx's passive checks take it out.
- ``redis_primary_kill``: SIGKILL to the Redis primary's host; Sentinel promotes the replica,
  the gateways follow Sentinel. The old host comes back and Sentinel makes it a replica.
- ``replica_partition``: the PostgreSQL replica's link goes down for a while (its processes
  keep running). In synchronous mode every commit waits for it until Patroni drops it from
  ``synchronous_standby_names``: that stall is the cost of zero acknowledged-write loss.
- ``lagging_primary_kill`` (synchronous mode off only): the replica is cut off, the primary
  crashes while it is, the link heals and the replica is promoted — asynchronous
  replication's worst case, where the writes acknowledged during the cut are lost.

For each: the window's answers by status, the write outage (``write_outage``: by due time,
as stretches of failed writes, and as the longest time no write was acknowledged), and the
acknowledged writes it lost. After all: every acknowledged (201) withdrawal is looked up in
the ledger (missing ones are the loss), and the ledger's invariants hold.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from bench._chaos_load import OpenLoad, Sent
from bench.chaos import World
from surge.cluster.control import (
    Cluster,
    crash_host,
    http_ok,
    kill_host,
    partition,
    sentinel_primary,
)
from surge.cluster.topology import PG_SUPERUSER, SECRET_KEY, SENTINEL_MASTER, Host
from surge.config import Settings

MIX = (("read", 0.6), ("wallet", 0.15), ("withdraw", 0.25))


@dataclass
class ClusterStack:
    """What ``bench.chaos.World`` needs from a stack: settings to reach the primary directly
    (HAProxy's write endpoint, no PgBouncer) and Redis through Sentinel."""

    cluster: Cluster

    def direct_settings(self) -> Settings:
        config = self.cluster.config
        return Settings(
            DATABASE_URL=config.direct_primary_url,
            REDIS_URL=f"redis://{config.host('redis1').address}:6379/0",
            REDIS_SENTINELS=config.sentinels.split(","),
            REDIS_SENTINEL_MASTER=SENTINEL_MASTER,
            ENV="production", SECRET_KEY=SECRET_KEY, LOG_LEVEL="WARNING", LOG_JSON=True,
            DB_CONNECT_TIMEOUT=2, DB_POOL_MIN=1, DB_POOL_MAX=4, AUTH_ARGON2_TIME_COST=1,
            AUTH_ARGON2_MEMORY_KIB=1024, AUTH_ARGON2_PARALLELISM=1,
            # The load signs its callers in once, at seeding: a slow machine stretches the
            # run past the default 15-minute access TTL, and every later request was a 401.
            AUTH_ACCESS_TTL=timedelta(hours=2),
        )  # fmt: skip


def leader(cluster: Cluster) -> Host | None:
    for host in cluster.config.of("postgres"):
        if http_ok(f"http://{host.address}:8008/primary", timeout=0.5):
            return host
    return None


def redis_primary(cluster: Cluster) -> Host | None:
    for sentinel in cluster.config.of("sentinel"):
        try:
            address = sentinel_primary(sentinel).split(":")[0]
        except Exception:
            continue
        return next((h for h in cluster.config.of("redis") if h.address == address), None)
    return None


async def _until(predicate: Callable[[], bool], within: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await asyncio.to_thread(predicate):
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.2)
    return None


async def standby_lag(host: Host) -> int | None:
    """Bytes of WAL the primary on ``host`` wrote that its standby has not flushed yet: what
    a crash now may lose when replication is asynchronous (0 in synchronous mode once the
    commits waiting for it are counted)."""
    user, password = PG_SUPERUSER
    try:
        connection = await asyncpg.connect(host=host.address, port=5432, user=user,
                                           password=password, database="postgres", timeout=2)  # fmt: skip
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        value = await connection.fetchval(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn))::bigint"
            " FROM pg_stat_replication"
        )
        return None if value is None else int(value)
    finally:
        await connection.close()


async def pg_primary_kill(cluster: Cluster) -> dict[str, Any]:
    old = leader(cluster)
    assert old is not None, "no Patroni leader to kill"
    lag = await standby_lag(old)
    crash_host(old)
    promoted = await _until(lambda: (h := leader(cluster)) is not None and h != old, 90)
    partition(old, cut=False)  # the host comes back
    await asyncio.to_thread(cluster.start_patroni, old)
    rejoined = await _until(lambda: http_ok(f"http://{old.address}:8008/replica", timeout=0.5), 120)
    new = leader(cluster)
    return {"killed": old.name, "new_leader": new.name if new else None,
            "standby_lag_at_kill_bytes": lag, "promoted_after_s": promoted, "old_rejoined_as_replica_after_s": rejoined}  # fmt: skip


async def api_kill(cluster: Cluster) -> dict[str, Any]:
    victim = cluster.config.of("api")[0]
    kill_host(victim)
    await asyncio.sleep(5)
    await asyncio.to_thread(cluster.start_api, victim)
    back = await _until(lambda: http_ok(f"http://{victim.address}:8000/readyz"), 90)
    return {"killed": victim.name, "restarted_ready_after_s": back}


async def redis_primary_kill(cluster: Cluster) -> dict[str, Any]:
    old = redis_primary(cluster)
    assert old is not None, "no Redis primary known to Sentinel"
    kill_host(old)
    switched = await _until(lambda: (h := redis_primary(cluster)) is not None and h != old, 60)
    # The host comes back (as a primary of nobody): Sentinel turns it into a replica.
    await asyncio.to_thread(_restart_redis, cluster, old)
    return {"killed": old.name, "sentinel_switched_after_s": switched}


def _restart_redis(cluster: Cluster, host: Host) -> None:
    from surge.cluster.control import spawn

    spawn(cluster.config, host, cluster.config.redis_command(host))


async def replica_partition(cluster: Cluster, seconds: float = 20.0) -> dict[str, Any]:
    primary = leader(cluster)
    replica = next(h for h in cluster.config.of("postgres") if h != primary)
    partition(replica, cut=True)
    await asyncio.sleep(seconds)
    partition(replica, cut=False)
    back = await _until(lambda: http_ok(f"http://{replica.address}:8008/replica"), 90)
    return {"partitioned": replica.name, "cut_s": seconds, "replica_back_after_s": back}


async def lagging_primary_kill(cluster: Cluster, cut: float = 5.0) -> dict[str, Any]:
    """Asynchronous replication's worst case: the standby is cut off (the primary goes on
    acknowledging writes the standby never receives), the primary's host crashes, then the
    standby's link heals. Patroni promotes it if its WAL is within
    ``maximum_lag_on_failover`` of the leader's last published position: the writes
    acknowledged during the cut are gone, and pg_rewind discards them from the old primary
    when it rejoins. (Synchronous mode has no such case: a standby dropped from
    ``synchronous_standby_names`` is not promoted, so this fault runs in asynchronous mode
    only.)"""
    primary = leader(cluster)
    assert primary is not None, "no Patroni leader"
    replica = next(h for h in cluster.config.of("postgres") if h != primary)
    partition(replica, cut=True)
    await asyncio.sleep(cut)
    lag = await standby_lag(primary)
    crash_host(primary)
    partition(replica, cut=False)
    promoted = await _until(lambda: leader(cluster) == replica, 60)
    partition(primary, cut=False)  # the old primary's host comes back
    await asyncio.to_thread(cluster.start_patroni, primary)
    rejoined = await _until(
        lambda: leader(cluster) is not None
        and any(http_ok(f"http://{h.address}:8008/replica", timeout=0.5)
                for h in cluster.config.of("postgres")),
        120,
    )  # fmt: skip
    new = leader(cluster)
    return {"cut": replica.name, "killed": primary.name, "cut_s": cut,
            "standby_lag_at_kill_bytes": lag, "new_leader": new.name if new else None,
            "standby_promoted_after_s": promoted, "replica_again_after_s": rejoined}  # fmt: skip


FAULTS: tuple[tuple[str, Callable[[Cluster], Awaitable[dict[str, Any]]]], ...] = (
    ("pg_primary_kill", pg_primary_kill),
    ("api_kill", api_kill),
    ("redis_primary_kill", redis_primary_kill),
    ("replica_partition", replica_partition),
)
#: Run after ``FAULTS`` when synchronous mode is off.
ASYNC_ONLY: tuple[tuple[str, Callable[[Cluster], Awaitable[dict[str, Any]]]], ...] = (
    ("lagging_primary_kill", lagging_primary_kill),
)


def faults_for(
    synchronous: bool,
) -> tuple[tuple[str, Callable[[Cluster], Awaitable[dict[str, Any]]]], ...]:
    return FAULTS if synchronous else FAULTS + ASYNC_ONLY


def _codes(records: list[Sent]) -> dict[str, int]:
    counts = Counter(str(r.status) if r.status else "no-answer" for r in records)
    return dict(sorted(counts.items()))


def write_outage(records: list[Sent], start: float, end: float) -> dict[str, Any]:
    """What writers saw from the fault (``start``) to the window's end (``end``), three ways:

    - ``last_failed_s`` / ``writes_ok_again_s``: by *due* time, the last write that failed and
      the first one due after it that succeeded (a write due during a stall may still succeed
      late: it waited in Surge's pool for the new primary);
    - ``failed_write_spans_s``: the stretches of failed writes (due time; a gap of more than
      2 s between failures starts a new stretch), so a stall at the cut and another at the
      heal are two entries, not one long outage;
    - ``no_write_acked_for_s``: the longest time without any write *acknowledged* (done
      time of a 201), counted from the fault: the outage as a writer felt it.
    """
    writes = sorted((r for r in records if r.kind == "withdraw" and start <= r.due < end),
                    key=lambda r: r.due)  # fmt: skip
    failed = [r for r in writes if not 200 <= r.status < 300]
    spans: list[list[float]] = []
    for r in failed:
        if spans and r.due - spans[-1][1] <= 2.0:
            spans[-1][1] = r.due
        else:
            spans.append([r.due, r.due])
    acked = sorted(min(r.done, end) for r in writes if 200 <= r.status < 300)
    marks = [start, *acked, end]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    out: dict[str, Any] = {
        "last_failed_s": None, "writes_ok_again_s": 0.0,
        "failed_write_spans_s": [[round(a - start, 2), round(b - start, 2)] for a, b in spans],
        "no_write_acked_for_s": round(gap, 2),
    }  # fmt: skip
    if failed:
        last = failed[-1].due
        ok_after = next((r.due for r in writes if r.due > last and 200 <= r.status < 300), None)
        out["last_failed_s"] = round(last - start, 2)
        out["writes_ok_again_s"] = None if ok_after is None else round(ok_after - start, 2)
    return out


async def run(cluster: Cluster, *, rate: float, settle: float = 15.0) -> dict[str, Any]:
    world = World(ClusterStack(cluster))  # type: ignore[arg-type]
    await world.seed()
    load = OpenLoad(cluster.config.base_url, world.callers, lambda _t: rate, mix=MIX,
                    timeout=15.0, connections=128)  # fmt: skip
    rows = []
    finishes: list[float] = []
    try:
        await load.start()
        await asyncio.sleep(settle)
        for name, fault in faults_for(cluster.config.synchronous):
            start = load.now()
            detail = await fault(cluster)
            end = load.now()
            await asyncio.sleep(settle)
            finish = load.now()
            while (oldest := load.oldest_pending()) is not None and oldest < finish:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # the window's last answers (OpenLoad has no event)
            window = [r for r in load.records if start <= r.due < finish]
            finishes.append(finish)
            after = [r for r in load.records if end + 5 <= r.due < finish]
            rows.append({
                "fault": name, **detail, "fault_s": round(end - start, 2),
                "requests": len(window), "codes": _codes(window),
                "writes": _codes([r for r in window if r.kind == "withdraw"]),
                **write_outage(window, start, finish),
                "errors_5xx": sorted({f"{r.status} {r.kind}: {r.error[:160]}" for r in window
                                      if r.status >= 500 and r.status != 503})[:5],
                "after_2xx": round(
                    sum(1 for r in after if 200 <= r.status < 300) / max(1, len(after)), 4
                ),
            })  # fmt: skip
    finally:
        await load.stop()
    acked = [r for r in load.records if r.kind == "withdraw" and r.status == 201]
    missing = await world.acked_missing(load.records)
    # A lost write counts against the fault it preceded: from the previous window's end (a
    # write acknowledged just before a crash is due before the fault's window starts).
    gone = set(missing)
    lost = [r for r in load.records if r.kind == "withdraw" and r.acked_id in gone]
    for index, row in enumerate(rows):
        low = finishes[index - 1] if index else float("-inf")
        row["acked_writes_lost"] = sum(1 for r in lost if low <= r.due < finishes[index])
    problems = await world.invariants()
    await world.runtime.stop()
    return {
        "synchronous_mode": cluster.config.synchronous,
        "rate_rps": rate,
        "requests": len(load.records),
        "codes": _codes(load.records),
        "acked_writes": len(acked),
        "acked_writes_missing": len(missing),
        "acked_missing_examples": missing[:5],
        "invariant_violations": problems[:5],
        "faults": rows,
    }
