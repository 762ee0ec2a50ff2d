"""The sample book's typesetter: a real multi-page PDF with the furniture of a printed book.

Checked by reading the PDF back with pdfminer (what ingest uses), not by trusting the layout.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from novelcrafter.run import typeset
from novelcrafter.run.typeset import (
    hyphenation_splits,
    parse_story,
    sample_story_text,
    smarten,
    typeset_sample,
)


@pytest.fixture(scope="module")
def sample_pdf(tmp_path_factory: pytest.TempPathFactory) -> typeset.TypesetBook:
    return typeset_sample(tmp_path_factory.mktemp("typeset") / "book.pdf")


@pytest.fixture(scope="module")
def pages(sample_pdf: typeset.TypesetBook) -> list[list[tuple[float, str]]]:
    """Each page's text lines as (baseline y from the bottom, text), top first."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTTextContainer, LTTextLine

    result = []
    for page in extract_pages(str(sample_pdf.path)):
        lines = []
        for box in page:
            if isinstance(box, LTTextContainer):
                for line in box:
                    if isinstance(line, LTTextLine) and line.get_text().strip():
                        lines.append((line.y0, line.get_text().strip()))
        result.append(sorted(lines, key=lambda item: -item[0]))
    return result


def test_story_is_original_and_long_enough() -> None:
    story = parse_story(sample_story_text())
    assert story.title == "The Ledger of Saltmarrow"
    assert len(story.chapters) >= 5
    assert 5000 <= story.words <= 6500
    names = ("Absalom Crewe", "Mrs. Pellow", "Dr. Marsh", "St. Brannoc")
    text = sample_story_text()
    assert all(name in text for name in names)


def test_pdf_has_many_pages_title_and_contents(
    sample_pdf: typeset.TypesetBook, pages: list[list[tuple[float, str]]]
) -> None:
    assert sample_pdf.pages == len(pages) >= 20
    title_page = " ".join(text for _, text in pages[0])
    assert "THE LEDGER OF SALTMARROW" in title_page
    contents = " ".join(text for _, text in pages[1])
    assert "CONTENTS" in contents and ". . . ." in contents  # dot leaders, as in print


def test_running_headers_and_page_numbers(
    sample_pdf: typeset.TypesetBook, pages: list[list[tuple[float, str]]]
) -> None:
    chapters = [t.split(". ", 1)[1].upper() for t in sample_pdf.chapter_pages]
    headed = numbered = 0
    folios = []
    for lines in pages[2:]:
        if not lines:
            continue  # a blank verso before a chapter
        top, bottom = lines[0][1], lines[-1][1]
        if re.fullmatch(r"\d+", bottom):
            numbered += 1
            folios.append(int(bottom))
        if top == "THE LEDGER OF SALTMARROW" or top.replace("’", "'") in chapters:
            headed += 1
    body_pages = sum(1 for lines in pages[2:] if lines)
    assert numbered == body_pages  # every printed page has its number at the foot
    assert folios == sorted(folios) and len(set(folios)) == len(folios)
    assert headed >= body_pages - len(chapters)  # all but chapter openings carry a header
    assert headed >= 10


def test_lines_are_hyphenated_at_line_ends(
    sample_pdf: typeset.TypesetBook, pages: list[list[tuple[float, str]]]
) -> None:
    source = re.sub(r"\s+", " ", sample_story_text())
    broken = []
    for lines in pages[2:]:
        texts = [t for _, t in lines]
        for this, nxt in itertools.pairwise(texts):
            m = re.search(r"(\w+)-$", this)
            if m and nxt[:1].islower():
                broken.append(m.group(1) + nxt.split()[0].rstrip(",.;:!?’”"))
    assert sample_pdf.hyphenated_lines >= 10
    assert len(broken) >= 10
    # A break inside a word joins back into a word of the story; one after a compound's
    # own hyphen (sea-wall) joins back into the compound.
    plain = source.replace("fi", "ﬁ")
    joined_ok = sum(1 for w in broken if w in source or w in plain or w.replace("ﬁ", "fi") in source)
    assert joined_ok >= 0.9 * len(broken)


def test_typographic_text_layer(pages: list[list[tuple[float, str]]]) -> None:
    text = " ".join(t for lines in pages for _, t in lines)
    assert "“" in text and "”" in text and "’" in text
    assert "\ufb01" in text or "\ufb02" in text  # ligature glyphs, as many book PDFs carry


def test_output_is_deterministic(tmp_path: Path, sample_pdf: typeset.TypesetBook) -> None:
    again = typeset_sample(tmp_path / "again.pdf")
    assert again.path.read_bytes() == sample_pdf.path.read_bytes()  # same story, same book id


def test_smarten_quotes_and_dashes() -> None:
    assert smarten("\"It will,\" said he -- 'the sea's'") == "“It will,” said he — ‘the sea’s’"
    assert smarten("in 'thirty-one") == "in ’thirty-one"


def test_hyphenation_splits() -> None:
    assert hyphenation_splits("sea-wall,") == [("sea-", "wall,")]
    assert hyphenation_splits("the") == []
    splits = hyphenation_splits("“extraordinary”")
    assert splits and all(h.endswith("-") for h, _ in splits)
    assert all((h[:-1] + t).strip("“”") == "extraordinary" for h, t in splits)


def test_parse_story_refuses_bad_markup() -> None:
    with pytest.raises(ValueError):
        parse_story("no title, no chapters")
    with pytest.raises(ValueError):
        parse_story("% Title\nprose before any chapter\n")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sample_book_goes_through_ingest_cleanly(sample_pdf: typeset.TypesetBook, tmp_path: Path) -> None:
    """The ingest CLI recovers exactly the story's words: no running headers, page numbers,
    contents or chapter labels left, every line-end hyphen joined (compounds kept), no ligatures."""
    import json

    from support import run_cli

    from novelcrafter.store import open_store

    proc = run_cli("ingest", str(sample_pdf.path), "--store", str(tmp_path / "store"), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["pages"] == sample_pdf.pages
    assert manifest["cleaning"]["running_headers"] >= 10 and manifest["cleaning"]["page_numbers"] >= 20
    store = open_store(str(tmp_path / "store"))
    text = store.get_text(manifest["text_key"])
    story = parse_story(sample_story_text())
    expected = [w for c in story.chapters for p in c.paragraphs for w in smarten(p).split()]
    got = text.split()
    assert len(got) == len(expected)
    # A compound broken at its own hyphen ("weather-|cut") that the book never spells
    # elsewhere is ambiguous for any dehyphenator: tolerate it being joined, nothing else.
    differ = [(e, g) for e, g in zip(expected, got, strict=True) if e != g]
    assert all(e.replace("-", "") == g for e, g in differ), differ
    assert len(differ) <= 2, differ
    chunks = [
        json.loads(line)["text"]
        for part in manifest["parts"]
        for key in (part["train_key"], part["test_key"])
        for line in store.get_text(key).splitlines()
    ]
    assert len(chunks) == manifest["chunks"] >= 25
    joined = " ".join(chunks)
    assert "SALTMARROW" not in joined and "CHAPTER" not in joined and "\ufb01" not in joined
