"""Prometheus metrics of the coordinator (served by the ingest process's /metrics endpoint)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from novelcrafter.progress import job_state_name
from novelcrafter.v1 import jobs_pb2

JOBS = Gauge("novelcrafter_coordinator_jobs", "Jobs known to the coordinator, by state", ["state"])
JOBS_CREATED = Counter("novelcrafter_coordinator_jobs_created_total", "Jobs created")
PARTS_CLAIMED = Counter(
    "novelcrafter_coordinator_parts_claimed_total", "Parts handed to a worker under a lease"
)
PARTS_COMPLETED = Counter("novelcrafter_coordinator_parts_completed_total", "Parts completed")
PARTS_FAILED = Counter(
    "novelcrafter_coordinator_parts_failed_total",
    "Part attempts that did not complete, by outcome (retried, failed = job failed, released)",
    ["outcome"],
)
LEASE_EXPIRIES = Counter(
    "novelcrafter_coordinator_lease_expiries_total", "Leases that expired without a heartbeat"
)
STALE_LEASES = Counter(
    "novelcrafter_coordinator_stale_lease_rejections_total",
    "Worker calls refused (ABORTED) because their lease expired or belongs to someone else",
)
STORE_WRITE_FAILURES = Counter(
    "novelcrafter_coordinator_store_write_failures_total",
    "State writes that failed after the store's retries",
)

_STATE_LABELS = {
    value: job_state_name(value).lower()
    for value in jobs_pb2.JobState.values()
    if value != jobs_pb2.JOB_STATE_UNSPECIFIED
}


def set_job_state_counts(counts: dict[int, int]) -> None:
    """Jobs per state, as the database counts them (all replicas' jobs)."""
    for value, label in _STATE_LABELS.items():
        JOBS.labels(label).set(counts.get(value, 0))
