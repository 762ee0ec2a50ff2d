"""From positioned text lines to book prose: what is not the author's text goes, and is counted.

The book itself is the reference for every decision:

* the *text frame* (where full body lines start and end on most pages) separates running
  headers, footers and page numbers from the body, whatever their wording;
* the body font size and line spacing tell headings, captions and paragraph breaks apart;
* the book's own vocabulary decides whether a line-end hyphen is a syllable break
  (``ac- quaintance`` -> ``acquaintance``) or a real compound (``good-natured``, ``To-morrow``);
* the furniture of editions is told by its structure, in any language: publisher and
  transcriber notices by web addresses, the publisher's name taken from those addresses,
  runs of ``Label: value`` lines and their place before or after the body; lists of
  illustrations and contents by dot leaders and page numbers; pronunciation guides by columns
  dense in marks the book's prose does not use; footnotes by marks set small and raised, and
  bodies set small at the foot of the page, starting with a label the page refers to.

Every removal and change is counted into ``Cleaned.counts`` (the manifest's ``cleaning``).
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .extract import Line, Page
from .extract_sandbox import FLAG_DROP_CAP, FLAG_RAISED, RAISED_CLOSE, RAISED_OPEN

# --- characters ------------------------------------------------------------------------------------

LIGATURES = {
    "\ufb00": "ff",
    "\ufb01": "fi",
    "\ufb02": "fl",
    "\ufb03": "ffi",
    "\ufb04": "ffl",
    "\ufb05": "st",
    "\ufb06": "st",
    "\u0132": "IJ",
    "\u0133": "ij",
}
# Real letters that look like ligatures: never touched (æ in "hæmoglobin", œ in "manœuvre").
KEEP = set("æÆœŒßøØðÐþÞ")
DROP = {"\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"}  # soft hyphen, zero-width
_COMPAT_TAGS = ("<compat>", "<noBreak>", "<wide>", "<narrow>", "<font>")
_CID = re.compile(r"\(cid:\d+\)")
_SPACE_RUN = re.compile(r"[ \t]+")


def normalize_chars(text: str, counts: Counter[str]) -> str:
    """Ligatures -> letters, compatibility forms (NBSP, fullwidth, long s) -> plain ones."""
    if _CID.search(text):
        counts["unmapped_glyphs"] += len(_CID.findall(text))
        text = _CID.sub("", text)
    if text.isascii():
        return text
    out = []
    for ch in text:
        if ch in LIGATURES:
            counts["ligatures"] += 1
            out.append(LIGATURES[ch])
        elif ch in DROP:
            counts["compat_chars"] += 1
        elif ch in KEEP or ord(ch) < 0xA0:
            out.append(ch)
        elif ch in "\u2010\u2011":
            counts["compat_chars"] += 1
            out.append("-")
        else:
            decomposition = unicodedata.decomposition(ch)
            if decomposition.startswith(_COMPAT_TAGS) and ch != "…":
                replacement = unicodedata.normalize("NFKC", ch)
                counts["ligatures" if 0xFB00 <= ord(ch) <= 0xFB4F else "compat_chars"] += 1
                out.append(replacement)
            elif unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs"):
                counts["compat_chars"] += 1
            else:
                out.append(ch)
    return "".join(out)


# --- rows ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """A visual line of a page: the pdfminer lines that share one baseline, left to right."""

    page: int
    x0: float
    y0: float
    x1: float
    y1: float
    size: float
    text: str
    segments: list[str]
    ink: float = 0.0  # summed width of the segments (a header and its page number are far apart)
    # body | header | footer | page_number | heading | caption | front | back | toc | boilerplate
    # | illustration_list | glossary | footnote
    kind: str = "body"
    marks: list[str] = field(default_factory=list)  # footnote marks taken out of the text
    label: str | None = None  # a raised label the row began with (a footnote's "1")

    @property
    def width(self) -> float:
        return self.x1 - self.x0


_RAISED = re.compile(
    re.escape(RAISED_OPEN) + "([^" + RAISED_OPEN + RAISED_CLOSE + "]*)" + re.escape(RAISED_CLOSE)
)
_MARK = re.compile(r"^[\[(]?(\d{1,3}|[*†‡§¶‖]{1,3})[\])]?\.?$")  # a footnote mark in the text
_LABEL_MARK = re.compile(r"^[\[(]?(\d{1,3}|[*†‡§¶‖]{1,3}|[a-z])[\])]?\.?$")  # or a note's label


_SUPERSCRIPT_DIGITS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def take_raised(text: str) -> tuple[str, str | None, list[str]]:
    """Superscripts out of a line: (text, label it began with, footnote marks dropped).

    Digits and reference symbols after a word are footnote marks; a raised run at the start
    of the line labels a footnote; the rest is text set raised (1st, Mlle, x²) and stays.
    """
    out: list[str] = []
    label: str | None = None
    marks: list[str] = []
    position = 0
    last = ""  # the last character written that is not a space
    for match in _RAISED.finditer(text):
        between = text[position : match.start()]
        out.append(between)
        last = between.rstrip()[-1:] or last
        position = match.end()
        content = match.group(1).strip()
        if not content:
            continue
        if not last and label is None and (found := _LABEL_MARK.match(content)):
            label = found.group(1)
            continue
        mark = _MARK.match(content)
        if mark and not last.isdigit():
            marks.append(mark.group(1))
            continue
        if content.isdigit():
            content = content.translate(_SUPERSCRIPT_DIGITS)  # an exponent: 10²
        out.append(content)  # ordinals, abbreviations, exponents: part of the word before
        last = content[-1]
    out.append(text[position:])
    return _SPACE_RUN.sub(" ", "".join(out)).strip(), label, marks


def build_rows(page: Page, counts: Counter[str]) -> list[Row]:
    """Merge lines on the same baseline (pdfminer splits justified lines at wide gaps), top to bottom."""
    lines: list[Line] = []
    notes: dict[int, tuple[str | None, list[str]]] = {}  # per kept line: its label and marks
    for x0, y0, x1, y1, size, text, flags in page.lines:
        text = normalize_chars(text, counts)
        label, marks = None, []
        if flags & FLAG_RAISED:
            text, label, marks = take_raised(text)
            counts["footnote_marks"] += len(marks)
        text = _SPACE_RUN.sub(" ", text).strip()
        if text:
            line = (x0, y0, x1, y1, size, text, flags)
            lines.append(line)
            notes[id(line)] = (label, marks)
            if flags & FLAG_DROP_CAP:
                counts["drop_caps"] += 1
    lines.sort(key=lambda ln: -ln[1])
    groups: list[list[Line]] = []
    for line in lines:
        if groups:
            last = groups[-1]
            tolerance = 0.35 * max(1.0, min(line[4], last[0][4]))
            if abs(last[0][1] - line[1]) <= tolerance and not any(_overlaps_x(line, other) for other in last):
                last.append(line)
                continue
        groups.append([line])
    rows = []
    for group in groups:
        group.sort(key=lambda ln: ln[0])
        main = max(group, key=lambda ln: len(ln[5]))
        rows.append(
            Row(
                page=page.index,
                x0=min(ln[0] for ln in group),
                y0=main[1],
                x1=max(ln[2] for ln in group),
                y1=main[3],
                size=main[4],
                text=" ".join(ln[5] for ln in group),
                segments=[ln[5] for ln in group],
                ink=sum(ln[2] - ln[0] for ln in group),
                marks=[m for ln in group for m in notes[id(ln)][1]],
                label=notes[id(group[0])][0],
            )
        )
    rows.sort(key=lambda r: -r.y0)
    return rows


def _overlaps_x(a: Line, b: Line) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 1.0


# --- book geometry ---------------------------------------------------------------------------------


def _mode(values: Iterable[float], default: float) -> float:
    counter = Counter(values)
    return counter.most_common(1)[0][0] if counter else default


@dataclass
class Geometry:
    """Where the body text sits, learnt from the whole book."""

    size: float  # body font size
    leading: float  # baseline-to-baseline distance of body lines
    left: dict[int, float]  # left margin by page parity
    right: dict[int, float]  # right margin by page parity
    top: float | None  # top of the first body line on a typical page (None: no clear frame)
    bottom: float | None  # baseline of the last body line on a typical page
    para_indent: float

    def is_body_size(self, size: float) -> bool:
        return abs(size - self.size) <= 0.1 * self.size

    def margin(self, row: Row) -> tuple[float, float]:
        parity = row.page % 2
        return self.left.get(parity, self.left.get(1 - parity, 0.0)), self.right.get(
            parity, self.right.get(1 - parity, 0.0)
        )


def measure(pages: list[list[Row]]) -> Geometry:
    all_rows = [r for rows in pages for r in rows]
    weights: Counter[float] = Counter()
    for r in all_rows:
        weights[round(r.size, 1)] += len(r.text)
    size = weights.most_common(1)[0][0] if weights else 10.0
    body = [r for r in all_rows if abs(r.size - size) <= 0.1 * size]
    gaps = []
    for rows in pages:
        seq = [r for r in rows if abs(r.size - size) <= 0.1 * size]
        for a, b in itertools.pairwise(seq):
            gap = a.y0 - b.y0
            if 0.8 * size <= gap <= 2.5 * size:
                gaps.append(round(gap * 2) / 2)
    leading = _mode(gaps, 1.2 * size)
    left: dict[int, float] = {}
    right: dict[int, float] = {}
    for parity in (0, 1):
        rows = [r for r in body if r.page % 2 == parity]
        if rows:
            left[parity] = _mode((round(r.x0) for r in rows), 0.0)
            right[parity] = _mode((round(r.x1) for r in rows), 0.0)
    geometry = Geometry(size, leading, left, right, None, None, 1.5 * size)
    tops, bottoms, indents = [], [], []
    for rows in pages:
        seq = [r for r in rows if geometry.is_body_size(r.size) and not is_page_number(r.text)]
        full = [r for r in seq if _is_full(r, geometry)]
        if full:
            tops.append(full[0].y1)
            bottoms.append(seq[-1].y0)
        for r in seq:
            lm, _ = geometry.margin(r)
            indent = r.x0 - lm
            if 0.4 * size <= indent <= 4 * size:
                indents.append(round(indent))
    geometry.para_indent = _mode(indents, 1.5 * size)
    # The frame: full pages reach it, nothing but heads and folios lies beyond it. Percentiles
    # rather than extremes, so one odd page (a longer one, a plate) does not move it.
    if len(tops) >= 3:
        tops.sort()
        bottoms.sort()
        geometry.top = tops[int(0.9 * (len(tops) - 1))]
        geometry.bottom = bottoms[int(0.1 * (len(bottoms) - 1))]
    return geometry


def _is_full(row: Row, g: Geometry) -> bool:
    left, right = g.margin(row)
    width = right - left
    return width > 0 and row.ink >= 0.6 * width


# --- classification --------------------------------------------------------------------------------

_ROMAN = re.compile(r"^(?=[ivxlcdm]+$)m{0,3}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})$", re.I)
_NUMBER = re.compile(r"^[\[(]?(\d{1,4}|[ivxlcdm]{1,8})[\])]?\.?$", re.I)
_CHAPTER = re.compile(
    r"^(chapter|book|part|volume|letter|stave|canto|section)\s+([ivxlcdm]+|\d+|[a-z]+)\b[.:]?", re.I
)
_CONTENTS = re.compile(r"^(table of )?contents\.?$", re.I)
_TOC_ENTRY = re.compile(r"(\.{3,}|(\. ){3,}|…{2,}|\s\d{1,4}$)")


def is_page_number(text: str) -> bool:
    text = text.strip()
    if not _NUMBER.match(text):
        return False
    core = text.strip("[]().")
    return core.isdigit() or bool(_ROMAN.match(core))


def _mark_frame(rows: list[Row], g: Geometry, counts: Counter[str]) -> None:
    """Rows outside the text frame are running headers/footers; bare numbers are page numbers."""
    for i, row in enumerate(rows):
        if row.kind != "body":
            continue
        above = g.top is not None and row.y0 > g.top + 0.5 * g.leading
        below = g.bottom is not None and row.y1 < g.bottom - 0.5 * g.leading
        edge = i == 0 or i == len(rows) - 1 or above or below
        if above or below:
            row.kind = "header" if above else "footer"
            for segment in row.segments:
                if is_page_number(segment):
                    counts["page_numbers"] += 1
                else:
                    counts["running_headers" if above else "running_footers"] += 1
        elif edge and is_page_number(row.text):
            row.kind = "page_number"
            counts["page_numbers"] += 1


def _mark_repeated(pages: list[list[Row]], counts: Counter[str]) -> None:
    """Without a trusted frame: first/last rows whose text (digits ignored) repeats across pages."""

    def key(row: Row) -> str:
        return re.sub(r"[\divxlcdm]+\b", "#", row.text.lower()).strip()

    seen: Counter[tuple[str, str]] = Counter()
    for rows in pages:
        body = [r for r in rows if r.kind == "body"]
        if len(body) >= 2:
            seen[("top", key(body[0]))] += 1
            seen[("bottom", key(body[-1]))] += 1
    threshold = max(3, 0.3 * len(pages))
    for rows in pages:
        body = [r for r in rows if r.kind == "body"]
        if len(body) < 2:
            continue
        for where, row in (("top", body[0]), ("bottom", body[-1])):
            if seen[(where, key(row))] >= threshold and len(row.text) < 80:
                row.kind = "header" if where == "top" else "footer"
                counts["running_headers" if where == "top" else "running_footers"] += 1


def _mark_lone_head(rows: list[Row], g: Geometry, counts: Counter[str]) -> None:
    """Too few pages for a frame: a first row set smaller than the body and apart from it."""
    body = [r for r in rows if r.kind == "body"]
    if len(body) >= 3 and body[0] is rows[0]:
        first, second = body[0], body[1]
        if first.size < 0.9 * g.size and first.y0 - second.y0 > 1.5 * g.leading and len(first.text) < 80:
            first.kind = "header"
            counts["running_headers"] += 1


def _mark_captions(page: Page, rows: list[Row], g: Geometry, counts: Counter[str]) -> None:
    """Short blocks next to an illustration, set apart (smaller, capitals or centred)."""
    area = max(1.0, page.width * page.height)
    for x0, y0, x1, y1 in page.images:
        if (x1 - x0) * (y1 - y0) > 0.9 * area or (x1 - x0) < 20 or (y1 - y0) < 20:
            continue  # a full-page scan or a rule, not an illustration
        # Seeds: rows beside the picture; a caption block grows from a seed through the rows
        # that follow at line distance and still look like a caption.
        for seed in [r for r in rows if _beside(r, (x0, y0, x1, y1), g)]:
            if seed.kind == "caption" or not _caption_like(seed, g):
                continue
            at = rows.index(seed)
            block = [seed]
            step = 1 if seed.y1 <= y0 else -1  # below the picture: read down; above: read up
            j = at + step
            while 0 <= j < len(rows) and len(block) < 8:
                row = rows[j]
                if row.kind not in ("body", "footer") or abs(block[-1].y0 - row.y0) > 1.6 * g.leading:
                    break
                if not _caption_like(row, g):
                    break
                block.append(row)
                j += step
            if len(block) <= 6:
                for row in block:
                    if row.kind == "footer":  # a caption set below the frame: recount it
                        counts["running_footers"] -= 1
                    row.kind = "caption"
                    counts["captions"] += 1


def _beside(row: Row, box: tuple[float, float, float, float], g: Geometry) -> bool:
    x0, y0, x1, y1 = box
    if row.kind not in ("body", "footer") or min(row.x1, x1) - max(row.x0, x0) <= 0:
        return False
    return max(0.0, y0 - row.y1, row.y0 - y1) <= 2.5 * g.leading


def _caption_like(row: Row, g: Geometry) -> bool:
    letters = [c for c in row.text if c.isalpha()]
    capitals = bool(letters) and sum(c.isupper() for c in letters) >= 0.8 * len(letters)
    left, right = g.margin(row)
    centred = row.x0 - left > g.size and right - row.x1 > g.size
    return row.size < 0.95 * g.size or capitals or centred


def _mark_headings(rows: list[Row], g: Geometry, counts: Counter[str]) -> None:
    for row in rows:
        if row.kind != "body":
            continue
        text = row.text.strip()
        large = row.size >= 1.15 * g.size and len(text) < 120
        if large or (len(text) <= 40 and _CHAPTER.match(text)) or _CONTENTS.match(text):
            row.kind = "heading"
            counts["headings"] += 1


def _is_toc_page(rows: list[Row]) -> bool:
    body = [r for r in rows if r.kind in ("body", "heading")]
    if any(_CONTENTS.match(r.text.strip()) for r in body):
        return True
    if len(body) < 4:
        return False
    entries = sum(1 for r in body if _TOC_ENTRY.search(r.text) or is_page_number(r.text))
    return entries >= 0.5 * len(body)


def _first_chapter(pages: list[list[Row]], limit: int) -> tuple[int, Row] | None:
    """The first chapter heading within the front pages, if the text before it is front matter."""
    total_words = sum(len(r.text.split()) for rows in pages for r in rows if r.kind == "body") or 1
    for index in range(min(limit + 1, len(pages))):
        for row in pages[index]:
            if row.kind == "heading" and _CHAPTER.match(row.text.strip()):
                before = sum(len(r.text.split()) for rows in pages[:index] for r in rows if r.kind == "body")
                # Too much text before it: not front matter, keep it.
                return (index, row) if before <= 0.2 * total_words else None
    return None


def _front_limit(n: int) -> int:
    """Front matter lives in the first pages."""
    return min(n - 1, max(3, int(0.15 * n)))


_ATTRIBUTION = re.compile(r"^[—–-]{1,2}\s?[^\W\d_]")


def _epigraph(rows: list[Row], g: Geometry) -> set[int]:
    """Rows of epigraphs on a page: a few lines of quotation closed by a dashed attribution."""
    keep: set[int] = set()
    for i, row in enumerate(rows):
        if row.kind != "body" or not _ATTRIBUTION.match(row.text) or len(row.text.split()) > 10:
            continue
        block = [row]
        for above in reversed(rows[:i]):
            if above.kind != "body" or above.y0 - block[-1].y0 > 1.8 * g.leading or len(block) > 8:
                break
            block.append(above)
        quote = block[1:]  # read upwards: quote[0] is the line just above the attribution
        # A quotation, not a title page ("THE KEEPER" / "— a novel —"): words, and punctuation.
        if (
            quote
            and sum(len(r.text.split()) for r in quote) >= 6
            and re.search(r"[.,;:!?”’\"']$", quote[0].text)
        ):
            keep.update(id(r) for r in block)
    return keep


def _mark_front_matter(pages: list[list[Row]], g: Geometry, counts: Counter[str]) -> None:
    """Title page, contents, editions' notes before the first chapter (an epigraph stays)."""
    n = len(pages)
    limit = _front_limit(n)
    first_chapter = _first_chapter(pages, limit)
    front_pages: set[int] = set()
    if first_chapter is not None:
        page_index, heading = first_chapter
        front_pages.update(range(page_index))
        epigraph = _epigraph(pages[page_index], g)
        for row in pages[page_index]:
            if row is heading:
                break
            if row.kind == "body" and id(row) not in epigraph:
                row.kind = "front"
                counts["front_matter_lines"] += 1
    else:
        # No chapter heading to anchor on: drop contents pages and near-empty leading pages only.
        for index in range(min(limit, n)):
            words = sum(len(r.text.split()) for r in pages[index] if r.kind == "body")
            if _is_toc_page(pages[index]) or words < 40:
                front_pages.add(index)
            else:
                break
    for index in range(min(limit, n)):
        if index not in front_pages and _is_toc_page(pages[index]):
            front_pages.add(index)
    for index in sorted(front_pages):
        is_toc = _is_toc_page(pages[index])
        epigraph = set() if is_toc else _epigraph(pages[index], g)
        for row in pages[index]:
            if row.kind in ("body", "heading") and id(row) not in epigraph:
                counts["toc_lines" if is_toc else "front_matter_lines"] += 1
                row.kind = "front"
        counts["front_matter_pages"] += 1


