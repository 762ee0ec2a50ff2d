"""PDF bytes -> book in the store: extract, clean, split sentences, chunk, write.

Store layout (keys from ``novelcrafter.layout``)::

    books/<id>/source.pdf, text.txt, parts/NN/{train,test}.jsonl, manifest.json  (written last)

The manifest is the commit point: readers only trust a book whose manifest exists, and a
failure before it removes whatever this call wrote. The same PDF always has the same id;
ingesting it again with the same parameters returns the stored manifest unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

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


@dataclass
class IngestResult:
    manifest: dict[str, Any]
    already_existed: bool


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
    _write(store, book_id, pdf_bytes, text, parts, manifest, progress, cancelled)
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
) -> None:
    """Everything first, the manifest last; on failure remove what was written (no half book)."""
    objects: list[tuple[str, bytes]] = [
        (layout.source_key(book_id), pdf_bytes),
        (layout.text_key(book_id), text.encode()),
    ]
    for part in parts:
        objects.append((layout.part_train_key(book_id, part.index), _jsonl(part.train)))
        objects.append((layout.part_test_key(book_id, part.index), _jsonl(part.test)))
    written: list[str] = []
    try:
        for done, (key, data) in enumerate(objects):
            if cancelled is not None and cancelled():
                raise Aborted("ingest cancelled: the client went away")
            store.put(key, data)
            written.append(key)
            _step(progress, "write", done + 1, len(objects) + 1)
        store.put_json(layout.manifest_key(book_id), manifest)
        _step(progress, "write", len(objects) + 1, len(objects) + 1)
    except BaseException:
        if not store.exists(layout.manifest_key(book_id)):
            for key in written:
                try:
                    store.delete(key)
                except StoreError:
                    log.warning("could not remove a partial write", extra=kv(key=key))
        raise


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


def list_books(store: Store) -> list[dict[str, Any]]:
    """Every complete book (one whose manifest exists), oldest first."""
    books = []
    for key in store.list(layout.BOOKS):
        if layout.is_manifest_key(key):
            try:
                books.append(store.get_json(key))
            except (NotFound, StoreError):
                continue  # removed meanwhile, or unreadable: not a complete book
    return sorted(books, key=lambda m: (m.get("created_at", 0), m.get("book_id", "")))
