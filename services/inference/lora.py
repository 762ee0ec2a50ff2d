"""LoRA adapters as plain tensors, validated against the served base model.

The server applies LoRA itself (see :mod:`novelcrafter.inference.engine`) instead of
injecting PEFT layers into the shared model: loading or dropping an adapter then
never mutates the module tree that in-flight requests are running through, and an
adapter is freed as soon as the last reference to its :class:`LoraWeights` goes.

:func:`load_lora` reads a saved PEFT adapter directory and refuses anything the
engine cannot apply exactly as PEFT would: another base model, missing modules,
wrong shapes, unsupported LoRA variants, truncated or non-finite tensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Decoder-layer linears the engine can adapt (Llama family).
SUPPORTED_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.("
    + "|".join(re.escape(m) for m in SUPPORTED_MODULES)
    + r")\.lora_([AB])\.weight$"
)
# PEFT config switches for variants whose forward is not plain ``x + B(A(x)) * scale``.
_UNSUPPORTED_FLAGS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
)


class AdapterRejected(Exception):
    """The adapter cannot be served on this base model; the message says why."""


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


@dataclass
class LoraWeights:
    """One adapter's tensors, indexed ``layers[layer_index][module_name]``."""

    rank: int
    alpha: float
    target_modules: list[str]
    layers: list[dict[str, LoraModule]]
    nbytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def module(self, layer: int, name: str) -> LoraModule | None:
        return self.layers[layer].get(name)


def normalize_model_name(name: str) -> str:
    """Compare base-model names loosely: a hub id, its cache folder and a local path agree."""
    name = name.strip().rstrip("/").replace("--", "/")
    return name.rsplit("/", 1)[-1].lower()


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterRejected(f"{ADAPTER_CONFIG} is missing")
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"{ADAPTER_CONFIG} is not valid JSON: {exc}")
    if not isinstance(config, dict):
        raise AdapterRejected(f"{ADAPTER_CONFIG} is not a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterRejected(f"peft_type {config.get('peft_type')!r} is not LORA")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterRejected(f"task_type {task!r} is not CAUSAL_LM")
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise AdapterRejected(f"unsupported LoRA variant: {flag}={config.get(flag)!r}")
    if config.get("bias", "none") != "none":
        raise AdapterRejected(f"bias={config.get('bias')!r} changes base weights; only 'none' is served")
    if config.get("fan_in_fan_out"):
        raise AdapterRejected("fan_in_fan_out=true does not fit Linear layers")
    rank = config.get("r")
    alpha = config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterRejected(f"invalid rank r={rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterRejected(f"invalid lora_alpha={alpha!r}")
    return config


def _scale(config: dict[str, Any], module_path: str, rank: int) -> float:
    alpha = float(config["lora_alpha"])
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(patterns), module_path)
        alpha = float(patterns.get(key, alpha))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_base_name(expected: str | None, config: dict[str, Any], base_name: str | None) -> None:
    """A version's meta.json names the model it was trained on; refuse another one."""
    if not expected or not base_name:
        return
    if normalize_model_name(expected) != normalize_model_name(base_name):
        raise AdapterRejected(f"trained for base model {expected!r}, but this server runs {base_name!r}")


def load_lora(
    adapter_dir: Path,
    model: Any,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    trained_on: str | None = None,
    base_name: str | None = None,
) -> LoraWeights:
    """Read and validate a PEFT LoRA directory against ``model``; raise :class:`AdapterRejected`."""
    from safetensors import SafetensorError, safe_open

    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    _check_base_name(trained_on, config, base_name)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise AdapterRejected(f"{ADAPTER_WEIGHTS} is missing")

    layers = model.model.layers
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            keys = list(fh.keys())
            if not keys:
                raise AdapterRejected(f"{ADAPTER_WEIGHTS} holds no tensors")
            for key in keys:
                match = _KEY_RE.match(key)
                if not match:
                    raise AdapterRejected(f"unsupported tensor {key!r} (only LoRA A/B of decoder linears)")
                layer, name, which = int(match.group(1)), match.group(2), match.group(3)
                if layer >= len(layers):
                    raise AdapterRejected(
                        f"tensor {key!r} targets layer {layer}; the model has {len(layers)}"
                    )
                pairs.setdefault((layer, name), {})[which] = fh.get_tensor(key)
    except SafetensorError as exc:
        raise AdapterRejected(f"{ADAPTER_WEIGHTS} is unreadable (truncated or corrupt): {exc}")
    except (OSError, RuntimeError, ValueError) as exc:
        raise AdapterRejected(f"{ADAPTER_WEIGHTS} is unreadable: {exc}")

    per_layer: list[dict[str, LoraModule]] = [{} for _ in layers]
    ranks: set[int] = set()
    nbytes = 0
    for (layer, name), tensors in sorted(pairs.items()):
        if set(tensors) != {"A", "B"}:
            raise AdapterRejected(f"layer {layer} {name}: lora_A and lora_B must both be present")
        base = layers[layer].get_submodule(name)
        if not isinstance(base, torch.nn.Linear):
            raise AdapterRejected(f"layer {layer} {name} is not a Linear layer in the base model")
        a, b = tensors["A"], tensors["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterRejected(f"layer {layer} {name}: LoRA tensors must be matrices")
        rank = a.shape[0]
        if tuple(a.shape) != (rank, base.in_features) or tuple(b.shape) != (base.out_features, rank):
            raise AdapterRejected(
                f"layer {layer} {name}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base "
                f"layer ({base.in_features} -> {base.out_features}); trained on another model?"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterRejected(f"layer {layer} {name}: tensors are not floating point")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRejected(f"layer {layer} {name}: tensors contain NaN or infinity")
        module_path = f"model.layers.{layer}.{name}"
        ranks.add(rank)
        a = a.to(device=device, dtype=dtype).contiguous()
        b = b.to(device=device, dtype=dtype).contiguous()
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        per_layer[layer][name] = LoraModule(a, b, _scale(config, module_path, rank))

    declared = config["r"]
    if not (config.get("rank_pattern") or ranks <= {declared}):
        raise AdapterRejected(f"tensors have rank {sorted(ranks)} but adapter_config.json says r={declared}")
    targets = sorted({name for layer in per_layer for name in layer})
    return LoraWeights(
        rank=max(ranks),
        alpha=float(config["lora_alpha"]),
        target_modules=targets,
        layers=per_layer,
        nbytes=nbytes,
        config=config,
    )