# --- footnotes -------------------------------------------------------------------------------------

_NOTE_LABEL = re.compile(r"^[\[(]?(\d{1,3}|[*†‡§¶‖]{1,3})[\])]?\.?\s+(?=\S)")


def _smaller(row: Row, g: Geometry) -> bool:
    return row.size < 0.92 * g.size


def _inline_mark(label: str) -> re.Pattern[str]:
    """A mark set in the text's own size: glued to a word, or after punctuation and a space."""
    core = re.escape(label)
    return re.compile(
        rf"(?:(?<=[^\W\d_])|(?<=[^\W\d_][.,;:!?”’)]))[\[(]?{core}[\])]?(?=[\s,.;:!?”’)]|$)"
        rf"|(?<=[.,;:!?”’)—–]) [\[(]?{core}[\])]?(?=\s|$)"
    )


def _mark_footnotes(pages: list[list[Row]], g: Geometry, counts: Counter[str]) -> None:
    """Footnote bodies: set smaller than the body at the foot of the page, the first one
    labelled with a mark the page refers to (or a raised label); a page that follows a
    footnote that broke off mid-sentence may continue it without a label. Marks set in the
    text's size are taken out of the text only when such a footnote confirms them."""
    carried = False
    for rows in pages:
        body = [r for r in rows if r.kind == "body"]
        last = max((i for i, r in enumerate(body) if not _smaller(r, g)), default=-1)
        tail = body[last + 1 :]
        above = body[: last + 1]
        referred = {m for r in above for m in r.marks}
        start = None
        inline: dict[str, re.Pattern[str]] = {}
        for i, row in enumerate(tail):
            if row.label is not None:
                start = i
                break
            found = _NOTE_LABEL.match(row.text)
            if found is None:
                continue
            label = found.group(1)
            if label in referred:
                start = i
                break
            pattern = _inline_mark(label)
            if any(pattern.search(r.text) for r in above):
                inline[label] = pattern
                start = i
                break
        if start is None and not (carried and tail):
            carried = False
            continue
        notes = tail if carried else tail[start:]
        for row in notes:
            row.kind = "footnote"
            counts["footnote_lines"] += 1
            found = _NOTE_LABEL.match(row.text)
            if found and found.group(1) not in inline and found.group(1) not in referred:
                pattern = _inline_mark(found.group(1))
                if any(pattern.search(r.text) for r in above):
                    inline[found.group(1)] = pattern
        for pattern in inline.values():
            for row in above:
                if pattern.search(row.text):
                    row.text = _SPACE_RUN.sub(" ", pattern.sub("", row.text, count=1)).strip()
                    counts["footnote_marks"] += 1
                    break
        carried = bool(notes) and not _TERMINAL.search(notes[-1].text)


# --- lists with dot leaders ------------------------------------------------------------------------

_LEADER = r"(?:(?:\.\s?){4,}|(?:·\s?){4,}|…{2,}|(?:_\s?){4,})"
_LEADER_ENTRY = re.compile(rf"{_LEADER}\s*[\[(]?(\d{{1,4}}|[ivxlcdm]{{1,8}})[\])]?\.?\s*$", re.I)
_MAY_LEAD = re.compile(r"\.\s?\.|·|…|_")  # cheap test before the leader patterns
_LEADER_WORD = re.compile(rf"{_LEADER}\s*[^\W\d_]+\.?\s*$")  # "Frontispiece", "facing"


def _page_value(text: str) -> int | None:
    return int(text) if text.isdigit() else None  # roman numbers are not compared


def _mark_leader_lists(pages: list[list[Row]], headings: list[str], counts: Counter[str]) -> None:
    """Contents and lists of illustrations: entries of a title or caption, a dot leader and a
    page number, with the lines of an entry that wraps and the list's title. In the body of
    the book a list needs three entries whose page numbers do not fall."""
    n = len(pages)
    known = {re.sub(r"\W+", " ", h).strip().lower() for h in headings}
    open_kind: str | None = None  # the kind of a list running on from the previous page
    for index, rows in enumerate(pages):
        live = [r for r in rows if r.kind in ("body", "heading")]
        # Only a line's end is searched: a hostile line of dots must not make this quadratic.
        ends = [(i, r.text[-200:]) for i, r in enumerate(live) if _MAY_LEAD.search(r.text[-200:])]
        found = [(i, m) for i, end in ends if (m := _LEADER_ENTRY.search(end))]
        entries = [i for i, _ in found]
        marked = sorted({*entries, *(i for i, end in ends if _LEADER_WORD.search(end))})
        values = [v for _, m in found if (v := _page_value(m.group(1))) is not None]
        ordered = all(a <= b for a, b in itertools.pairwise(values))
        edge = index < _front_limit(n) or index >= int(0.85 * n)
        # A list running on from the previous page starts at the top of this one.
        continued = open_kind is not None and bool(marked) and marked[0] <= 1
        enough = len(entries) >= (2 if edge else 3) or (continued and bool(entries))
        if not enough or not (edge or ordered):
            open_kind = None
            continue
        if not continued:
            open_kind = None  # a new list, with its own title
        first, last = marked[0], marked[-1]
        span = list(range(first, last + 1))
        if len(marked) < 0.34 * len(span):
            span = marked  # scattered entries: only they are the list
        title: list[int] = []
        if open_kind is None:
            for i in range(first - 1, max(-1, first - 4), -1):
                row = live[i]
                if len(row.text.split()) > 8 or (re.search(r"[.!?]$", row.text) and row.kind != "heading"):
                    break
                title.insert(0, i)
        kind = open_kind
        if kind is None:
            entries_text = [_LEADER_ENTRY.sub("", live[i].text[-200:]) for i in entries]
            by_heading = sum(
                1
                for t in entries_text
                if _CHAPTER.match(t) or re.sub(r"\W+", " ", t).strip().lower() in known
            )
            is_contents = any(_CONTENTS.match(live[i].text.strip()) for i in title)
            kind = "toc" if is_contents or by_heading >= 0.5 * max(1, len(entries)) else "illustration_list"
        for i in title + span:
            live[i].kind = kind
            counts["toc_lines" if kind == "toc" else "illustration_list_lines"] += 1
        open_kind = kind if last == len(live) - 1 or last >= len(live) - 2 else None


