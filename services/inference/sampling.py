"""Per-request sampling and incremental text: nothing here depends on other requests.

Each request owns a ``torch.Generator`` seeded from its ``seed`` and draws from its own
logits row, so a seeded request samples the same tokens whatever it is batched with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .cpu_kernels import Shortlist


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


class Sampler(Protocol):
    """The compiled sampler (:meth:`cpu_kernels.RowGemm.sample`): the same algorithm as
    :func:`next_token`'s torch path, for one fp32 logits row, penalized in place."""

    def sample(
        self, logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, u: float
    ) -> int: ...


def shortlist(params: SamplingParams, seen: torch.Tensor | None) -> Shortlist | None:
    """The logits :func:`next_token` reads for ``params``: the top k (1 when greedy) and the
    ``seen`` ids the repetition penalty changes; None when it reads them all (no top-k)."""
    k = 1 if params.temperature == 0.0 else params.top_k
    if k <= 0:
        return None
    return Shortlist(
        k, seen if params.repetition_penalty != 1.0 and seen is not None and seen.numel() else None
    )


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    seen: torch.Tensor | None,
    sampler: Sampler | None = None,
) -> int:
    """Pick the next token from one row of fp32 logits (HF semantics: penalty, temperature,
    top-k, then top-p; ``seen``: int64 ids for the penalty).

    The draw is one uniform number from ``generator``, mapped through the inverse CDF of the
    kept tokens, best logit first (ties: lower id first), or in id order when neither top-k
    nor top-p filters. ``sampler`` (the compiled kernel, where the engine has it) computes the
    same token faster; a greedy request draws nothing."""
    logits = logits.to("cpu", torch.float32)
    penalize = params.repetition_penalty != 1.0 and seen is not None and seen.numel() > 0
    if sampler is not None:
        u = 0.0 if params.temperature == 0.0 else _uniform(generator)
        row = logits.clone() if penalize else logits.contiguous()  # penalized in place: a copy
        return sampler.sample(row, params, seen if penalize else None, u)
    if penalize:
        assert seen is not None
        scores = logits.gather(0, seen)
        penalty = params.repetition_penalty
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        logits = logits.scatter(0, seen, scores)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    u = _uniform(generator)
    vocab = logits.shape[0]
    if 0 < params.top_k < vocab:
        values, indices = torch.topk(logits, params.top_k)  # sorted, descending
    elif params.top_p < 1.0:
        values, indices = torch.sort(logits, descending=True, stable=True)
    else:
        values, indices = logits, torch.arange(vocab)
    weights = torch.exp((values.double() - values.max().double()) / params.temperature)
    kept = weights.shape[0]
    if params.top_p < 1.0:
        before = torch.cumsum(weights, dim=0) - weights  # mass of strictly better tokens
        kept = max(1, int((before < params.top_p * weights.sum()).sum()))
    cdf = torch.cumsum(weights[:kept], dim=0)
    choice = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    return int(indices[min(choice, kept - 1)])


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


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
