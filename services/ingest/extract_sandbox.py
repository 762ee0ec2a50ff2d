"""Runs INSIDE an extraction worker process: open the PDF, read pages, send lines back.

Started as ``python -m novelcrafter.ingest.extract_sandbox``; imports only stdlib and pdfminer. Each
worker caps its own address space and CPU time first, so a decompression bomb or a
content-stream loop ends in that worker, never in the service that started it.

Protocol (JSON lines): stdin gets the job spec, then ``{"block": [start, stop]}`` commands;
stdout answers ``meta`` (page count, title), one ``page`` per page read, ``ready`` after each
block, or one ``error`` (kind, message) before exiting. A line is
``[x0, y0, x1, y1, size, text, flags]`` in PDF points (origin bottom-left). With
``FLAG_RAISED`` set, runs of the text between ``RAISED_OPEN`` and ``RAISED_CLOSE`` were set
smaller and above the line's baseline (superscripts: footnote marks, ordinals, "Mlle").
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import resource
import sys
from typing import Any

from pdfminer.pdfdevice import PDFTextDevice
from pdfminer.pdfdocument import PDFDocument, PDFEncryptionError, PDFPasswordIncorrect
from pdfminer.pdffont import PDFUnicodeNotDefined
from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
from pdfminer.pdfpage import PDFPage
from pdfminer.pdfparser import PDFParser
from pdfminer.psexceptions import PSException
from pdfminer.utils import apply_matrix_rect, decode_text, mult_matrix

FLAG_DROP_CAP = 1  # the line began with a large initial letter, joined to its word
FLAG_RAISED = 2  # the text holds superscript runs, delimited as below
RAISED_OPEN, RAISED_CLOSE = "\x02", "\x03"  # control characters: stripped from the PDF's own text
# A superscript: at most this share of its line's size, its baseline lifted by a share of that size.
SUPERSCRIPT_SIZE = 0.85
SUPERSCRIPT_RISE = (0.12, 0.75)
# Grouping characters into lines (multiples of the character size): wider gaps than
# CHAR_MARGIN split a line (columns, far-apart running-head parts), wider than WORD_GAP
# are a word space the PDF did not draw.
CHAR_MARGIN = 2.0
WORD_GAP = 0.12
BASELINE_TOLERANCE = 0.3


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


# --- pages ---------------------------------------------------------------------------------------

Char = tuple[float, float, float, float, float, float, str]  # x0, x1, y0, y1, baseline, size, text


class CharDevice(PDFTextDevice):
    """Records each character's box and text, and each image's box; nothing else.

    pdfminer's own pipeline builds an object per character and then a full layout (text
    boxes, their reading order); prose needs only lines, which :func:`group_lines` makes
    from plain tuples at a fraction of the cost. The arithmetic mirrors
    ``PDFTextDevice.render_string_horizontal`` and ``LTChar``.
    """

    def __init__(self, rsrcmgr: PDFResourceManager) -> None:
        super().__init__(rsrcmgr)
        self.chars: list[Char] = []
        self.images: list[tuple[float, float, float, float]] = []
        self.rotated = 0  # characters not on a horizontal baseline: not prose, skipped
        self._figures: list[tuple[Any, Any]] = []

    def begin_page(self, page: PDFPage, ctm: Any) -> None:
        self.chars, self.images, self.rotated, self._figures = [], [], 0, []

    def begin_figure(self, name: str, bbox: Any, matrix: Any) -> None:
        self._figures.append((bbox, mult_matrix(matrix, self.ctm)))

    def end_figure(self, name: str) -> None:
        if self._figures:
            self._figures.pop()

    def render_image(self, name: str, stream: Any) -> None:
        if self._figures:
            bbox, matrix = self._figures[-1]
            box = apply_matrix_rect(matrix, bbox)
            if math.isfinite(sum(box)):
                self.images.append(box)

    def render_string(self, textstate: Any, seq: Any, ncs: Any, graphicstate: Any) -> None:
        font = textstate.font
        if font is None or font.is_vertical():
            return  # vertical writing is not book prose in our languages
        a, b, c, d, e, f = mult_matrix(textstate.matrix, self.ctm)
        fontsize = textstate.fontsize
        scaling = textstate.scaling * 0.01
        charspace = textstate.charspace * scaling
        wordspace = 0 if font.is_multibyte() else textstate.wordspace * scaling
        dxscale = 0.001 * fontsize * scaling
        rise = textstate.rise
        low = font.get_descent() * fontsize + rise
        high = low + fontsize
        size = abs(d * fontsize)
        x, y = textstate.linematrix
        upright = b == 0 and d != 0
        # y is constant along a horizontal string: its box's vertical extent is computed once.
        y0, y1 = sorted((d * (y + low) + f, d * (y + high) + f))
        base = d * (y + rise) + f
        plain = upright and c == 0 and a > 0  # no skew, no mirroring: the common case
        chars = self.chars
        needcharspace = False
        for obj in seq:
            if isinstance(obj, (int, float)):
                x -= obj * dxscale
                needcharspace = True
                continue
            if not isinstance(obj, bytes):
                continue
            for cid in font.decode(obj):
                if needcharspace:
                    x += charspace
                try:
                    text = font.to_unichr(cid)
                except PDFUnicodeNotDefined:
                    text = f"(cid:{cid})"
                adv = font.char_width(cid) * fontsize * scaling
                if plain:
                    x0 = a * x + e
                    chars.append((x0, x0 + a * adv, y0, y1, base, size, text))
                elif upright:
                    x0 = a * x + c * (y + low) + e
                    x1 = a * (x + adv) + c * (y + high) + e
                    chars.append((min(x0, x1), max(x0, x1), y0, y1, base, size, text))
                else:
                    self.rotated += 1
                x += adv
                if cid == 32 and wordspace:
                    x += wordspace
                needcharspace = True
        textstate.linematrix = (x, y)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


_MARKERS = str.maketrans("", "", RAISED_OPEN + RAISED_CLOSE)


def _line(chars: list[Char], flags: int = 0, raised: set[int] | frozenset[int] = frozenset()) -> tuple:
    """One line tuple from characters sorted left to right: spaces where the PDF left gaps.

    Characters whose ``id`` is in ``raised`` are superscripts: they are delimited in the text
    and do not count towards the line's size and vertical extent.
    """
    plain = [ch for ch in chars if id(ch) not in raised] or chars
    size = _median([ch[5] for ch in plain])
    gap = WORD_GAP * size
    parts: list[str] = []
    prev: Char | None = None
    inside = False
    for ch in chars:
        up = id(ch) in raised
        if prev is not None and ch[0] - prev[1] > gap and prev[6] != " " and ch[6] != " ":
            parts.append(RAISED_CLOSE + " " if inside and not up else " ")
            inside = inside and up
        if up != inside:
            parts.append(RAISED_OPEN if up else RAISED_CLOSE)
            inside = up
        parts.append(ch[6].translate(_MARKERS))
        prev = ch
    if inside:
        parts.append(RAISED_CLOSE)
    text = "".join(parts).encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    if raised and any(id(ch) in raised for ch in chars):
        flags |= FLAG_RAISED
    bottom = _median([ch[2] for ch in plain])
    top = _median([ch[3] for ch in plain])
    return (chars[0][0], bottom, max(ch[1] for ch in chars), top, round(size, 2), text, flags)


def _raised_chars(groups: list[list[Char]]) -> set[int]:
    """Superscripts, merged into the line they belong to (``groups`` changes in place).

    A run set smaller and lifted above its neighbours' baseline, either inside a baseline
    group (a small rise) or as a group of its own just above a larger line (the usual footnote
    mark), whose characters all sit within that line's horizontal span.
    """
    raised: set[int] = set()
    stats = [(_median([ch[5] for ch in g]), _median([ch[4] for ch in g])) for g in groups]
    for group, (size, base) in zip(groups, stats, strict=True):
        for ch in group:
            if ch[5] <= SUPERSCRIPT_SIZE * size and ch[4] - base >= SUPERSCRIPT_RISE[0] * size:
                raised.add(id(ch))
    low, high = SUPERSCRIPT_RISE
    merged: set[int] = set()
    for i, (group, (size, base)) in enumerate(zip(groups, stats, strict=True)):
        if len(group) > 24:
            continue  # a line of text, not a few marks
        best = None
        # Groups are sorted by falling baseline: the line a mark sits on follows closely.
        for j in range(i + 1, min(len(groups), i + 8)):
            other_size, other_base = stats[j]
            rise = base - other_base
            if size > SUPERSCRIPT_SIZE * other_size:
                continue
            if not low * other_size <= rise <= high * other_size:
                continue
            left = min(ch[0] for ch in groups[j]) - other_size
            right = max(ch[1] for ch in groups[j]) + other_size
            if all(left <= ch[0] and ch[1] <= right for ch in group):
                best = j
                break
        if best is not None:
            groups[best].extend(group)
            raised.update(id(ch) for ch in group)
            merged.add(i)
    groups[:] = [g for k, g in enumerate(groups) if k not in merged]
    return raised


def group_lines(chars: list[Char]) -> list[tuple]:
    """Characters -> lines: same baseline, left to right, split at wide gaps.

    Vertical extents come from the median character, so a drop cap or a tall bracket does
    not make a line overlap its neighbours. A drop cap (one large letter beside the first
    lines of a paragraph) is joined to the word it begins.
    """
    # Hostile matrices give NaN or infinite positions: such characters have no place on a line.
    chars = [ch for ch in chars if ch[6] and math.isfinite(ch[0] + ch[1] + ch[2] + ch[3] + ch[4] + ch[5])]
    if not chars:
        return []
    typical = _median([ch[5] for ch in chars])
    big = [ch for ch in chars if ch[5] > 1.8 * typical and ch[6].isalpha() and len(ch[6]) == 1]
    # A drop cap stands alone: no other large glyph on its baseline beside it (a title's do).
    drop_caps = [
        ch
        for ch in big
        if not any(
            o is not ch
            and abs(o[4] - ch[4]) < 0.3 * ch[5]
            and min(abs(o[0] - ch[1]), abs(ch[0] - o[1])) < ch[5]
            for o in big
        )
    ]
    if drop_caps:
        chars = [ch for ch in chars if not any(ch is cap for cap in drop_caps)]
    chars.sort(key=lambda ch: (-ch[4], ch[0]))
    groups: list[list[Char]] = []
    for ch in chars:
        if groups and abs(groups[-1][0][4] - ch[4]) <= BASELINE_TOLERANCE * max(ch[5], 1.0):
            groups[-1].append(ch)
        else:
            groups.append([ch])
    raised = _raised_chars(groups)
    lines: list[tuple] = []
    for group in groups:
        group.sort(key=lambda ch: ch[0])
        start = 0
        for i in range(1, len(group)):
            if group[i][0] - group[i - 1][1] > CHAR_MARGIN * max(group[i][5], group[i - 1][5]):
                lines.append(_line(group[start:i], raised=raised))
                start = i
        lines.append(_line(group[start:], raised=raised))
    for cap in drop_caps:
        x0, x1, y0, y1, _, size, letter = cap
        beside = [
            (i, ln)
            for i, ln in enumerate(lines)
            if y0 - 0.2 * size <= ln[1] <= y1 and 0 <= ln[0] - x1 < size and ln[5][:1].isalpha()
        ]
        if beside:
            i, ln = max(beside, key=lambda item: item[1][1])  # the top one
            # An opening quote set before the drop cap ("“" + "O" + "pen the gate") joins too.
            quote = next(
                (
                    j
                    for j, q in enumerate(lines)
                    if len(q[5]) <= 2
                    and not any(c.isalnum() for c in q[5])
                    and abs(q[1] - ln[1]) < 0.5 * ln[4]
                    and -0.2 * size <= x0 - q[2] < size
                ),
                None,
            )
            prefix, start = (lines[quote][5], lines[quote][0]) if quote is not None else ("", x0)
            lines[i] = (start, ln[1], ln[2], ln[3], ln[4], prefix + letter + ln[5], ln[6] | FLAG_DROP_CAP)
            if quote is not None:
                del lines[quote]
        else:
            lines.append((x0, y0, x1, y1, round(size, 2), letter, 0))
    return lines


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


def read_page(interpreter: PDFPageInterpreter, device: CharDevice, index: int, page: PDFPage) -> tuple:
    x0, y0, x1, y1 = page.mediabox
    lines: list = []
    images: list = []
    NOTES.notes.clear()
    try:
        interpreter.process_page(page)
        lines = [ln for ln in group_lines(device.chars) if ln[5].strip()]
        images = device.images
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
    device = CharDevice(rsrcmgr)
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
    logging.disable(logging.DEBUG)  # pdfminer's parser asks about debug logging per token
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
