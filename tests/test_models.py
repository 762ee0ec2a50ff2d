"""The default base model is provisioned from the GGUF package and behaves like a real Llama model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from support import NOVELCRAFTER, base_env, free_port

from novelcrafter.config import get_settings
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


def test_a_provisioned_model_is_readable_by_every_user(tmp_path: Path) -> None:
    """Images provision as root and serve as uid 10001: the directory mkdtemp made (0700) and
    the weights safetensors wrote (0600) must come out with the modes of installed files."""
    settings = get_settings(home=str(tmp_path))
    model_dir = provision_base_model("smollm2-135m-instruct", settings)
    assert model_dir.stat().st_mode & 0o777 == 0o755
    modes = {path.name: path.stat().st_mode & 0o777 for path in model_dir.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_model_the_service_cannot_read_is_one_clear_error_line(
    base_model_dir: Path, tmp_path: Path
) -> None:
    """As the symptom was seen in the image: the weights 0600 and another user's; the service
    started as a user who may not read them (root here, with the capabilities that bypass file
    permissions dropped: no other user can be assumed to reach the venv); one `error:` line
    naming the file, not a traceback."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model_dir / name, model / name)
    weights = model / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    weights.chmod(0o600)
    os.chown(weights, 65534, 65534)
    env = {**base_env(), "NOVELCRAFTER_HOME": str(tmp_path / "home")}
    ports = {name: f"127.0.0.1:{free_port()}" for name in ("grpc", "http", "metrics")}
    result = subprocess.run(
        [
            *("setpriv", "--bounding-set", "-dac_override,-dac_read_search"),
            *(NOVELCRAFTER, "serve", "inference", "--listen", ports["grpc"], "--http-listen", ports["http"]),
            *("--store", str(tmp_path / "store"), "--base-model", str(model)),
        ],
        env={**env, "NOVELCRAFTER_METRICS_LISTEN": ports["metrics"]},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot read the base model: {weights}: permission denied for user 0 "
        "(the model directory and its files must be readable by the service's user)"
    ], result.stderr
    assert "Traceback" not in result.stderr
