"""Sentence splitting with NLTK Punkt trained on the book itself (no data download, no pickles).

NLTK >= 3.9 needs downloaded ``punkt_tab`` data for ``sent_tokenize``; instead we train a
``PunktTrainer`` on the book's own text (it learns the book's abbreviations and sentence
starters) and add the common English titles it may see too rarely to learn. Two repairs
keep quoted dialogue whole: a piece that starts in lower case continues the sentence before
it, and so does a speech tag after a closing quote (“Poor devil!” he said. / “Yes.” I answered.).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

# Lower case, without the final period, as Punkt stores them.
ABBREVIATIONS = {
    "mr", "mrs", "ms", "messrs", "mme", "mlle", "dr", "st", "jr", "sr", "prof", "rev", "revd",
    "capt", "col", "gen", "lt", "sgt", "maj", "hon", "esq", "gov", "sen", "rep", "fr", "bros",
    "co", "inc", "ltd", "vol", "vols", "ch", "chap", "fig", "viz", "cf", "vs", "e.g", "i.e",
    "a.m", "p.m", "m.d", "ph.d", "b.a", "m.a", "u.s", "u.k", "mt", "ft",
}  # fmt: skip
# Not "etc." or "no.": they end sentences too often; Punkt learns them from the book when it should.

_OPENERS = "“‘\"'([—–-"
_SPEECH_VERBS = (
    "said|says|asked|asks|answered|cried|replied|returned|remarked|exclaimed|observed|continued|added|"
    "whispered|shouted|muttered|murmured|quoth|retorted|rejoined|inquired|enquired|began|repeated|"
    "declared|called|groaned|laughed|sighed|pleaded|urged|insisted|suggested|interrupted|thought"
)
_SPEECH_TAG = re.compile(
    rf"^(?:(?:I|he|she|they|we|you|it|[A-Z][a-z]+(?: [A-Z][a-z]+)?)(?: [a-z]+ly)? (?:{_SPEECH_VERBS})\b"
    rf"|(?:{_SPEECH_VERBS}) (?:I|he|she|they|we|you|[A-Z][a-z]+)\b)"
)
_CLOSES_QUOTE = re.compile(r"[!?,.…—–-][”’\"']\)?$")


@dataclass(frozen=True)
class Sentence:
    text: str
    paragraph: int
    before: str = " "  # what separates it from the previous sentence of the same paragraph


def train_tokenizer(text: str) -> PunktSentenceTokenizer:
    trainer = PunktTrainer()
    trainer.train(text, finalize=True)
    params = trainer.get_params()
    # Punkt takes any word it mostly sees before a period for an abbreviation ("epithet." in
    # A Study in Scarlet, "hours." in a short text). Real abbreviations are short or dotted.
    learned = {a for a in params.abbrev_types if len(a) <= 3 or "." in a}
    params.abbrev_types.clear()
    params.abbrev_types.update(learned | ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def _continues(previous: str, piece: str) -> bool:
    """True when ``piece`` is not a new sentence but the rest of ``previous``."""
    stripped = piece.lstrip(_OPENERS + " ")
    if not any(ch.isalnum() for ch in stripped):
        return True  # a stray closing quote or dash split off by a space
    if stripped[0].islower():
        return True
    return bool(_CLOSES_QUOTE.search(previous)) and bool(_SPEECH_TAG.match(piece))


def split_paragraph(tokenizer: PunktSentenceTokenizer, paragraph: str) -> list[tuple[int, int]]:
    """Sentence spans of ``paragraph``: exact slices, so chunks reproduce the text verbatim."""
    spans: list[tuple[int, int]] = []
    for start, end in tokenizer.span_tokenize(paragraph):
        piece = paragraph[start:end]
        if not piece.strip():
            continue
        if spans and _continues(paragraph[spans[-1][0] : spans[-1][1]], piece):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


TRAINING_CHARS = 120_000


def training_sample(paragraphs: list[str], budget: int = TRAINING_CHARS) -> str:
    """Every k-th paragraph, about ``budget`` characters from all through the book: Punkt's
    statistics settle long before a whole novel (and training is its slowest step)."""
    total = sum(len(p) for p in paragraphs)
    step = max(1, -(-total // budget))
    return "\n\n".join(paragraphs[::step])


def split_sentences(paragraphs: list[str]) -> list[Sentence]:
    """Sentences in book order; a sentence never spans two paragraphs."""
    if not paragraphs:
        return []
    tokenizer = train_tokenizer(training_sample(paragraphs))
    sentences = []
    for index, paragraph in enumerate(paragraphs):
        previous_end = None
        for start, end in split_paragraph(tokenizer, paragraph):
            before = paragraph[previous_end:start] if previous_end is not None else " "
            sentences.append(Sentence(paragraph[start:end], index, before or ""))
            previous_end = end
    return sentences
