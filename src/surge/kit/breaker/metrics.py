"""The breakers' Prometheus series (one family each, labelled by breaker name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

BREAKER_STATE = Gauge(
    "breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open (worst process wins).",
    ["breaker"],
    multiprocess_mode="livemax",
)
BREAKER_CALLS = Counter(
    "breaker_calls_total",
    "Calls through a breaker by outcome: success, failure, slow_success, slow_failure, "
    "rejected, ignored.",
    ["breaker", "outcome"],
)
BREAKER_TRANSITIONS = Counter(
    "breaker_transitions_total", "State changes of a breaker.", ["breaker", "from_state", "to"]
)

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}
