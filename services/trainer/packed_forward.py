"""The training forward of a Llama-architecture model over packed sequences, at the hardware limit.

``transformers`` + PEFT compute the same function (``training.reference_nll`` keeps that path),
but spend time the hardware does not need to spend:

* **fused projections** — q/k/v and gate/up are one matmul each over a fused frozen weight
  (built once per base model and cached; in fp32 the modules' own weights become views into
  it, so it costs no memory). LoRA deltas are added to their slices, computed exactly as PEFT
  does (``B(A(dropout(x))) * scaling``, the same dropout modules in the same order);
* **frozen weights in the compute dtype** — with bf16 autocast the fused weights are kept in
  bf16 (a cached copy), so autocast does not cast 2·N bytes of fp32 weights at every call.
  LoRA A/B, the optimizer and the residual stream stay fp32, as under plain autocast;
* **attention per chunk** — each packed chunk runs causal SDPA on its own (``is_causal``, no
  mask): nothing of the masked-out blocks of a ``T×T`` score matrix is computed;
* **linear + cross-entropy in blocks** — logits exist for one block of tokens at a time and the
  gradient w.r.t. the hidden states is computed in the same pass, so the fp32
  ``[tokens × vocab]`` logits (and their gradient) are never materialized;
* no gradient checkpointing (LoRA on a small model fits; recomputation is 50% more forward).

:func:`supports` says whether a model is one this path computes exactly; anything else
(other architectures, DoRA, LoRA on embeddings or lm_head, biases) takes the reference path.
``tests/test_trainer_numerics.py`` holds the two paths to the same loss and LoRA gradients.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from .data import IGNORE

CE_BLOCK = 256  # tokens per block of the fused linear + cross-entropy (logits: block × vocab)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSlice:
    """One LoRA adapter on one projection (what PEFT's ``Linear.forward`` adds)."""

    a: Any  # lora_A weight [r, in]
    b: Any  # lora_B weight [out, r]
    dropout: Any  # nn.Module (Dropout or Identity)
    scaling: float


@dataclass(frozen=True)
class Projection:
    """A frozen (possibly fused) weight and the LoRA adapters on its output slices."""

    weight: Any  # [sum(sizes), in]
    sizes: tuple[int, ...]
    loras: tuple[LoraSlice | None, ...]

    def __call__(self, x: Any) -> list[Any]:
        import torch.nn.functional as F

        y = F.linear(x, self.weight)
        outs = list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        for i, lora in enumerate(self.loras):
            if lora is not None:
                delta = F.linear(F.linear(lora.dropout(x), lora.a), lora.b) * lora.scaling
                outs[i] = outs[i] + delta
        return outs


def _base_linear(module: Any) -> Any:
    return getattr(module, "base_layer", module)


def lora_of(module: Any) -> LoraSlice | None:
    """The active vanilla LoRA of a PEFT ``Linear`` (None for a plain ``nn.Linear``)."""
    if not hasattr(module, "lora_A"):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active or getattr(module, "disable_adapters", False):
        return None
    (name,) = active
    return LoraSlice(
        a=module.lora_A[name].weight,
        b=module.lora_B[name].weight,
        dropout=module.lora_dropout[name],
        scaling=float(module.scaling[name]),
    )


def unwrap(model: Any) -> Any:
    """The ``LlamaForCausalLM`` inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def supports(model: Any) -> bool:
    """True when this path computes exactly what the model's own forward computes."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", "") != "llama":
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_dropout", 0.0):
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    peft_config = getattr(model, "peft_config", {}) or {}
    for cfg in peft_config.values():
        if getattr(cfg, "use_dora", False) or getattr(cfg, "bias", "none") != "none":
            return False
        targets = cfg.target_modules
        names = {targets} if isinstance(targets, str) else set(targets or ())
        if not names <= set(PROJECTIONS):
            return False
    # Every LoRA layer must be a vanilla one on one of the seven projections.
    for name, module in inner.named_modules():
        if hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] not in PROJECTIONS:
            return False
        if getattr(module, "lora_variant", None):
            return False
    return True


# -- fused frozen weights, cached per base model and dtype --------------------------------------
@dataclass
class _FusedLayer:
    qkv: Any
    qkv_sizes: tuple[int, ...]
    o: Any
    gate_up: Any
    gate_up_sizes: tuple[int, ...]
    down: Any


def fused_weights(inner: Any, dtype: Any) -> tuple[list[_FusedLayer], Any]:
    """(per-layer fused weights, lm_head weight) in ``dtype``, built once per base model.

    fp32 (the weights' own dtype): the fused tensors are built once and every module's weight
    becomes a view into them, so nothing is duplicated and the fusion survives PEFT
    attaching and detaching adapters. Another dtype: a cached copy in that dtype.
    """
    import torch

    cache: dict[Any, Any] = inner.__dict__.setdefault("_novelcrafter_fused", {})
    # The lm_head weight (never re-viewed) identifies the weights the entries were built from:
    # a model moved to another device or given new weights rebuilds.
    head_weight = _base_linear(inner.lm_head).weight
    source = (head_weight.device, head_weight.data_ptr())
    for stale in [key for key in cache if key[1:] != source]:
        del cache[stale]
    if (dtype, *source) in cache:
        return cache[(dtype, *source)]
    layers = []
    for layer in inner.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = []
        for mods in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            linears = [_base_linear(m) for m in mods]
            sizes = tuple(int(lin.weight.shape[0]) for lin in linears)
            if linears[0].weight.dtype == dtype:
                fused = torch.cat([lin.weight.detach() for lin in linears])
                offset = 0
                for lin, size in zip(linears, sizes, strict=True):
                    lin.weight.data = fused[offset : offset + size]
                    offset += size
            else:
                fused = torch.cat([lin.weight.detach().to(dtype) for lin in linears])
            groups.append((fused, sizes))
        (qkv, qkv_sizes), (gate_up, gate_up_sizes) = groups
        o, down = (_base_linear(m).weight.detach() for m in (attn.o_proj, mlp.down_proj))
        layers.append(_FusedLayer(qkv, qkv_sizes, o.to(dtype), gate_up, gate_up_sizes, down.to(dtype)))
    head = _base_linear(inner.lm_head).weight.detach().to(dtype)
    cache[(dtype, *source)] = (layers, head)
    return layers, head


