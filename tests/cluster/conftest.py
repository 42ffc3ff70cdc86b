"""Cluster tests run only when asked for (``make cluster-test`` → ``pytest -m cluster``): they
need root and the Debian packages of ``make cluster-deps``, and take minutes. Without
``-m cluster`` they are deselected (not skipped): ``make test`` never starts a cluster."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "cluster" in (config.getoption("markexpr") or ""):
        return
    chosen = [item for item in items if item.get_closest_marker("cluster") is None]
    dropped = [item for item in items if item.get_closest_marker("cluster") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen
