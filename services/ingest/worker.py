"""Runs INSIDE an extraction worker process: open the PDF, read pages, send lines back.

Started as ``python -m novelcrafter.ingest.worker``; imports only stdlib and pdfminer. Each
worker caps its own address space and CPU time first, so a decompression bomb or a
content-stream loop ends in that worker, never in the service that started it.

Protocol (JSON lines): stdin gets the job spec, then ``{"block": [start, stop]}`` commands;
stdout answers ``meta`` (page count, title), one ``page`` per page read, ``ready`` after each
block, or one ``error`` (kind, message) before exiting. A line is
``[x0, y0, x1, y1, size, text, flags]`` in PDF points (origin bottom-left).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import sys
from typing import Any

from pdfminer.converter import PDFPageAggregator
from pdfminer.layout import LAParams, LTAnno, LTChar, LTFigure, LTImage, LTTextBox, LTTextLineHorizontal
from pdfminer.pdfdocument import PDFDocument, PDFEncryptionError, PDFPasswordIncorrect
from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
from pdfminer.pdfpage import PDFPage
from pdfminer.pdfparser import PDFParser
from pdfminer.psexceptions import PSException
from pdfminer.utils import decode_text

# Book prose: one column, horizontal lines. boxes_flow=None skips pdfminer's costly text-box
# ordering; rows are ordered by position in ``clean`` instead. all_texts reads text drawn inside
# form XObjects too (some producers put every page in one).
LAPARAMS = LAParams(
    line_overlap=0.5,
    char_margin=2.0,
    line_margin=0.5,
    word_margin=0.1,
    boxes_flow=None,
    detect_vertical=False,
    all_texts=True,
)
FLAG_DROP_CAP = 1  # the line began with a large initial letter, joined to its word


class WorkerError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def set_limits(memory_mb: int, cpu_seconds: int) -> None:
    """Cap this process: allocations beyond the limit fail (MemoryError), CPU beyond it is SIGXCPU."""
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if cpu_seconds > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))


# --- opening ---------------------------------------------------------------------------------------

_OBJ_RE = re.compile(rb"(?<![0-9])(\d{1,9})\s+(\d{1,5})\s+obj\b")
_CATALOG_RE = re.compile(rb"/Type\s*/Catalog\b")
_PAGE_RE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def repair(data: bytes) -> bytes | None:
    """Give a damaged or truncated PDF a trailer again so its surviving objects can be read.

    Keeps everything up to the last complete object, then appends a trailer naming the
    catalog, or (catalog lost) a new page tree over the page objects that survived.
    None when nothing usable survived (e.g. the pages lived in object streams at the end).
    """
    end = data.rfind(b"endobj")
    if end < 0:
        return None
    body = data[: end + len(b"endobj")]
    catalog = None
    pages: list[int] = []
    max_id = 0
    for match in _OBJ_RE.finditer(body):
        obj_id = int(match.group(1))
        max_id = max(max_id, obj_id)
        stop = body.find(b"endobj", match.end())
        head = body[match.end() : min(stop if stop >= 0 else len(body), match.end() + 4096)]
        head = head.split(b"stream", 1)[0]
        if catalog is None and _CATALOG_RE.search(head):
            catalog = obj_id
        elif _PAGE_RE.search(head):
            pages.append(obj_id)
    if catalog is None and not pages:
        return None
    tail = b"\n"
    if catalog is None:
        kids = b" ".join(b"%d 0 R" % p for p in pages)
        tree, catalog = max_id + 1, max_id + 2
        tail += b"%d 0 obj\n<< /Type /Pages /Kids [%s] /Count %d >>\nendobj\n" % (tree, kids, len(pages))
        tail += b"%d 0 obj\n<< /Type /Catalog /Pages %d 0 R >>\nendobj\n" % (catalog, tree)
        max_id += 2
    tail += b"trailer\n<< /Root %d 0 R /Size %d >>\n%%%%EOF\n" % (catalog, max_id + 1)
    return body + tail


def open_document(path: str, password: str | None) -> tuple[PDFDocument, bool]:
    """The parsed document and whether it had to be repaired. Raises WorkerError."""
    try:
        # The file stays open for the worker's life: pdfminer reads objects lazily.
        return PDFDocument(PDFParser(open(path, "rb")), password=password or ""), False
    except PDFPasswordIncorrect:
        raise _password_error(password)
    except PDFEncryptionError as exc:
        raise WorkerError("encrypted", f"the PDF uses an encryption pdfminer cannot open: {exc}")
    except (PSException, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        first_error = exc
    with open(path, "rb") as fh:
        fixed = repair(fh.read())
    if fixed is not None:
        try:
            return PDFDocument(PDFParser(io.BytesIO(fixed)), password=password or ""), True
        except PDFPasswordIncorrect:
            raise _password_error(password)
        except Exception:
            pass
    raise WorkerError(
        "damaged",
        "the PDF is damaged or truncated and no page could be recovered "
        f"(its document structure is missing: {_short(first_error)})",
    )


def _password_error(password: str | None) -> WorkerError:
    if password:
        return WorkerError("password", "wrong password for the encrypted PDF")
    return WorkerError("encrypted", "the PDF is encrypted: give its password with --password")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def list_pages(doc: PDFDocument, max_pages: int) -> list[PDFPage]:
    """The page objects, refusing more than ``max_pages`` (before parsing any content)."""
    pages: list[PDFPage] = []
    try:
        for page in PDFPage.create_pages(doc):
            pages.append(page)
            if len(pages) > max_pages:
                raise WorkerError(
                    "too_many_pages",
                    f"the PDF has more than {max_pages} pages, over the limit (NOVELCRAFTER_MAX_PAGES)",
                )
    except RecursionError:
        raise WorkerError("damaged", "the PDF's page tree is nested too deeply (damaged or hostile file)")
    except WorkerError:
        raise
    except (PSException, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        if not pages:
            raise WorkerError("damaged", f"the PDF's page tree cannot be read: {_short(exc)}")
    if not pages:
        raise WorkerError("damaged", "the PDF has no pages")
    return pages


def document_title(doc: PDFDocument) -> str | None:
    from pdfminer.pdftypes import resolve1

    try:
        for info in doc.info:
            value = resolve1(info.get("Title"))
            if isinstance(value, bytes):
                value = decode_text(value)
            if isinstance(value, str) and value.strip():
                return " ".join(value.split())[:300]
    except Exception:
        return None
    return None


# --- pages -----------------------------------------------------------------------------------------


def _line(line: LTTextLineHorizontal) -> tuple:
    chars = [c for c in line if isinstance(c, LTChar)]
    sizes = sorted(c.size for c in chars)
    size = sizes[len(sizes) // 2] if sizes else 0.0
    items = list(line)
    flags = 0
    # A drop cap ("I" two lines tall, then "n the days") is grouped with its line after a gap
    # that pdfminer turns into a space: join it back to its word.
    if (
        len(items) > 2
        and isinstance(items[0], LTChar)
        and isinstance(items[1], LTAnno)
        and items[0].get_text().isalpha()
        and size > 0
        and items[0].size > 1.6 * size
    ):
        text = items[0].get_text() + "".join(i.get_text() for i in items[2:])
        flags |= FLAG_DROP_CAP
    else:
        text = line.get_text()
    text = text.rstrip("\n").encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    # Vertical extent from the median character, so a drop cap or a tall bracket does not make
    # the line overlap its neighbours (rows are rebuilt from these positions).
    if chars:
        bottom = sorted(c.y0 for c in chars)[len(chars) // 2]
        top = sorted(c.y1 for c in chars)[len(chars) // 2]
    else:
        bottom, top = line.y0, line.y1
    return (line.x0, bottom, line.x1, top, round(size, 2), text, flags)


def _collect(container: Any, lines: list, images: list) -> None:
    for obj in container:
        if isinstance(obj, LTTextLineHorizontal):
            if obj.get_text().strip():
                lines.append(_line(obj))
        elif isinstance(obj, (LTTextBox, LTFigure)):
            if isinstance(obj, LTFigure) and any(isinstance(o, LTImage) for o in obj):
                images.append((obj.x0, obj.y0, obj.x1, obj.y1))
            _collect(obj, lines, images)
        elif isinstance(obj, LTImage):
            images.append((obj.x0, obj.y0, obj.x1, obj.y1))


# pdfminer logs (and otherwise survives) damage it met; the ones a user should hear about.
_NOTABLE = (
    ("Data-loss while decompressing", "a damaged compressed stream (some text was lost)"),
    ("circular reference", "content streams that call each other in a loop (hostile file?)"),
)


class _Notes(logging.Handler):
    """Collects pdfminer's warnings about the page being read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for needle, note in _NOTABLE:
            if needle in message and note not in self.notes:
                self.notes.append(note)


NOTES = _Notes()


def read_page(interpreter: PDFPageInterpreter, device: PDFPageAggregator, index: int, page: PDFPage) -> tuple:
    x0, y0, x1, y1 = page.mediabox
    lines: list = []
    images: list = []
    NOTES.notes.clear()
    try:
        interpreter.process_page(page)
        _collect(device.get_result(), lines, images)
        error = None
    except MemoryError:
        raise
    except RecursionError:
        error = "nested too deeply"
    except Exception as exc:  # one unreadable page must not lose the book
        error = _short(exc)
    return (index, abs(x1 - x0), abs(y1 - y0), lines, images, error, list(NOTES.notes))


# --- entry point -----------------------------------------------------------------------------------


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def serve(spec: dict) -> None:
    """Open the document, then read the page blocks the parent hands out on stdin."""
    set_limits(int(spec["memory_mb"]), int(spec["cpu_seconds"]))
    doc, repaired = open_document(spec["path"], spec.get("password"))
    pages = list_pages(doc, int(spec["max_pages"]))
    title = document_title(doc) if spec.get("meta") else None
    _send({"t": "meta", "pages": len(pages), "title": title, "repaired": repaired})
    rsrcmgr = PDFResourceManager(caching=True)
    device = PDFPageAggregator(rsrcmgr, laparams=LAPARAMS)
    interpreter = PDFPageInterpreter(rsrcmgr, device)
    for command in sys.stdin:
        start, stop = json.loads(command)["block"]
        for index in range(max(0, start), min(len(pages), stop)):
            index, width, height, lines, images, error, notes = read_page(
                interpreter, device, index, pages[index]
            )
            page = {"t": "page", "i": index, "w": width, "h": height, "l": lines, "img": images, "e": error}
            _send({**page, "n": notes})
        _send({"t": "ready"})


def main() -> None:
    """Worker main. The parent reads JSON lines from stdout (never pickles: this process
    handles hostile input, the parent must not trust it with more than data)."""
    pdfminer_log = logging.getLogger("pdfminer")
    pdfminer_log.handlers[:] = [NOTES]  # nothing on stderr; notable damage is reported per page
    pdfminer_log.propagate = False
    try:
        serve(json.loads(sys.stdin.readline()))
    except WorkerError as exc:
        _send({"t": "error", "kind": exc.kind, "message": exc.message})
    except MemoryError:
        _send({"t": "error", "kind": "memory", "message": ""})
    except RecursionError:
        _send({"t": "error", "kind": "damaged", "message": "the PDF is nested too deeply (damaged/hostile)"})
    except Exception as exc:
        _send({"t": "error", "kind": "damaged", "message": f"the PDF cannot be read: {_short(exc)}"})
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
