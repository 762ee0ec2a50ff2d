"""Prometheus metrics of the ingest service (served by ``novelcrafter.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "novelcrafter_ingest_requests_total",
    "IngestBook calls by outcome: ingested, existed, or the gRPC status of the refusal",
    ["outcome"],
)
SECONDS = Histogram(
    "novelcrafter_ingest_seconds",
    "Wall time of an IngestBook call that ingested a book",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
PAGES = Counter("novelcrafter_ingest_pages_total", "Pages extracted from ingested books")
UPLOAD_BYTES = Counter("novelcrafter_ingest_upload_bytes_total", "PDF bytes received by IngestBook")
