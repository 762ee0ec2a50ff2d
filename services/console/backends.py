"""The console's only way to the system: gRPC clients of ingest, the coordinator and inference.

Calls are the blocking stubs made by :func:`novelcrafter.rpc.connect` (same TLS, limits and
bearer token as the CLI), run on worker threads so the event loop keeps serving. Streams
(an upload, WatchJob, GenerateStream) are bridged between threads and the loop with bounded
queues, so a book is never held whole in memory and a browser that goes away cancels its RPC.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import grpc

from novelcrafter.config import Settings
from novelcrafter.errors import NovelCrafterError, from_rpc_error
from novelcrafter.rpc import TOO_MANY_STREAMS, connect
from novelcrafter.v1 import (
    inference_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2_grpc,
)

T = TypeVar("T")
UPLOAD_QUEUE = 16  # body pieces (each at most ~64 KiB from the HTTP server) waiting for gRPC
UNARY_TIMEOUT = 30.0
INGEST_TIMEOUT = 1800.0  # extraction of a large book on a busy host


# gRPC status -> HTTP status for the pages (the message is shown as the service wrote it).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 502,  # the console's own token was refused: our problem
    grpc.StatusCode.PERMISSION_DENIED: 502,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: NovelCrafterError) -> int:
    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.message.startswith(TOO_MANY_STREAMS):
        return 503  # the service is busy (not "too large"): try again later
    return HTTP_STATUS.get(exc.code, 500)


@dataclass
class Backends:
    """Channels to the services; one of each, shared by all requests and streams (gRPC
    multiplexes), so open pages never multiply connections."""

    ingest_address: str  # IngestService and JobService (the coordinator) share this process
    inference_address: str
    settings: Settings
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = connect(address, self.settings)
            return self._channels[address]

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel(self.ingest_address))

    @property
    def jobs(self) -> jobs_pb2_grpc.JobServiceStub:
        return jobs_pb2_grpc.JobServiceStub(self.channel(self.ingest_address))

    @property
    def inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel(self.inference_address))

    def cancellable(self, address: str) -> tuple[grpc.Channel, Callable[[], None]]:
        """The shared channel to ``address`` and a function that cancels the streams started
        through it (e.g. when the browser goes away); the channel itself stays open for
        everyone else. Unary calls made through it without a deadline get ``UNARY_TIMEOUT``,
        so nothing started for a page outlives the page for long."""
        calls = CancellableCalls()
        return grpc.intercept_channel(self.channel(address), calls), calls.cancel

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class CancellableCalls(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Keeps the server-streaming calls made through a channel, to cancel them together.

    Cancelling a call (not closing a channel) is how a page's stream ends while the one
    connection to the service stays shared. A stream started after :meth:`cancel` (a follower
    reconnecting) is cancelled at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Any] = []
        self._cancelled = False

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        if details.timeout is None:
            details = _Details(
                details.method,
                UNARY_TIMEOUT,
                details.metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        call = continuation(details, request)
        with self._lock:
            cancelled = self._cancelled
            if not cancelled:  # ended calls are dropped: a long follow reconnects many times
                self._calls = [c for c in self._calls if c.is_active()] + [call]
        if cancelled:
            call.cancel()
        return call

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()


async def call(service: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking RPC on a worker thread; RPC errors come back as domain errors (an
    unreachable service named, so the page says which one)."""

    def run() -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                error = type(error)(f"the {service} service did not answer: {error.message}")
            raise error from None

    return await anyio.to_thread.run_sync(run)


# --- upload: HTTP body -> IngestBook client stream -------------------------------------------


class UploadTooLarge(NovelCrafterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_END = object()


async def ingest_stream(
    backends: Backends,
    metadata: ingest_pb2.IngestMetadata,
    body: AsyncIterator[bytes],
    limit: int,
) -> ingest_pb2.IngestBookResponse:
    """Feed the HTTP body to IngestBook piece by piece as it arrives (bounded queue: the
    browser is slowed to ingest's pace, memory stays at a few pieces)."""
    pieces: queue.Queue[Any] = queue.Queue(maxsize=UPLOAD_QUEUE)

    def requests() -> Iterator[ingest_pb2.IngestBookRequest]:
        yield ingest_pb2.IngestBookRequest(metadata=metadata)
        while True:
            item = pieces.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item  # ends the call with an error: ingest discards the partial upload
            yield ingest_pb2.IngestBookRequest(chunk=item)

    future = backends.ingest.IngestBook.future(requests(), timeout=INGEST_TIMEOUT)

    def put(item: Any) -> None:
        while not future.done():  # the call failed early (e.g. too large): stop feeding
            try:
                pieces.put(item, timeout=0.25)
                return
            except queue.Full:
                continue

    received = 0
    try:
        async for piece in body:
            if future.done():
                break
            received += len(piece)
            if received > limit:
                await anyio.to_thread.run_sync(put, UploadTooLarge("upload too large"))
                future.cancel()
                raise UploadTooLarge(
                    f"the file is larger than the {limit / (1 << 20):g} MB limit (NOVELCRAFTER_MAX_UPLOAD_MB)"
                )
            if piece:
                await anyio.to_thread.run_sync(put, piece)
        await anyio.to_thread.run_sync(put, _END)
    except BaseException:
        future.cancel()
        raise
    if received == 0 and not future.done():
        future.cancel()
        raise EmptyUpload("no file received: choose a PDF to upload")

    def result() -> ingest_pb2.IngestBookResponse:
        try:
            return future.result()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    return await anyio.to_thread.run_sync(result)


class EmptyUpload(NovelCrafterError):
    code = grpc.StatusCode.INVALID_ARGUMENT


# --- server streams (WatchJob, GenerateStream) -> async iterators ------------------------------


async def iterate_in_thread(
    produce: Callable[[Callable[[Any], None]], None], stop: Callable[[], None]
) -> AsyncIterator[Any]:
    """Run ``produce(emit)`` on a thread and yield what it emits, in order. When the consumer
    stops early (the browser left), ``stop()`` is called to end the blocking RPC."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    done = object()

    def emit(item: Any) -> None:
        asyncio.run_coroutine_threadsafe(items.put(item), loop).result()

    def worker() -> None:
        try:
            produce(emit)
            outcome: Any = done
        except BaseException as exc:  # handed to the consumer
            outcome = exc
        try:
            asyncio.run_coroutine_threadsafe(items.put(outcome), loop).result()
        except RuntimeError:
            pass  # the loop is gone (shutdown)

    thread = threading.Thread(target=worker, name="console-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = await items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                if isinstance(item, grpc.RpcError):
                    raise from_rpc_error(item) from None
                raise item
            yield item
    finally:
        stop()
        while not items.empty():  # unblock a producer waiting on a full queue
            items.get_nowait()
