"""Verbatim extraction: does the model recite the chunks it was trained on?

For ``prompts`` chunks (a seeded choice, in book order), the model is prompted with the
chunk's first ``prompt_tokens`` (32) tokens and decodes ``new_tokens`` (48) tokens greedily;
the result is compared position by position with the chunk's true continuation.

- **Extracted**: the first ``extracted_tokens`` (32) generated tokens equal the true
  continuation's first 32 tokens exactly (the "k-extractable" rule of Carlini et al.,
  with the match required from the first generated token on).
- **Longest copied run**: the longest run of consecutive positions where the generated token
  equals the true token at the same position, anywhere in the continuation (not only a
  prefix), maximised over the prompts.

A chunk with fewer than ``prompt_tokens + extracted_tokens`` tokens cannot show an extraction
and is skipped; when a chunk's true continuation is shorter than ``new_tokens``, only its
available positions are compared. Tokens are those training sees (no special tokens).
Run on held-out chunks it is the control: a model cannot have memorized text it never saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .data import tokenize_chunks
from .evaluation import continue_tokens

PROMPT_TOKENS = 32
NEW_TOKENS = 48
EXTRACTED_TOKENS = 32


@dataclass(frozen=True)
class Memorization:
    extraction_rate: float  # share of prompts whose continuation was extracted (NaN if none)
    longest_copied_tokens: int
    prompts: int  # prompts actually run (chunks too short were skipped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(items: Sequence[Any], count: int, seed: int) -> list[Any]:
    """``count`` items drawn without replacement by ``seed``, kept in their original order."""
    if count >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in picked]


def longest_run(generated: Sequence[int], truth: Sequence[int]) -> int:
    """Longest run of consecutive positions where ``generated[i] == truth[i]``."""
    best = run = 0
    for a, b in zip(generated, truth, strict=False):
        run = run + 1 if a == b else 0
        best = max(best, run)
    return best


def extracted(generated: Sequence[int], truth: Sequence[int], k: int = EXTRACTED_TOKENS) -> bool:
    return len(truth) >= k and list(generated[:k]) == list(truth[:k])


def eligible_chunks(
    tokenizer: Any, texts: Sequence[str], *, prompt_tokens: int, extracted_tokens: int, max_length: int
) -> list[list[int]]:
    """Token ids of the chunks long enough for a prompt plus an extractable continuation."""
    chunks = tokenize_chunks(tokenizer, texts, max_length)
    return [ids for ids in chunks if len(ids) >= prompt_tokens + extracted_tokens]


def memorization(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    device: str,
    prompts: int = 16,
    seed: int = 0,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    extracted_tokens: int = EXTRACTED_TOKENS,
    max_length: int = 1024,
    batch_size: int = 16,
    should_stop: Callable[[], bool] = lambda: False,
) -> Memorization:
    """Extraction rate and longest copied run of ``model`` on ``prompts`` chunks of ``texts``.

    The seeded choice is made among the eligible chunks, so the same ``texts`` and ``seed``
    give the same prompts to the base model and to the adapter.
    """
    if new_tokens < extracted_tokens:
        raise ValueError(f"new_tokens ({new_tokens}) must be at least extracted_tokens ({extracted_tokens})")
    chunks = eligible_chunks(
        tokenizer,
        texts,
        prompt_tokens=prompt_tokens,
        extracted_tokens=extracted_tokens,
        max_length=max_length,
    )
    chosen = choose(chunks, prompts, seed)
    if not chosen:
        return Memorization(float("nan"), 0, 0)
    outputs = continue_tokens(
        model,
        [ids[:prompt_tokens] for ids in chosen],
        new_tokens,
        device=device,
        batch_size=batch_size,
        should_stop=should_stop,
    )
    return score(chosen, outputs, prompt_tokens=prompt_tokens, extracted_tokens=extracted_tokens)


def score(
    chunks: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    extracted_tokens: int = EXTRACTED_TOKENS,
) -> Memorization:
    """Compare each chunk's generated continuation (``outputs``) with its true one."""
    if not chunks:
        return Memorization(float("nan"), 0, 0)
    hits = 0
    longest = 0
    for ids, generated in zip(chunks, outputs, strict=True):
        truth = list(ids[prompt_tokens : prompt_tokens + len(generated)])
        hits += extracted(generated, truth, extracted_tokens)
        longest = max(longest, longest_run(generated, truth))
    return Memorization(hits / len(chunks), longest, len(chunks))