# --- publisher and transcriber notices -------------------------------------------------------------

# Quantifiers are bounded: a hostile line of dots or letters must not make these quadratic.
_URL = re.compile(
    r"(?:https?://|\bwww\.)[^\s)>\]]{1,200}|\b[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,4}"
    # A bare domain in lower case only: "day.The" is a missing space, not an address.
    r"|(?-i:\b[a-z0-9][a-z0-9-]{2,62}(?:\.[a-z0-9-]{1,63}){0,3}\.[a-z]{2,4}(?:/[^\s)>\]]{0,200})?(?![\w-]))",
    re.I,
)
_MAY_ADDRESS = re.compile(r"[A-Za-z0-9-]\.[A-Za-z]|@|://")  # cheap test before _URL
_FIELD = re.compile(r"^([^\W\d_][\w'’.&-]*(?:\s[\w'’.&-]+){0,3})\s?:\s+\S")
_BANNER = re.compile(r"^\W{0,5}\*{3,}[^*]{0,100}[^\W\d_][^*]{0,100}\*{3,}\W{0,5}$")
_NUMBERED_CLAUSE = re.compile(r"^\d{1,2}\.[A-Z](?:\.\d{1,2})*\.?\s")
_NUMERIC_DATE = re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{2,4}\b|#\d{2,}")
_URL_NOISE = {"www", "http", "https", "mail", "email", "html", "htm", "index", "home", "ftp", "files"}


