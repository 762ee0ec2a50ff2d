"""gRPC bootstrap shared by every service (server) and every client (CLI, workers).

Server: health (``grpc.health.v1``), reflection, one interceptor that maps domain
errors to status codes, optional bearer-token auth (health stays open), TLS,
message-size limits, and graceful shutdown on SIGTERM/SIGINT: health flips to
NOT_SERVING, new RPCs are refused, in-flight RPCs get ``grace_seconds`` to finish.

Capacity: a sync gRPC server holds one thread per call for the call's whole life, so a
long stream (WatchJob, an upload, a download, GenerateStream) would hold a thread for
minutes. Streams and short unary calls therefore never compete for threads: streaming
calls get at most ``max_streams`` threads (one more is refused at once with
RESOURCE_EXHAUSTED, :class:`StreamLimitInterceptor`) and unary calls keep ``max_workers``
threads of their own, so a trainer's RenewLease answers in milliseconds however many job
pages are open.

Client: :func:`connect` makes a channel with the same limits, TLS and token.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge

from novelcrafter.config import Settings, get_settings
from novelcrafter.errors import NovelCrafterError
from novelcrafter.exposure import UNAUTHORIZED, BearerCheck, check_listen
from novelcrafter.logs import get_logger

log = get_logger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"

# Capacity of one server (see the module docstring). Threads = UNARY_WORKERS + NOVELCRAFTER_MAX_STREAMS.
UNARY_WORKERS = 32  # threads only short unary calls use (ClaimPart, RenewLease, GetJob, …)
UNARY_BACKLOG_PER_WORKER = 3  # unary calls that may wait for a thread, per thread, before RESOURCE_EXHAUSTED
TOO_MANY_STREAMS = "too many open streams"  # how a refused stream's message starts
REFUSAL_LOG_SECONDS = 60.0  # refused streams are logged at most this often (a flood must not flood the log)

OPEN_STREAMS = Gauge(
    "novelcrafter_grpc_open_streams",
    "Streaming RPCs in progress (each holds a server thread), by method",
    ["method"],
)
STREAMS_REFUSED = Counter(
    "novelcrafter_grpc_streams_refused_total",
    "Streaming RPCs refused with RESOURCE_EXHAUSTED because the server's streams were all in use",
    ["method"],
)


def _channel_options(settings: Settings) -> list[tuple[str, Any]]:
    limit = int(settings.max_message_mb) * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# --- interceptors ------------------------------------------------------------------------------


def _wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]
) -> grpc.RpcMethodHandler:
    """Rebuild a method handler with its behaviour wrapped, whatever its streaming kind."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, NovelCrafterError):
        log.info(
            "rpc error", extra={"fields": {"method": method, "code": exc.code.name, "error": exc.message}}
        )
        context.abort(exc.code, exc.message)
    incident = uuid.uuid4().hex[:8]
    log.exception("unhandled error in rpc", extra={"fields": {"method": method, "incident": incident}})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; see the server log)")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Domain errors → status codes with their message; anything else → INTERNAL, logged."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method

        def wrap(behaviour: Callable) -> Callable:
            streaming = handler.unary_stream or handler.stream_stream

            if streaming:

                def stream_behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    try:
                        yield from behaviour(request, context)
                    except Exception as exc:
                        if _is_abort(exc):
                            raise
                        _abort_for(exc, context, method)

                return stream_behaviour

            def unary_behaviour(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behaviour(request, context)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    _abort_for(exc, context, method)

            return unary_behaviour

        return _wrap_handler(handler, wrap)


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare Exception subclass internal to grpc; let it through.
    return type(exc).__module__.startswith("grpc") and not isinstance(exc, NovelCrafterError)


class AuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every RPC except health checks."""

    def __init__(self, token: str) -> None:
        self._matches = BearerCheck(token)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if self._matches(str(metadata.get("authorization", ""))):
            return continuation(details)
        handler = continuation(details)
        message = UNAUTHORIZED

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is None:
            return grpc.unary_unary_rpc_method_handler(deny)
        return _wrap_handler(handler, lambda _behaviour: deny)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """At most ``limit`` streaming calls (client-, server- or bidi-streaming) at once.

    Each holds a server thread until it ends; one more is refused at once with
    RESOURCE_EXHAUSTED instead of waiting for a thread, so streams can never take the threads
    reserved for unary calls. Health's Watch counts too (it blocks a thread, and needs no token).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._open = 0
        self._refused_since_log = 0
        self._last_log = -REFUSAL_LOG_SECONDS

    @property
    def open(self) -> int:
        """Streaming calls in progress now."""
        return self._open

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = details.method

        # The slot is taken in the handler's own thread (not here, on gRPC's polling thread):
        # a call that gRPC then rejects or never runs cannot leak one.
        def wrap(behaviour: Callable) -> Callable:
            if handler.response_streaming:

                def stream_behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    self._enter(method, context)
                    try:
                        yield from behaviour(request, context)
                    finally:  # also when gRPC drops the generator (client gone)
                        self._leave(method)

                return stream_behaviour

            def unary_behaviour(request_iterator: Any, context: grpc.ServicerContext) -> Any:
                self._enter(method, context)
                try:
                    return behaviour(request_iterator, context)
                finally:
                    self._leave(method)

            return unary_behaviour

        return _wrap_handler(handler, wrap)

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        if not self._slots.acquire(blocking=False):
            STREAMS_REFUSED.labels(method).inc()
            self._log_refusal(method)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{TOO_MANY_STREAMS} ({self.limit}); try again later"
            )
        with self._lock:
            self._open += 1
        OPEN_STREAMS.labels(method).inc()

    def _leave(self, method: str) -> None:
        OPEN_STREAMS.labels(method).dec()
        with self._lock:
            self._open -= 1
        self._slots.release()

    def _log_refusal(self, method: str) -> None:
        with self._lock:
            self._refused_since_log += 1
            now = time.monotonic()
            if now - self._last_log < REFUSAL_LOG_SECONDS:
                return
            refused, self._refused_since_log, self._last_log = self._refused_since_log, 0, now
        log.warning(
            "streams refused: all in use",
            extra={"fields": {"method": method, "limit": self.limit, "refused": refused}},
        )


