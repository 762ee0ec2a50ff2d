"""Per-request sampling and incremental text: nothing here depends on other requests.

Each request owns a ``torch.Generator`` seeded from its ``seed`` and draws from its own
logits row, so a seeded request samples the same tokens whatever it is batched with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator for one request; an unseeded request gets a random seed (returned)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen, seed


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: torch.Tensor | None
) -> int:
    """Pick the next token from one row of fp32 logits (HF semantics: penalty, temperature,
    top-k, then top-p)."""
    logits = logits.to("cpu", torch.float32)
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        scores = logits.gather(0, seen)
        penalty = params.repetition_penalty
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        logits = logits.scatter(0, seen, scores)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        values, indices = torch.topk(logits, params.top_k)  # sorted, descending
    else:
        values, indices = torch.sort(logits, descending=True, stable=True)
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=0)
        before = torch.cumsum(probs, dim=0) - probs  # mass of strictly better tokens
        keep = before < params.top_p
        keep[0] = True
        values, indices = values[keep], indices[keep]
    probs = torch.softmax(values, dim=0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


class TextAssembler:
    """Turns generated token ids into text pieces, safely for streaming.

    Decodes incrementally (prefix/read offsets, as TGI does) so multi-byte characters split
    across tokens are never emitted half-way, and holds back the tail that could still become
    a stop sequence. The concatenated pieces always equal :attr:`text`.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to emit ('' if none)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            search_from = max(0, len(self.text) - self.hold)
            self.text += piece
            self._find_stop(search_from)
        return self._take(final=self.stopped)

    def _find_stop(self, start: int) -> None:
        hits = [pos for pos in (self.text.find(s, start) for s in self.stop) if pos >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted : limit]
        self.emitted = limit
        return piece

    def finish(self) -> str:
        """The rest of the text (held-back tail), at the end of generation."""
        return self._take(final=True)
