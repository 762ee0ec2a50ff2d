"""Prometheus ``/metrics`` endpoint, one per service process.

Metrics themselves are declared by each service with ``prometheus_client``
(Counter, Histogram, Gauge); this module only starts the HTTP endpoint, in one place.
"""

from __future__ import annotations

from novelcrafter.config import DEFAULT_METRICS, Settings
from novelcrafter.logs import get_logger

log = get_logger(__name__)


def start_metrics_server(settings: Settings, service: str) -> int | None:
    """Serve /metrics on ``NOVELCRAFTER_METRICS_LISTEN`` (default per service; ``off`` disables).

    Returns the bound port, or None when disabled. A port already in use is logged and
    skipped rather than fatal: metrics must never stop a service from serving.
    """
    from prometheus_client import start_http_server

    listen = settings.metrics_listen or DEFAULT_METRICS.get(service, "off")
    if listen in ("off", "", "none"):
        return None
    host, _, port = listen.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
    except (OSError, ValueError) as exc:
        log.warning("metrics endpoint not started", extra={"fields": {"listen": listen, "error": str(exc)}})
        return None
    bound = server.server_address[1]
    log.info("metrics endpoint", extra={"fields": {"listen": f"{host or '0.0.0.0'}:{bound}"}})
    return bound