# --- server ------------------------------------------------------------------------------------


@dataclass
class Service:
    """A servicer to register: ``add_fn`` is the generated ``add_XServicer_to_server``."""

    name: str  # full service name, e.g. "novelcrafter.v1.IngestService"
    servicer: Any
    add_fn: Callable[[Any, grpc.Server], None]
    on_stop: Callable[[], None] | None = None  # e.g. end long streams before the grace period


@dataclass
class GrpcServer:
    """A running server with health, reflection and graceful shutdown."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str]
    grace_seconds: float
    _stopped: threading.Event = field(default_factory=threading.Event)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    streams: StreamLimitInterceptor | None = None  # open-stream count and limit

    @property
    def open_streams(self) -> int:
        return self.streams.open if self.streams else 0

    def set_serving(self, serving: bool, service: str = "") -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        names = [service] if service else ["", *self.services]
        for name in names:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within the grace period, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        self.health.enter_graceful_shutdown()
        for callback in self.on_stop:
            try:
                callback()
            except Exception:
                log.exception("shutdown hook failed")
        self.server.stop(grace).wait()
        log.info("stopped")

    def wait(self) -> None:
        """Block until stopped (by :meth:`stop` or a signal)."""
        while not self._stopped.is_set():
            self._stopped.wait(0.5)
        self.server.wait_for_termination()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT → graceful stop (main thread only)."""

        def handler(signum: int, _frame: Any) -> None:
            log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
            threading.Thread(target=self.stop, name="grpc-shutdown", daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not (settings.tls_cert and settings.tls_key):
        return None
    cert = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def start_server(
    services: Iterable[Service],
    listen: str,
    settings: Settings | None = None,
    *,
    max_workers: int = UNARY_WORKERS,
    max_streams: int | None = None,
    serving: bool = True,
    extra_interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> GrpcServer:
    """Build, bind and start a server. ``serving=False`` starts with health NOT_SERVING
    (e.g. until a model is loaded); call :meth:`GrpcServer.set_serving` later.

    ``max_workers``: threads for unary calls; ``max_streams``: streaming calls open at once,
    on threads of their own (the pool has both; default ``NOVELCRAFTER_MAX_STREAMS``)."""
    settings = settings or get_settings()
    max_streams = settings.max_streams if max_streams is None else max_streams
    services = list(services)
    check_listen(listen, "gRPC " + ", ".join(svc.name.rsplit(".", 1)[-1] for svc in services), settings)
    interceptors: list[grpc.ServerInterceptor] = []
    if settings.auth_token:
        interceptors.append(AuthInterceptor(settings.auth_token))
    interceptors.extend(extra_interceptors)
    streams = StreamLimitInterceptor(max_streams)
    interceptors.extend([streams, ErrorInterceptor()])
    # Streams never hold more than max_streams threads, so max_workers threads are always left
    # for unary calls; the admission limit lets a bounded backlog of unary calls wait for one.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers + max_streams, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            *_channel_options(settings),
            ("grpc.so_reuseport", 0),
            # Accept the clients' 30 s keepalive pings on idle long streams (WatchJob) instead
            # of answering GOAWAY "too_many_pings" under gRPC's 5-minute default.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            # Small receive windows: with BDP probing gRPC grows each stream's HTTP/2 window to
            # many MB and reads whole uploads into memory ahead of their handler (N uploads x
            # their size). Without it an upload is read as its handler spools it to disk.
            ("grpc.http2.bdp_probe", 0),
        ],
        maximum_concurrent_rpcs=max_streams + max_workers * (1 + UNARY_BACKLOG_PER_WORKER),
    )
    for svc in services:
        svc.add_fn(svc.servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    creds = _server_credentials(settings)
    try:
        port = server.add_secure_port(listen, creds) if creds else server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise NovelCrafterError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0 and not listen.endswith(":0"):
        raise NovelCrafterError(f"cannot listen on {listen}: address in use or not available")
    server.start()
    srv = GrpcServer(server, port, health_servicer, names, settings.grace_seconds, streams=streams)
    srv.on_stop.extend(svc.on_stop for svc in services if svc.on_stop)
    srv.set_serving(serving)
    log.info(
        "grpc server listening",
        extra={
            "fields": {
                "listen": listen,
                "port": port,
                "services": ",".join(names),
                "tls": bool(creds),
                "auth": bool(settings.auth_token),
                "unary_workers": max_workers,
                "max_streams": max_streams,
            }
        },
    )
    return srv


# --- client ------------------------------------------------------------------------------------


class _AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)


@dataclass
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def connect(address: str, settings: Settings | None = None, *, token: str | None = None) -> grpc.Channel:
    """A channel to ``address`` with the configured TLS, message limits and bearer token."""
    settings = settings or get_settings()
    options = _channel_options(settings)
    if settings.tls_ca:
        root = Path(settings.tls_ca).read_bytes()
        cert = Path(settings.tls_client_cert).read_bytes() if settings.tls_client_cert else None
        key = Path(settings.tls_client_key).read_bytes() if settings.tls_client_key else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root, key, cert), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = token if token is not None else settings.auth_token
    if token:
        channel = grpc.intercept_channel(channel, _AuthClientInterceptor(token))
    return channel


def wait_for_health(
    address: str, timeout: float = 60.0, settings: Settings | None = None, service: str = ""
) -> None:
    """Block until the server at ``address`` reports SERVING (raises TimeoutError)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with connect(address, settings) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s (last: {last})")
