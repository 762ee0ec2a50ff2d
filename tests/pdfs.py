"""PDFs the ingest tests build themselves: small book-like files with known content
(fpdf2, a real TrueType font), and hostile files written object by object."""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# --- book-like PDFs (fpdf2) --------------------------------------------------------------------------

PAGE_W, PAGE_H = 148.0, 210.0  # mm (A5)
LEFT, RIGHT, TOP, BOTTOM = 20.0, 20.0, 28.0, 185.0  # the text frame (baselines between TOP and BOTTOM)
BODY_PT = 11.0
LEADING = 5.6
INDENT = 6.0
HEAD_Y = 14.0
FOLIO_Y = 198.0
NOTE_PT = 8.5  # footnotes
NOTE_LEADING = 3.8
MARK_PT = 6.5  # raised footnote marks
_MARK_RE = re.compile(r"\[\^([^\]]+)\]")


def font_path(style: str = "") -> str:
    """DejaVu Serif from matplotlib's data (a project dependency): quotes, æ and ﬁ/ﬂ glyphs."""
    import matplotlib

    name = {"": "DejaVuSerif.ttf", "I": "DejaVuSerif-Italic.ttf", "B": "DejaVuSerif-Bold.ttf"}[style]
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


@dataclass
class Heading:
    text: str
    new_page: bool = True


@dataclass
class Picture:
    caption: list[str]  # caption lines, set small and centred under the picture


@dataclass
class Paragraph:
    """Body text. ``lines`` fixes the line breaks exactly (e.g. ``["… ac-", "quaintance …"]``);
    otherwise ``text`` is wrapped to the frame. ``[^1]`` in the text is a footnote mark, set
    small and raised (or, with ``marks="inline"``, in the body size after a space), whose note
    ``notes["1"]`` is set small at the foot of the same page. ``size`` sets the whole paragraph
    smaller (a quotation in small type)."""

    text: str = ""
    lines: list[str] | None = None
    indent: bool = True
    notes: dict[str, str] = field(default_factory=dict)
    marks: str = "raised"  # raised | inline
    raised_labels: bool = True  # the notes' labels raised (LaTeX) or set on the line ("1 Text")
    size: float | None = None


@dataclass
class PageBreak:
    pass


@dataclass
class LeaderList:
    """A contents page or a list of illustrations: each entry's lines (a caption may wrap),
    a dot leader and its page number (or a word, e.g. "Frontispiece")."""

    title: str
    entries: list[tuple[list[str], str]]
    column_head: str | None = None


@dataclass
class Columns:
    """A pronunciation guide or glossary: a title, key lines, then entries set in columns."""

    title: str
    key: list[str]
    rows: list[list[str]]


@dataclass
class Book:
    blocks: list[Heading | Picture | Paragraph | PageBreak | LeaderList | Columns]
    title: str = "The Lighthouse Keeper"
    author: str = "A. N. Author"
    running_head: str | None = "THE LIGHTHOUSE KEEPER"
    folios: bool = True
    title_page: bool = False
    contents: list[str] = field(default_factory=list)
    ligatures: bool = False


def _ligate(text: str) -> str:
    return text.replace("ffi", "\ufb03").replace("fi", "\ufb01").replace("fl", "\ufb02")


