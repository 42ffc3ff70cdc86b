"""Issue 18's "Done when": the cluster under steady load through nginx survives, one after
another, a PostgreSQL primary crash, an API node crash, a Redis primary crash and a replica
partition — and with synchronous mode on, no acknowledged write is lost. Figures go to
``bench/results/cluster.json`` (key ``failover``). ``make cluster-test`` (root, minutes)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench import _cluster_faults
from bench.common import RESULTS, machine

from surge.cluster.control import Cluster, teardown
from surge.cluster.topology import ClusterConfig
from tests.fixtures.servers import ROOT

pytestmark = pytest.mark.cluster

RATE = float(os.environ.get("SURGE_CLUSTER_RATE", "30"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = ROOT / ".data" / "cluster"
    teardown(root)
    running = Cluster(ClusterConfig(root=root, synchronous=True))
    try:
        running.up(say=lambda _line: None)
        yield running
    finally:
        keep = ROOT / ".data" / "cluster-logs"  # the nodes' logs outlive the cluster
        shutil.rmtree(keep, ignore_errors=True)
        for log in root.glob("*/out.log"):
            (keep / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep / log.parent.name / "out.log")
        teardown(root)


def save(key: str, value: object) -> Path:
    path = RESULTS / "cluster.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current[key] = value
    current["machine"] = machine()
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path


@pytest.mark.timeout(1200)
async def test_failover_under_load_loses_no_acknowledged_write(cluster: Cluster) -> None:
    result = await _cluster_faults.run(cluster, rate=RATE)
    save("failover", result)
    faults = {row["fault"]: row for row in result["faults"]}
    assert list(faults) == [name for name, _ in _cluster_faults.FAULTS]
    assert result["acked_writes"] > 0
    assert result["acked_writes_missing"] == 0, result["acked_missing_examples"]
    assert result["invariant_violations"] == []
    assert faults["pg_primary_kill"]["new_leader"] not in (
        None,
        faults["pg_primary_kill"]["killed"],
    )
    for name, row in faults.items():
        assert row["writes_ok_again_s"] is not None, f"{name}: writes never came back: {row}"
        assert row["after_2xx"] >= 0.95, f"{name}: not recovered: {row}"
        assert "500" not in row["codes"], f"{name}: a 500 is a bug: {row}"
