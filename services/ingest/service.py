"""IngestService over gRPC: a client-streamed upload (metadata, then bytes), GetBook, ListBooks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from novelcrafter.config import IngestSettings, get_settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NovelCrafterError, ResourceExhausted
from novelcrafter.layout import check_book_id
from novelcrafter.logs import get_logger, kv
from novelcrafter.rpc import Service
from novelcrafter.store import Store
from novelcrafter.v1 import ingest_pb2, ingest_pb2_grpc

from . import manifest as manifest_codec
from . import metrics, pipeline
from .params import IngestParams

log = get_logger(__name__)

SERVICE_NAME = "novelcrafter.v1.IngestService"
EXPORT_CHUNK = 1 << 20
MAX_PREVIEW = 20  # GetBook's preview_chunks cap: a look at the text, not a download


def max_upload_bytes() -> int:
    """``NOVELCRAFTER_MAX_UPLOAD_MB`` (``Settings.max_upload_mb``): the largest PDF IngestBook accepts."""
    return int(get_settings().max_upload_mb * 1024 * 1024)


def _too_large(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"upload exceeds the {limit / (1024 * 1024):g} MB limit (NOVELCRAFTER_MAX_UPLOAD_MB on the server)"
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Extraction runs in worker processes (see ``extract``); this process only coordinates."""

    def __init__(self, store: Store, coordinator: Any = None, *, max_concurrent: int | None = None) -> None:
        self.store = store
        self.coordinator = coordinator
        # Each ingest already uses every core; more at once would only thrash.
        limit = max_concurrent or get_settings(IngestSettings).max_concurrent_ingests
        self._slots = threading.BoundedSemaphore(max(1, limit))

    # -- RPCs -------------------------------------------------------------------------------------
    def IngestBook(
        self, request_iterator: Iterator[ingest_pb2.IngestBookRequest], context: grpc.ServicerContext
    ) -> ingest_pb2.IngestBookResponse:
        try:
            response = self._ingest_book(request_iterator, context)
        except NovelCrafterError as exc:
            metrics.REQUESTS.labels(outcome=exc.code.name.lower()).inc()
            raise
        except Exception:
            metrics.REQUESTS.labels(outcome="internal").inc()
            raise
        metrics.REQUESTS.labels(outcome="existed" if response.already_existed else "ingested").inc()
        return response

    def _ingest_book(
        self, request_iterator: Iterator[ingest_pb2.IngestBookRequest], context: grpc.ServicerContext
    ) -> ingest_pb2.IngestBookResponse:
        started = time.monotonic()
        meta, data = self._receive(request_iterator)
        metrics.UPLOAD_BYTES.inc(len(data))
        params = IngestParams.from_proto(meta.params)
        if meta.create_job and self.coordinator is None:
            raise FailedPrecondition("this ingest server has no job coordinator: create_job is unavailable")
        gone = threading.Event()  # the client cancelled or its deadline passed: stop working
        context.add_callback(gone.set)
        with self._slots:
            result = pipeline.ingest(
                self.store,
                data,
                title=meta.title or None,
                password=meta.password or None,
                params=params,
                filename=meta.filename or None,
                cancelled=lambda: gone.is_set() or not context.is_active(),
            )
        if not result.already_existed:
            metrics.SECONDS.observe(time.monotonic() - started)
            metrics.PAGES.inc(result.manifest["pages"])
        response = ingest_pb2.IngestBookResponse(
            manifest=manifest_codec.to_proto(result.manifest), already_existed=result.already_existed
        )
        if meta.create_job:
            job = self.coordinator.create_job(result.manifest["book_id"], meta.job_config)
            response.job.CopyFrom(job)
        log.info(
            "ingested book",
            extra=kv(
                book_id=result.manifest["book_id"],
                already_existed=result.already_existed,
                bytes=len(data),
                seconds=round(time.monotonic() - started, 2),
            ),
        )
        return response

    def GetBook(self, request: ingest_pb2.GetBookRequest, context: grpc.ServicerContext) -> Any:
        manifest = pipeline.get_book(self.store, check_book_id(request.book_id))
        if request.preview_chunks < 0:
            raise InvalidArgument(f"preview_chunks must be >= 0, got {request.preview_chunks}")
        preview = pipeline.preview_chunks(self.store, manifest, min(request.preview_chunks, MAX_PREVIEW))
        return ingest_pb2.GetBookResponse(manifest=manifest_codec.to_proto(manifest), preview=preview)

    def ListBooks(self, request: ingest_pb2.ListBooksRequest, context: grpc.ServicerContext) -> Any:
        return ingest_pb2.ListBooksResponse(
            books=[manifest_codec.to_proto(m) for m in pipeline.list_books(self.store)]
        )

    def GetAdapterCard(self, request: ingest_pb2.GetAdapterCardRequest, context: grpc.ServicerContext) -> Any:
        from novelcrafter import adapters
        from novelcrafter.export import resolve_version

        meta = resolve_version(self.store, check_book_id(request.book_id), request.adapter or "latest")
        card = self.store.get_text(meta.prefix + adapters.CARD) if adapters.CARD in meta.files else ""
        return ingest_pb2.GetAdapterCardResponse(version=meta.to_proto(), model_card=card)

    def ExportAdapter(
        self, request: ingest_pb2.ExportAdapterRequest, context: grpc.ServicerContext
    ) -> Iterator[ingest_pb2.ExportAdapterChunk]:
        """``novelcrafter export --format peft`` into a temporary folder, zipped and streamed."""
        import tempfile
        import zipfile
        from pathlib import Path

        from novelcrafter.export import export_adapter

        book_id = check_book_id(request.book_id)
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            result = export_adapter(
                self.store, book_id, Path(tmp) / "adapter", adapter=request.adapter or "latest"
            )
            name = f"{book_id}-{result.meta.version}"
            archive = Path(tmp) / f"{name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in result.files:
                    zf.write(result.dest / file, f"{name}/{file}")
            with open(archive, "rb") as fh:
                first = True
                while piece := fh.read(EXPORT_CHUNK):
                    yield ingest_pb2.ExportAdapterChunk(filename=archive.name if first else "", data=piece)
                    first = False

    # -- upload -----------------------------------------------------------------------------------
    def _receive(
        self, request_iterator: Iterator[ingest_pb2.IngestBookRequest]
    ) -> tuple[ingest_pb2.IngestMetadata, bytes]:
        """Metadata first, then chunks; refuse early once the size limit is passed."""
        limit = max_upload_bytes()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise InvalidArgument("IngestBook: the first message must carry the metadata, then the PDF bytes")
        meta = first.metadata
        if meta.size_bytes > limit:
            raise _too_large(limit)
        buffer = bytearray()
        for request in request_iterator:
            kind = request.WhichOneof("payload")
            if kind == "metadata":
                raise InvalidArgument("IngestBook: metadata may only be sent once, in the first message")
            if kind == "chunk":
                buffer += request.chunk
                if len(buffer) > limit:
                    raise _too_large(limit)
        return meta, bytes(buffer)


def ingest_service(store: Store, coordinator: Any = None) -> Service:
    return Service(
        SERVICE_NAME, IngestServicer(store, coordinator), ingest_pb2_grpc.add_IngestServiceServicer_to_server
    )