def _wrap(pdf, text: str, width: float, first_indent: float) -> list[str]:  # type: ignore[no-untyped-def]
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        indent = first_indent if not lines else 0.0
        if current and pdf.get_string_width(candidate) > width - indent:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def book_pdf(book: Book) -> bytes:
    """Typeset ``book``: running head above the frame, folio below it, indented paragraphs."""
    from fpdf import FPDF

    pdf = FPDF(unit="mm", format=(PAGE_W, PAGE_H))
    pdf.set_auto_page_break(False)
    pdf.set_title(book.title)
    for style in ("", "I", "B"):
        pdf.add_font("Serif", style, font_path(style))
    width = PAGE_W - LEFT - RIGHT
    folio = 0
    y = BOTTOM + 1  # forces a first page
    notes: list[tuple[str, list[str], bool]] = []  # this page's footnotes: label, lines, raised label

    def notes_height(extra: list[tuple[str, list[str], bool]] = ()) -> float:  # type: ignore[assignment]
        lines = sum(len(n[1]) for n in [*notes, *extra])
        return 0.0 if not lines else 4.0 + NOTE_LEADING * lines

    def flush_notes() -> None:
        if not notes:
            return
        ny = BOTTOM - NOTE_LEADING * (sum(len(n[1]) for n in notes) - 1)
        pdf.set_line_width(0.2)
        pdf.line(LEFT, ny - 5.0, LEFT + 30, ny - 5.0)
        for label, lines, raised in notes:
            for n, line in enumerate(lines):
                x = LEFT + 3.0
                if n == 0:
                    if raised:
                        pdf.set_font("Serif", "", MARK_PT)
                        pdf.text(x - pdf.get_string_width(label) - 0.4, ny - 1.4, label)
                    else:
                        pdf.set_font("Serif", "", NOTE_PT)
                        pdf.text(LEFT, ny, label)
                pdf.set_font("Serif", "", NOTE_PT)
                pdf.text(x, ny, line)
                ny += NOTE_LEADING
        notes.clear()

    def new_page(chapter_opening: bool = False) -> None:
        nonlocal folio, y
        flush_notes()
        pdf.add_page()
        folio += 1
        if book.running_head and not chapter_opening:
            pdf.set_font("Serif", "I", 8.5)
            pdf.text((PAGE_W - pdf.get_string_width(book.running_head)) / 2, HEAD_Y, book.running_head)
        if book.folios:
            pdf.set_font("Serif", "", 9)
            pdf.text((PAGE_W - pdf.get_string_width(str(folio))) / 2, FOLIO_Y, str(folio))
        y = TOP

    if book.title_page:
        pdf.add_page()
        pdf.set_font("Serif", "B", 20)
        pdf.text((PAGE_W - pdf.get_string_width(book.title)) / 2, 70, book.title)
        pdf.set_font("Serif", "", 12)
        pdf.text((PAGE_W - pdf.get_string_width(book.author)) / 2, 90, book.author)
    if book.contents:
        pdf.add_page()
        pdf.set_font("Serif", "B", 14)
        pdf.text((PAGE_W - pdf.get_string_width("Contents")) / 2, 40, "Contents")
        pdf.set_font("Serif", "", BODY_PT)
        for i, entry in enumerate(book.contents):
            number = str(3 * i + 1)
            row_y = 55 + 8 * i
            pdf.text(LEFT, row_y, entry)
            pdf.text(PAGE_W - RIGHT - pdf.get_string_width(number), row_y, number)
            x = LEFT + pdf.get_string_width(entry) + 2
            while x < PAGE_W - RIGHT - pdf.get_string_width(number) - 3:
                pdf.text(x, row_y, ".")
                x += 2.5

    def draw(x: float, y: float, line: str, paragraph: Paragraph, size: float) -> None:
        """A body line; ``[^label]`` marks drawn raised and small (or inline)."""
        for n, piece in enumerate(_MARK_RE.split(line)):
            if n % 2:
                if paragraph.marks == "inline":
                    x += pdf.get_string_width(" ")
                    pdf.text(x, y, piece)
                    x += pdf.get_string_width(piece)
                else:
                    pdf.set_font("Serif", "", MARK_PT)
                    pdf.text(x + 0.2, y - 1.8, piece)
                    x += pdf.get_string_width(piece) + 0.3
                    pdf.set_font("Serif", "", size)
            elif piece:
                text = _ligate(piece) if book.ligatures else piece
                pdf.text(x, y, text)
                x += pdf.get_string_width(text)

    for block in book.blocks:
        if isinstance(block, PageBreak):
            new_page(chapter_opening=True)
        elif isinstance(block, LeaderList):
            new_page(chapter_opening=True)
            pdf.set_font("Serif", "B", 13)
            pdf.text((PAGE_W - pdf.get_string_width(block.title)) / 2, y + 6, block.title)
            y += 6 + 3 * LEADING
            if block.column_head:
                pdf.set_font("Serif", "", 8)
                pdf.text(
                    PAGE_W - RIGHT - pdf.get_string_width(block.column_head), y - LEADING, block.column_head
                )
            pdf.set_font("Serif", "", BODY_PT - 1)
            for lines, number in block.entries:
                for n, line in enumerate(lines):
                    if y > BOTTOM:
                        new_page(chapter_opening=True)
                        pdf.set_font("Serif", "", BODY_PT - 1)
                    indent = 0.0 if n == 0 else 4.0
                    pdf.text(LEFT + indent, y, line)
                    if n == len(lines) - 1:
                        right = PAGE_W - RIGHT - pdf.get_string_width(number)
                        pdf.text(right, y, number)
                        x = LEFT + indent + pdf.get_string_width(line) + 2
                        while x < right - 3:
                            pdf.text(x, y, ".")
                            x += 2.2
                    y += LEADING
                y += 1.5
        elif isinstance(block, Columns):
            new_page(chapter_opening=True)
            pdf.set_font("Serif", "B", 13)
            pdf.text((PAGE_W - pdf.get_string_width(block.title)) / 2, y + 6, block.title)
            y += 6 + 2.5 * LEADING
            pdf.set_font("Serif", "", BODY_PT - 1.5)
            for key in block.key:
                pdf.text((PAGE_W - pdf.get_string_width(key)) / 2, y, key)
                y += LEADING
            y += LEADING
            column = width / max(len(r) for r in block.rows)
            for cells in block.rows:
                if y > BOTTOM:
                    new_page()
                    pdf.set_font("Serif", "", BODY_PT - 1.5)
                for c, cell in enumerate(cells):
                    pdf.text(LEFT + c * column, y, cell)
                y += LEADING
        elif isinstance(block, Heading):
            if block.new_page or y > BOTTOM - 3 * LEADING:
                new_page(chapter_opening=True)
                y = TOP + 20
            pdf.set_font("Serif", "B", 15)
            pdf.text((PAGE_W - pdf.get_string_width(block.text)) / 2, y, block.text)
            y += 3 * LEADING
        elif isinstance(block, Picture):
            if y > BOTTOM - 60:
                new_page()
            from PIL import Image

            image = Image.new("RGB", (32, 24), (90, 110, 130))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pdf.image(buffer, x=LEFT + 15, y=y, w=width - 30, h=40)
            y += 40 + LEADING + 2
            pdf.set_font("Serif", "I", 8.5)
            for caption in block.caption:
                pdf.text((PAGE_W - pdf.get_string_width(caption)) / 2, y, caption)
                y += 4.2
            y += LEADING
        else:
            size = block.size or BODY_PT
            leading = LEADING * size / BODY_PT
            pdf.set_font("Serif", "", size)
            indent = INDENT if block.indent else 0.0
            lines = block.lines or _wrap(pdf, block.text, width, indent)
            for n, line in enumerate(lines):
                pending = []
                for label in _MARK_RE.findall(line):
                    pdf.set_font("Serif", "", NOTE_PT)
                    pending.append(
                        (label, _wrap(pdf, block.notes[label], width - 3.0, 0.0), block.raised_labels)
                    )
                    pdf.set_font("Serif", "", size)
                if y > BOTTOM - notes_height(pending):
                    new_page()
                    pdf.set_font("Serif", "", size)
                notes.extend(pending)
                draw(LEFT + (indent if n == 0 else 0.0), y, line, block, size)
                y += leading
    flush_notes()
    return bytes(pdf.output())


