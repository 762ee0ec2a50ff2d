"""Verbatim extraction on a constructed case: a LoRA trained hard on one chunk recites it.

The memorized chunk is from the project's own story (novelcrafter/run/saltmarrow.txt), which no
pretraining corpus holds, so the base model cannot extract it; a chunk the adapter never saw is
the control.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from novelcrafter.trainer.decode import base_and_adapter_greedy, row_gemm
from novelcrafter.trainer.evaluation import base_and_adapter_continuations, continue_tokens, without_adapter
from novelcrafter.trainer.lora import attach, detach
from novelcrafter.trainer.memorization import (
    PROMPT_TOKENS,
    choose,
    eligible_chunks,
    extracted,
    longest_run,
    memorization,
)
from test_trainer_helpers import one_torch_thread  # noqa: F401 (autouse)

from novelcrafter.train_settings import LoraSettings

STORY = Path(__file__).resolve().parent.parent / "novelcrafter" / "run" / "saltmarrow.txt"


def _paragraphs() -> list[str]:
    lines = STORY.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith(("%", "#"))]


def test_longest_run_counts_aligned_positions_anywhere() -> None:
    assert longest_run([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert longest_run([9, 2, 3, 9, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]) == 3  # not only a prefix
    assert longest_run([2, 3, 4], [1, 2, 3]) == 0  # shifted text is not copied position by position
    assert longest_run([], [1]) == 0


def test_extracted_needs_the_first_k_tokens_exactly() -> None:
    truth = list(range(40))
    assert extracted(truth, truth, 32)
    assert extracted(truth[:32] + [-1] * 8, truth, 32)  # the first 32 are what counts
    assert not extracted([-1, *truth[1:]], truth, 32)  # a miss at the first token is no extraction
    assert not extracted(truth[:31], truth[:31], 32)  # too short a truth can never be extracted


def test_choose_is_seeded_and_keeps_order() -> None:
    items = list(range(50))
    assert choose(items, 5, seed=1) == choose(items, 5, seed=1)
    assert choose(items, 5, seed=1) != choose(items, 5, seed=2)
    assert choose(items, 5, seed=1) == sorted(choose(items, 5, seed=1))
    assert choose(items, 80, seed=1) == items


def test_short_chunks_are_skipped(base_model) -> None:
    _, tokenizer = base_model
    long, short = _paragraphs()[0], "A short line of text."
    kept = eligible_chunks(tokenizer, [short, long], prompt_tokens=32, extracted_tokens=32, max_length=1024)
    assert len(kept) == 1 and len(kept[0]) >= 64


def test_greedy_continuation_matches_generate(base_model) -> None:
    """Our KV-cache loop decodes what transformers' own greedy ``generate`` decodes."""
    model, tokenizer = base_model
    prompts = [
        ids[:PROMPT_TOKENS]
        for ids in eligible_chunks(
            tokenizer, _paragraphs()[:2], prompt_tokens=32, extracted_tokens=32, max_length=1024
        )
    ]
    ours = continue_tokens(model, prompts, 12, device="cpu")
    ids = torch.tensor(prompts)
    with torch.no_grad():
        theirs = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
    assert ours == theirs[:, PROMPT_TOKENS:].tolist()


