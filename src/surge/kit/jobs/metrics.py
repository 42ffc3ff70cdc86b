"""Prometheus metrics of the job queue (multiprocess-safe; see surge.kit.telemetry.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOB_DURATION_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

PROCESSED = Counter("surge_jobs_processed_total", "Jobs that ran to success.", ["queue", "job"])
FAILED = Counter(
    "surge_jobs_failed_total", "Jobs that ended failed (attempts or stalls exhausted).", ["queue"]
)
RETRIED = Counter("surge_jobs_retried_total", "Failed attempts re-queued with backoff.", ["queue"])
SNOOZED = Counter(
    "surge_jobs_snoozed_total", "Starts put back to wait, not counted as attempts.", ["queue"]
)
STALLED = Counter(
    "surge_jobs_stalled_total", "Attempts whose lease expired (worker died or froze).", ["queue"]
)
LEASE_LOST = Counter(
    "surge_jobs_lease_lost_total",
    "Attempts refused at completion because another attempt owns the job (fencing).",
    ["queue"],
)
DURATION = Histogram(
    "surge_job_duration_seconds", "Handler run time.", ["queue"], buckets=JOB_DURATION_BUCKETS
)
RUNNING = Gauge(
    "surge_jobs_running", "Jobs running in worker processes.", ["queue"],
    multiprocess_mode="livesum",
)  # fmt: skip
# Every worker samples the same global figures from PostgreSQL; "livemax" shows one value.
DEPTH = Gauge(
    "surge_jobs_queue_depth", "Jobs ready to run, per queue.", ["queue"],
    multiprocess_mode="livemax",
)  # fmt: skip
LAG = Gauge(
    "surge_jobs_queue_lag_seconds", "Age of the oldest ready job, per queue.", ["queue"],
    multiprocess_mode="livemax",
)  # fmt: skip