def _measure(size: float):  # type: ignore[no-untyped-def]
    from fpdf import FPDF

    pdf = FPDF(unit="mm", format=(PAGE_W, PAGE_H))
    pdf.add_font("Serif", "", font_path(""))
    pdf.set_font("Serif", "", size)
    return pdf


def lines_of(paragraph: Paragraph) -> list[str]:
    """The lines :func:`book_pdf` sets ``paragraph`` in (marks still in them)."""
    if paragraph.lines:
        return list(paragraph.lines)
    pdf = _measure(paragraph.size or BODY_PT)
    return _wrap(pdf, paragraph.text, PAGE_W - LEFT - RIGHT, INDENT if paragraph.indent else 0.0)


def footnote_lines(paragraph: Paragraph) -> list[str]:
    """The lines :func:`book_pdf` sets the notes of ``paragraph`` in."""
    pdf = _measure(NOTE_PT)
    return [
        line
        for text in paragraph.notes.values()
        for line in _wrap(pdf, text, PAGE_W - LEFT - RIGHT - 3.0, 0.0)
    ]


def unmarked(text: str) -> str:
    """A paragraph's text as the reader should get it: footnote marks taken out."""
    return _MARK_RE.sub("", text)


SENTENCES = [  # each last word also appears mid-sentence, as in real prose (Punkt learns from it)
    "The lamp burned for {n} hours above the harbour, and Mr. Hale watched the sea.",
    "Mrs. Hale was sure of it, and she asked whether the {n} boats on the sea were in.",
    "“They are all in but one,” he said, and he pointed at the rocks beyond St. Agnes Point, {n} miles out.",
    "Dr. Morrow came up the path at dawn with his bag and his lantern on day {n}.",
    "“Poor devil!” he said, when he heard of the boat missing since day {n}.",
    "The wind dropped before noon, and {n} gulls came out to the rocks.",
    "Nobody in the village could remember a quieter morning in {n} years.",
    "She had counted the boats for {n} years, to be sure.",
]


