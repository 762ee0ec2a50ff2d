"""Greedy decoding for judging a part (memorization, style): base and adapter in one lean pass.

After every part the judging decodes a few dozen short continuations. A decode step feeds one
token per row, so it multiplies a handful of rows by every weight of the model: it is bound by
reading the weights, and through transformers + PEFT by per-call overhead on top (PEFT walks
every module to install its ``adapter_names`` hooks and splits every LoRA layer's batch per
adapter; transformers grows its cache by concatenation and the prefill computes logits for
every prompt position). Measured on the ``make run`` quick schedule, that pass cost ~40% of
the part's training time. This decoder computes the same function
(:func:`evaluation.continue_tokens` with ``adapter_names``) for the Llama architecture with:

* the fused q/k/v and gate/up weights of :mod:`packed_forward` (one matmul each), and on CPU
  the decode steps' projections in the inference engine's row-GEMM kernel
  (``inference/cpu_kernels.py``: fp32 weights read at the memory's speed, fp32 arithmetic)
  where it loads, else ``W @ xᵀ`` (torch's faster route for a few rows);
* the LoRA delta (``B(A(x)) * scaling``; no dropout: evaluation) added to the adapter rows
  only — rows ``[:adapter_rows]`` decode with the adapter, the others as the base model —
  with the A matrices of one fused projection applied as one matmul;
* a preallocated KV cache written in place; causal attention over the prompt, and none needed
  for one new token, which sees everything before it;
* logits for the last position only.

All prompts have one length (no padding), every row decodes ``new_tokens`` tokens (no stop
at EOS), greedy (argmax), as ``continue_tokens`` does; ``tests/test_trainer_memorization.py``
holds the two to the same tokens. A model this path does not compute exactly (see
``packed_forward.supports``) takes ``continue_tokens``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from novelcrafter.logs import get_logger, kv

from . import packed_forward
from .evaluation import EvalInterrupted, base_and_adapter_continuations

log = get_logger(__name__)

MAX_ROWS = 128  # rows decoded together (KV cache: rows × layers × length × kv width)


def base_and_adapter_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    device: str,
    should_stop: Callable[[], bool] = lambda: False,
    kernel: Any = "auto",
    step_weights: str = "fp16",
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of ``prompts``: (base model's, adapter's), as
    :func:`evaluation.base_and_adapter_continuations` decodes them.

    ``kernel``: "auto" (the row-GEMM kernel on CPU where it loads), None (torch only), or a
    loaded ``RowGemm``. ``step_weights``: with the kernel, the frozen weights the decode steps
    read — "fp16" (a cached half-size copy, widened to fp32 in registers) or "fp32".
    """
    if step_weights not in ("fp16", "fp32"):
        raise ValueError(f"step_weights must be fp16 or fp32 (got {step_weights!r})")
    if not prompts or new_tokens <= 0:
        return [[] for _ in prompts], [[] for _ in prompts]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("greedy decoding needs prompts of one length")
    if not packed_forward.supports(model):
        return base_and_adapter_continuations(
            model, prompts, new_tokens, device=device, batch_size=32, should_stop=should_stop
        )
    if kernel == "auto":
        kernel = row_gemm() if device == "cpu" else None
    has_adapter = bool(getattr(model, "active_adapter", None)) and hasattr(model, "disable_adapter")
    try:
        return _decode_all(model, prompts, new_tokens, device, should_stop, kernel, step_weights, has_adapter)
    except EvalInterrupted:
        raise
    except Exception as exc:
        if kernel is None:
            raise
        # The kernel is another module's (inference): should its interface drift, judging
        # still runs, on torch's matmuls.
        log.warning("row-GEMM kernel failed; judging decodes with torch", extra=kv(error=str(exc)[:300]))
        return _decode_all(model, prompts, new_tokens, device, should_stop, None, step_weights, has_adapter)


def _decode_all(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    device: str,
    should_stop: Callable[[], bool],
    kernel: Any,
    step_weights: str,
    has_adapter: bool,
) -> tuple[list[list[int]], list[list[int]]]:
    per = MAX_ROWS // 2 if has_adapter else MAX_ROWS
    base: list[list[int]] = []
    adapter: list[list[int]] = []
    for start in range(0, len(prompts), per):
        group = [list(p) for p in prompts[start : start + per]]
        if not has_adapter:
            out = _greedy(model, group, new_tokens, 0, device, should_stop, kernel, step_weights)
            base.extend(out)
            adapter.extend(out)
            continue
        out = _greedy(
            model, [*group, *group], new_tokens, len(group), device, should_stop, kernel, step_weights
        )
        adapter.extend(out[: len(group)])
        base.extend(out[len(group) :])
    return base, adapter


def row_gemm() -> Any:
    """The inference engine's CPU row-GEMM kernel (built once per machine), or None."""
    import torch

    try:
        from novelcrafter.inference import cpu_kernels

        return cpu_kernels.load(threads=torch.get_num_threads())
    except Exception as exc:  # an optional speed-up: torch's matmuls compute the same
        log.info("row-GEMM kernel not used for judging", extra=kv(error=str(exc)[:200]))
        return None


