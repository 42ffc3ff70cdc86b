"""kit.telemetry.gc: a web process's collector thresholds, and its time in /metrics."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from surge.kit.telemetry import gc as kit_gc
from surge.kit.telemetry.metrics import flush_all


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def _collections(generation: int) -> float:
    flush_all()
    value = REGISTRY.get_sample_value(
        "process_gc_collections_total", {"generation": str(generation)}
    )
    return value or 0.0


def test_tune_sets_thresholds_and_counts_each_collection_and_its_time(thresholds: None) -> None:
    kit_gc.tune((50_000, 20, 100))
    assert gc.get_threshold() == (50_000, 20, 100)
    kit_gc.tune(())  # an empty setting keeps what is there; the timer is installed once
    assert gc.get_threshold() == (50_000, 20, 100)
    assert sum(1 for c in gc.callbacks if isinstance(c, kit_gc._Timer)) == 1
    full_before, seconds_before = _collections(2), kit_gc.seconds_by_generation()[2]
    garbage: list[list[int]] = [[] for _ in range(200_000)]  # a heap worth walking
    gc.collect()
    gc.collect()
    del garbage
    assert _collections(2) - full_before == 2
    assert kit_gc.seconds_by_generation()[2] > seconds_before
    flush_all()
    exported = REGISTRY.get_sample_value("process_gc_seconds_total", {"generation": "2"})
    assert exported is not None
    assert exported == pytest.approx(kit_gc.seconds_by_generation()[2])