def _blocks(pages: list[list[Row]], g: Geometry) -> list[list[Row]]:
    """Paragraph-like blocks of the rows still counted as text; a block never spans pages."""
    blocks: list[list[Row]] = []
    prev: Row | None = None
    for rows in pages:
        for row in rows:
            if row.kind not in ("body", "heading"):
                continue
            if (
                prev is None
                or row.page != prev.page
                or "heading" in (row.kind, prev.kind)
                or _starts_paragraph(prev, row, g)
            ):
                blocks.append([row])
            else:
                blocks[-1].append(row)
            prev = row
    return blocks


_COMBINING = re.compile("[\u0300-\u036f]")


def _fold(text: str) -> str:
    """Without accents: "Bibliothèque" is the "bibliotheque" of an address."""
    return text if text.isascii() else _COMBINING.sub("", unicodedata.normalize("NFKD", text))


def _publisher_terms(edge: list[Row], middle: list[Row]) -> set[str]:
    """Names taken from the web and mail addresses of the edition (www.name.org -> "name").

    A name is written as one (capitalized: "Project Gutenberg", "Bibliothèque Lumière") and the
    body of the book hardly uses it; a common word in an address ("harbour") is no evidence.
    """
    candidates: set[str] = set()
    for row in edge:
        if not _MAY_ADDRESS.search(row.text):
            continue
        for found in _URL.finditer(row.text):
            address = found.group(0).lower()
            host = address.split("//")[-1].split("/")[0].split("@")[-1]
            for label in host.split(".")[:-1]:  # without the top-level domain
                parts = label.split("-")
                candidates.update(x for x in parts if len(x) >= 4 and x.isalpha() and x not in _URL_NOISE)
    if not candidates:
        return set()
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(candidates))) + r")\b", re.I)

    def words(rows: list[Row]) -> list[str]:  # the name as written, outside the addresses
        text = "\n".join(_URL.sub(" ", r.text) if _MAY_ADDRESS.search(r.text) else r.text for r in rows)
        return [m.group(1) for m in pattern.finditer(_fold(text))]

    body = words(middle)
    in_body = Counter(w.lower() for w in body)
    written = body + words(edge)
    names = Counter(w.lower() for w in written if w[0].isupper())
    every = Counter(w.lower() for w in written)
    return {t for t in candidates if in_body[t] <= 2 and names[t] >= 0.9 * every[t]}


class _Evidence:
    """What marks a row or a block as the edition's rather than the author's."""

    def __init__(self, rows: list[Row], g: Geometry, terms: set[str]) -> None:
        self.g = g
        self.term = (
            re.compile(r"\b(" + "|".join(map(re.escape, sorted(terms))) + r")", re.I) if terms else None
        )
        self.fields: set[int] = set()
        # Runs of at least two short "Label: value" lines (Title:, Author:, Release Date: …).
        field_rows = [self._field(r) for r in rows]
        for i, is_field in enumerate(field_rows):
            near = (i > 0 and field_rows[i - 1] and rows[i - 1].page == rows[i].page) or (
                i + 1 < len(rows) and field_rows[i + 1] and rows[i + 1].page == rows[i].page
            )
            if is_field and near:
                self.fields.add(id(rows[i]))

    def _field(self, row: Row) -> bool:
        found = _FIELD.match(row.text)
        if not found or row.text.rstrip().endswith(":"):
            return False
        left, right = self.g.margin(row)
        value = row.text[found.end() - 1 :]
        return row.ink < 0.8 * max(1.0, right - left) and len(value.split()) <= 10

    def strong(self, row: Row) -> bool:
        text = row.text
        return bool(
            id(row) in self.fields
            or (_MAY_ADDRESS.search(text) and _URL.search(text))
            or _BANNER.match(text)
            or (self.term is not None and self.term.search(_fold(text)))
        )

    def weak(self, row: Row) -> bool:
        return bool(_NUMBERED_CLAUSE.match(row.text) or _NUMERIC_DATE.search(row.text))

    def labelled(self, block: list[Row]) -> bool:
        """A block that opens with a short label and a colon: "Transcriber's Note: …"."""
        found = _FIELD.match(block[0].text) or re.match(
            r"^[^\W\d_][\w'’.&-]*(?:\s[\w'’.&-]+){0,3}\s?:$", block[0].text
        )
        return bool(found)


