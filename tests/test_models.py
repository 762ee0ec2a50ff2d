"""The default base model is provisioned from the GGUF package and behaves like a real Llama model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from novelcrafter.errors import InvalidArgument
from novelcrafter.models import COMPLETE_MARK, provision_base_model


def test_provisioned_directory_is_a_plain_safetensors_model(base_model_dir: Path) -> None:
    assert (base_model_dir / COMPLETE_MARK).exists()
    assert (base_model_dir / "model.safetensors").exists()
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # loads as an ordinary model
    assert provision_base_model("smollm2-135m-instruct") == base_model_dir  # cached: same dir, no rework
    assert provision_base_model(str(base_model_dir)) == base_model_dir  # a local path works too


def test_tokenizer_has_chat_template(base_model: tuple[Any, Any]) -> None:
    _model, tok = base_model
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hello" in text and "<|im_start|>assistant" in text


def _generate(model: Any, tok: Any, seed: int) -> str:
    torch.manual_seed(seed)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=16, do_sample=True, top_p=0.95, temperature=0.8, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_generation_is_deterministic_with_a_seed(base_model: tuple[Any, Any]) -> None:
    model, tok = base_model
    first, second = _generate(model, tok, 1234), _generate(model, tok, 1234)
    assert first == second and len(first.split()) >= 3
    assert any(_generate(model, tok, s) != first for s in (1, 2, 3))  # sampling is real


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument, match="unknown base model"):
        provision_base_model("no-such-model")
    with pytest.raises(InvalidArgument, match="does not exist"):
        provision_base_model("./no/such/dir")
