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

from .data import collate, pack, tokenize_chunks
from .training import batch_nll


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


def continue_tokens(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    device: str,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_k: int = 50,
    seed: int = 0,
    adapter_names: Sequence[str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[list[int]]:
    """``new_tokens`` generated after each prompt (all prompts the same length: no padding).

    Greedy when ``temperature`` is 0, else seeded top-k sampling. A plain loop over the KV
    cache rather than ``model.generate``: no early stop at EOS (every continuation has the
    same length) and no generation config of the checkpoint sneaking in sampling settings.
    ``adapter_names`` (one per prompt, PEFT's mixed-batch LoRA) lets one batch hold prompts for
    the adapter and for the base model (``"__base__"``).
    """
    import torch

    if not prompts or new_tokens <= 0:
        return [[] for _ in prompts]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("continue_tokens needs prompts of one length")
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out: list[list[int]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids = torch.tensor([list(p) for p in prompts[start : start + batch_size]], device=device)
            extra = (
                {}
                if adapter_names is None
                else {"adapter_names": list(adapter_names[start : start + batch_size])}
            )
            generated: list[Any] = []
            cache = None
            for _ in range(new_tokens):
                if should_stop():
                    raise EvalInterrupted("stop requested during evaluation")
                result = model(input_ids=ids, cache=cache, use_cache=True, **extra)
                cache = result.cache
                logits = result.logits[:, -1, :].float()
                if generator is None:
                    ids = logits.argmax(dim=-1, keepdim=True)
                else:
                    top = torch.topk(logits / temperature, min(top_k, logits.shape[-1]), dim=-1)
                    pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
                    ids = top.indices.gather(-1, pick)
                generated.append(ids)
            out.extend(torch.cat(generated, dim=1).tolist())
    return out


BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def base_and_adapter_continuations(
    model: Any, prompts: Sequence[Sequence[int]], new_tokens: int, **options: Any
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of ``prompts``: (base model's, adapter's), decoded in one pass.

    Decoding is bound by per-step overhead on CPU, so one batch with both halves (mixed-batch
    LoRA) costs about half of two passes. A model without an adapter gives its own twice.
    """
    name = getattr(model, "active_adapter", None)
    if not name or not hasattr(model, "disable_adapter"):
        out = continue_tokens(model, prompts, new_tokens, **options)
        return out, out
    both = [*prompts, *prompts]
    names = [name] * len(prompts) + [BASE] * len(prompts)
    out = continue_tokens(model, both, new_tokens, adapter_names=names, **options)
    return out[len(prompts) :], out[: len(prompts)]