def _short_block(block: list[Row]) -> bool:
    words = sum(len(r.text.split()) for r in block)
    return len(block) <= 2 and words <= 12 and not re.search(r"[.!?]$", block[-1].text)


def _mark_boilerplate(pages: list[list[Row]], g: Geometry, counts: Counter[str]) -> None:
    """Publisher and transcriber notices before the body and after it, by their evidence.

    Front: within the front pages (up to the first chapter heading, or the first page that
    carries a full page of unmarked prose), blocks with an address, the publisher's name, a
    run of fields or a banner; around them, on the same page, labelled notes, dates and short
    lines (the title repeated in the notice). Back: the first marked block near the end after
    which most of the text is marked (a licence) starts a notice that runs to the end.
    """
    n = len(pages)
    if n == 0:
        return
    limit = _front_limit(n)
    chapter = _first_chapter(pages, limit)
    back_start = max(limit + 1, int(0.7 * n))
    edge_pages = pages[: limit + 1] + pages[back_start:]  # the body's pages are never looked at
    edge_rows = [r for rows in edge_pages for r in rows if r.kind in ("body", "heading")]
    middle_rows = [r for rows in pages[limit + 1 : back_start] for r in rows if r.kind == "body"]
    evidence = _Evidence(edge_rows, g, _publisher_terms(edge_rows, middle_rows))
    contents = {i for i in range(min(limit + 1, n)) if _is_toc_page(pages[i])}  # its entries are no notice
    blocks = [b for b in _blocks(edge_pages, g) if b[0].page not in contents]

    @functools.cache
    def strong(i: int) -> bool:
        return any(evidence.strong(r) for r in blocks[i])

    @functools.cache
    def weak(i: int) -> bool:
        return any(evidence.weak(r) for r in blocks[i]) or evidence.labelled(blocks[i])

    def mark(block: list[Row]) -> None:
        for row in block:
            if row.kind in ("body", "heading"):
                row.kind = "boilerplate"
                counts["boilerplate_lines"] += 1

    # The front: up to the first chapter, or to the first page of plain prose.
    front: list[int] = []
    unmarked_words: Counter[int] = Counter()
    for i, block in enumerate(blocks):
        page = block[0].page
        if page > limit:
            break
        if chapter is not None and (
            page > chapter[0] or (page == chapter[0] and block[0].y0 <= chapter[1].y0)
        ):
            break
        if not strong(i):
            unmarked_words[page] += sum(len(r.text.split()) for r in block)
            if unmarked_words[page] >= 200:
                front = [j for j in front if blocks[j][0].page < page]
                break
        front.append(i)
    notice = {i for i in front if strong(i)}
    per_page = Counter(blocks[i][0].page for i in front)
    for i in front:  # a labelled note alone on its page
        if per_page[blocks[i][0].page] == 1 and evidence.labelled(blocks[i]):
            notice.add(i)
    # Grow along the page around what is marked: labelled notes, dates, short lines. One pass
    # each way follows every chain.
    for order in (front, front[::-1]):
        for i in order:
            near = any(j in notice and blocks[j][0].page == blocks[i][0].page for j in (i - 1, i + 1))
            if i not in notice and near and (weak(i) or _short_block(blocks[i])):
                notice.add(i)
    for i in sorted(notice):
        mark(blocks[i])

    # The back: a notice that, once begun, is most of what follows. Read from the end; once
    # unmarked prose far outweighs what was marked, this is the body: stop.
    marked_after = 0
    total_after = 0
    start = None
    for i in range(len(blocks) - 1, -1, -1):
        if blocks[i][0].page < back_start or total_after > 2 * marked_after + 2000:
            break
        words = sum(len(r.text.split()) for r in blocks[i])
        total_after += words
        marked_after += words if (strong(i) or weak(i)) else 0
        if strong(i) and marked_after >= 0.5 * total_after:
            start = i

    def apart(i: int) -> bool:  # on a page of its own, or under a heading
        prev = blocks[i - 1][-1] if i > 0 else None
        return prev is None or prev.page != blocks[i][0].page or prev.kind == "heading"

    # One marked paragraph closing the book is a notice only when set apart: a stray address
    # in the last paragraph of a story is not.
    if start is not None and sum(1 for i in range(start, len(blocks)) if strong(i)) < 2 and not apart(start):
        start = None
    # "Transcriber's Note: …" closing the book on a page of its own.
    last = len(blocks) - 1
    closing = last >= 0 and blocks[last][0].page >= back_start and apart(last)
    if start is None and closing and evidence.labelled(blocks[last]):
        start = last
    if start is None:
        return
    while start > 0 and blocks[start - 1][0].page >= back_start and weak(start - 1) and not strong(start - 1):
        start -= 1  # a transcriber's note or a dated line just before it
    for block in blocks[start:]:
        mark(block)


# --- pronunciation guides and glossaries -----------------------------------------------------------

_KEY_MARKS = {"\u0306", "\u0304", "\u0307", "\u0323", "\u0331"}  # breve, macron, dots, line below
_PRIMES = set("′″‴ˈˌ´")
# Respellings: "[+a]", "(hăr′ald)".
_RESPELLING = re.compile(r"\[[^\]\s\w]{1,2}[^\W\d_]{1,3}\]|\([^)\s]{0,20}[′ˈ´'][^)\s]{0,20}\)")


def _key_candidate(ch: str) -> bool:
    """Characters of pronunciation keys: stress marks, breves and macrons, loose accents."""
    if ch in _PRIMES or unicodedata.category(ch) in ("Mn", "Sk", "Lm"):
        return True
    decomposition = unicodedata.decomposition(ch).split()
    return any(chr(int(code, 16)) in _KEY_MARKS for code in decomposition[1:] if len(code) == 4)


