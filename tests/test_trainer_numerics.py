"""The optimized training path computes what the reference path computes.

Optimized: ``training.batch_nll`` → ``packed_forward`` (fused projections, per-chunk causal
attention on packed sequences, blockwise linear + cross-entropy). Reference:
``training.reference_nll`` — transformers + PEFT, fp32, unfused, every chunk on its own
(unpacked attention). Tolerances, stated once here:

* fp32, same packed batch, dropout on (same seed): loss to 1e-5 relative, LoRA gradients to
  5e-3 of each tensor's largest entry and cosine similarity ≥ 0.9999 — the same masks are
  drawn in the same order; what remains is fp32 summation order (fused matmuls, blockwise
  cross-entropy, attention kernel). Measured: loss 5e-6, gradients 2.2e-3 at most, in the
  o_proj lora_B of the last layers, where SmolLM2's residual stream carries outliers of
  ~25 000 (hidden states themselves agree to ~1e-8 relative there);
* fp32, one AdamW step, packed + optimized vs unpacked + reference (dropout 0, as the masks
  of differently shaped inputs cannot match): the same loss and gradient tolerances (what
  AdamW then does with the gradient is the same code on both paths);
* bf16 autocast (optimized) vs fp32 (reference), on a small Llama with grouped-query
  attention: loss to 1e-2 relative, every gradient's cosine similarity ≥ 0.99 — bf16 keeps
  8 bits of mantissa, so this is the precision the optimized path is allowed to lose.
"""

from __future__ import annotations

import copy

import pytest
import torch
from novelcrafter.trainer import packed_forward
from novelcrafter.trainer.data import collate, one_per_sequence, pack, tokenize_chunks
from novelcrafter.trainer.lora import attach
from novelcrafter.trainer.training import batch_nll, reference_nll
from test_trainer_helpers import chunks, one_torch_thread  # noqa: F401 (autouse)

from novelcrafter.train_settings import LoraSettings

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_model(base: torch.nn.Module, dropout: float, targets=("q_proj", "v_proj")) -> torch.nn.Module:
    torch.manual_seed(0)
    model = attach(base, LoraSettings(dropout=dropout, target_modules=targets))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; a non-zero B makes every gradient non-trivial
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    return model


def _loss_and_grads(model, fn, batches, dtype=None, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = fn(model, batch, "cpu", dtype)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, grads


def _max_relative_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert ref.keys() == got.keys() and ref
    return max(float((ref[k] - got[k]).abs().max() / ref[k].abs().max()) for k in ref)


def _min_cosine(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    cos = torch.nn.functional.cosine_similarity
    return min(float(cos(ref[k].flatten(), got[k].flatten(), dim=0)) for k in ref)


def _assert_close(ref_loss, ref_grads, loss, grads) -> None:
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _max_relative_error(ref_grads, grads) < 5e-3
    assert _min_cosine(ref_grads, grads) >= 0.9999


@pytest.fixture(scope="module")
def packed(base_model):
    _model, tokenizer = base_model
    token_chunks = tokenize_chunks(tokenizer, chunks(3)[:5], max_length=256)
    sequences = pack(token_chunks, max_length=sum(map(len, token_chunks)))
    assert len(sequences) == 1 and sequences[0].chunks == 5
    return token_chunks, sequences[0], tokenizer.pad_token_id


def test_the_real_model_takes_the_optimized_path(base_model_dir):
    from peft import LoraConfig, get_peft_model

    from novelcrafter.models import load_base_model

    base = load_base_model(base_model_dir)
    assert packed_forward.supports(base)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not packed_forward.supports(dora)  # DoRA: the reference path computes it
    embedding = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert not packed_forward.supports(embedding)
    assert packed_forward.supports(_lora_model(base, 0.05, ALL_PROJECTIONS))


def test_same_packed_batch_same_loss_and_gradients_with_dropout(base_model_dir, packed):
    from novelcrafter.models import load_base_model

    _chunks, sequence, pad = packed
    model = _lora_model(load_base_model(base_model_dir), dropout=0.05, targets=ALL_PROJECTIONS)
    batch = collate([sequence], pad)
    ref_loss, ref_grads = _loss_and_grads(model, reference_nll, [batch])
    fast_loss, fast_grads = _loss_and_grads(model, batch_nll, [batch])
    _assert_close(ref_loss, ref_grads, fast_loss, fast_grads)
    # Control: another dropout seed changes the gradients far beyond the tolerance.
    _, other = _loss_and_grads(model, batch_nll, [batch], seed=6)
    assert _max_relative_error(ref_grads, other) > 1e-2


def test_one_optimizer_step_loss_and_gradients_match_the_unpacked_fp32_reference(base_model_dir, packed):
    from novelcrafter.models import load_base_model

    token_chunks, sequence, pad = packed
    reference = _lora_model(load_base_model(base_model_dir), dropout=0.0)
    optimized = _lora_model(load_base_model(base_model_dir), dropout=0.0)
    unpacked = [collate([s], pad) for s in one_per_sequence(token_chunks)]
    ref_loss, ref_grads = _loss_and_grads(reference, reference_nll, unpacked)
    fast_loss, fast_grads = _loss_and_grads(optimized, batch_nll, [collate([sequence], pad)])
    _assert_close(ref_loss, ref_grads, fast_loss, fast_grads)


def _small_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2 and Llama 3.2
        tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


def test_bf16_autocast_stays_within_bf16_precision_of_fp32():
    base = _small_llama()
    lengths = [40, 25, 60]
    gen = torch.Generator().manual_seed(1)
    token_chunks = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]
    (sequence,) = pack(token_chunks, max_length=sum(lengths))
    model = _lora_model(base, dropout=0.0, targets=ALL_PROJECTIONS)
    unpacked = [collate([s], 0) for s in one_per_sequence(token_chunks)]
    ref_loss, ref_grads = _loss_and_grads(model, reference_nll, unpacked)
    fast_loss, fast_grads = _loss_and_grads(model, batch_nll, [collate([sequence], 0)], dtype=torch.bfloat16)
    assert fast_loss == pytest.approx(ref_loss, rel=1e-2)
    assert _min_cosine(ref_grads, fast_grads) >= 0.99


def test_a_disabled_adapter_computes_the_base_model(base_model_dir, packed):
    """Base perplexity is measured on the PeftModel with its adapter disabled: the optimized
    path must then leave every LoRA out, as PEFT does."""
    from novelcrafter.trainer.evaluation import without_adapter

    from novelcrafter.models import load_base_model

    _chunks, sequence, pad = packed
    batch = collate([sequence], pad)
    model = _lora_model(load_base_model(base_model_dir), dropout=0.0)
    model.eval()
    with torch.no_grad():
        adapted = float(batch_nll(model, batch, "cpu", None))
        with without_adapter(model):
            base = float(batch_nll(model, batch, "cpu", None))
            reference = float(reference_nll(model, batch, "cpu", None))
    assert base == pytest.approx(reference, rel=1e-5)
    assert abs(adapted - base) / base > 1e-3  # the adapter does change the loss when enabled
