"""Run the console: uvicorn on a socket bound up front (a busy port is an error at start)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from novelcrafter.config import Settings
from novelcrafter.errors import NovelCrafterError
from novelcrafter.logs import get_logger, kv

from .app import Console
from .backends import Backends
from .security import Guard

log = get_logger(__name__)
DEFAULT_LISTEN = "0.0.0.0:8080"


def bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise NovelCrafterError(
            f"cannot listen on {listen!r} (console): expected HOST:PORT, e.g. 0.0.0.0:8080"
        )
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(256)
    except (OSError, ValueError) as exc:
        raise NovelCrafterError(
            f"cannot listen on {listen} (console): {getattr(exc, 'strerror', None) or exc}"
        )
    return sock


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
    sock = bind(listen)
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