def _list_like(row: Row, g: Geometry) -> bool:
    left, right = g.margin(row)
    return len(row.segments) >= 2 or row.ink < 0.65 * max(1.0, right - left)


def _mark_glossaries(pages: list[list[Row]], g: Geometry, counts: Counter[str]) -> None:
    """Pronunciation guides and name glossaries: runs of short or columned rows dense in
    pronunciation marks (or respellings) that the book's prose itself does not use."""
    rows = [r for page in pages for r in page if r.kind in ("body", "heading")]
    inside: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for row in rows:
        if row.text.isascii():
            continue
        listed = _list_like(row, g)
        for ch in row.text:
            if ord(ch) > 0x7F and _key_candidate(ch):
                total[ch] += 1
                inside[ch] += listed
    # A mark the prose uses (a language's own accents) is no evidence of a key.
    keys = {ch for ch, count in total.items() if inside[ch] >= 0.6 * count}
    if not keys and not any(_RESPELLING.search(r.text) for r in rows):
        return

    def flagged(row: Row) -> bool:
        if row.text.isascii():
            return bool(_RESPELLING.search(row.text))
        letters = sum(1 for ch in row.text if ch.isalpha())
        marks = sum(1 for ch in row.text if ch in keys)
        return (letters > 0 and marks >= max(1, 0.06 * letters)) or bool(_RESPELLING.search(row.text))

    flags = [flagged(r) for r in rows]
    listed = [_list_like(r, g) for r in rows]

    def take(first: int, last: int) -> None:
        run = rows[first : last + 1]
        # The guide's title just above it, on its page.
        k = first - 1
        while (
            k >= 0 and first - k <= 2 and rows[k].page == rows[first].page and len(rows[k].text.split()) <= 12
        ):
            if rows[k].kind != "heading" and not listed[k]:
                break
            run.insert(0, rows[k])
            k -= 1
        for row in run:
            if row.kind != "glossary":
                row.kind = "glossary"
                counts["glossary_lines"] += 1

    i = 0
    while i < len(rows):
        if not flags[i]:
            i += 1
            continue
        # A run: rows of marks, and short or columned rows between them; no running prose.
        hits = [i]
        j = i + 1
        while j < len(rows) and j - hits[-1] <= 6 and (flags[j] or listed[j]):
            if flags[j]:
                hits.append(j)
            j += 1
        if len(hits) >= 4 and len(hits) >= 0.4 * (hits[-1] - i + 1):
            take(i, hits[-1])
        else:  # a sparse run may still hold a dense guide: clusters of marked rows
            start = 0
            for k in range(1, len(hits) + 1):
                if k == len(hits) or hits[k] - hits[k - 1] > 2:
                    if k - start >= 4:
                        take(hits[start], hits[k - 1])
                    start = k
        i = max(j, i + 1)


# --- reflow ----------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_COMPOUND = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*(?:-[^\W\d_]+(?:['’][^\W\d_]+)*)+")
_HYPHEN_END = re.compile(r"((?:[^\W\d_]+-)*[^\W\d_]+(?:['’][^\W\d_]+)*)-$")
_LEAD_WORD = re.compile(r"^([^\W\d_]+)((?:-[^\W\d_]+)*)")
_TERMINAL = re.compile(r"[.!?:;…\"”’')\]]$")
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "est", "ness", "ment")
# Fragments that only ever attach to a word: a break before them is a syllable break.
_JOIN_SUFFIXES = {
    "ness", "less", "ful", "fully", "ment", "ments", "ship", "hood", "wise", "ward", "wards", "ing", "ings",
    "ingly",
    "able", "ably", "ible", "ibly", "dom", "ly", "ity", "ities", "ous", "ously", "ive", "tion", "tions",
    "sion", "sions", "ance", "ances", "ence", "ences", "ism", "ist", "ists", "ize", "ise", "ized", "ised",
}  # fmt: skip
# Prefixes that are not words of their own (or close up in English): join.
_JOIN_PREFIXES = {
    "un", "re", "de", "pre", "dis", "mis", "im", "il", "ir", "ex", "con", "com", "be", "fore", "over",
    "under", "out", "with", "every", "other", "any", "some", "no", "non", "counter", "inter", "trans",
    "sub", "super", "en", "em", "per", "pro", "ac", "ad", "ap", "as", "at", "ab", "ob", "op", "sup",
}  # fmt: skip
# First halves of compounds that English keeps hyphenated (self-evident, ill-bred, forty-four).
_KEEP_PREFIXES = {
    "self", "ill", "well", "half", "all", "twenty", "thirty", "forty", "fifty", "sixty", "seventy",
    "eighty", "ninety", "quarter", "good", "great", "long", "short", "new", "old", "far", "full", "so",
    "high", "low", "open", "free", "first", "second", "third", "ever", "never", "fellow", "brother",
    "sister", "father", "mother", "son", "daughter", "step",
}  # fmt: skip


class Vocabulary:
    """Word and compound counts from the book itself, excluding line-end fragments."""

    def __init__(self, rows: list[Row]) -> None:
        self.words: Counter[str] = Counter()
        self.compounds: Counter[str] = Counter()
        for i, row in enumerate(rows):
            text = row.text
            if text.endswith("-"):
                text = text[: text.rfind(" ") + 1] if " " in text else ""
            if i > 0 and rows[i - 1].text.endswith("-"):
                text = text.split(" ", 1)[1] if " " in text else ""
            self.compounds.update(m.group(0).lower() for m in _COMPOUND.finditer(text))
            self.words.update(m.group(0).lower() for m in _WORD.finditer(text))

    def knows(self, word: str) -> bool:
        """The word, or an inflection of a word the book uses (stirring: stir, pursued: pursue)."""
        word = word.lower()
        if self.words[word]:
            return True
        for suffix in _SUFFIXES:
            if len(word) > len(suffix) + 2 and word.endswith(suffix):
                stem = word[: -len(suffix)]
                doubled = len(stem) > 2 and stem[-1] == stem[-2]
                if self.words[stem] or self.words[stem + "e"] or (doubled and self.words[stem[:-1]]):
                    return True
        return False

    def join_hyphenated(self, left: str, right: str) -> bool:
        """True: ``left-`` + ``right`` is one word broken at the line end; False: a real compound.

        ``right`` is the whole next token, hyphens included (``a-Dale`` in ``Allan-a-Dale``).
        """
        if right[:1].isupper():
            return False  # Anglo-Saxon, Allan-a-Dale
        joined = (left + right).lower()
        compound = f"{left}-{right}".lower()
        as_word = self.compounds[joined] if "-" in right else self.words[joined]
        as_compound = self.compounds[compound]
        if as_word or as_compound:  # the book has an opinion: follow it
            return as_word >= as_compound
        if "-" in right or "-" in left:
            return False  # a chain: to-morrow-night, five-and-twenty, tete-a-tete
        lo, ro = left.lower(), right.lower()
        if ro in _JOIN_SUFFIXES or self.knows(joined):
            return True
        if lo in _KEEP_PREFIXES:
            return False
        if lo in _JOIN_PREFIXES or len(lo) <= 2:
            return True
        if ro.endswith("ed") and len(lo) >= 3 and self.words[lo] and self.knows(ro):
            return False  # compound adjectives: pale-faced, blood-stained, narrow-minded
        # A word the book uses often plus a word (or inflection) it uses at all: a compound it
        # happens to write only here (drawing-room, brain-attic). Anything else is a syllable break.
        return not (len(lo) >= 3 and len(ro) >= 3 and self.words[lo] >= 2 and self.knows(ro))


