"""Chunks of N sentences, K consecutive parts, a seeded train/test split per part."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass

from novelcrafter.errors import FailedPrecondition

from .params import IngestParams
from .sentences import Sentence


@dataclass
class Part:
    index: int
    train: list[str]
    test: list[str]


def plan_parts(sentence_count: int, params: IngestParams) -> int:
    """How many parts the text allows; a clear error (with the numbers) when it is too short."""
    per_part = params.min_chunks_per_part * params.chunk_sentences
    needed = params.parts * per_part
    if sentence_count >= needed:
        return params.parts
    possible = sentence_count // per_part
    if params.auto_reduce_parts and possible >= 1:
        return possible
    shape = (
        f"{params.parts} part{'s' if params.parts != 1 else ''} of at least {params.min_chunks_per_part} "
        f"chunk{'s' if params.min_chunks_per_part != 1 else ''} of {params.chunk_sentences} sentences"
    )
    if params.auto_reduce_parts:
        return _too_little(sentence_count, per_part, f"even 1 part of {params.min_chunks_per_part} chunks")
    return _too_little(
        sentence_count,
        needed,
        shape,
        hint="use fewer --parts, a smaller --chunk-sentences, or --auto-reduce-parts",
    )


def _too_little(found: int, needed: int, shape: str, hint: str = "use a smaller --chunk-sentences") -> int:
    raise FailedPrecondition(
        f"too little text: found {found} sentence{'' if found == 1 else 's'}, need at least {needed} "
        f"for {shape}; {hint}"
    )


_LEAD_IN = re.compile(r":\s*$")  # "… and said:", its quotation follows


def make_chunks(
    sentences: list[Sentence], chunk_sentences: int, counts: Counter[str] | None = None
) -> list[str]:
    """Consecutive groups of ``chunk_sentences`` sentences (the last may be shorter).

    Inside a chunk, sentences of one paragraph keep their original spacing (the chunk is a
    verbatim slice of the paragraph) and paragraphs are joined by a newline, so dialogue
    keeps its shape. A chunk does not end on a lead-in (a sentence ending in ":"): it takes the
    sentence that opens the quotation too (up to twice its size), counted as
    ``lead_ins_joined`` in ``counts``.
    """
    chunks = []
    start = 0
    while start < len(sentences):
        stop = min(start + chunk_sentences, len(sentences))
        # Bounded, so that a text of nothing but lead-ins still comes in chunks.
        while stop < min(len(sentences), start + 2 * chunk_sentences) and _LEAD_IN.search(
            sentences[stop - 1].text
        ):
            stop += 1
            if counts is not None:
                counts["lead_ins_joined"] += 1
        group = sentences[start:stop]
        start = stop
        text = group[0].text
        for prev, sentence in itertools.pairwise(group):
            text += (sentence.before if sentence.paragraph == prev.paragraph else "\n") + sentence.text
        chunks.append(text)
    return chunks


def split_parts(chunks: list[str], parts: int, params: IngestParams) -> list[Part]:
    """``parts`` consecutive, near-equal parts; in each, a seeded held-out share (book order kept)."""
    result = []
    base, extra = divmod(len(chunks), parts)
    start = 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        part = chunks[start : start + size]
        start += size
        n_test = 0
        if params.test_fraction > 0 and len(part) >= 2:
            n_test = min(len(part) - 1, max(1, round(params.test_fraction * len(part))))
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
        rng = random.Random(f"novelcrafter-split:{params.seed}:{index}")
        held_out = set(rng.sample(range(len(part)), n_test))
        result.append(
            Part(
                index=index,
                train=[c for i, c in enumerate(part) if i not in held_out],
                test=[c for i, c in enumerate(part) if i in held_out],
            )
        )
    return result
