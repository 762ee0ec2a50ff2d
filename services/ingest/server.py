"""The ingest process: IngestService and the job coordinator's JobService on one gRPC server.

``serve_ingest(settings)`` blocks until SIGTERM/SIGINT; ``start_ingest_server`` is the
non-blocking form for callers that host several services in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from novelcrafter.config import DEFAULT_INGEST_LISTEN, Settings
from novelcrafter.logs import configure_logging, get_logger, kv
from novelcrafter.metrics import start_metrics_server
from novelcrafter.rpc import GrpcServer, start_server
from novelcrafter.store import Store, open_store

from .service import ingest_service

log = get_logger(__name__)


@dataclass
class IngestServer:
    grpc: GrpcServer
    coordinator: object
    store: Store
    metrics_port: int | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    def stop(self, grace: float | None = None) -> None:
        self.grpc.stop(grace)
        self.coordinator.close()  # idempotent; also hooked into on_stop

    def wait(self) -> None:
        try:
            self.grpc.wait()
        finally:
            self.coordinator.close()


def start_ingest_server(
    settings: Settings, *, listen: str | None = None, store: Store | None = None, metrics: bool = True
) -> IngestServer:
    """Open the store and the coordinator (hosted here, or the one at NOVELCRAFTER_COORDINATOR
    when ``embedded_coordinator`` is off), bind and start serving."""
    from novelcrafter.coordinator import Coordinator, job_service
    from novelcrafter.coordinator.client import RemoteCoordinator

    store = store or open_store(settings=settings)
    listen = listen or settings.listen or DEFAULT_INGEST_LISTEN
    if settings.embedded_coordinator:
        coordinator = Coordinator(store, settings)
        services = [ingest_service(store, coordinator), job_service(coordinator)]
    else:  # jobs are created through the coordinator service
        coordinator = RemoteCoordinator(settings.coordinator, settings)
        services = [ingest_service(store, coordinator)]
    try:
        server = start_server(services, listen, settings)
    except BaseException:
        coordinator.close()
        raise
    server.on_stop.append(coordinator.close)  # ends WatchJob streams before the grace wait
    metrics_port = start_metrics_server(settings, "ingest", listen) if metrics else None
    log.info("ingest service ready", extra=kv(store=store.url, port=server.port))
    return IngestServer(server, coordinator, store, metrics_port)


def serve_ingest(settings: Settings) -> None:
    """Run the ingest service until a signal stops it (graceful: in-flight RPCs may finish)."""
    configure_logging()
    server = start_ingest_server(settings)
    server.grpc.install_signal_handlers()
    server.wait()
