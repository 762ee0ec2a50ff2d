"""Ingest pipeline on small PDFs the tests typeset themselves (known content, known layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from novelcrafter.ingest import manifest as manifest_codec
from novelcrafter.ingest.chunking import make_chunks, plan_parts, split_parts
from novelcrafter.ingest.params import IngestParams
from novelcrafter.ingest.pipeline import get_book, ingest, list_books
from novelcrafter.ingest.sentences import Sentence, split_sentences
from pdfs import Book, Heading, Paragraph, Picture, book_pdf, prose, sentences

from novelcrafter import layout
from novelcrafter.errors import FailedPrecondition, InvalidArgument, StoreError
from novelcrafter.store import LocalStore, open_store

SMALL = IngestParams(chunk_sentences=2, parts=2)


def _ingest(tmp_path: Path, pdf: bytes, params: IngestParams = SMALL, **kw):  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "store"))
    result = ingest(store, pdf, params=params, filename="book.pdf", **kw)
    text = store.get_text(layout.text_key(result.manifest["book_id"]))
    return store, result, text


def _all_prose(count: int, start: int = 0) -> list[str]:
    return [p.text for p in prose(count, start=start)]


def test_running_heads_folios_title_page_and_contents_are_removed(tmp_path: Path) -> None:
    paragraphs = prose(24)
    book = Book(
        [Heading("CHAPTER I"), *paragraphs[:12], Heading("CHAPTER II"), *paragraphs[12:]],
        title_page=True,
        contents=["Chapter I. The Lamp", "Chapter II. The Boats"],
    )
    _, result, text = _ingest(tmp_path, book_pdf(book))
    cleaning = result.manifest["cleaning"]
    pages = result.manifest["pages"]
    assert pages >= 6
    assert cleaning["running_headers"] >= pages - 4  # every page but title, contents, openings
    assert cleaning["page_numbers"] >= pages - 2
    assert cleaning["toc_lines"] >= 3 and cleaning["front_matter_lines"] >= 2
    assert cleaning["headings"] >= 2
    for leftover in ("LIGHTHOUSE KEEPER", "A. N. Author", "Contents", "CHAPTER", ". . ."):
        assert leftover not in text
    assert not [line for line in text.splitlines() if re.fullmatch(r"\s*\d+\s*", line)]
    # Every sentence of the body survives, exactly once, whatever page it was on.
    for sentence in sentences(96):
        assert text.count(sentence) == 1, sentence
    assert result.manifest["words"] == sum(len(p.split()) for p in _all_prose(24))


def test_dehyphenation_follows_the_books_own_vocabulary(tmp_path: Path) -> None:
    lines = [
        "In the first season the sea-wall held, and to-morrow the",
        "keeper would mend what was left. The acquaintance of",
        "the keeper was a good thing. His brain was tired, and the",
        "brain of a keeper is like an attic.",
    ]
    broken = [
        "He had made the ac-",
        "quaintance of a good-",
        "natured keeper by the sea-",
        "wall, who said the sea-",
        "son was late and that To-",
        "morrow would bring the boats. It filled his brain-",
        "attic with noise.",
    ]
    book = Book([*prose(6), Paragraph(lines=lines), Paragraph(lines=broken), *prose(6, start=24)])
    _, result, text = _ingest(tmp_path, book_pdf(book))
    expected = (
        "He had made the acquaintance of a good-natured keeper by the sea-wall, who said the season "
        "was late and that To-morrow would bring the boats. It filled his brain-attic with noise."
    )
    assert expected in text
    assert not re.search(r"\w- \w", text), "a line-end hyphen fragment survived"
    cleaning = result.manifest["cleaning"]
    assert cleaning["hyphen_joins"] == 2  # ac-quaintance, sea-son
    # good-natured, sea-wall, To-morrow; brain-attic: two words of the book (one of them seen once)
    # that it never writes closed up
    assert cleaning["hyphens_kept"] == 4


def test_ligatures_become_letters_and_real_letters_stay(tmp_path: Path) -> None:
    special = Paragraph(
        "The office clerk was first to find the fluent official note on hæmoglobin and manœuvres."
    )
    book = Book([*prose(5), special, *prose(5, start=20)], ligatures=True)
    pdf = book_pdf(book)
    _, result, text = _ingest(tmp_path, pdf)
    assert result.manifest["cleaning"]["ligatures"] >= 5
    assert not set("\ufb00\ufb01\ufb02\ufb03\ufb04") & set(text)
    assert special.text in text  # æ and œ are letters, not ligatures: kept


def test_dialogue_and_paragraph_breaks_survive_reflow(tmp_path: Path) -> None:
    dialogue = [
        Paragraph(
            lines=["“Is the lamp lit?” asked Mrs. Hale, coming to the door", "with her shawl about her."]
        ),
        Paragraph(lines=["“It is,” said he."]),
        Paragraph(lines=["“Then come in to supper.”"]),
        Paragraph(lines=["He came in, and the wind came with him, and the", "candles bowed to it."]),
    ]
    _, result, text = _ingest(tmp_path, book_pdf(Book([*prose(6), *dialogue, *prose(6, start=24)])))
    paragraphs = text.strip().split("\n\n")
    assert paragraphs[6:10] == [
        "“Is the lamp lit?” asked Mrs. Hale, coming to the door with her shawl about her.",
        "“It is,” said he.",
        "“Then come in to supper.”",
        "He came in, and the wind came with him, and the candles bowed to it.",
    ]
    assert len(paragraphs) == result.manifest["paragraphs"] == 16


def test_illustration_caption_is_dropped_and_counted(tmp_path: Path) -> None:
    book = Book([*prose(4), Picture(["THE KEEPER AT HIS LAMP,", "WATCHING THE SEA."]), *prose(8, start=16)])
    _, result, text = _ingest(tmp_path, book_pdf(book))
    assert result.manifest["cleaning"]["captions"] == 2
    assert "KEEPER AT HIS LAMP" not in text and "WATCHING" not in text
    assert all(p in text for p in _all_prose(8, start=16))


def test_sentences_keep_abbreviations_and_quoted_dialogue_whole() -> None:
    corpus = _all_prose(40)
    paragraphs = [
        *corpus,
        "Mr. Holmes met Dr. Watson near St. Paul’s in the morning. Mrs. Hudson was not surprised.",
        "“Poor devil!” he said, commiseratingly. “What are you up to now?”",
        "“Looking for lodgings.” I answered. “Trying to solve a problem.”",
        "“I should like to meet him,” I said. “If I am to lodge with anyone, it had better be him.”",
    ]
    sentences = [s.text for s in split_sentences(paragraphs)]
    assert sentences[-8:] == [
        "Mr. Holmes met Dr. Watson near St. Paul’s in the morning.",
        "Mrs. Hudson was not surprised.",
        "“Poor devil!” he said, commiseratingly.",
        "“What are you up to now?”",
        "“Looking for lodgings.” I answered.",
        "“Trying to solve a problem.”",
        "“I should like to meet him,” I said.",
        "“If I am to lodge with anyone, it had better be him.”",
    ]


def _sentences(n: int) -> list[Sentence]:
    return [Sentence(f"Sentence number {i}.", i // 3) for i in range(n)]


def test_chunks_parts_and_the_seeded_split() -> None:
    params = IngestParams(chunk_sentences=4, parts=3, test_fraction=0.1, seed=7)
    sentences = _sentences(250)
    chunks = make_chunks(sentences, 4)
    assert len(chunks) == 63 and chunks[-1] == "Sentence number 248.\nSentence number 249."
    assert chunks[0] == "Sentence number 0. Sentence number 1. Sentence number 2.\nSentence number 3."
    parts = split_parts(chunks, plan_parts(len(sentences), params), params)
    assert [len(p.train) + len(p.test) for p in parts] == [21, 21, 21]
    assert [len(p.test) for p in parts] == [2, 2, 2]
    # Consecutive parts, book order inside each file, nothing lost or repeated.
    for part, start in zip(parts, (0, 21, 42), strict=True):
        block = chunks[start : start + 21]
        assert part.train == [c for c in block if c in part.train]
        assert part.test == [c for c in block if c in part.test]
        assert sorted(part.train + part.test) == sorted(block)
    again = split_parts(chunks, 3, params)
    assert [p.test for p in again] == [p.test for p in parts]  # deterministic
    other = split_parts(chunks, 3, IngestParams(chunk_sentences=4, parts=3, seed=8))
    assert [p.test for p in other] != [p.test for p in parts]  # and the seed matters


def test_too_little_text_states_the_numbers_and_auto_reduce_works(tmp_path: Path) -> None:
    pdf = book_pdf(Book(prose(3)))  # 12 sentences
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(FailedPrecondition) as info:
        ingest(store, pdf, params=IngestParams())
    message = info.value.message
    assert "found 12 sentences" in message and "need at least 200" in message
    assert "--auto-reduce-parts" in message
    assert store.list("books/") == []
    manifest = ingest(store, pdf, params=IngestParams(chunk_sentences=2, auto_reduce_parts=True)).manifest
    assert manifest["params"]["parts"] == 3 and manifest["params"]["requested_parts"] == 10
    assert any("reduced to 3" in w for w in manifest["warnings"])
    assert [p["train_chunks"] + p["test_chunks"] for p in manifest["parts"]] == [2, 2, 2]


def test_store_layout_manifest_and_proto_roundtrip(tmp_path: Path) -> None:
    pdf = book_pdf(Book([Heading("CHAPTER I"), *prose(20)]))
    store, result, text = _ingest(tmp_path, pdf, IngestParams(chunk_sentences=3, parts=4, seed=1))
    manifest = result.manifest
    book_id = manifest["book_id"]
    assert book_id == layout.book_id_for(pdf) and not result.already_existed
    expected_keys = {layout.source_key(book_id), layout.text_key(book_id), layout.manifest_key(book_id)}
    for index in range(4):
        expected_keys |= {layout.part_train_key(book_id, index), layout.part_test_key(book_id, index)}
    assert set(store.list(f"books/{book_id}/")) == expected_keys
    assert store.get(layout.source_key(book_id)) == pdf
    assert store.get_json(layout.manifest_key(book_id)) == manifest
    # Chunks carry increasing sentence numbers: book order across parts, train and test alike.
    numbers = []
    for part in manifest["parts"]:
        assert part["train_key"] == layout.part_train_key(book_id, part["index"])
        for key, count in (
            (part["train_key"], part["train_chunks"]),
            (part["test_key"], part["test_chunks"]),
        ):
            rows = [json.loads(line) for line in store.get_text(key).splitlines()]
            assert len(rows) == count and all(set(r) == {"text"} for r in rows)
            found = [int(n) for r in rows for n in re.findall(r"\b(\d+)\b", r["text"])]
            assert found == sorted(found)
            numbers += found
    assert sorted(numbers) == list(range(1, 81))
    assert manifest["sentences"] == 80 and manifest["chunks"] == 27
    assert text.count("\n\n") == 19
    typed = manifest_codec.to_proto(manifest)
    assert typed.book_id == book_id and typed.pages == manifest["pages"] and typed.chunks == 27
    assert typed.params.parts == 4 and typed.params.seed == 1 and dict(typed.cleaning) == manifest["cleaning"]
    assert [p.train_chunks for p in typed.parts] == [p["train_chunks"] for p in manifest["parts"]]
    assert manifest_codec.from_proto(typed) == manifest
    assert get_book(store, book_id) == manifest and list_books(store) == [manifest]


def test_same_pdf_twice_is_idempotent(tmp_path: Path) -> None:
    pdf = book_pdf(Book(prose(10)))
    store, first, _ = _ingest(tmp_path, pdf)
    before = {key: store.stat(key).modified for key in store.list("books/")}
    second = ingest(store, pdf, params=SMALL)
    assert second.already_existed and second.manifest == first.manifest
    assert {key: store.stat(key).modified for key in store.list("books/")} == before
    with pytest.raises(FailedPrecondition, match="already in the store, cut with chunk_sentences=2, parts=2"):
        ingest(store, pdf, params=IngestParams(chunk_sentences=5, parts=2))
    assert {key: store.stat(key).modified for key in store.list("books/")} == before


class _FailingStore(LocalStore):
    """A real local store whose disk 'fills up' when the manifest is written."""

    def _put(self, key: str, data: bytes) -> None:
        if key.endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        super()._put(key, data)

    def _put_if_absent(self, key: str, data: bytes) -> bool:  # how the manifest is committed
        if key.endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        return super()._put_if_absent(key, data)


def test_a_failed_write_leaves_no_half_book(tmp_path: Path) -> None:
    store = _FailingStore(tmp_path / "store", retry_seconds=0)
    with pytest.raises(StoreError):
        ingest(store, book_pdf(Book(prose(10))), params=SMALL)
    assert store.list("") == []


def test_truncated_pdf_recovers_readable_pages_with_a_warning(tmp_path: Path) -> None:
    pdf = book_pdf(Book(prose(40)))
    cut = pdf[: pdf.rfind(b"/CreationDate")]  # the cross-reference table and trailer are lost
    _, result, text = _ingest(tmp_path, cut, IngestParams(chunk_sentences=2, parts=2))
    assert any("damaged or truncated" in w for w in result.manifest["warnings"])
    assert result.manifest["pages"] > 0
    assert _all_prose(1)[0] in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a PDF: the file is empty"),
        (b"GIF89a not a pdf at all" * 10, "not a PDF"),
        (b"%PDF-1.4\n" + b"\x00garbage" * 100, "damaged or truncated"),
    ],
)
def test_not_a_pdf_is_a_clear_error(tmp_path: Path, data: bytes, message: str) -> None:
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(InvalidArgument, match=message):
        ingest(store, data)
    assert store.list("") == []


def test_ingest_into_an_s3_store(s3_settings: dict[str, str]) -> None:
    """The same pipeline on the S3 backend (a real moto server process)."""
    from novelcrafter.config import get_settings

    store = open_store("s3://ingest-books/prefix", get_settings())
    pdf = book_pdf(Book(prose(10)))
    manifest = ingest(store, pdf, params=SMALL).manifest
    keys = store.list("books/")
    assert layout.manifest_key(manifest["book_id"]) in keys and len(keys) == 7
    assert store.get(layout.source_key(manifest["book_id"])) == pdf
    assert ingest(store, pdf, params=SMALL).already_existed
    assert list_books(store) == [manifest]


def test_cancelled_ingest_stops_its_workers_and_writes_nothing(tmp_path: Path) -> None:
    import psutil

    from novelcrafter.errors import Aborted

    polls = []

    def cancelled() -> bool:  # the caller goes away once extraction is under way
        polls.append(1)
        return len(polls) > 3

    store = open_store(str(tmp_path / "store"))
    with pytest.raises(Aborted, match="cancelled"):
        ingest(store, book_pdf(Book(prose(40))), params=SMALL, cancelled=cancelled)
    assert store.list("") == []
    workers = [
        p
        for p in psutil.Process().children(recursive=True)
        if "novelcrafter.ingest.extract_sandbox" in " ".join(p.cmdline())
    ]
    assert workers == []
