"""Prometheus ``/metrics`` endpoint, one per service process.

Metrics themselves are declared by each service with ``prometheus_client``
(Counter, Histogram, Gauge); this module only starts the HTTP endpoint, in one place.
It binds where its service binds (loopback unless told otherwise) and, when
``NOVELCRAFTER_AUTH_TOKEN`` is set, answers only requests that carry it
(``Authorization: Bearer …``, as Prometheus's ``authorization`` scrape setting sends it):
its labels name books and adapter versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from novelcrafter.config import DEFAULT_METRICS_PORTS, Settings
from novelcrafter.errors import NovelCrafterError
from novelcrafter.exposure import UNAUTHORIZED, BearerCheck, bind_socket, check_listen, split_listen
from novelcrafter.logs import get_logger, kv

log = get_logger(__name__)
OFF = ("off", "", "none")


def metrics_listen(settings: Settings, service: str, service_listen: str | None = None) -> str:
    """``NOVELCRAFTER_METRICS_LISTEN``, else the service's own host at its default port."""
    if settings.metrics_listen:
        return settings.metrics_listen.strip()
    host = "127.0.0.1"
    if service_listen and not service_listen.startswith("unix:"):
        host = split_listen(service_listen, service)[0]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{DEFAULT_METRICS_PORTS[service]}"


HEALTH_PATH = "/healthz"  # open, like gRPC health: probes carry no token, and it tells nothing


def require_token(app: Callable, token: str | None) -> Callable:
    """The WSGI app, answering 401 to a request without ``Authorization: Bearer <token>``;
    :data:`HEALTH_PATH` answers ``ok`` to anyone."""
    matches = BearerCheck(token) if token else None

    def guarded(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == HEALTH_PATH:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if matches is None:
            return app(environ, start_response)
        # WSGI hands headers over as latin-1 text: back to the bytes that were sent.
        if matches(str(environ.get("HTTP_AUTHORIZATION", "")).encode("latin-1", "replace")):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
        )
        return [UNAUTHORIZED.encode() + b"\n"]

    return guarded


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class _ThreadingServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        # One short-lived thread per scrape, as prometheus_client's own server does.
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def start_metrics_server(settings: Settings, service: str, service_listen: str | None = None) -> int | None:
    """Serve /metrics (``off`` disables). Returns the bound port, or None when disabled.

    A busy port is logged and skipped rather than fatal (metrics must never stop a service
    from serving); an address beyond loopback without a token is refused like any listener."""
    from prometheus_client import make_wsgi_app

    listen = metrics_listen(settings, service, service_listen)
    if listen.lower() in OFF:
        return None
    what = f"{service} /metrics"
    check_listen(listen, what, settings)
    try:
        sock = bind_socket(listen, what)
    except NovelCrafterError as exc:
        log.warning("metrics endpoint not started", extra=kv(listen=listen, error=exc.message))
        return None
    app = require_token(make_wsgi_app(), settings.auth_token)
    # The socket is ours (checked and bound above); the server only serves it.
    server = _ThreadingServer(sock.getsockname()[:2], _Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = "metrics", server.server_address[1]
    server.set_app(app)
    server.setup_environ()
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = server.server_address[1]
    log.info("metrics endpoint", extra=kv(listen=listen, port=bound, auth=bool(settings.auth_token)))
    return bound
