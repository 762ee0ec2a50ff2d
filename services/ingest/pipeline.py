"""PDF bytes -> book in the store: extract, clean, split sentences, chunk, write.

Store layout (keys from ``novelcrafter.layout``)::

    books/<id>/source.pdf, text.txt, parts/NN/{train,test}.jsonl, manifest.json  (written last)

The manifest is the commit point: readers only trust a book whose manifest exists, and a
failure before it removes whatever this call wrote. The same PDF always has the same id;
ingesting it again with the same parameters returns the stored manifest unchanged.

Ingests of one book are serialized within the process (:func:`book_lock`), and the manifest is
written with ``put_if_absent``: of two writers (say, this service and a ``novelcrafter ingest``
into the same store) exactly one commits and the other returns its manifest. A failed writer
never removes keys that a committed manifest names.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Protocol

from novelcrafter import layout
from novelcrafter.errors import Aborted, FailedPrecondition, NotFound, StoreError
from novelcrafter.logs import get_logger, kv
from novelcrafter.store import Store

from .chunking import make_chunks, plan_parts, split_parts
from .clean import clean_pages
from .extract import Cancelled, Limits, extract_pdf
from .manifest import MANIFEST_VERSION
from .params import IngestParams
from .sentences import split_sentences

log = get_logger(__name__)
Progress = Callable[[str, int, int], None]
_WORDS = re.compile(r"\S+")
_SAME_SPLIT = ("chunk_sentences", "test_fraction", "seed")


_LOCK_POLL = 0.2  # seconds between checks of ``cancelled`` while waiting for a lock


@dataclass
class IngestResult:
    manifest: dict[str, Any]
    already_existed: bool


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


def acquire(lock: _Lock, cancelled: Cancelled | None) -> None:
    """Wait for ``lock``; a caller that goes away while waiting stops waiting (:class:`Aborted`)."""
    while not lock.acquire(timeout=_LOCK_POLL):
        if cancelled is not None and cancelled():
            raise Aborted("ingest cancelled: the client went away")


_book_locks: dict[str, tuple[threading.RLock, int]] = {}  # book id -> (lock, holders and waiters)
_book_locks_guard = threading.Lock()


@contextmanager
def book_lock(book_id: str, cancelled: Cancelled | None = None) -> Iterator[None]:
    """Hold the process-wide lock of one book: a second ingest of the same PDF waits here, then
    finds the first one's manifest (re-entrant, so the service may take it before the pipeline)."""
    with _book_locks_guard:
        lock, users = _book_locks.get(book_id) or (threading.RLock(), 0)
        _book_locks[book_id] = (lock, users + 1)
    try:
        acquire(lock, cancelled)
        try:
            yield
        finally:
            lock.release()
    finally:
        with _book_locks_guard:
            lock, users = _book_locks[book_id]
            if users == 1:
                del _book_locks[book_id]  # no entry per book ever seen: the map stays small
            else:
                _book_locks[book_id] = (lock, users - 1)


def ingest_pdf(
    store: Store,
    pdf_bytes: bytes,
    *,
    title: str | None = None,
    password: str | None = None,
    params: IngestParams | dict[str, Any] | None = None,
    progress: Progress | None = None,
    filename: str | None = None,
    limits: Limits | None = None,
    cancelled: Cancelled | None = None,
) -> dict[str, Any]:
    """Ingest a PDF and return its manifest (see :func:`ingest` for whether it already existed)."""
    return ingest(
        store,
        pdf_bytes,
        title=title,
        password=password,
        params=params,
        progress=progress,
        filename=filename,
        limits=limits,
        cancelled=cancelled,
    ).manifest


def ingest(
    store: Store,
    pdf_bytes: bytes,
    *,
    title: str | None = None,
    password: str | None = None,
    params: IngestParams | dict[str, Any] | None = None,
    progress: Progress | None = None,
    filename: str | None = None,
    limits: Limits | None = None,
    cancelled: Cancelled | None = None,
) -> IngestResult:
    """Ingest a PDF. ``cancelled`` is polled: once true, work stops and nothing is written."""
    if not isinstance(params, IngestParams):
        params = IngestParams.from_dict(params)
    book_id = layout.book_id_for(pdf_bytes)
    with book_lock(book_id, cancelled):
        return _ingest(
            store, book_id, pdf_bytes, title, password, params, progress, filename, limits, cancelled
        )


