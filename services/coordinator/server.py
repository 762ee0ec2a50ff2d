"""``novelcrafter serve coordinator``: the job coordinator (JobService) as a service of its own.

The ingest process can still host the same coordinator beside IngestService (``serve ingest``,
``serve all``, ``make run``); a deployment runs it here, scaled apart from ingest, and points
ingest (``NOVELCRAFTER_EMBEDDED_COORDINATOR=false``) and trainers at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from novelcrafter.config import DEFAULT_COORDINATOR_LISTEN, Settings
from novelcrafter.logs import configure_logging, get_logger, kv
from novelcrafter.metrics import start_metrics_server
from novelcrafter.rpc import GrpcServer, start_server
from novelcrafter.store import Store, open_store

log = get_logger(__name__)


@dataclass
class CoordinatorServer:
    grpc: GrpcServer
    coordinator: object
    store: Store

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


def start_coordinator_server(
    settings: Settings, *, listen: str | None = None, store: Store | None = None, metrics: bool = True
) -> CoordinatorServer:
    """Open the store and the coordinator's state, bind and start serving JobService."""
    from .core import Coordinator
    from .service import job_service

    store = store or open_store(settings=settings)
    listen = listen or settings.listen or DEFAULT_COORDINATOR_LISTEN
    coordinator = Coordinator(store, settings)
    try:
        server = start_server([job_service(coordinator)], listen, settings)
    except BaseException:
        coordinator.close()
        raise
    server.on_stop.append(coordinator.close)  # ends WatchJob streams before the grace wait
    if metrics:
        start_metrics_server(settings, "coordinator", listen)
    log.info("coordinator ready", extra=kv(store=store.url, port=server.port))
    return CoordinatorServer(server, coordinator, store)


def serve_coordinator(settings: Settings) -> None:
    """Run the coordinator until a signal stops it (graceful: in-flight RPCs may finish)."""
    configure_logging()
    server = start_coordinator_server(settings)
    server.grpc.install_signal_handlers()
    server.wait()
