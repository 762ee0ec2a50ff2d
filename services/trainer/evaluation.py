"""Held-out perplexity: token-weighted, exp(total NLL / total target tokens).

Never a mean of per-batch perplexities. Chunks are packed exactly as in training
(block-diagonal attention, no padding), which gives each chunk's own NLL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from novelcrafter.trainer.data import collate, pack, tokenize_chunks
from novelcrafter.trainer.training import batch_nll


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float
    targets: int
    chunks: int

    @property
    def loss(self) -> float:
        return self.nll / self.targets if self.targets else float("nan")


class EvalInterrupted(Exception):
    """The worker was asked to stop during evaluation."""


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    device: str,
    dtype: Any,
    should_stop: Callable[[], bool] = lambda: False,
) -> Perplexity:
    """Perplexity of ``model`` on ``texts`` (each text one chunk)."""
    import torch

    chunks = tokenize_chunks(tokenizer, texts, max_length)
    sequences = pack(chunks, max_length)
    nll = 0.0
    targets = 0
    model.eval()
    with torch.no_grad():
        for sequence in sequences:
            if should_stop():
                raise EvalInterrupted("stop requested during evaluation")
            batch = collate([sequence], tokenizer.pad_token_id)
            nll += float(batch_nll(model, batch, device, dtype))
            targets += batch.targets
    value = math.exp(nll / targets) if targets else float("nan")
    return Perplexity(value, nll, targets, len(chunks))


def without_adapter(model: Any) -> Any:
    """Context in which a PeftModel computes as its base model."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()