def _ingest(
    store: Store,
    book_id: str,
    pdf_bytes: bytes,
    title: str | None,
    password: str | None,
    params: IngestParams,
    progress: Progress | None,
    filename: str | None,
    limits: Limits | None,
    cancelled: Cancelled | None,
) -> IngestResult:
    existing = _stored_manifest(store, book_id)
    if existing is not None:
        _check_same_params(existing, params)
        log.info("book already ingested", extra=kv(book_id=book_id))
        return IngestResult(existing, True)

    if cancelled is not None and cancelled():
        raise Aborted("ingest cancelled: the client went away")
    started = time.monotonic()
    extraction = extract_pdf(
        pdf_bytes, password=password, limits=limits, progress=progress, cancelled=cancelled
    )
    _step(progress, "clean", 0)
    raw_words = sum(len(line[5].split()) for page in extraction.pages for line in page.lines)
    if raw_words == 0:
        raise FailedPrecondition(
            f"no extractable text (scanned?): none of the {extraction.page_count} pages has a text layer; "
            "run OCR on the PDF first" + _problems(extraction.warnings)
        )
    cleaned = clean_pages(extraction.pages)
    _step(progress, "clean", 1)
    sentences = split_sentences(cleaned.paragraphs)
    try:
        parts_count = plan_parts(len(sentences), params)
    except FailedPrecondition as exc:
        raise FailedPrecondition(exc.message + _problems(extraction.warnings)) from None
    warnings = list(extraction.warnings)
    if parts_count < params.parts:
        warnings.append(
            f"too little text for {params.parts} parts: reduced to {parts_count} (--auto-reduce-parts)"
        )
    cleaning = Counter(cleaned.counts)
    cleaning["lead_ins_joined"] += 0  # counted in every manifest, zero included
    chunks = make_chunks(sentences, params.chunk_sentences, cleaning)
    parts = split_parts(chunks, parts_count, params)
    text = cleaned.text + "\n"

    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "book_id": book_id,
        "title": _title(title, extraction.title, filename),
        "filename": filename or "",
        "source_sha256": hashlib.sha256(pdf_bytes).hexdigest(),
        "source_bytes": len(pdf_bytes),
        "source_key": layout.source_key(book_id),
        "text_key": layout.text_key(book_id),
        "pages": extraction.page_count,
        "pages_with_text": cleaned.pages_with_text,
        "paragraphs": len(cleaned.paragraphs),
        "sentences": len(sentences),
        "chunks": len(chunks),
        "words": len(_WORDS.findall(cleaned.text)),
        "extracted_words": raw_words,  # before cleaning: words / extracted_words = what was kept
        "params": {**params.to_dict(), "parts": parts_count, "requested_parts": params.parts},
        "cleaning": dict(sorted(cleaning.items())),
        "parts": [
            {
                "index": part.index,
                "train_key": layout.part_train_key(book_id, part.index),
                "test_key": layout.part_test_key(book_id, part.index),
                "train_chunks": len(part.train),
                "test_chunks": len(part.test),
            }
            for part in parts
        ],
        "warnings": warnings,
        "extraction": {"workers": extraction.workers, "seconds": round(extraction.seconds, 3)},
        "created_at": time.time(),
    }
    if cancelled is not None and cancelled():
        raise Aborted("ingest cancelled: the client went away")
    if not _write(store, book_id, pdf_bytes, text, parts, manifest, progress, cancelled):
        # Another process committed this book meanwhile: its manifest is the book.
        existing = get_book(store, book_id)
        _check_same_params(existing, params)
        log.info("book ingested meanwhile by another writer", extra=kv(book_id=book_id))
        return IngestResult(existing, True)
    log.info(
        "book ingested",
        extra=kv(
            book_id=book_id,
            pages=manifest["pages"],
            sentences=manifest["sentences"],
            chunks=manifest["chunks"],
            parts=parts_count,
            seconds=round(time.monotonic() - started, 2),
        ),
    )
    return IngestResult(manifest, False)


def _problems(warnings: list[str]) -> str:
    """Damage met while reading, appended to an error it may explain."""
    return f" (problems reading the PDF: {'; '.join(warnings)})" if warnings else ""


def _step(progress: Progress | None, stage: str, done: int, total: int = 1) -> None:
    if progress is not None:
        progress(stage, done, total)


def _title(explicit: str | None, from_pdf: str | None, filename: str | None) -> str:
    if explicit and explicit.strip():
        return explicit.strip()
    if from_pdf:
        return from_pdf
    if filename:
        stem = PurePath(filename).stem.replace("_", " ").replace("-", " ").strip()
        if stem:
            return stem[:1].upper() + stem[1:]
    return "Untitled"


def _jsonl(chunks: list[str]) -> bytes:
    return "".join(json.dumps({"text": chunk}, ensure_ascii=False) + "\n" for chunk in chunks).encode()


