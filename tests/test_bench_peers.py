"""bench/inference_peers + bench/peers: the pure parts of the peer benchmark (bytes per decode step,
bandwidth fraction, the JSON report's shape, the peer specs). No peer is built or run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT

sys.path.insert(0, str(ROOT))  # bench/ lives at the repository root, beside tests/
from bench import inference_peers as ip
from bench import peers

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def _linear_weights(config: dict) -> int:
    """Elements of every nn.Linear weight of the HF model, the lm_head counted even when tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("config", [SMOLLM2_135M, ip.LLAMA_3_2_1B], ids=["smollm2-135m", "llama-3.2-1b"])
@pytest.mark.parametrize("bytes_per_param", [2, 4])
def test_bytes_per_step_are_the_models_projections_and_lm_head(config: dict, bytes_per_param: int):
    expected = _linear_weights({k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    counted = ip.weight_bytes_per_step(config, bytes_per_param)
    assert counted["total"] == expected * bytes_per_param
    assert counted["lm_head"] == config["vocab_size"] * config["hidden_size"] * bytes_per_param
    assert counted["projections"] + counted["lm_head"] == counted["total"]


def test_llama_1b_shape_counts_its_published_parameters():
    # Llama-3.2-1B: 1,235,814,400 parameters; the lm_head is tied (counted once in the
    # parameters, read once per step), norms are not matmul weights.
    norms = 2048 * (2 * 16 + 1)
    assert ip.weight_bytes_per_step(ip.LLAMA_3_2_1B, 1)["total"] == 1_235_814_400 - norms


def test_smollm2_135m_in_bf16_reads_about_270_mb_per_step():
    total = ip.weight_bytes_per_step(SMOLLM2_135M, 2)["total"]
    assert 265e6 < total < 275e6


def test_bandwidth_fraction():
    assert ip.bandwidth_fraction(270e6, 10.0, 27e9) == pytest.approx(0.1)
    assert ip.bandwidth_fraction(270e6, None, 27e9) is None
    assert ip.bandwidth_fraction(270e6, 10.0, 0.0) is None


def test_measured_bandwidth_has_copy_and_read():
    bw = ip.measure_bandwidth(mib=8, rounds=1)  # tiny: shape only, no timing threshold
    assert bw["mib"] == 8 and bw["copy_bytes_per_s"] > 0 and bw["read_bytes_per_s"] > 0


def _report(
    llamacpp: dict | None,
    vllm: dict | None,
    errors: dict | None = None,
    paired: dict | None = None,
    screen: int | None = None,
) -> dict:
    ours = {
        "paired": paired,
        "lm_head_screen_bytes": screen,
        "single": 20.0,
        "levels": {1: {"aggregate": 20.0, "per_stream": 20.0}, 8: {"aggregate": 90.0, "per_stream": 11.0}},
        "ttft": 0.2,
        "ttft_prompt_tokens": [512, 511, 512],
        "precision": "bfloat16 weights (fp32 arithmetic)",
    }
    settings = {
        "tokens": 32, "adapters": 3, "threads": 2, "levels": [1, 8], "requests": 0,
        "sampling": {"temperature": 0.8}, "bytes_per_param": 2, "ttft_prompt_tokens": 512,
    }  # fmt: skip
    bandwidth = {"mib": 512, "threads": 2, "copy_bytes_per_s": 20e9, "read_bytes_per_s": 27e9}
    return ip.build_report(
        model="smollm2", config=SMOLLM2_135M, ours=ours, llamacpp=llamacpp, vllm=vllm, bandwidth=bandwidth,
        bytes_per_param=2, settings=settings, errors=errors or {},
    )  # fmt: skip


KEYS = {
    "ours_single", "ours_levels", "llamacpp_single", "llamacpp_single_nolora", "vllm_single", "vllm_levels",
    "ttft_ours", "ttft_llamacpp", "ttft_vllm", "ratio_single_vs_llamacpp", "ratio_top_vs_vllm",
    "ratio_ttft_ours_vs_llamacpp", "bandwidth", "weight_bytes_per_step", "bandwidth_fraction_single",
    "precision", "settings", "errors", "model", "top_concurrency",
}  # fmt: skip


def test_report_with_every_peer_has_the_figures_and_ratios():
    llama = {"lora": 16.0, "nolora": 18.0, "ttft": 0.4, "precision": "bf16 GGUF"}
    vllm = {"levels": {1: {"aggregate": 8.0, "per_stream": 8.0}, 8: {"aggregate": 30.0, "per_stream": 4.0}},
            "ttft": 0.5, "precision": "float32"}  # fmt: skip
    report = _report(llama, vllm)
    assert set(report) >= KEYS
    assert report["ratio_single_vs_llamacpp"] == pytest.approx(20.0 / 16.0)
    assert report["ratio_top_vs_vllm"] == pytest.approx(90.0 / 30.0)
    assert report["ratio_ttft_ours_vs_llamacpp"] == pytest.approx(0.5)
    assert report["vllm_single"] == 8.0 and report["top_concurrency"] == 8
    frac = report["bandwidth_fraction_single"]
    assert frac["ours"] == pytest.approx(report["weight_bytes_per_step"]["total"] * 20.0 / 27e9)
    assert json.loads(json.dumps(report, default=str))["ours_levels"]["8"]["aggregate"] == 90.0
    text = "\n".join(ip.format_report(report))
    assert "ours / llama.cpp, one stream: 1.25x" in text and "ours / vLLM at concurrency 8: 3.00x" in text
    assert "error:" not in text
    assert "int8 screen" not in text  # no screen: ours reads what the table says


def test_with_the_lm_head_screen_ours_fraction_is_of_the_bytes_it_reads_and_the_report_says_so():
    screen = 49152 * 576 + 49152 * 8  # int8 copy + fp32 scale and bound per row
    report = _report(
        {"lora": 16.0, "nolora": 18.0, "ttft": 0.4, "precision": "bf16 GGUF"}, None, screen=screen
    )
    weights = report["weight_bytes_per_step"]
    assert report["ours_bytes_per_step"] == weights["projections"] + screen < weights["total"]
    frac = report["bandwidth_fraction_single"]
    assert frac["ours"] == pytest.approx((weights["projections"] + screen) * 20.0 / 27e9)
    assert frac["llamacpp"] == pytest.approx(weights["total"] * 16.0 / 27e9)  # peers read all of it
    text = "\n".join(ip.format_report(report))
    assert f"ours reads {(weights['projections'] + screen) / 1e6:.1f} MB per one-stream step" in text


def test_a_paired_run_gives_the_one_stream_ratio_and_the_unpaired_stays_beside_it():
    llama = {"lora": 16.0, "nolora": 18.0, "ttft": 0.4, "precision": "bf16 GGUF"}
    paired = {
        "rounds": 4,
        "ours": 22.0,
        "llamacpp": 17.0,
        "ratio_median": 1.3,
        "ratios": [1.2, 1.3, 1.3, 1.4],
    }
    report = _report(llama, None, paired=paired)
    assert report["ratio_single_vs_llamacpp"] == pytest.approx(1.3)
    assert report["ratio_single_vs_llamacpp_unpaired"] == pytest.approx(20.0 / 16.0)
    assert report["paired_single"]["rounds"] == 4
    text = "\n".join(ip.format_report(report))
    assert "ours / llama.cpp, one stream: 1.30x (paired: median of 4 interleaved rounds" in text
    assert "measured apart, as in the table: 1.25x" in text


def test_report_without_peers_says_so_and_keeps_ours():
    report = _report(None, None, {"vLLM": "did not start"})
    assert set(report) >= KEYS
    assert report["llamacpp_single"] is None and report["ratio_single_vs_llamacpp"] is None
    assert report["vllm_levels"] == {} and report["ratio_top_vs_vllm"] is None
    assert report["ours_single"] == 20.0
    lines = ip.format_report(report)
    assert "error: vLLM: did not start" in lines
    assert any("n/a" in line for line in lines)


def test_llamacpp_runs_the_gguf_type_matching_our_precision():
    assert ip.llamacpp_outtype(torch.bfloat16) == "bf16"
    assert ip.llamacpp_outtype(torch.float32) == "f32"


def test_llamacpp_peer_keeps_the_stamp_export_llamacpp_wrote():
    # bench/export_llamacpp.py built this venv before it moved here: same folder, same stamp.
    assert peers.LLAMACPP.name == "llamacpp" and peers.STAMP == ".novelcrafter-built"
    assert "--no-binary" in peers.LLAMACPP.pip_args
    assert peers.PEERS["llamacpp"] is peers.LLAMACPP and peers.PEERS["vllm"] is peers.VLLM


def test_conversion_cache_key_follows_the_content(tmp_path: Path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    first = peers.folder_digest(tmp_path)
    (tmp_path / "README.md").write_text("a model card")  # not a converter input
    assert peers.folder_digest(tmp_path) == first
    (tmp_path / "adapter_model.safetensors").write_bytes(b"other weights")
    assert peers.folder_digest(tmp_path) != first


def test_vllm_argv_takes_the_dtype_and_our_adapter_folders(tmp_path: Path):
    argv = peers.vllm_serve_argv(
        Path("python"), tmp_path, 8000, dtype="bfloat16", lora_modules={"a0": tmp_path / "a0"}
    )
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--lora-modules") + 1] == f"a0={tmp_path / 'a0'}"
    assert "--lora-modules" not in peers.vllm_serve_argv(Path("python"), tmp_path, 8000)


def test_report_without_vllm_by_design_has_no_vllm_row():
    report = _report({"lora": 16.0, "nolora": 18.0, "ttft": 0.4, "precision": "bf16 GGUF"}, None)
    report["settings"]["vllm"] = False  # --shape 1b
    text = "\n".join(ip.format_report(report))
    assert "vLLM" not in text and "ours / llama.cpp, one stream: 1.25x" in text
