"""Typeset the project's sample story into a real book-like PDF, at run time.

The repository may not ship third-party books, so ``make run`` trains on an original
story (``saltmarrow.txt``) that we turn into the kind of PDF the ingest pipeline must
clean: a title page, a table of contents with dot leaders, chapters opening on new
pages, running headers (book title on the left page, chapter on the right), page
numbers, justified lines with words hyphenated at line ends, typographic quotes and
fi/fl ligature glyphs. The output is deterministic (fixed creation date), so the same
story always becomes the same book id.

Source format: ``% Title`` / ``% Subtitle`` / ``% Author`` lines, ``# Chapter`` headings,
paragraphs separated by blank lines, straight quotes and ``--`` (made typographic here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path

SAMPLE_STORY = "saltmarrow.txt"

# Page geometry (mm): a small trade-paperback page.
PAGE_W, PAGE_H = 133.0, 203.0
INNER, OUTER, TOP, BOTTOM = 17.0, 15.0, 22.0, 22.0
BODY_PT = 10.5
LEADING = 5.0  # baseline-to-baseline, mm
INDENT = 5.0  # first-line indent of paragraphs after the first
HEADER_Y = 13.0  # baseline of the running header
FOLIO_Y = PAGE_H - 11.0  # baseline of the page number
MIN_HYPHEN_WORD = 6
LIGATURES = (("ffi", "\ufb03"), ("ffl", "\ufb04"), ("ff", "\ufb00"), ("fi", "\ufb01"), ("fl", "\ufb02"))
FIXED_DATE = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass
class Chapter:
    title: str
    paragraphs: list[str]


@dataclass
class Story:
    title: str
    subtitle: str
    author: str
    chapters: list[Chapter]

    @property
    def words(self) -> int:
        return sum(len(p.split()) for c in self.chapters for p in c.paragraphs)


@dataclass
class Line:
    words: list[str]  # as drawn (a hyphenated word ends with "-")
    y: float
    indent: float
    justify: bool
    hyphenated: bool = False


@dataclass
class Page:
    kind: str  # title | contents | body
    chapter: str = ""
    opens_chapter: str = ""  # heading drawn on this page
    folio: int = 0  # printed page number (0: none)
    lines: list[Line] = field(default_factory=list)


@dataclass
class TypesetBook:
    """What was produced, for logs and tests."""

    path: Path
    title: str
    pages: int
    chapters: int
    words: int
    lines: int
    hyphenated_lines: int
    chapter_pages: dict[str, int]  # chapter title -> printed page number


def sample_story_text() -> str:
    return resources.files("novelcrafter.run").joinpath(SAMPLE_STORY).read_text(encoding="utf-8")


def parse_story(text: str) -> Story:
    """Parse the light markup of a story file."""
    meta: list[str] = []
    chapters: list[Chapter] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            if not chapters:
                raise ValueError("story text before the first '# chapter' heading")
            chapters[-1].paragraphs.append(" ".join(para))
            para.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("%"):
            meta.append(line.lstrip("% ").strip())
        elif line.startswith("#"):
            flush()
            chapters.append(Chapter(line.lstrip("# ").strip(), []))
        elif not line:
            flush()
        else:
            para.append(line)
    flush()
    if not meta or not chapters:
        raise ValueError("a story needs '% Title' and at least one '# Chapter'")
    meta += ["", ""]
    return Story(meta[0], meta[1], meta[2], chapters)


_OPEN_BEFORE = set(" \t\n([{\u2014\u2013-/")


def smarten(text: str) -> str:
    """Straight quotes to typographic ones, ``--`` to an em dash."""
    text = text.replace("--", "\u2014")
    out = []
    for i, ch in enumerate(text):
        prev = text[i - 1] if i else " "
        if ch == '"':
            out.append("\u201c" if prev in _OPEN_BEFORE or prev in "\u2018" else "\u201d")
        elif ch == "'":
            # An apostrophe inside or at the end of a word is a right quote; so is an elision
            # like 'thirty-one after a space when followed by a digit-word we cannot tell
            # apart: books use ’ there too, so only a quote opening dialogue gets ‘.
            opening = prev in _OPEN_BEFORE or prev == "\u201c"
            nxt = text[i + 1] if i + 1 < len(text) else " "
            out.append("\u2018" if opening and nxt.isalpha() and not _is_elision(text, i) else "\u2019")
        else:
            out.append(ch)
    return "".join(out)


_ELISIONS = ("'thirty", "'tis", "'twas", "'em", "'ninety")


def _is_elision(text: str, i: int) -> bool:
    return text[i : i + 8].lower().startswith(_ELISIONS)


def ligate(word: str) -> str:
    """Use ligature glyphs as many book PDFs do (their text layer then carries ﬁ, ﬂ …)."""
    for plain, lig in LIGATURES:
        word = word.replace(plain, lig)
    return word


@cache
def _font_path(style: str = "") -> str:
    import matplotlib

    name = {"": "DejaVuSerif.ttf", "I": "DejaVuSerif-Italic.ttf", "B": "DejaVuSerif-Bold.ttf"}[style]
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.exists():
        raise FileNotFoundError(f"font {name} not found in matplotlib's data ({path})")
    return str(path)


@cache
def _hyphenator():  # type: ignore[no-untyped-def]
    import pyphen

    return pyphen.Pyphen(lang="en_US", left=2, right=3)


_TOKEN_RE = re.compile(r"^([^\w]*)(.*?)([^\w]*)$", re.UNICODE)


def hyphenation_splits(word: str) -> list[tuple[str, str]]:
    """Ways to break ``word`` at a line end, longest first part first: (head incl. '-', tail).

    A compound breaks after its own hyphen (nothing added); a plain word of at least
    ``MIN_HYPHEN_WORD`` letters breaks where the dictionary allows, with an added hyphen.
    """
    lead, core, trail = _TOKEN_RE.match(word).groups()  # type: ignore[union-attr]
    splits: list[tuple[str, str]] = []
    if "-" in core.strip("-"):
        parts = core.split("-")
        for k in range(len(parts) - 1, 0, -1):
            head, tail = "-".join(parts[:k]), "-".join(parts[k:])
            if head and tail:
                splits.append((lead + head + "-", tail + trail))
        return splits
    if len(core) < MIN_HYPHEN_WORD or not core.isalpha() or core.isupper():
        return []
    for head, tail in _hyphenator().iterate(core):
        splits.append((lead + head + "-", tail + trail))
    return splits


class _Measure:
    """String widths in mm for the body font (fpdf2 metrics)."""

    def __init__(self) -> None:
        from fpdf import FPDF

        self.pdf = FPDF(unit="mm", format=(PAGE_W, PAGE_H))
        self.pdf.add_font("Body", "", _font_path(""))
        self.pdf.set_font("Body", size=BODY_PT)
        self.space = self.pdf.get_string_width(" ")

    def __call__(self, text: str) -> float:
        return self.pdf.get_string_width(ligate(text))


def break_paragraph(
    text: str, width: float, first_indent: float, measure: _Measure
) -> list[tuple[list[str], float, bool, bool]]:
    """Greedy line breaking with hyphenation: [(words, indent, justify, hyphenated)]."""
    words = text.split()
    lines: list[tuple[list[str], float, bool, bool]] = []
    current: list[str] = []
    used = 0.0
    indent = first_indent
    i = 0
    while i < len(words):
        word = words[i]
        need = measure(word) + (measure.space if current else 0.0)
        if used + need <= width - indent:
            current.append(word)
            used += need
            i += 1
            continue
        # The word does not fit: take as much of it as fits, with a hyphen.
        room = width - indent - used - (measure.space if current else 0.0)
        split = next(((h, t) for h, t in hyphenation_splits(word) if measure(h) <= room), None)
        if split is not None and room > 2 * measure.space:
            current.append(split[0])
            words[i] = split[1]
            lines.append((current, indent, True, True))
        elif current:
            lines.append((current, indent, True, False))
        else:  # a single word wider than the line: let it overflow rather than loop
            lines.append(([word], indent, False, False))
            i += 1
        current, used, indent = [], 0.0, 0.0
    if current:
        lines.append((current, indent, False, False))
    return lines


def layout(story: Story, measure: _Measure) -> list[Page]:
    """Place every line on a page (pure geometry; :func:`render` draws it)."""
    width = PAGE_W - INNER - OUTER
    pages: list[Page] = [Page("title"), Page("contents")]
    folio = 0
    bottom = PAGE_H - BOTTOM
    for chapter in story.chapters:
        if len(pages) % 2 == 1:  # chapters open on a right-hand (odd) page, as in print
            folio += 1
            pages.append(Page("body", chapter.title, folio=folio))  # blank verso, number only
        folio += 1
        page = Page("body", chapter.title, opens_chapter=chapter.title, folio=folio)
        pages.append(page)
        y = TOP + 48.0  # drop the chapter opening a third of the way down
        for n, para in enumerate(chapter.paragraphs):
            for words, indent, justify, hyph in break_paragraph(
                smarten(para), width, INDENT if n else 0.0, measure
            ):
                if y > bottom:
                    folio += 1
                    page = Page("body", chapter.title, folio=folio)
                    pages.append(page)
                    y = TOP + LEADING
                page.lines.append(Line(words, y, indent, justify, hyph))
                y += LEADING
    return pages


def _chapter_label(title: str) -> tuple[str, str]:
    """'IV. The Lower Street' -> ('IV', 'The Lower Street')."""
    number, dot, rest = title.partition(". ")
    return (number, rest) if dot and number.isalpha() and number.isupper() else ("", title)


def render(story: Story, pages: list[Page], out: Path) -> None:
    import logging

    from fpdf import FPDF

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # font subsetting chatter at INFO

    pdf = FPDF(unit="mm", format=(PAGE_W, PAGE_H))
    pdf.set_auto_page_break(False)
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(story.title)
    pdf.set_author(story.author.removeprefix("by ").strip())
    pdf.set_creator("novelcrafter sample typesetter")
    pdf.set_producer("novelcrafter")
    for style in ("", "I", "B"):
        pdf.add_font("Serif", style, _font_path(style))
    width = PAGE_W - INNER - OUTER
    chapter_pages = {p.opens_chapter: p.folio for p in pages if p.opens_chapter}

    def centered(text: str, y: float, style: str = "", size: float = BODY_PT) -> None:
        pdf.set_font("Serif", style, size)
        pdf.text((PAGE_W - pdf.get_string_width(text)) / 2, y, text)

    for index, page in enumerate(pages):
        pdf.add_page()
        recto = index % 2 == 0  # page 1 of the file is a right-hand page
        left = OUTER if not recto else INNER
        if page.kind == "title":
            centered(story.title.upper(), 70, "B", 17)
            centered(story.subtitle, 82, "I", 11)
            centered(smarten(story.author), 120, "", 10)
            continue
        if page.kind == "contents":
            centered("CONTENTS", TOP + 20, "B", 11)
            pdf.set_font("Serif", "", BODY_PT)
            y = TOP + 34
            for chapter in story.chapters:
                label = smarten(chapter.title)
                number = str(chapter_pages[chapter.title])
                x_end = left + width
                pdf.text(left, y, label)
                pdf.text(x_end - pdf.get_string_width(number), y, number)
                dots_from = left + pdf.get_string_width(label) + 2
                dots_to = x_end - pdf.get_string_width(number) - 2
                dot = pdf.get_string_width(". ")
                x = dots_from
                while x + dot <= dots_to:
                    pdf.text(x, y, ".")
                    x += dot
                y += LEADING * 1.6
            continue
        # Running header: book title on the left page, chapter on the right; none on an opening.
        if not page.opens_chapter and page.lines:
            header = story.title if not recto else _chapter_label(page.chapter)[1]
            pdf.set_font("Serif", "I", 8.5)
            hx = (PAGE_W - pdf.get_string_width(header.upper())) / 2
            pdf.text(hx, HEADER_Y, header.upper())
            pdf.set_line_width(0.15)
            pdf.line(left, HEADER_Y + 2.2, left + width, HEADER_Y + 2.2)
        if page.folio and (page.lines or page.opens_chapter):  # blank pages carry no number
            centered(str(page.folio), FOLIO_Y, "", 9)
        if page.opens_chapter:
            number, name = _chapter_label(smarten(page.opens_chapter))
            if number:
                centered(f"CHAPTER {number}", TOP + 22, "", 10)
            centered(name, TOP + 32, "B", 13)
        pdf.set_font("Serif", "", BODY_PT)
        for line in page.lines:
            drawn = [ligate(w) for w in line.words]
            widths = [pdf.get_string_width(w) for w in drawn]
            x = left + line.indent
            gap = pdf.get_string_width(" ")
            if line.justify and len(drawn) > 1:
                gap = (width - line.indent - sum(widths)) / (len(drawn) - 1)
            for word, w in zip(drawn, widths, strict=True):
                pdf.text(x, line.y, word)
                x += w + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pdf.output(str(tmp))
    tmp.replace(out)


def typeset(text: str, out: Path) -> TypesetBook:
    """Typeset story markup into ``out`` (written atomically) and describe the result."""
    story = parse_story(text)
    pages = layout(story, _Measure())
    render(story, pages, Path(out))
    lines = [line for p in pages for line in p.lines]
    return TypesetBook(
        path=Path(out),
        title=story.title,
        pages=len(pages),
        chapters=len(story.chapters),
        words=story.words,
        lines=len(lines),
        hyphenated_lines=sum(1 for line in lines if line.hyphenated),
        chapter_pages={p.opens_chapter: p.folio for p in pages if p.opens_chapter},
    )


def typeset_sample(out: Path) -> TypesetBook:
    """The default book of ``novelcrafter run``: the project's own story as a PDF."""
    return typeset(sample_story_text(), out)