def _write(
    store: Store,
    book_id: str,
    pdf_bytes: bytes,
    text: str,
    parts: list[Any],
    manifest: dict[str, Any],
    progress: Progress | None,
    cancelled: Cancelled | None = None,
) -> bool:
    """Everything first, the manifest last and only if absent (the commit). Return whether this
    call committed (False: another writer's manifest got there first). On failure, remove what this
    call wrote, but never keys that a committed manifest names."""
    objects: dict[str, bytes] = {
        layout.source_key(book_id): pdf_bytes,
        layout.text_key(book_id): text.encode(),
    }
    for part in parts:
        objects[layout.part_train_key(book_id, part.index)] = _jsonl(part.train)
        objects[layout.part_test_key(book_id, part.index)] = _jsonl(part.test)
    manifest_data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    written: list[str] = []
    try:
        for done, (key, data) in enumerate(objects.items()):
            if cancelled is not None and cancelled():
                raise Aborted("ingest cancelled: the client went away")
            store.put(key, data)
            written.append(key)
            _step(progress, "write", done + 1, len(objects) + 1)
        committed = store.put_if_absent(layout.manifest_key(book_id), manifest_data)
        _step(progress, "write", len(objects) + 1, len(objects) + 1)
    except BaseException:
        _remove_uncommitted(store, book_id, {key: objects[key] for key in written}, manifest["params"])
        raise
    if committed:
        # A failed writer in another process may have removed some of these keys after we wrote
        # them (it saw no manifest yet): put them back, the book must be whole.
        _restore_missing(store, book_id, objects)
    return committed


def _remove_uncommitted(
    store: Store, book_id: str, written: dict[str, bytes], params: dict[str, Any]
) -> None:
    """Remove what a failed ingest wrote, unless another writer's manifest now names those keys."""
    if not written:
        return
    try:
        if store.exists(layout.manifest_key(book_id)):
            return  # another writer committed: the keys belong to its book now
        for key in written:
            try:
                store.delete(key)
            except StoreError:
                log.warning("could not remove a partial write", extra=kv(key=key))
        # Another process may have committed while we deleted: put back what we removed from
        # under it. Only identical bytes: the source and text always, the parts if cut alike.
        other = _stored_manifest(store, book_id)
        if other is not None:
            same_cut = other.get("params") == params
            shared = (layout.source_key(book_id), layout.text_key(book_id))
            _restore_missing(store, book_id, {k: v for k, v in written.items() if same_cut or k in shared})
    except StoreError as exc:
        log.warning("could not clean up a failed ingest", extra=kv(book_id=book_id, error=str(exc)))


def _restore_missing(store: Store, book_id: str, objects: dict[str, bytes]) -> None:
    present = set(store.list(layout.book_prefix(book_id)))
    for key, data in objects.items():
        if key not in present:
            log.warning("restoring a key a concurrent writer removed", extra=kv(key=key))
            store.put(key, data)


def _stored_manifest(store: Store, book_id: str) -> dict[str, Any] | None:
    try:
        return store.get_json(layout.manifest_key(book_id))
    except NotFound:
        return None


def _check_same_params(existing: dict[str, Any], params: IngestParams) -> None:
    stored = existing.get("params", {})
    requested = stored.get("requested_parts", stored.get("parts"))
    same = all(stored.get(k) == getattr(params, k) for k in _SAME_SPLIT) and params.parts in (
        requested,
        stored.get("parts"),
    )
    if not same:
        keys = ("chunk_sentences", "parts", "test_fraction", "seed")
        shown = ", ".join(f"{k}={stored.get(k)}" for k in keys)
        raise FailedPrecondition(
            f"book {existing['book_id']} is already in the store, cut with {shown}; its parts are immutable "
            "(jobs train on them): ingest it again with those parameters, or into another store"
        )


def get_book(store: Store, book_id: str) -> dict[str, Any]:
    manifest = _stored_manifest(store, layout.check_book_id(book_id))
    if manifest is None:
        raise NotFound(f"no book {book_id} in the store")
    return manifest


def preview_chunks(store: Store, manifest: dict[str, Any], count: int) -> list[str]:
    """The first ``count`` training chunks of the first part, in book order (read as a stream:
    only as much of the part as the preview needs)."""
    parts = manifest.get("parts") or []
    if count <= 0 or not parts:
        return []
    chunks: list[str] = []
    pending = b""
    for piece in store.stream(parts[0]["train_key"], chunk_size=64 * 1024):
        pending += piece
        *lines, pending = pending.split(b"\n")
        chunks += [json.loads(line)["text"] for line in lines if line.strip()]
        if len(chunks) >= count:
            break
    if pending.strip() and len(chunks) < count:
        chunks.append(json.loads(pending)["text"])
    return chunks[:count]


def book_ids(store: Store) -> list[str]:
    """The ids of every complete book (one whose manifest exists), in id order."""
    ids = (key.split("/")[1] for key in store.list(layout.BOOKS) if layout.is_manifest_key(key))
    return sorted(book_id for book_id in ids if layout.BOOK_ID_RE.match(book_id))


def read_book(store: Store, book_id: str) -> dict[str, Any] | None:
    """A listed book's manifest; None when it was removed meanwhile or is unreadable."""
    try:
        return store.get_json(layout.manifest_key(book_id))
    except (NotFound, StoreError):
        return None


def list_books(store: Store) -> list[dict[str, Any]]:
    """Every complete book, oldest first (all in memory: for a bounded listing page through
    :func:`book_ids` with :func:`read_book`)."""
    books = [m for m in (read_book(store, book_id) for book_id in book_ids(store)) if m is not None]
    return sorted(books, key=lambda m: (m.get("created_at", 0), m.get("book_id", "")))
