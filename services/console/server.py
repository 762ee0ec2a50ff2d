"""Run the console: uvicorn on a socket bound up front (a busy port is an error at start)."""

from __future__ import annotations

import ssl
from typing import Any

from novelcrafter.config import Settings
from novelcrafter.exposure import bind_tcp
from novelcrafter.logs import get_logger, kv

from .app import Console
from .backends import Backends
from .security import Guard

log = get_logger(__name__)


def serve(listen: str, ingest: str, inference: str, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers: in-flight requests get the grace period)."""
    import uvicorn

    tls: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca:
            tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    backends = Backends(ingest, inference, settings)
    guard = Guard(settings.auth_token, secure_cookie=bool(tls))
    config = uvicorn.Config(
        Console(backends, guard).app(),
        lifespan="off",
        http="h11",
        ws="none",
        log_config=None,  # our logging is already configured
        access_log=False,  # URLs could carry what a user typed; we log our own events
        server_header=False,
        timeout_graceful_shutdown=int(settings.grace_seconds),
        **tls,
    )
    sock = bind_tcp(listen, "console", settings)
    log.info(
        "console listening",
        extra=kv(
            listen=listen,
            port=sock.getsockname()[1],
            ingest=ingest,
            inference=inference,
            auth=guard.required,
            tls=bool(tls),
        ),
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        backends.close()
        log.info("console stopped")
