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


def test_mfu_is_reported_only_for_a_gpu_with_a_known_peak():
    assert bench.mfu(1000.0, 10**9, "cpu") == (None, "cpu")


def test_bench_skips_with_a_reason_when_the_book_is_absent(tmp_path, capsys):
    assert bench.main(["--book", str(tmp_path / "absent.pdf")]) == 0
    assert "SKIPPED" in capsys.readouterr().out
