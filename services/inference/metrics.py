"""Prometheus metrics of the inference service (served on /metrics by novelcrafter.metrics).

Labels are separate dimensions (status, book, adapter version), never comma-joined strings.
Only validated identifiers become label values, so clients cannot mint label series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

REQUESTS = Counter(
    "novelcrafter_inference_requests_total",
    "Generation requests by method, gRPC status, book and adapter version ('base' for the base model).",
    ["method", "status", "book", "adapter"],
)
HTTP_REQUESTS = Counter(
    "novelcrafter_inference_http_requests_total",
    "Requests to the OpenAI-compatible HTTP API by route and HTTP status "
    "(499: the client went away before the response was complete).",
    ["route", "status"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "novelcrafter_inference_time_to_first_token_seconds",
    "From accepting a request to its first generated token.",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "novelcrafter_inference_time_per_output_token_seconds",
    "Mean time between output tokens of a request, after the first.",
    buckets=_TOKEN_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "novelcrafter_inference_request_seconds",
    "Whole generation time per request.",
    buckets=_LATENCY_BUCKETS,
)
TOKENS_GENERATED = Counter(
    "novelcrafter_inference_generated_tokens_total", "Output tokens generated.", ["book", "adapter"]
)
PROMPT_TOKENS = Counter("novelcrafter_inference_prompt_tokens_total", "Prompt tokens processed.")
ADAPTER_LOADS = Counter(
    "novelcrafter_inference_adapter_loads_total", "Adapter version loads by result.", ["result"]
)
ADAPTER_LOAD_SECONDS = Histogram(
    "novelcrafter_inference_adapter_load_seconds",
    "Download + validation + load time of an adapter version.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ADAPTER_SWAPS = Counter(
    "novelcrafter_inference_adapter_swaps_total",
    "Times a book's latest alias moved to a new version.",
    ["book"],
)
ADAPTER_EVICTIONS = Counter("novelcrafter_inference_adapter_evictions_total", "LRU evictions of versions.")
VERSIONS_HELD = Gauge("novelcrafter_inference_adapter_versions_held", "Adapter versions held in memory.")
ACTIVE_GENERATIONS = Gauge(
    "novelcrafter_inference_active_generations", "Generations holding a slot (--max-concurrency)."
)
QUEUE_DEPTH = Gauge(
    "novelcrafter_inference_queue_depth", "Requests waiting for a generation slot (at most --max-queued)."
)
QUEUE_WAIT_SECONDS = Histogram(
    "novelcrafter_inference_queue_wait_seconds",
    "From accepting a request to its getting a generation slot (0 when one was free); requests "
    "that leave the queue without a slot (cancelled, deadline passed) are not counted.",
    buckets=(0.0, *_LATENCY_BUCKETS),
)
BATCH_SIZE = Histogram(
    "novelcrafter_inference_batch_size",
    "Sequences per decode step.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
