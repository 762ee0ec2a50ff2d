"""``novelcrafter export``: take a published adapter version out of the store, for other tools.

Formats:

* ``peft`` — the version's files as PEFT saves them (``adapter_model.safetensors``,
  ``adapter_config.json`` with the canonical base model id) and the model card ``README.md``:
  ``PeftModel.from_pretrained(base, DIR)`` and the Hub take it as it is.
* ``gguf`` — the PEFT folder plus ``adapter.gguf``, a LoRA adapter in llama.cpp's GGUF format
  (what its ``convert_lora_to_gguf.py`` writes), and an Ollama ``Modelfile``.
* ``all`` — both (today the same as ``gguf``; kept as the name users ask for).

The destination appears whole or not at all: everything is written into a temporary folder
beside it, which is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novelcrafter import adapters, layout
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NotFound
from novelcrafter.store import Store

FORMATS = ("peft", "gguf", "all")
GGUF_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
# Base-model architectures whose LoRA tensors we can lay out as llama.cpp does (Llama family:
# SmolLM2, Llama 3.x); the inference engine serves the same family.
GGUF_ARCHES = {"llama": "llama"}
# HF module (under model.layers.N.) -> whether llama.cpp stores its weight rows permuted for RoPE.
_MODULES = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "",
    "self_attn.o_proj": "",
    "mlp.gate_proj": "",
    "mlp.up_proj": "",
    "mlp.down_proj": "",
}
# LoRA variants whose forward is not plain x + B(A(x)) * alpha / r: llama.cpp cannot run them.
_UNSUPPORTED = ("use_dora", "use_rslora", "alpha_pattern", "rank_pattern", "modules_to_save", "lora_bias")


@dataclass
class ExportResult:
    dest: Path
    meta: adapters.AdapterMeta
    files: list[str] = field(default_factory=list)


def resolve_version(store: Store, book_id: str, spec: str = "latest") -> adapters.AdapterMeta:
    """The version ``spec`` names: ``latest``, ``part-N`` (its newest version) or a version id."""
    layout.check_book_id(book_id)
    spec = (spec or "latest").strip()
    if spec == "latest":
        version = adapters.latest_version(store, book_id)
        if version is None:
            raise NotFound(_no_adapter(store, book_id))
        return adapters.read_meta(store, book_id, version)
    part = layout.PART_ALIAS_RE.fullmatch(spec)
    if part:
        metas = [m for m in adapters.list_versions(store, book_id) if m.part == int(part.group(1))]
        if not metas:
            if not adapters.list_versions(store, book_id):
                raise NotFound(_no_adapter(store, book_id))
            raise NotFound(f"book {book_id} has no published adapter for part {int(part.group(1))}")
        return metas[-1]
    if not layout.VERSION_RE.fullmatch(spec):
        raise InvalidArgument(
            f"invalid adapter {spec[:80]!r}: use 'latest', 'part-N' or a version id like 'j-0123456789ab-p03'"
        )
    return adapters.read_meta(store, book_id, spec)


def _no_adapter(store: Store, book_id: str) -> str:
    if store.exists(layout.manifest_key(book_id)):
        return f"book {book_id} has no published adapter yet: train it first"
    return f"unknown book {book_id}: nothing ingested or published under that id in this store"


def export_adapter(
    store: Store,
    book_id: str,
    dest: Path,
    *,
    adapter: str = "latest",
    fmt: str = "peft",
    settings: Any = None,
) -> ExportResult:
    """Write the version ``adapter`` of ``book_id`` into the new folder ``dest`` (see module doc)."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"invalid format {fmt!r}: use one of {', '.join(FORMATS)}")
    meta = resolve_version(store, book_id, adapter)
    dest = Path(dest).expanduser().absolute()
    _check_destination(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise FailedPrecondition(f"cannot write in {dest.parent}: {exc.strerror or exc}")
    try:
        adapters.download_adapter(store, meta, tmp)  # checksums verified against meta.json
        # Versions published before cards existed: canonical config and a card made now.
        config = adapters.canonicalize_config(tmp, meta.base_model)
        if not (tmp / adapters.CARD).exists():
            adapters.write_card(tmp, meta, config, adapters.read_manifest(store, book_id))
        if fmt in ("gguf", "all"):
            base_dir = _base_model_dir(meta, settings)
            write_gguf(tmp, tmp / GGUF_FILE, json.loads((base_dir / "config.json").read_text()), meta=meta)
            (tmp / MODELFILE).write_text(modelfile_text(meta, config))
        # mkdtemp and the store's downloads are private; an export is an ordinary folder.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        files = sorted(p.name for p in tmp.iterdir())
        os.replace(tmp, dest)  # atomic; replaces dest only if it is an empty directory
    except OSError as exc:
        raise FailedPrecondition(f"cannot write {dest}: {exc.strerror or exc}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(dest, meta, files)


def _check_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise FailedPrecondition(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise FailedPrecondition(f"{dest} is not empty: export into a new or empty directory")
    if not dest.parent.is_dir():
        raise FailedPrecondition(f"{dest.parent} does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise FailedPrecondition(f"cannot write in {dest.parent}: permission denied")


def _base_model_dir(meta: adapters.AdapterMeta, settings: Any) -> Path:
    """The base model's local directory (its config.json gives the GGUF layout)."""
    from novelcrafter.config import get_settings
    from novelcrafter.models import provision_base_model

    settings = settings or get_settings()
    return provision_base_model(meta.base_model or settings.base_model, settings)


# --- GGUF --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp's, e.g. blk.3.attn_q.weight.lora_a
    array: Any  # numpy float32, in PyTorch's (row-major) shape


def _rope_permute(rows: Any, heads: int) -> Any:
    """llama.cpp keeps q/k weight rows in the original Llama (interleaved-pair) RoPE order;
    transformers' checkpoints use halves. Same reordering as llama.cpp's converter (LoRA B is
    the output side, so only B's rows move)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(adapter_dir: Path, base_config: dict[str, Any]) -> list[GGUFTensor]:
    """The adapter's LoRA tensors as llama.cpp names and lays them out, in a stable order.

    For a weight ``W`` (out x in), PEFT stores ``lora_A`` (r x in) and ``lora_B`` (out x r);
    llama.cpp reads ``<name>.lora_a`` with ne = (in, r) and ``<name>.lora_b`` with ne = (r, out):
    GGUF lists dimensions fastest-first, so both are written as they are, untransposed.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    arch = GGUF_ARCHES.get(str(base_config.get("model_type", "")))
    if arch is None:
        raise FailedPrecondition(
            f"GGUF export supports Llama-architecture base models; this base is "
            f"{base_config.get('model_type')!r} (use --format peft)"
        )
    for flag in _UNSUPPORTED:
        if config.get(flag):
            raise FailedPrecondition(f"GGUF export: llama.cpp cannot apply this LoRA variant ({flag})")
    if config.get("bias", "none") != "none":
        raise FailedPrecondition("GGUF export: LoRA bias terms are not supported")
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    layers = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        hf = key.removeprefix("base_model.model.")
        for which in ("A", "B"):
            suffix = f".lora_{which}.weight"
            if hf.endswith(suffix):
                pairs.setdefault(hf.removesuffix(suffix), {})[which] = tensor
                break
        else:
            raise FailedPrecondition(f"GGUF export: unexpected tensor {key!r} (only LoRA A/B matrices)")
    out: list[GGUFTensor] = []
    for module in sorted(pairs, key=_layer_order):
        tensors = pairs[module]
        kind = _module_kind(module, layers)
        if set(tensors) != {"A", "B"} or kind is None:
            raise FailedPrecondition(f"GGUF export: cannot place LoRA tensors of {module!r}")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise FailedPrecondition(f"GGUF export: llama.cpp has no tensor for {module!r}")
        a = np.ascontiguousarray(tensors["A"], dtype=np.float32)
        b = np.asarray(tensors["B"], dtype=np.float32)
        if kind == "q":
            b = _rope_permute(b, n_head)
        elif kind == "k":
            b = _rope_permute(b, n_kv)
        out.append(GGUFTensor(f"{name}.lora_a", a))
        out.append(GGUFTensor(f"{name}.lora_b", np.ascontiguousarray(b)))
    if not out:
        raise FailedPrecondition("GGUF export: the adapter holds no LoRA tensors")
    return out


def _module_kind(module: str, layers: int) -> str | None:
    """'q' / 'k' (RoPE-permuted in llama.cpp), '' (as is), None (not a decoder linear)."""
    parts = module.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    if int(parts[2]) >= layers:
        return None
    return _MODULES.get(".".join(parts[3:]))


def _layer_order(module: str) -> tuple[int, str]:
    parts = module.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, module)


def write_gguf(
    adapter_dir: Path, path: Path, base_config: dict[str, Any], *, meta: adapters.AdapterMeta
) -> list[GGUFTensor]:
    """Write ``adapter.gguf``: the metadata llama.cpp checks (architecture, ``general.type =
    adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``) and the LoRA tensors in f32."""
    import gguf

    from novelcrafter.modelcard import base_model_license, canonical_base_model

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = gguf_tensors(adapter_dir, base_config)
    arch = GGUF_ARCHES[str(base_config["model_type"])]
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        writer.add_name(f"NovelCrafter {meta.book_id} {meta.version}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        base = str(config.get("base_model_name_or_path") or canonical_base_model(meta.base_model))
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)
        if "/" in base:  # a hub id (a store: model's name is only known to its store)
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
        if base_model_license(base):
            writer.add_license(base_model_license(base))
        for tensor in tensors:
            writer.add_tensor(tensor.name, tensor.array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return tensors


def modelfile_text(meta: adapters.AdapterMeta, config: dict[str, Any]) -> str:
    """An Ollama Modelfile: the base model in GGUF (how to get it is in the comments) + the adapter."""
    base = str(config.get("base_model_name_or_path") or meta.base_model)
    local = meta.base_model or base
    hub = (
        f"# or from the Hub: hf download {base} --local-dir base-hf\n# and convert base-hf the same way.\n"
        if "/" in base
        else ""
    )
    return f"""# Ollama Modelfile for NovelCrafter adapter {meta.version} of book {meta.book_id}.
#
# The adapter works only on the base model it was trained on:
#   {base}
# and Ollama needs that model as a GGUF file beside this one (base.gguf below). Make it with
# llama.cpp's converter from the local copy NovelCrafter trained on:
#
#   python llama.cpp/convert_hf_to_gguf.py "$(novelcrafter model provision --base-model {local})" \\
#       --outtype f16 --outfile base.gguf
#
{hub}# Then:
#
#   ollama create novelcrafter-{meta.book_id} -f Modelfile
#   ollama run novelcrafter-{meta.book_id}
FROM ./base.gguf
ADAPTER ./{GGUF_FILE}
"""
