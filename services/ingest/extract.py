"""PDF text extraction: pdfminer.six in worker processes, parallel over pages, bounded.

The service process never parses a PDF. Worker processes (one per core, started as
``python -m novelcrafter.ingest.extract_sandbox``) each open the document, take blocks of pages
as the parent hands them out and send back text lines with their positions (JSON).
Every worker runs under an address-space limit (RLIMIT_AS) and a CPU limit; the parent
enforces a whole-document timeout and a per-page stall timeout and kills the workers
when either passes. A hostile file therefore ends in a clear error while the service
keeps serving.

Limits (environment):
    NOVELCRAFTER_EXTRACT_WORKERS       worker processes (default: the usable cores)
    NOVELCRAFTER_EXTRACT_MEMORY_MB     address-space limit per worker (default 512; books need ~150)
    NOVELCRAFTER_EXTRACT_TIMEOUT       seconds for the whole document (default 300)
    NOVELCRAFTER_EXTRACT_PAGE_TIMEOUT  seconds a worker may spend on one page (default 30)
    NOVELCRAFTER_MAX_PAGES             pages a PDF may have (default 5000)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

from novelcrafter.config import IngestSettings, get_settings
from novelcrafter.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NovelCrafterError,
    ResourceExhausted,
)
from novelcrafter.logs import get_logger, kv

log = get_logger(__name__)

Line = tuple[float, float, float, float, float, str, int]  # x0, y0, x1, y1, size, text, flags
Progress = Callable[[str, int, int], None]
Cancelled = Callable[[], bool]  # True once the caller has gone away (a gRPC client gave up)


@dataclass
class Page:
    index: int
    width: float
    height: float
    lines: list[Line]
    images: list[tuple[float, float, float, float]]
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Extraction:
    pages: list[Page]
    title: str | None
    warnings: list[str] = field(default_factory=list)
    repaired: bool = False
    seconds: float = 0.0
    workers: int = 0

    @property
    def page_count(self) -> int:
        return len(self.pages)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    workers: int
    memory_mb: int = 512
    timeout_s: float = 300.0
    page_timeout_s: float = 30.0
    max_pages: int = 5000

    @classmethod
    def from_env(cls) -> Limits:
        """The limits the settings give (``IngestSettings``: ``NOVELCRAFTER_EXTRACT_*``, ``…_MAX_PAGES``)."""
        settings = get_settings(IngestSettings)
        workers = int(settings.extract_workers) or usable_cores()
        return cls(
            workers=max(1, min(workers, 32)),
            memory_mb=int(settings.extract_memory_mb),
            timeout_s=settings.extract_timeout,
            page_timeout_s=settings.extract_page_timeout,
            max_pages=int(settings.max_pages),
        )


def sniff(data: bytes) -> None:
    """Refuse what is plainly not a PDF before starting any worker."""
    if not data:
        raise InvalidArgument("not a PDF: the file is empty")
    if b"%PDF-" not in data[:1024]:
        raise InvalidArgument("not a PDF: no %PDF header at the start of the file")


def _error(kind: str, message: str, limits: Limits) -> NovelCrafterError:
    if kind in ("encrypted", "password"):
        return FailedPrecondition(message)
    if kind == "memory":
        return ResourceExhausted(
            f"extracting the PDF needed more than {limits.memory_mb} MB of memory "
            "(NOVELCRAFTER_EXTRACT_MEMORY_MB): a decompression bomb or a hostile file?"
        )
    if kind == "too_many_pages":
        return ResourceExhausted(message)
    return InvalidArgument(message)


PAGES_PER_BLOCK = 4


class _Worker:
    """One ``python -m novelcrafter.ingest.extract_sandbox`` process and its JSON-lines pipe."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "novelcrafter.ingest.extract_sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a signal to the service's group does not hit the workers twice
        )
        self._buffer = b""
        self.last_seen = time.monotonic()
        self.ready = False
        self.done = False
        self.send(spec)

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; its closed stdout tells the reader why

    def finish(self) -> None:
        self.done = True
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def read(self) -> list[dict[str, Any]] | None:
        """Complete messages now available; None at end of stream (the worker exited)."""
        chunk = os.read(self.fileno(), 1 << 20)
        if not chunk:
            return None
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        self.last_seen = time.monotonic()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except ValueError:
            return None  # not our protocol: treated like a worker that died

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def extract_pdf(
    data: bytes,
    *,
    password: str | None = None,
    limits: Limits | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> Extraction:
    """Text lines of every page. Raises a domain error (with a readable message) on bad input;
    :class:`Aborted` (workers stopped) as soon as ``cancelled()`` turns true."""
    limits = limits or Limits.from_env()
    sniff(data)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nc-extract-") as tmp:
        path = Path(tmp) / "book.pdf"
        path.write_bytes(data)
        spec = {
            "path": str(path),
            "password": password,
            "memory_mb": limits.memory_mb,
            "cpu_seconds": int(limits.timeout_s) + 10,
            "max_pages": limits.max_pages,
        }
        workers: list[_Worker] = []
        try:
            for index in range(limits.workers):
                workers.append(_Worker({**spec, "meta": index == 0}))
            result = _gather(workers, limits, progress, started, cancelled or (lambda: False))
        finally:
            for worker in workers:
                worker.kill()
    result.seconds = time.monotonic() - started
    result.workers = len(workers)
    log.info(
        "extracted",
        extra=kv(pages=result.page_count, workers=result.workers, seconds=round(result.seconds, 2)),
    )
    return result


def _gather(
    workers: list[_Worker], limits: Limits, progress: Progress | None, started: float, cancelled: Cancelled
) -> Extraction:
    """Hand out blocks of pages to whichever worker is ready; collect pages; enforce the limits."""
    pages: dict[int, Page] = {}
    meta: dict[str, Any] | None = None
    next_page = 0
    deadline = started + limits.timeout_s
    while not all(w.done for w in workers):
        now = time.monotonic()
        if cancelled():
            raise Aborted("ingest cancelled: the client went away")
        if now > deadline:
            raise ResourceExhausted(
                f"extraction took longer than {limits.timeout_s:g} s (NOVELCRAFTER_EXTRACT_TIMEOUT): "
                "the PDF is too large or hostile"
            )
        for w in workers:
            if not w.done and now - w.last_seen > limits.page_timeout_s:
                raise ResourceExhausted(
                    f"one page took longer than {limits.page_timeout_s:g} s to read "
                    "(NOVELCRAFTER_EXTRACT_PAGE_TIMEOUT): the PDF is hostile or damaged"
                )
        active = [w for w in workers if not w.done]
        for w in wait_ready(active, timeout=0.5):
            messages = w.read()
            if messages is None:
                raise _crashed(w, limits)
            for message in messages:
                kind = message.get("t")
                if kind == "page":
                    pages[message["i"]] = Page(
                        message["i"],
                        message["w"],
                        message["h"],
                        [tuple(line) for line in message["l"]],
                        [tuple(box) for box in message["img"]],
                        message["e"],
                        list(message.get("n") or []),
                    )
                    if progress is not None and meta is not None:
                        progress("extract", len(pages), meta["pages"])
                elif kind == "meta":
                    if meta is None or message.get("title"):
                        meta = message
                    w.ready = True
                elif kind == "ready":
                    w.ready = True
                elif kind == "error":
                    raise _error(message.get("kind", "damaged"), message.get("message", ""), limits)
                if w.ready and meta is not None:
                    w.ready = False
                    if next_page < meta["pages"]:
                        w.send({"block": [next_page, next_page + PAGES_PER_BLOCK]})
                        next_page += PAGES_PER_BLOCK
                    else:
                        w.finish()
    assert meta is not None  # every worker reports meta before it can finish
    ordered = [pages[i] for i in range(meta["pages"]) if i in pages]
    warnings: list[str] = []
    if meta.get("repaired"):
        warnings.append(
            "the PDF is damaged or truncated (no valid cross-reference table): recovered what was readable"
        )
    notes: dict[str, list[int]] = {}
    for page in ordered:
        for note in page.notes:
            notes.setdefault(note, []).append(page.index + 1)
    for note, numbers in notes.items():
        shown = ", ".join(map(str, numbers[:5])) + (" …" if len(numbers) > 5 else "")
        warnings.append(f"page{'s' if len(numbers) > 1 else ''} {shown}: {note}")
    failed = [p for p in ordered if p.error]
    if failed:
        first = failed[0]
        warnings.append(
            f"{len(failed)} of {len(ordered)} pages could not be read and were skipped "
            f"(first: page {first.index + 1}: {first.error})"
        )
    return Extraction(
        pages=ordered, title=meta.get("title"), warnings=warnings, repaired=bool(meta.get("repaired"))
    )


def _crashed(w: _Worker, limits: Limits) -> NovelCrafterError:
    try:
        code = w.proc.wait(5)
    except subprocess.TimeoutExpired:
        code = None
    if code == -24:  # SIGXCPU
        return ResourceExhausted(
            f"extraction used more CPU time than allowed ({limits.timeout_s:g} s): "
            "the PDF is hostile or too large"
        )
    return ResourceExhausted(
        f"an extraction worker died (exit code {code}) — over its {limits.memory_mb} MB memory limit "
        "(NOVELCRAFTER_EXTRACT_MEMORY_MB)? The PDF looks hostile or damaged"
    )