def sentences(count: int, start: int = 0) -> list[str]:
    """Deterministic dialogue-rich sentences; each is unique (it carries its number)."""
    return [SENTENCES[k % len(SENTENCES)].format(n=k + 1) for k in range(start, start + count)]


def prose(paragraphs: int, sentences_per_paragraph: int = 4, start: int = 0) -> list[Paragraph]:
    """Paragraphs of :func:`sentences`; ``start`` counts sentences."""
    flat = sentences(paragraphs * sentences_per_paragraph, start)
    return [
        Paragraph(" ".join(flat[i : i + sentences_per_paragraph]))
        for i in range(0, len(flat), sentences_per_paragraph)
    ]


# --- hostile PDFs (written object by object) --------------------------------------------------------


def raw_pdf(objects: dict[int, bytes], root: int = 1) -> bytes:
    """A PDF from numbered object bodies, with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    size = max(objects) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        if number in offsets:
            out += b"%010d 00000 n \n" % offsets[number]
        else:
            out += b"0000000000 65535 f \n"
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, root, xref)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), extra) + data + b"\nendstream"


_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def _text_page(parent: int, contents: int, font: int) -> bytes:
    return (
        b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 300 300] /Contents %d 0 R "
        b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (parent, contents, font)
    )


def bomb_pdf(gigabytes: float = 3.0) -> bytes:
    """One page whose content stream inflates (FlateDecode) to ``gigabytes`` GB of spaces.

    The deflate data is built block by block (each block is 1 MiB of spaces after a full
    flush, so every block's bytes are the same), then framed with a correct zlib header and
    Adler-32: a valid stream of about a thousandth of its inflated size.
    """
    chunk = b" " * (1 << 20)
    blocks = int(gigabytes * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressor.compress(chunk)
    compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(chunk, adler)
    deflated = b"\x78\xda" + block * blocks + compressor.flush(zlib.Z_FINISH) + struct.pack(">I", adler)
    return raw_pdf(
        {
            1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            3: _text_page(2, 4, 5),
            4: _stream(deflated, b"/Filter /FlateDecode"),
            5: _FONT,
        }
    )


def many_pages_pdf(pages: int = 20_000) -> bytes:
    """``pages`` pages that all share one small content stream."""
    kids = b" ".join(b"%d 0 R" % (10 + i) for i in range(pages))
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        3: _stream(b"BT /F1 12 Tf 20 250 Td (A page of a very long book.) Tj ET"),
        4: _FONT,
    }
    for i in range(pages):
        objects[10 + i] = _text_page(2, 3, 4)
    return raw_pdf(objects)


def page_tree_cycle_pdf() -> bytes:
    """A page tree whose node lists itself (and its parent) among its kids."""
    return raw_pdf(
        {
            1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R 2 0 R 5 0 R] /Count 3 >>",
            3: b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 /Parent 2 0 R >>",
            5: _text_page(2, 6, 7),
            6: _stream(b"BT /F1 12 Tf 20 250 Td (Hello from a looping page tree.) Tj ET"),
            7: _FONT,
        }
    )


def xobject_explosion_pdf(depth: int = 40) -> bytes:
    """Form XObjects that each draw the next one twice: 2**depth drawings, no cycle to refuse."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 300] /Contents 4 0 R "
        b"/Resources << /XObject << /X 10 0 R >> /Font << /F1 5 0 R >> >> >>",
        4: _stream(b"/X Do"),
        5: _FONT,
    }
    for level in range(depth):
        number = 10 + level
        if level + 1 < depth:
            body = b"/Y Do /Y Do"
            resources = b"/Resources << /XObject << /Y %d 0 R >> >>" % (number + 1)
        else:
            body = b"BT /F1 1 Tf (x) Tj ET"
            resources = b"/Resources << /Font << /F1 5 0 R >> >>"
        objects[number] = _stream(body, b"/Type /XObject /Subtype /Form /BBox [0 0 300 300] " + resources)
    return raw_pdf(objects)