# -- packed attention ---------------------------------------------------------------------------
def segments(position_ids: Any) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of consecutive positions: one span per packed chunk
    (or padding segment), as transformers' ``find_packed_sequence_indices`` defines them."""
    import torch

    rows = []
    for row in position_ids.cpu():
        breaks = torch.nonzero(row[1:] != row[:-1] + 1).flatten().add(1).tolist()
        edges = [0, *breaks, int(row.shape[0])]
        rows.append(list(itertools.pairwise(edges)))
    return rows


def packed_attention(q: Any, k: Any, v: Any, spans: list[list[tuple[int, int]]], scale: float) -> Any:
    """Causal attention within each span only. q: [B, T, Hq, D], k/v: [B, T, Hkv, D] →
    [B, T, Hq·D]. Each span is one SDPA call with ``is_causal`` and no mask."""
    import torch
    import torch.nn.functional as F

    gqa = q.shape[2] != k.shape[2]
    rows = []
    for b, row_spans in enumerate(spans):
        outs = []
        for start, end in row_spans:
            qs, ks, vs = (t[b : b + 1, start:end].transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            outs.append(out.transpose(1, 2))
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.reshape(out.shape[0], out.shape[1], -1)


# -- fused linear + cross-entropy -------------------------------------------------------------
def _linear_cross_entropy_impl(hidden: Any, weight: Any, targets: Any, want_grad: bool) -> tuple[Any, Any]:
    """(summed NLL, d NLL / d hidden or None), one block of tokens at a time."""
    import torch

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    for start in range(0, hidden.shape[0], CE_BLOCK):
        h = hidden[start : start + CE_BLOCK].to(weight.dtype)
        t = targets[start : start + CE_BLOCK]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
        if grad is not None:
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad[start : start + CE_BLOCK] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
    return total, grad


class _LinearCrossEntropy:
    """Autograd wrapper: the gradient is computed in the forward pass, scaled in backward."""

    _fn: Any = None

    @classmethod
    def apply(cls, hidden: Any, weight: Any, targets: Any) -> Any:
        import torch

        if cls._fn is None:

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, h: Any, w: Any, t: Any) -> Any:
                    total, grad = _linear_cross_entropy_impl(h, w, t, want_grad=h.requires_grad)
                    ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
                    return total

                @staticmethod
                def backward(ctx: Any, grad_output: Any) -> Any:
                    (grad,) = ctx.saved_tensors
                    return grad * grad_output.to(grad.dtype), None, None

            cls._fn = Fn
        return cls._fn.apply(hidden, weight, targets)


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any) -> Any:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (no IGNORE here),
    never holding more than ``CE_BLOCK`` rows of logits. ``weight`` is frozen."""
    import torch

    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _LinearCrossEntropy.apply(hidden, weight, targets)
        return _linear_cross_entropy_impl(hidden, weight, targets, want_grad=False)[0]


# -- the forward ------------------------------------------------------------------------------
def packed_nll(model: Any, input_ids: Any, position_ids: Any, labels: Any, dtype: Any) -> Any:
    """Summed next-token NLL of a packed batch (labels IGNORE where a token has no target).

    Call it under the same autocast context as the reference path; ``dtype`` is the autocast
    dtype (None = fp32), which decides the dtype of the frozen weights.
    """
    import torch.nn.functional as F

    inner = unwrap(model)
    config = inner.config
    weight_dtype = dtype or inner.model.embed_tokens.weight.dtype
    fused, head = fused_weights(inner, weight_dtype)
    spans = segments(position_ids)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    scale = head_dim**-0.5
    eps = config.rms_norm_eps

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = inner.model.embed_tokens(input_ids)
    cos, sin = inner.model.rotary_emb(hidden, position_ids)
    batch, length = input_ids.shape
    for layer, weights in zip(inner.model.layers, fused, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_layernorm.weight, eps)
        qkv = Projection(
            weights.qkv,
            weights.qkv_sizes,
            tuple(lora_of(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)),
        )
        q, k, v = qkv(x)
        q = q.view(batch, length, n_heads, head_dim)
        k = k.view(batch, length, n_kv, head_dim)
        v = v.view(batch, length, n_kv, head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        out = packed_attention(q, k, v, spans, scale)
        (out,) = Projection(weights.o, (weights.o.shape[0],), (lora_of(attn.o_proj),))(out)
        hidden = hidden + out
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.post_attention_layernorm.weight, eps)
        gate_up = Projection(
            weights.gate_up, weights.gate_up_sizes, (lora_of(mlp.gate_proj), lora_of(mlp.up_proj))
        )
        gate, up = gate_up(x)
        (out,) = Projection(weights.down, (weights.down.shape[0],), (lora_of(mlp.down_proj),))(
            F.silu(gate) * up
        )
        hidden = hidden + out
    hidden = F.rms_norm(hidden, (hidden.shape[-1],), inner.model.norm.weight, eps)
    # Position t predicts token t+1; only positions with a target take part.
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    return linear_cross_entropy(selected, head, targets[keep])
