"""bench/train: the GPU model shapes are Llama 3.2's, and the benchmark skips clearly without data."""

from __future__ import annotations

import sys

import pytest
import torch
from support import ROOT

sys.path.insert(0, str(ROOT))  # bench/ lives at the repository root, beside tests/
from bench import train as bench


@pytest.mark.parametrize(
    ("shape", "params"),
    [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824)],  # published parameter counts
)
def test_model_shapes_match_llama_3_2(shape: str, params: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**bench.LLAMA_COMMON, **bench.MODEL_SHAPES[shape])
    config.head_dim = config.hidden_size // config.num_attention_heads
    with torch.device("meta"):  # shapes only: no memory, no time
        model = LlamaForCausalLM(config)
    assert bench.count_params(model) == params


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.2-3b"])
def test_the_peak_is_measured_on_every_dense_weight_of_the_model(shape: str):
    """The matmuls timed for the peak are exactly the model's weights (4·N counts the same N):
    every parameter but the norms' is in one of them, the tied embedding once as the lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**bench.LLAMA_COMMON, **bench.MODEL_SHAPES[shape])
    config.head_dim = config.hidden_size // config.num_attention_heads
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert sum(k * n for k, n in bench.layer_shapes(config)) == bench.count_params(model) - norms


def test_measured_peak_and_mfu_formula():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    peak = bench.measure_peak(config, rows=32, dtype=torch.float32, device="cpu", repeats=1)
    assert 0 < peak < float("inf")
    assert bench.model_flops(100.0, 10**6) == 4 * 10**6 * 100.0
    assert bench.datasheet_peak("cpu") == (None, "cpu")  # no datasheet MFU off CUDA


def test_bench_skips_with_a_reason_when_the_book_is_absent(tmp_path, capsys):
    assert bench.main(["--book", str(tmp_path / "absent.pdf")]) == 0
    assert "SKIPPED" in capsys.readouterr().out
