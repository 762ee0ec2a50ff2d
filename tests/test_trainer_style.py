"""The stylometric distance separates authors: a book's own unseen text scores closer to it
than another author's text.

Corpus-independent case on texts in the repository (the project's own story and Austen's
chapter 1 from test_trainer_helpers); the real case on two books of ../shared/corpus/books,
ingested as a user would, held-out chunks as the reference (skipped without ../shared).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from novelcrafter.ingest.pipeline import ingest_pdf
from novelcrafter.trainer.style import METRIC, StyleReference, profile, sentences, windows, words
from support import BOOKS, require_shared
from test_trainer_helpers import AUSTEN

from novelcrafter.store import open_store

STORY = Path(__file__).resolve().parent.parent / "novelcrafter" / "run" / "saltmarrow.txt"
SAMPLE_WORDS = 400  # about what the style evaluation generates (8 prompts x 64 tokens)


def _story() -> str:
    lines = STORY.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.startswith(("%", "#")))


def _samples(text: str, count: int, size: int = SAMPLE_WORDS) -> list[str]:
    tokens = text.split()
    step = max((len(tokens) - size) // max(count - 1, 1), 1)
    return [" ".join(tokens[i * step : i * step + size]) for i in range(count)]


def test_features_of_a_known_text() -> None:
    text = "The cat sat. The dog ran, and the cat ran! Did it?"
    assert words(text) == ["the", "cat", "sat", "the", "dog", "ran", "and", "the", "cat", "ran", "did", "it"]
    assert sentences(text) == ["The cat sat.", "The dog ran, and the cat ran!", "Did it?"]
    p = profile(text, ["the", "cat", "owl"])
    assert p.words == [3 / 12, 2 / 12, 0.0]
    assert p.sentlen == 12 / 3
    assert windows(text, size=5) == ["The cat sat. The dog ran, and the cat ran! Did it?"]


def test_a_text_is_closest_to_itself() -> None:
    book = _story()
    reference = StyleReference(book)
    assert reference.distance(book).distance == pytest.approx(0.0, abs=1e-12)
    assert reference.distance(book).metric == METRIC == "burrows_delta_mfw100+punct+sentlen"
    assert math.isnan(reference.distance("").distance)


def test_same_author_scores_closer_than_another_author_in_repo_texts() -> None:
    """The story's first half is the reference; its unseen second half beats Austen."""
    tokens = _story().split()
    half = len(tokens) // 2
    reference = StyleReference(" ".join(tokens[:half]))
    same = [reference.distance(s).distance for s in _samples(" ".join(tokens[half:]), 3)]
    other = [reference.distance(s).distance for s in _samples(AUSTEN, 2)]
    assert max(same) < min(other), (same, other)


@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """(held-out text, training text) of two corpus books by different authors."""
    require_shared(BOOKS)
    store = open_store(str(tmp_path_factory.mktemp("style") / "store"))
    out = {}
    for name in ("pride-and-prejudice", "a-study-in-scarlet"):
        path = BOOKS / f"{name}.pdf"
        if not path.exists():
            pytest.skip(f"{path} is absent")
        manifest = ingest_pdf(store, path.read_bytes(), filename=path.name)
        texts: dict[str, list[str]] = {"test_key": [], "train_key": []}
        for part in manifest["parts"]:
            for key in texts:
                lines = store.get_text(part[key]).splitlines()
                texts[key] += [json.loads(line)["text"] for line in lines if line.strip()]
        out[name] = (" ".join(texts["test_key"]), " ".join(texts["train_key"]))
    return out


@pytest.mark.parametrize(
    "author,other",
    [("pride-and-prejudice", "a-study-in-scarlet"), ("a-study-in-scarlet", "pride-and-prejudice")],
)
def test_corpus_books_separate_authors(books: dict[str, tuple[str, str]], author: str, other: str) -> None:
    """Against a book's held-out text, samples of its own training text score closer on average."""
    reference = StyleReference(books[author][0])
    same = [reference.distance(s).distance for s in _samples(books[author][1], 8, 1000)]
    different = [reference.distance(s).distance for s in _samples(books[other][1], 8, 1000)]
    # Delta on 1000-word samples is a noisy single reading; the claim is about the average.
    assert sum(same) / len(same) < sum(different) / len(different), (same, different)
    assert sorted(same)[len(same) // 2] < sorted(different)[len(different) // 2], (same, different)