@dataclass
class Cleaned:
    paragraphs: list[str]
    counts: dict[str, int]
    pages_with_text: int
    body_rows: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # samples, for tests and debugging

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def _starts_paragraph(prev: Row, row: Row, g: Geometry) -> bool:
    if row.text[:1].islower():
        return False  # paragraphs start with a capital; this continues a broken word or sentence
    if prev.page == row.page and prev.y0 - row.y0 > 1.6 * g.leading:
        return True  # vertical space: paragraph spacing, a section break, a letter's salutation
    left, _ = g.margin(row)
    _, prev_right = g.margin(prev)
    step = 0.4 * g.size
    indented = row.x0 - left >= step
    prev_short = prev.x1 < prev_right - 1.5 * g.size
    prev_terminal = bool(_TERMINAL.search(prev.text))
    if indented and row.x0 - prev.x0 >= step:
        return prev_short or prev_terminal  # the usual first-line indent
    if indented and abs(row.x0 - prev.x0) < step:
        # Same indent as the line before: one-line paragraphs of dialogue (each ends a
        # sentence), or the lines of a letter, a quotation or a verse (they mostly do not).
        return prev_terminal
    return prev_short and prev_terminal and prev.x1 < prev_right - 3 * g.size


def _is_verse(row: Row, g: Geometry) -> bool:
    left, right = g.margin(row)
    return row.x0 - left > g.para_indent + 0.5 * g.size and row.x1 < right - 3 * g.size


def reflow(rows: list[Row], g: Geometry, counts: Counter[str]) -> list[str]:
    """Join lines into paragraphs, mending words hyphenated at line ends."""
    vocabulary = Vocabulary(rows)
    paragraphs: list[str] = []
    current = ""
    prev: Row | None = None
    for row in rows:
        text = row.text
        if prev is None or _starts_paragraph(prev, row, g):
            if current.strip():
                paragraphs.append(current.strip())
            current = text
        else:
            current = _join(current, text, vocabulary, counts, verse=_is_verse(prev, g) and _is_verse(row, g))
        prev = row
    if current.strip():
        paragraphs.append(current.strip())
    return [p for p in paragraphs if _WORD.search(p)]


def _join(current: str, text: str, vocabulary: Vocabulary, counts: Counter[str], *, verse: bool) -> str:
    # Only the tail, and only when it ends in a hyphen: paragraphs grow long.
    hyphen = _HYPHEN_END.search(current[-80:]) if current.endswith("-") else None
    lead = _LEAD_WORD.match(text)
    if hyphen and lead and not current.endswith("--"):
        left, right = hyphen.group(1), lead.group(0)
        if vocabulary.join_hyphenated(left, right):
            counts["hyphen_joins"] += 1
            return current[:-1] + text
        counts["hyphens_kept"] += 1
        return current + text
    if current.endswith(("—", "–")) and not current.endswith((" —", " –")):
        return current + text  # dashes are set closed up in these books: "air—or"
    return current + ("\n" if verse else " ") + text


# --- entry point -----------------------------------------------------------------------------------


# Counted in every manifest, zero included, so that a change shows as a number.
FURNITURE = (
    "boilerplate_lines",
    "illustration_list_lines",
    "glossary_lines",
    "footnote_marks",
    "footnote_lines",
)


def clean_pages(pages: list[Page]) -> Cleaned:
    """The book's prose as paragraphs, plus counts of everything removed or changed."""
    counts: Counter[str] = Counter({key: 0 for key in FURNITURE})
    page_rows = [build_rows(page, counts) for page in pages]
    geometry = measure(page_rows)
    for page, rows in zip(pages, page_rows, strict=True):
        _mark_frame(rows, geometry, counts)
        if page.images:
            _mark_captions(page, rows, geometry, counts)
    if geometry.top is None and geometry.bottom is None:
        _mark_repeated(page_rows, counts)
        for rows in page_rows:
            _mark_lone_head(rows, geometry, counts)
    _mark_footnotes(page_rows, geometry, counts)
    for rows in page_rows:
        _mark_headings(rows, geometry, counts)
    headings = [r.text for rows in page_rows for r in rows if r.kind == "heading"]
    _mark_leader_lists(page_rows, headings, counts)
    _mark_boilerplate(page_rows, geometry, counts)
    _mark_glossaries(page_rows, geometry, counts)
    _mark_front_matter(page_rows, geometry, counts)
    # A raised label on a row that turned out not to be a footnote was a mark all the same.
    counts["footnote_marks"] += sum(1 for rows in page_rows for r in rows if r.label and r.kind != "footnote")
    body = [r for rows in page_rows for r in rows if r.kind == "body"]
    paragraphs = reflow(body, geometry, counts)
    counts["paragraphs"] = len(paragraphs)
    dropped: dict[str, list[str]] = {}
    for row in (r for rows in page_rows for r in rows):
        if row.kind != "body":
            dropped.setdefault(row.kind, []).append(row.text)
    return Cleaned(
        paragraphs=paragraphs,
        counts=dict(sorted(counts.items())),
        pages_with_text=sum(1 for rows in page_rows if any(r.kind == "body" for r in rows)),
        body_rows=len(body),
        dropped=dropped,
    )