def _greedy(
    model: Any,
    prompts: list[list[int]],
    new_tokens: int,
    adapter_rows: int,
    device: str,
    should_stop: Callable[[], bool],
    kernel: Any,
    step_weights: str,
) -> list[list[int]]:
    """``new_tokens`` greedy tokens per prompt; rows ``[:adapter_rows]`` with the LoRA."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = packed_forward.unwrap(model)
    config = inner.config
    dtype = inner.model.embed_tokens.weight.dtype
    fused, head = packed_forward.fused_weights(inner, dtype)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    scale = head_dim**-0.5
    eps = config.rms_norm_eps
    rows, prompt_len = len(prompts), len(prompts[0])
    length = prompt_len + new_tokens - 1  # the last generated token is never fed back
    use_kernel = kernel is not None and device == "cpu" and dtype == torch.float32
    # The decode steps read every weight once per token: with the kernel, from a cached fp16
    # copy (half the bytes; fp32 arithmetic) unless fp32 is asked for. The prompt pass and the
    # LoRA deltas stay in the model's dtype.
    step_fused, step_head = (
        packed_forward.fused_weights(inner, torch.float16)
        if use_kernel and step_weights == "fp16"
        else (fused, head)
    )

    def spec(weight: Any, sizes: tuple[int, ...], modules: tuple[Any, ...]) -> tuple[Any, ...]:
        """A projection: its fused weight, output sizes, and its LoRA as (A of all slices, [(slice,
        rank, B * scaling)]) — None without one."""
        loras = [(i, packed_forward.lora_of(m)) for i, m in enumerate(modules)]
        loras = [(i, lo) for i, lo in loras if lo is not None]
        if not loras or not adapter_rows:
            return weight, sizes, None
        a = torch.cat([lo.a for _, lo in loras])
        slices = [(i, int(lo.a.shape[0]), lo.b * lo.scaling) for i, lo in loras]
        return weight, sizes, (a, slices)

    def specs(weights: Any, layer: Any) -> tuple[Any, ...]:
        attn, mlp = layer.self_attn, layer.mlp
        return (
            spec(weights.qkv, weights.qkv_sizes, (attn.q_proj, attn.k_proj, attn.v_proj)),
            spec(weights.o, (weights.o.shape[0],), (attn.o_proj,)),
            spec(weights.gate_up, weights.gate_up_sizes, (mlp.gate_proj, mlp.up_proj)),
            spec(weights.down, (weights.down.shape[0],), (mlp.down_proj,)),
        )

    layers = []  # (layer, prompt-pass projections, decode-step projections)
    with torch.no_grad():
        for layer, weights, step in zip(inner.model.layers, fused, step_fused, strict=True):
            layers.append((layer, specs(weights, layer), specs(step, layer)))

    def project(projection: tuple[Any, ...], x: Any) -> list[Any]:
        """The prompt pass (x [rows, t, in]): torch matmuls, LoRA added on the adapter rows."""
        weight, sizes, lora = projection
        y = F.linear(x, weight)
        outs = list(y.split(sizes, dim=-1)) if len(sizes) > 1 else [y]
        if lora is not None:
            a, slices = lora
            low = F.linear(x[:adapter_rows], a).split([rank for _, rank, _ in slices], dim=-1)
            for (index, _, b), part in zip(slices, low, strict=True):
                outs[index][:adapter_rows] += F.linear(part, b)
        return outs

    def matmul(x: Any, weight: Any, out: Any = None) -> Any:
        """A decode step's ``x @ weight.T`` for x [rows, in]; with ``out``: added into it."""
        if use_kernel:
            return kernel(x, weight) if out is None else kernel(x, weight, out, accumulate=True)
        y = torch.mm(weight, x.t()).t() if device == "cpu" else F.linear(x, weight)
        return y if out is None else out.add_(y)

    def step_project(projection: tuple[Any, ...], x: Any, out: Any = None) -> Any:
        """A decode step's projection (x [rows, in]) with its LoRA on the adapter rows."""
        weight, sizes, lora = projection
        y = matmul(x, weight, out)
        if lora is not None:
            a, slices = lora
            low = matmul(x[:adapter_rows], a)
            offsets = [0, *itertools.accumulate(sizes)]
            taken = 0
            for index, rank, b in slices:
                target = y[:adapter_rows, offsets[index] : offsets[index + 1]]
                matmul(low[:, taken : taken + rank].contiguous(), b, target)
                taken += rank
        return y

    def norm(x: Any, weight: Any) -> Any:
        return kernel.rmsnorm(x, weight, eps) if use_kernel else F.rms_norm(x, (width,), weight, eps)

    def silu_gate(gate_up: Any, sizes: tuple[int, ...]) -> Any:
        if use_kernel and sizes[0] == sizes[1]:
            return kernel.silu_mul(gate_up)
        gate, up = gate_up.split(sizes, dim=-1)
        return (F.silu(gate) * up).contiguous()

    # KV cache [rows, layers, kv heads, positions, head_dim]: each row's block is contiguous, as
    # the kernel's attention takes it; a layer's slice is what SDPA takes.
    keys = torch.empty(rows, len(layers), n_kv, length + 1, head_dim, dtype=dtype, device=device)
    values = torch.empty_like(keys)
    width = config.hidden_size
    # Rotary tables for every position once (what rotary_emb computes per call).
    cos_all, sin_all = inner.model.rotary_emb(
        torch.empty(1, 1, width, dtype=dtype, device=device), torch.arange(length, device=device)[None]
    )
    q_width, kv_width = n_heads * head_dim, n_kv * head_dim

    def prompt_pass(ids: Any) -> Any:
        """Feed the prompts [rows, t] (positions 0..t-1); the next token of each row."""
        t = ids.shape[1]
        hidden = inner.model.embed_tokens(ids)
        cos, sin = cos_all[:, :t].expand(rows, t, -1), sin_all[:, :t].expand(rows, t, -1)
        for index, (layer, (qkv, o, gate_up, down), _) in enumerate(layers):
            x = F.rms_norm(hidden, (width,), layer.input_layernorm.weight, eps)
            q, k, v = project(qkv, x)
            q = q.view(rows, t, n_heads, head_dim)
            k = k.view(rows, t, n_kv, head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            keys[:, index, :, :t] = k.transpose(1, 2)
            values[:, index, :, :t] = v.view(rows, t, n_kv, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys[:, index, :, :t],
                values[:, index, :, :t],
                is_causal=True,
                scale=scale,
                enable_gqa=n_heads != n_kv,
            )
            (out,) = project(o, out.transpose(1, 2).reshape(rows, t, q_width))
            hidden = hidden + out
            x = F.rms_norm(hidden, (width,), layer.post_attention_layernorm.weight, eps)
            gate, up = project(gate_up, x)
            (out,) = project(down, F.silu(gate) * up)
            hidden = hidden + out
        last = F.rms_norm(hidden[:, -1], (width,), inner.model.norm.weight, eps)
        return matmul(last.contiguous(), head).float().argmax(dim=-1, keepdim=True)

    def kernel_caches(position: int) -> Any:
        """The kernel's view of the KV cache at ``position`` (None: attention in torch)."""
        if not use_kernel or dtype != torch.float32 or not hasattr(kernel, "decode_attention"):
            return None
        from novelcrafter.inference.cpu_kernels import DecodeCaches

        return DecodeCaches(list(keys), list(values), [position] * rows)

    def decode_step(ids: Any, position: int) -> Any:
        """Feed one token per row at ``position``; the next token of each row."""
        caches = kernel_caches(position)
        hidden = inner.model.embed_tokens(ids[:, 0]).contiguous()  # [rows, width], updated in place
        cos, sin = cos_all[:, position], sin_all[:, position]  # [1, head_dim]: every row, every head
        for index, (layer, _, (qkv, o, gate_up, down)) in enumerate(layers):
            x = norm(hidden, layer.input_layernorm.weight)
            y = step_project(qkv, x)
            if caches is not None:  # rotary, cache write and attention in one kernel call
                out = kernel.decode_attention(
                    y,
                    heads=n_heads,
                    kv_heads=n_kv,
                    head_dim=head_dim,
                    cos=cos_all[0],
                    sin=sin_all[0],
                    caches=caches,
                    layer=index,
                    scale=scale,
                )
            else:
                q = y[:, :q_width].view(rows, n_heads, head_dim)
                k = y[:, q_width : q_width + kv_width].view(rows, n_kv, head_dim)
                q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
                keys[:, index, :, position] = k
                values[:, index, :, position] = y[:, q_width + kv_width :].view(rows, n_kv, head_dim)
                out = F.scaled_dot_product_attention(
                    q.unsqueeze(2),
                    keys[:, index, :, : position + 1],
                    values[:, index, :, : position + 1],
                    scale=scale,
                    enable_gqa=n_heads != n_kv,
                )  # one query sees every position before it: no mask
            step_project(o, out.reshape(rows, q_width), hidden)
            x = norm(hidden, layer.post_attention_layernorm.weight)
            step_project(down, silu_gate(step_project(gate_up, x), gate_up[1]), hidden)
        last = norm(hidden, inner.model.norm.weight)
        return matmul(last, step_head).float().argmax(dim=-1, keepdim=True)

    generated = []
    with torch.no_grad():
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        generated.append(prompt_pass(ids))
        for position in range(prompt_len, length):
            if should_stop():
                raise EvalInterrupted("stop requested during evaluation")
            generated.append(decode_step(generated[-1], position))
    return torch.cat(generated, dim=1).tolist()