@pytest.fixture(scope="module")
def memorized(base_model_dir: Path):
    """A private base with a LoRA trained on one chunk until it recites it (loss near 0)."""
    from novelcrafter.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(base_model_dir)
    base = load_base_model(base_model_dir)
    chunk = _paragraphs()[1]
    torch.manual_seed(0)
    model = attach(base, LoraSettings(r=16, alpha=32, dropout=0.0))
    ids = torch.tensor([tokenizer(chunk, add_special_tokens=False)["input_ids"][:96]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    model.eval()
    yield model, tokenizer, chunk
    detach(model)


def test_a_memorized_chunk_is_extracted_and_the_control_is_not(memorized) -> None:
    model, tokenizer, chunk = memorized
    control = max(_paragraphs()[2:], key=len)  # a long paragraph the adapter never saw
    trained = memorization(model, tokenizer, [chunk], device="cpu", new_tokens=48)
    assert trained.prompts == 1
    assert trained.extraction_rate == 1.0
    assert trained.longest_copied_tokens >= 32
    held_out = memorization(model, tokenizer, [control], device="cpu")
    assert held_out.prompts == 1 and held_out.extraction_rate == 0.0
    with without_adapter(model):
        base = memorization(model, tokenizer, [chunk], device="cpu")
    assert base.extraction_rate == 0.0
    assert base.longest_copied_tokens < trained.longest_copied_tokens


def test_one_mixed_pass_equals_separate_passes(memorized) -> None:
    """Base and adapter decoded in one batch (as the part's evaluation does) = two passes."""
    model, tokenizer, chunk = memorized
    texts = [chunk, max(_paragraphs()[2:], key=len)]
    prompts = [
        ids[:PROMPT_TOKENS]
        for ids in eligible_chunks(tokenizer, texts, prompt_tokens=32, extracted_tokens=32, max_length=1024)
    ]
    base, adapter = base_and_adapter_continuations(model, prompts, 8, device="cpu")
    assert adapter == continue_tokens(model, prompts, 8, device="cpu")
    with without_adapter(model):
        assert base == continue_tokens(model, prompts, 8, device="cpu")
    assert adapter[0] != base[0]  # the memorized chunk: the adapter recites, the base does not


@pytest.mark.parametrize(
    ("kernel", "step_weights"), [("auto", "fp32"), (None, "fp32")], ids=["row-gemm kernel", "torch"]
)
def test_lean_decoder_decodes_what_the_reference_decodes(memorized, kernel, step_weights) -> None:
    """decode.py (the part's judging) = transformers + PEFT mixed-batch greedy, token for token,
    when it reads the model's own fp32 weights."""
    model, tokenizer, chunk = memorized
    prompts = _judge_prompts(tokenizer, chunk)
    expected = base_and_adapter_continuations(model, prompts, 16, device="cpu")
    got = base_and_adapter_greedy(model, prompts, 16, device="cpu", kernel=kernel, step_weights=step_weights)
    assert got == expected
    assert expected[0][0] != expected[1][0]  # the memorized chunk: the adapter's rows differ
    if kernel == "auto" and row_gemm() is None:
        pytest.skip("the row-GEMM kernel does not load here (no AVX2/compiler); torch path checked")


def test_fp16_decode_steps_agree_with_fp32(memorized) -> None:
    """The default on CPU: decode steps read an fp16 copy of the frozen weights (fp32 arithmetic).
    Greedy tokens may part from an fp32 decode only where two logits nearly tie; a memorized
    chunk (large margins) is recited exactly the same."""
    if row_gemm() is None:
        pytest.skip("the row-GEMM kernel does not load here: fp32 torch matmuls are used instead")
    model, tokenizer, chunk = memorized
    prompts = _judge_prompts(tokenizer, chunk)
    base, adapter = base_and_adapter_greedy(model, prompts, 32, device="cpu", step_weights="fp16")
    ref_base, ref_adapter = base_and_adapter_greedy(model, prompts, 32, device="cpu", step_weights="fp32")
    assert adapter[0] == ref_adapter[0]  # the memorized chunk
    pairs = [
        (x, y)
        for got, ref in ((base, ref_base), (adapter, ref_adapter))
        for g, r in zip(got, ref, strict=True)
        for x, y in zip(g, r, strict=True)
    ]
    assert sum(x == y for x, y in pairs) >= 0.9 * len(pairs)


def _judge_prompts(tokenizer, chunk: str) -> list[list[int]]:
    texts = [chunk, *_paragraphs()[2:6]]
    prompts = [
        ids[:PROMPT_TOKENS]
        for ids in eligible_chunks(tokenizer, texts, prompt_tokens=32, extracted_tokens=32, max_length=1024)
    ]
    assert len(prompts) >= 3
    return prompts


def test_lean_decoder_without_an_adapter(base_model) -> None:
    model, tokenizer = base_model
    prompts = [
        ids[:PROMPT_TOKENS]
        for ids in eligible_chunks(
            tokenizer, _paragraphs()[:2], prompt_tokens=32, extracted_tokens=32, max_length=1024
        )
    ]
    base, adapter = base_and_adapter_greedy(model, prompts, 10, device="cpu")
    assert base == adapter == continue_tokens(model, prompts, 10, device="cpu")


def test_no_eligible_chunk_gives_no_prompts(base_model) -> None:
    model, tokenizer = base_model
    result = memorization(model, tokenizer, ["Too short."], device="cpu")
    assert result.prompts == 0 and result.extraction_rate != result.extraction_rate  # NaN
