"""The three real books in ../shared/corpus/books: the text that reaches the chunks is prose.

Each book is ingested once per session (module fixture). The oracle is independent of our
cleaning: plain ``pdfminer.high_level.extract_text`` on a sample of pages.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from novelcrafter.ingest.pipeline import ingest
from support import BOOKS, require_shared

from novelcrafter import layout
from novelcrafter.store import open_store

BOOK_NAMES = ["a-study-in-scarlet", "pride-and-prejudice", "robin-hood"]
OPENERS = "“‘\"'(—–’["
LIGATURES = set("\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06")
ROMAN = r"[ivxlcdm]+"


@dataclass
class Ingested:
    manifest: dict
    text: str
    chunks: list[str]
    raw_pages: dict[int, list[str]]  # sampled page index -> lines, from plain extract_text


@pytest.fixture(scope="module", params=BOOK_NAMES)
def book(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    require_shared(BOOKS)
    path = BOOKS / f"{request.param}.pdf"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    store = open_store(str(tmp_path_factory.mktemp("books") / "store"))
    manifest = ingest(store, path.read_bytes(), filename=path.name).manifest
    text = store.get_text(layout.text_key(manifest["book_id"]))
    chunks = []
    for part in manifest["parts"]:
        for key in (part["train_key"], part["test_key"]):
            chunks += [json.loads(line)["text"] for line in store.get_text(key).splitlines()]
    return Ingested(manifest, text, chunks, _raw_sample(path, manifest["pages"]))


def _raw_sample(path: Path, pages: int) -> dict[int, list[str]]:
    from pdfminer.high_level import extract_text

    sample = list(range(0, pages, 3))
    texts = extract_text(str(path), page_numbers=sample).split("\x0c")
    return {
        index: [line.strip() for line in page.splitlines() if line.strip()]
        for index, page in zip(sample, texts, strict=False)
    }


def _edge_lines(book: Ingested) -> list[tuple[int, str]]:
    return [(i, line) for i, lines in book.raw_pages.items() for line in lines[:3] + lines[-3:]]


def _key(line: str) -> str:
    return re.sub(rf"\b(\d+|{ROMAN})\b", "#", line, flags=re.IGNORECASE).strip()


def test_no_running_heads_or_page_numbers_reach_the_chunks(book: Ingested) -> None:
    # Running heads: lines at page edges that repeat across pages (numbers ignored).
    counts: dict[str, set[int]] = {}
    for page, line in _edge_lines(book):
        counts.setdefault(_key(line), set()).add(page)
    heads = {
        line
        for page, line in _edge_lines(book)
        if len(counts[_key(line)]) >= 4 and len(re.sub(r"[^a-zA-Z]", "", _key(line))) >= 3
    }
    assert heads, "the oracle found no running heads: the sample is wrong"
    joined = "\n".join(book.chunks)
    leaked = sorted(h for h in heads if h in joined)
    assert not leaked, f"running heads inside chunk text: {leaked[:10]}"
    # Page numbers: the folios printed at page edges; leaked, nearly all would appear.
    # Small numbers are common in prose ("No. 3"); from 30 up they are rare.
    folios = {line for _, line in _edge_lines(book) if re.fullmatch(r"\d{2,3}", line) and int(line) >= 30}
    assert len(folios) >= 20
    tokens = set(re.findall(r"(?<![\w,.$£])(\d{1,3})(?![\w])", joined))
    assert len(folios & tokens) <= 0.1 * len(folios), sorted(folios & tokens, key=int)[:20]
    assert not [c for c in book.chunks for ln in c.splitlines() if re.fullmatch(rf"\s*(\d+|{ROMAN})\s*", ln)]
    cleaning = book.manifest["cleaning"]
    assert cleaning["page_numbers"] >= 0.8 * book.manifest["pages"]
    assert cleaning["running_headers"] >= 0.5 * book.manifest["pages"]


def test_line_end_hyphens_are_mended_and_ligatures_gone(book: Ingested) -> None:
    joined = "\n".join(book.chunks)
    fragments = re.findall(r"\b\w+- [a-z]\w*", joined)
    assert not fragments, f"line-break hyphen fragments: {fragments[:10]}"
    # Every word the PDF broke at a line end is in the text, joined or as its compound.
    pairs = []
    for index, lines in book.raw_pages.items():
        if not 0.1 * book.manifest["pages"] < index < 0.8 * book.manifest["pages"]:
            continue
        for line, following in itertools.pairwise(lines):
            left = re.search(r"([A-Za-z]+)-$", line)
            right = re.match(r"([a-z]+)", following)
            if left and right and not re.fullmatch(r"\d+", following):
                pairs.append((left.group(1), right.group(1)))
    assert len(pairs) >= 30
    text = book.text.replace("\ufb01", "fi").replace("\ufb02", "fl")
    missing = [(a, b) for a, b in pairs if a + b not in text and f"{a}-{b}" not in text]
    assert len(missing) <= 0.03 * len(pairs), missing[:20]
    assert book.manifest["cleaning"]["hyphen_joins"] >= 100
    assert not LIGATURES & set(book.text)
    raw = "".join(line for lines in book.raw_pages.values() for line in lines)
    if LIGATURES & set(raw):
        assert book.manifest["cleaning"]["ligatures"] >= 100
    for letter in "æœ":  # real letters, never "normalized" away
        assert (letter in raw) <= (letter in book.text)


def _at_sentence_start(text: str, position: int) -> bool:
    before = text[:position]
    return position == 0 or before.endswith("\n\n") or bool(re.search(r"[.!?…:;—–][”’\"')\]]* $", before))


def test_chunks_start_and_end_at_sentence_boundaries(book: Ingested) -> None:
    assert len(book.chunks) == book.manifest["chunks"]
    for chunk in book.chunks:
        first, last = chunk.splitlines()[0], chunk.splitlines()[-1]
        assert first.lstrip(OPENERS)[:1].isupper() or first.lstrip(OPENERS)[:1].isdigit(), chunk[:200]
        # Where the chunk sits in the book's text (paragraphs: "\n" in a chunk, "\n\n" in the text).
        found = re.search("\n\n?".join(map(re.escape, chunk.split("\n"))), book.text)
        assert found, chunk[:200]
        assert _at_sentence_start(book.text, found.start()), chunk[:200]
        after = book.text[found.end() :]
        paragraph_end = after[:1] in ("", "\n")
        assert paragraph_end or re.search(r"[.!?…][”’\"')\]]*$", last), chunk[-200:]
        assert paragraph_end or _at_sentence_start(book.text, found.end() + 1), chunk[-200:]


def test_body_text_is_retained(book: Ingested) -> None:
    manifest = book.manifest
    assert 0.85 <= manifest["words"] / manifest["extracted_words"] <= 1.0
    # Interior lines of body pages, from plain pdfminer: their middle words are all in the text.
    text = re.sub(r"\s+", " ", book.text)
    checked = missing = 0
    for index, lines in book.raw_pages.items():
        if not 0.15 * manifest["pages"] < index < 0.75 * manifest["pages"]:
            continue
        for line in lines[3:-3]:
            words = line.replace("\ufb01", "fi").replace("\ufb02", "fl").split()
            if len(words) < 6 or line.upper() == line:
                continue  # short lines and all-capital captions
            checked += 1
            missing += " ".join(words[1:-1]) not in text
    assert checked >= 200
    assert missing <= 0.02 * checked, f"{missing} of {checked} body lines missing"


def test_parts_follow_the_requested_shape(book: Ingested) -> None:
    manifest = book.manifest
    assert manifest["params"]["parts"] == 10 and len(manifest["parts"]) == 10
    sizes = [p["train_chunks"] + p["test_chunks"] for p in manifest["parts"]]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == manifest["chunks"]
    for part in manifest["parts"]:
        share = part["test_chunks"] / (part["train_chunks"] + part["test_chunks"])
        assert 0.05 <= share <= 0.15
    assert manifest["chunks"] == -(-manifest["sentences"] // 10)
    summary = f"{manifest['pages']} pages, {manifest['words']} words"
    print(f"\n{manifest['title']}: {summary}, cleaning {manifest['cleaning']}")
