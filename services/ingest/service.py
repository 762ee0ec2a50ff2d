"""IngestService over gRPC: a client-streamed upload (metadata, then bytes), GetBook, ListBooks.

An upload is spooled to an unnamed temporary file as it arrives and read into memory only
once it holds one of the ``max_concurrent_ingests`` slots: however many clients upload at
once, the process holds at most slots x ``NOVELCRAFTER_MAX_UPLOAD_MB`` of PDFs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from typing import IO, Any

import grpc

from novelcrafter.config import IngestSettings, get_settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NovelCrafterError, ResourceExhausted
from novelcrafter.layout import BOOK_ID_RE, MAX_FILENAME_BYTES, MAX_TITLE_CHARS, check_book_id
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
LIST_PAGE_SIZE = 100  # ListBooks' default page size
MAX_LIST_PAGE_SIZE = 1000
# A ListBooks page also ends once its manifests pass this many bytes (or half the gRPC message
# limit, if lower): one manifest can be large (up to 1000 parts), a page must stay sendable.
LIST_PAGE_BYTES = 4 << 20


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
BIG_BUFFER = 1 << 20


def keep_big_buffers_mapped() -> None:
    """Fix glibc's mmap threshold at 1 MiB. By default it rises to the size of the largest block
    freed, so after the first upload every later one is read into a per-thread arena that keeps
    the memory after it is freed: RSS would grow by a PDF per handler thread, not per slot."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: its allocator has its own policy
    mallopt(M_MMAP_THRESHOLD, BIG_BUFFER)


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
        keep_big_buffers_mapped()

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
        gone = threading.Event()  # the client cancelled or its deadline passed: stop working
        context.add_callback(gone.set)

        def cancelled() -> bool:
            return gone.is_set() or not context.is_active()

        meta = _metadata(request_iterator)
        params = IngestParams.from_proto(meta.params)
        if meta.create_job and self.coordinator is None:
            raise FailedPrecondition("this ingest server has no job coordinator: create_job is unavailable")
        with _spool_file() as spool:
            size, book_id = _spool(request_iterator, spool)
            metrics.UPLOAD_BYTES.inc(size)
            # Same book: wait (without a slot) for the ingest already at it, then find its manifest.
            with pipeline.book_lock(book_id, cancelled), _slot(self._slots, cancelled):
                spool.seek(0)
                data = spool.read()  # the one in-memory copy, held only within a slot
                try:
                    result = pipeline.ingest(
                        self.store,
                        data,
                        title=meta.title or None,
                        password=meta.password or None,
                        params=params,
                        filename=meta.filename or None,
                        cancelled=cancelled,
                    )
                finally:
                    del data  # not kept past the slot by a traceback's reference to this frame
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
                bytes=size,
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
        """A page of books in id order: at most ``page_size`` and about LIST_PAGE_BYTES, so the
        answer stays under the message limit however many books the store holds."""
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {request.page_size}")
        page_size = min(request.page_size or LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE)
        after = request.page_token
        if after and not BOOK_ID_RE.match(after):
            raise InvalidArgument("invalid page_token: pass a previous ListBooks answer's next_page_token")
        budget = min(LIST_PAGE_BYTES, get_settings().max_message_mb * (1 << 20) // 2)
        ids = [book_id for book_id in pipeline.book_ids(self.store) if book_id > after]
        response = ingest_pb2.ListBooksResponse()
        size = 0
        for index, book_id in enumerate(ids):
            if len(response.books) >= page_size or (response.books and size >= budget):
                response.next_page_token = ids[index - 1]
                break
            manifest = pipeline.read_book(self.store, book_id)
            if manifest is not None:
                book = manifest_codec.to_proto(manifest)
                size += book.ByteSize()
                response.books.append(book)
        return response

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


@contextlib.contextmanager
def _slot(slots: threading.BoundedSemaphore, cancelled: Callable[[], bool]) -> Iterator[None]:
    """Hold one of the ingest slots; a client that goes away while waiting stops waiting."""
    pipeline.acquire(slots, cancelled)
    try:
        yield
    finally:
        slots.release()


def _metadata(request_iterator: Iterator[ingest_pb2.IngestBookRequest]) -> ingest_pb2.IngestMetadata:
    """The first message: the metadata, checked before any byte of the PDF is taken."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("payload") != "metadata":
        raise InvalidArgument("IngestBook: the first message must carry the metadata, then the PDF bytes")
    meta = first.metadata
    limit = max_upload_bytes()
    if meta.size_bytes > limit:
        raise _too_large(limit)
    if len(meta.title) > MAX_TITLE_CHARS:
        raise InvalidArgument(f"title too long: {len(meta.title)} characters, at most {MAX_TITLE_CHARS}")
    name_bytes = len(meta.filename.encode())
    if name_bytes > MAX_FILENAME_BYTES:
        raise InvalidArgument(f"filename too long: {name_bytes} bytes (UTF-8), at most {MAX_FILENAME_BYTES}")
    for field, value in (("title", meta.title), ("filename", meta.filename)):
        bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise InvalidArgument(f"{field} contains a control character (U+{ord(bad):04X}): remove it")
    return meta


def _no_room(exc: OSError) -> ResourceExhausted:
    return ResourceExhausted(
        f"cannot receive the upload: the server's temporary folder {tempfile.gettempdir()} "
        f"(TMPDIR) is not writable or full ({exc.strerror or exc})"
    )


def _spool_file() -> IO[bytes]:
    """An unnamed temporary file (O_TMPFILE on Linux): gone once closed, whatever happens,
    even if the process dies."""
    try:
        return tempfile.TemporaryFile(prefix="nc-upload-")
    except OSError as exc:
        raise _no_room(exc) from None


def _spool(request_iterator: Iterator[ingest_pb2.IngestBookRequest], spool: IO[bytes]) -> tuple[int, str]:
    """The PDF's chunks into ``spool``, refused as soon as they pass the size limit; returns the
    size and the book id (hashed on the way: the book's lock is taken before its bytes are read)."""
    limit = max_upload_bytes()
    digest = hashlib.sha256()
    size = 0
    for request in request_iterator:
        kind = request.WhichOneof("payload")
        if kind == "metadata":
            raise InvalidArgument("IngestBook: metadata may only be sent once, in the first message")
        if kind != "chunk":
            continue
        chunk = request.chunk  # a copy out of the message: taken once
        del request  # the message too: nothing of this stream stays in memory while we wait
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        try:
            spool.write(chunk)
        except OSError as exc:
            raise _no_room(exc) from None
        digest.update(chunk)
        del chunk
    try:
        spool.flush()
    except OSError as exc:
        raise _no_room(exc) from None
    return size, digest.hexdigest()[:16]  # layout.book_id_for's rule


def ingest_service(store: Store, coordinator: Any = None) -> Service:
    return Service(
        SERVICE_NAME, IngestServicer(store, coordinator), ingest_pb2_grpc.add_IngestServiceServicer_to_server
    )
