"""From positioned text lines to book prose: what is not the author's text goes, and is counted.

The book itself is the reference for every decision:

* the *text frame* (where full body lines start and end on most pages) separates running
  headers, footers and page numbers from the body, whatever their wording;
* the body font size and line spacing tell headings, captions and paragraph breaks apart;
* the book's own vocabulary decides whether a line-end hyphen is a syllable break
  (``ac- quaintance`` -> ``acquaintance``) or a real compound (``good-natured``, ``To-morrow``).

Every removal and change is counted into ``Cleaned.counts`` (the manifest's ``cleaning``).
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .extract import Line, Page

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
    kind: str = "body"  # body | header | footer | page_number | heading | caption | front | back

    @property
    def width(self) -> float:
        return self.x1 - self.x0


def build_rows(page: Page, counts: Counter[str]) -> list[Row]:
    """Merge lines on the same baseline (pdfminer splits justified lines at wide gaps), top to bottom."""
    lines: list[Line] = []
    for x0, y0, x1, y1, size, text, flags in page.lines:
        text = normalize_chars(text, counts)
        text = _SPACE_RUN.sub(" ", text).strip()
        if text:
            lines.append((x0, y0, x1, y1, size, text, flags))
            if flags & 1:
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
_BACK_MATTER = re.compile(
    r"^(\*+\s*)?(end of (the |this )?project gutenberg|project gutenberg( ebook)? license\b"
    r"|the full project gutenberg license)",
    re.I,
)


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


def _mark_front_and_back(pages: list[list[Row]], counts: Counter[str]) -> None:
    """Title page, contents, editions' notes before the first chapter; licences after the end."""
    n = len(pages)
    # Front matter lives in the first pages; never more than a small share of the words.
    limit = min(n - 1, max(3, int(0.15 * n)))
    total_words = sum(len(r.text.split()) for rows in pages for r in rows if r.kind == "body") or 1
    first_chapter = None
    for index in range(min(limit + 1, n)):
        for row in pages[index]:
            if row.kind == "heading" and _CHAPTER.match(row.text.strip()):
                first_chapter = (index, row)
                break
        if first_chapter:
            break
    front_pages: set[int] = set()
    if first_chapter is not None:
        before = sum(
            len(r.text.split()) for rows in pages[: first_chapter[0]] for r in rows if r.kind == "body"
        )
        if before > 0.2 * total_words:
            first_chapter = None  # too much text before it: not front matter, keep it
    if first_chapter is not None:
        page_index, heading = first_chapter
        front_pages.update(range(page_index))
        for row in pages[page_index]:
            if row is heading:
                break
            if row.kind == "body":
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
        for row in pages[index]:
            if row.kind in ("body", "heading"):
                counts["toc_lines" if is_toc else "front_matter_lines"] += 1
                row.kind = "front"
        counts["front_matter_pages"] += 1
    # Back matter (e.g. a licence appended to the book), only near the end.
    start = int(0.7 * n)
    for index in range(start, n):
        for position, row in enumerate(pages[index]):
            if row.kind in ("body", "heading") and _BACK_MATTER.match(row.text.strip()):
                for rest in pages[index][position:] + [r for p in pages[index + 1 :] for r in p]:
                    if rest.kind in ("body", "heading"):
                        counts["back_matter_lines"] += 1
                        rest.kind = "back"
                return


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


def clean_pages(pages: list[Page]) -> Cleaned:
    """The book's prose as paragraphs, plus counts of everything removed or changed."""
    counts: Counter[str] = Counter()
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
    for rows in page_rows:
        _mark_headings(rows, geometry, counts)
    _mark_front_and_back(page_rows, counts)
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
