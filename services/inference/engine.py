"""The forward pass: one base model, many LoRA adapters, batched decoding with exact isolation.

We run the Llama decoder ourselves (reusing the model's own modules for norms, rotary
embedding and weights) rather than calling ``model.forward`` because serving needs
three things the stock forward does not give together:

* **per-row adapters** — each row of a batch carries its own LoRA (or none), applied as
  PEFT does (``base(x) + B(A(x)) * scale``) without touching the shared modules;
* **per-sequence KV caches** — sequences join and leave the batch at any step
  (continuous batching) and never need padding: attention runs per sequence on its
  own cache, so a request's attention sees exactly the shapes it would see alone;
* **batch invariance** — a seeded request must give the same text alone and in any
  mix. Every op but the matrix multiply is row-wise, and a matmul's rows are
  bitwise independent of the row count only above a backend-specific minimum (oneDNN
  bf16: 2 rows, MKL fp32: 4; a one-row matmul takes another kernel). :meth:`calibrate`
  measures that minimum at startup and decode pads every matmul up to it with dummy
  rows, then verifies end to end that a sequence decodes identically alone and mixed.

On an x86-64 CPU the projections run in our row-GEMM kernel (:mod:`.cpu_kernels`): weights
stay in the serving precision (bf16 halves the bytes a decode step reads), activations, KV
caches and accumulation are fp32, and every row's result is independent of the batch, so
no padding rows are needed. Prompts longer than :data:`KERNEL_MAX_ROWS` tokens are prefilled
with torch's fp32 GEMM on the widened weights instead (compute-bound, where MKL is faster).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from novelcrafter.errors import FailedPrecondition
from novelcrafter.logs import get_logger

from . import cpu_kernels
from .cpu_kernels import Shortlist
from .lora import SUPPORTED_MODULES, LoraModule, LoraWeights

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CALIBRATION_VERSION = "3"  # bump when the probe changes: cached outcomes then re-measure
SHORTLIST_MAX_K = 1024  # a sampler's top-k up to this reads the LM head through its int8 screen
SHORTLIST_MAX_ROWS = 1  # ... in one-row steps (measured: 1.08x a step at 1 row, none at 2: compute-bound)
KERNEL_MAX_ROWS = 16  # above this many rows (long prompts) the CPU kernel hands over to GEMM
KERNEL_PREFILL_ROWS = 64  # prompts up to this long are prefilled in the decode kernels (measured:
# 10 tokens 65 vs 84 ms, 64 tokens 292 vs 409 ms; at 96 torch's GEMM wins)


def resolve_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """The serving precision of the weights: half on CUDA; on CPU bf16 where the CPU has
    native bf16 or our CPU kernel runs (bf16 weights, fp32 arithmetic), else fp32.

    ``bench/inference.py`` measures fp32 against bf16 on the CPU (speed and loss on real text)
    to justify the CPU rule: bf16 weights halve the bytes a decode step reads.
    """
    if requested and requested != "auto":
        if requested not in DTYPES:
            raise FailedPrecondition(f"unknown dtype {requested!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from novelcrafter.models import cpu_supports_bf16

    return torch.bfloat16 if cpu_supports_bf16() or cpu_kernels.supported_cpu() else torch.float32


@dataclass
class KVCache:
    """One sequence's keys and values for every layer, preallocated to its capacity."""

    k: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    v: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


# A LoRA plan for one forward: (rows or None for all rows, adapter).
LoraPlan = list[tuple[torch.Tensor | None, LoraWeights]]


class Engine:
    """Prefill and batched decode for a Llama-family causal LM with per-row LoRA."""

    def __init__(
        self, model: Any, *, device: str, dtype: torch.dtype, max_batch: int, kernels: str = "auto"
    ) -> None:
        """``kernels``: "auto" runs the CPU kernel where it is available, "off" never does."""
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype  # the weights'
        self.max_batch = max(1, max_batch)
        self.rowgemm = cpu_kernels.load() if kernels == "auto" and self.device.type == "cpu" else None
        # Activations, KV caches and LoRA tensors: fp32 with the kernel, else the weights' dtype.
        self.compute_dtype = torch.float32 if self.rowgemm is not None else dtype
        self.lora_dtype = self.compute_dtype
        config = model.config
        self._check_supported(model)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.vocab = config.vocab_size
        self.context = int(getattr(config, "max_position_embeddings", 2048))
        self.act = self.layers[0].mlp.act_fn
        self.min_rows = 1  # decode matmuls run on at least this many rows (see calibrate)
        self.batch_invariant = False
        self._buffer: Any = None
        self.fused = self._pack_weights()
        # The LM head's int8 screen: a row whose sampler reads only its top-k logits gets those
        # (exact) from ~half the bytes (cpu_kernels.LmHeadScreen, Engine.decode's shortlists).
        self.lm_head_screen = (
            cpu_kernels.LmHeadScreen.build(self.lm_head.weight)
            if self.rowgemm is not None and getattr(self.lm_head, "bias", None) is None
            else None
        )
        if self.rowgemm is not None:  # rotary tables for the decode kernel, every position once
            positions = torch.arange(self.context)[None, :]
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), positions)
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
            self._layer_pointers = self._pointer_table()
            self._shapes = cpu_kernels.LayerShapes(
                hidden=self.hidden,
                heads=self.n_heads,
                kv_heads=self.n_kv,
                head_dim=self.head_dim,
                intermediate=self.layers[0].mlp.gate_proj.out_features,
                eps=float(self.layers[0].input_layernorm.variance_epsilon),
                attn_scale=float(self.layers[0].self_attn.scaling),
            )

    @staticmethod
    def _check_supported(model: Any) -> None:
        config = model.config
        kind = getattr(config, "model_type", "?")
        problems = []
        if kind not in ("llama",):
            problems.append(f"model_type {kind!r}")
        layer = model.model.layers[0] if hasattr(model, "model") else None
        if layer is None or any(_missing(layer, name) for name in SUPPORTED_MODULES):
            problems.append("decoder layers without q/k/v/o and gate/up/down projections")
        if getattr(config, "sliding_window", None):
            problems.append("sliding-window attention")
        if problems:
            raise FailedPrecondition(
                "the inference engine serves Llama-architecture models (LlamaForCausalLM); "
                f"this base model has {', '.join(problems)}"
            )

    # --- weights --------------------------------------------------------------------------------

    def _pack_weights(self) -> list[dict[str, tuple[torch.Tensor, list[str], list[int]]]]:
        """Move every projection weight into one buffer, in the order a decode step reads them,
        and return per layer the fused q/k/v and gate/up weights (views, no copies).

        The modules' parameters become views into the buffer (same values, no extra memory).
        One call per fused group instead of one per projection, and the weights stream from
        memory in one sequential pass (on CPU the buffer is asked for transparent huge pages,
        so the prefetchers are not stopped at every 4 KiB page).
        """
        params = [layer.get_submodule(name).weight for layer in self.layers for name in SUPPORTED_MODULES]
        params.append(self.lm_head.weight)
        total = sum(p.numel() for p in params)
        buffer = _allocate(total, self.dtype, self.device)
        offset = 0
        for param in params:
            view = buffer[offset : offset + param.numel()].view(param.shape)
            view.copy_(param.data)
            param.data = view
            offset += param.numel()
        self._buffer = buffer
        fused = []
        for layer in self.layers:
            groups = {}
            for group, names in (("qkv", SUPPORTED_MODULES[:3]), ("gate_up", SUPPORTED_MODULES[4:6])):
                weights = [layer.get_submodule(name).weight for name in names]
                start = weights[0].data_ptr() - buffer.data_ptr()
                rows = sum(w.shape[0] for w in weights)
                in_features = weights[0].shape[1]
                fused_weight = buffer[start // buffer.element_size() :][: rows * in_features]
                widths = [w.shape[0] for w in weights]
                groups[group] = (fused_weight.view(rows, in_features), list(names), widths)
            fused.append(groups)
        return fused

    def _pointer_table(self) -> torch.Tensor:
        """int64 [layers, 6]: input norm, post-attention norm, q/k/v, o, gate/up, down weights
        of every layer, for the decode loop in C (the tensors live as long as the model)."""
        rows = []
        for layer, fused in zip(self.layers, self.fused, strict=True):
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(n.dtype != self.dtype or not n.is_contiguous() for n in norms):
                raise FailedPrecondition("norm weights must share the projections' dtype")
            if any(layer.get_submodule(name).bias is not None for name in SUPPORTED_MODULES):
                raise FailedPrecondition("projection biases are not supported by the CPU decode loop")
            rows.append(
                [
                    *(n.data_ptr() for n in norms),
                    fused["qkv"][0].data_ptr(),
                    layer.self_attn.o_proj.weight.data_ptr(),
                    fused["gate_up"][0].data_ptr(),
                    layer.mlp.down_proj.weight.data_ptr(),
                ]
            )
        return torch.tensor(rows, dtype=torch.int64)

    def _lora_table(self, adapter: LoraWeights) -> cpu_kernels.LoraTable:
        table = getattr(adapter, "_kernel_table", None)  # built once per adapter version
        if table is None:
            table = cpu_kernels.LoraTable.build(len(self.layers), SUPPORTED_MODULES, adapter)
            adapter._kernel_table = table  # type: ignore[attr-defined]
        return table

    # --- caches ---------------------------------------------------------------------------------

    def new_cache(self, capacity: int) -> KVCache:
        shape = (len(self.layers), self.n_kv, capacity, self.head_dim)
        return KVCache(
            torch.empty(shape, dtype=self.compute_dtype, device=self.device),
            torch.empty(shape, dtype=self.compute_dtype, device=self.device),
        )

    # --- forward --------------------------------------------------------------------------------

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """``x @ weight.T``: the CPU kernel where it runs, except for a ``wide`` (long prompt) input.

        Decode never passes ``wide``: its rows must always take the same kernel.
        """
        if self.rowgemm is None:
            return F.linear(x, weight)
        if wide:
            return F.linear(x, weight.to(torch.float32))
        return self.rowgemm(x, weight)

    def _linear(
        self, x: torch.Tensor, module: torch.nn.Linear, layer: int, name: str, plan: LoraPlan, wide: bool
    ) -> Any:
        y = self._matmul(x, module.weight, wide)
        if module.bias is not None:
            y = y + module.bias.to(y.dtype)
        for rows, adapter in plan:
            lora: LoraModule | None = adapter.layers[layer].get(name)
            if lora is None:
                continue
            if rows is None:
                y = y + self._matmul(self._matmul(x, lora.a, wide), lora.b, wide) * lora.scale
                continue
            sub = x.index_select(0, rows)
            if sub.shape[0] < self.min_rows:
                sub = F.pad(sub, (0, 0, 0, self.min_rows - sub.shape[0]))
            delta = self._matmul(self._matmul(sub, lora.a, wide), lora.b, wide) * lora.scale
            y[rows] = y[rows] + delta[: rows.shape[0]]
        return y

    def _fused_linear(
        self, x: torch.Tensor, layer: int, group: str, plan: LoraPlan, wide: bool
    ) -> tuple[torch.Tensor, ...]:
        """The projections of one fused group (q/k/v or gate/up) in one matmul, each with its
        own LoRA added on its columns as PEFT adds it to that projection's output."""
        weight, names, widths = self.fused[layer][group]
        y = self._matmul(x, weight, wide)
        start = 0
        for name, width in zip(names, widths, strict=True):
            columns = y[:, start : start + width]
            start += width
            for rows, adapter in plan:
                lora: LoraModule | None = adapter.layers[layer].get(name)
                if lora is None:
                    continue
                if rows is None:
                    columns += self._matmul(self._matmul(x, lora.a, wide), lora.b, wide) * lora.scale
                    continue
                sub = x.index_select(0, rows)
                if sub.shape[0] < self.min_rows:
                    sub = F.pad(sub, (0, 0, 0, self.min_rows - sub.shape[0]))
                delta = self._matmul(self._matmul(sub, lora.a, wide), lora.b, wide) * lora.scale
                columns.index_add_(0, rows, delta[: rows.shape[0]])
        return y.split(widths, dim=1)

    def _layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        plan: LoraPlan,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        wide: bool = False,
    ) -> torch.Tensor:
        """Run the decoder over N rows; ``attend`` does attention for one layer's q, k, v;
        ``wide``: a long prompt (see :meth:`_matmul`)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        n = ids.shape[0]
        h = self.embed(ids).to(self.compute_dtype)  # [N, hidden]
        cos, sin = self.rotary(h, positions[None, :])  # [1, N, head_dim]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = self._fused_linear(x, index, "qkv", plan, wide)
            # Rows play the role of the sequence axis of a batch of one: [1, heads, N, head_dim].
            q = q.view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = attend(index, q, k, v)  # [N, heads * head_dim]
            h = h + self._linear(out, attn.o_proj, index, "self_attn.o_proj", plan, wide)
            x = layer.post_attention_layernorm(h)
            gate, up = self._fused_linear(x, index, "gate_up", plan, wide)
            h = h + self._linear(self.act(gate) * up, layer.mlp.down_proj, index, "mlp.down_proj", plan, wide)
        return h

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        scale = self.layers[0].self_attn.scaling
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query over a cache, [1, heads, 1, dim] x [1, kv_heads, L, dim]: two small bmm's.

        SDPA's CPU kernel costs ~0.2 ms a call at this size (tiling set-up for one row); this
        is the same arithmetic (query heads grouped onto their kv head, as ``enable_gqa``).
        """
        groups = self.n_heads // self.n_kv
        scale = self.layers[0].self_attn.scaling
        query = q.reshape(self.n_kv, groups, self.head_dim)
        scores = torch.bmm(query, k[0].transpose(1, 2)) * scale  # [kv, groups, L]
        out = torch.bmm(torch.softmax(scores, dim=-1), v[0])  # [kv, groups, dim]
        return out.reshape(1, self.n_heads, 1, self.head_dim)

    @torch.inference_mode()
    def prefill(
        self,
        ids: Sequence[int],
        cache: KVCache,
        adapter: LoraWeights | None,
        shortlist: Shortlist | None = None,
    ) -> torch.Tensor:
        """Run a whole prompt alone (no padding) into ``cache``; the last position's logits (fp32,
        CPU); ``shortlist``: as :meth:`decode`'s."""
        n = len(ids)
        if n == 0 or n > cache.capacity:
            raise ValueError(f"prompt of {n} tokens does not fit a cache of {cache.capacity}")
        tokens = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        if self.rowgemm is not None and n <= KERNEL_PREFILL_ROWS:
            # Row i writes position i and attends over 0..i: every write happens before any
            # attention in the kernel, so the rows of one prompt form a causal prefill.
            h = self._layers_in_kernels(tokens, [cache] * n, list(range(n)), [adapter] * n)
            cache.length = n
            return self._logits(h[-1:], [shortlist])[0]
        positions = torch.arange(n, device=self.device)
        plan: LoraPlan = [(None, adapter)] if adapter is not None else []

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, :, :n] = k[0]
            cache.v[layer, :, :n] = v[0]
            out = self._attention(q, k, v, causal=True)  # [1, heads, N, head_dim]
            return out.transpose(1, 2).reshape(n, -1)

        h = self._layers(tokens, positions, plan, attend, wide=n > KERNEL_MAX_ROWS)
        cache.length = n
        return self._matmul(self.norm(h[-1:]), self.lm_head.weight).float()[0].cpu()

    @torch.inference_mode()
    def decode(
        self,
        tokens: Sequence[int],
        caches: Sequence[KVCache],
        adapters: Sequence[LoraWeights | None],
        shortlists: Sequence[Shortlist | None] | None = None,
    ) -> torch.Tensor:
        """One step for a batch of sequences, each at its own length; logits [B, vocab] (fp32, CPU).

        ``shortlists[b]`` (optional) says row b's sampler reads only some logits (its top k and
        a few ids): the engine may then return -inf for the others; the ones it reads are
        exactly what they would be otherwise. None: every logit."""
        batch = len(tokens)
        rows = max(batch, self.min_rows)
        if self.rowgemm is not None and rows == batch:  # the kernels need no padding rows
            ids = torch.tensor(list(tokens), dtype=torch.long)
            h = self._layers_in_kernels(ids, caches, [c.length for c in caches], adapters)
            for cache in caches:
                cache.length += 1
            return self._logits(h, shortlists)
        ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        ids[:batch] = torch.tensor(list(tokens), dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        positions[:batch] = torch.tensor([c.length for c in caches], dtype=torch.long)
        plan = self._plan(adapters, rows)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for i, cache in enumerate(caches):
                pos = cache.length
                cache.k[layer, :, pos] = k[0, :, i]
                cache.v[layer, :, pos] = v[0, :, i]
                keys = cache.k[layer, :, : pos + 1].unsqueeze(0)
                values = cache.v[layer, :, : pos + 1].unsqueeze(0)
                query = q[:, :, i : i + 1].contiguous()
                outs.append(self._decode_attention(query, keys, values))
            if rows > batch:  # dummy rows: attention output is irrelevant, keep shapes fixed
                outs.append(q.new_zeros(1, self.n_heads, rows - batch, self.head_dim))
            return torch.cat(outs, dim=2).transpose(1, 2).reshape(rows, -1)

        h = self._layers(ids, positions, plan, attend)
        for cache in caches:
            cache.length += 1
        return self._matmul(self.norm(h), self.lm_head.weight).float()[:batch].cpu()  # sampling: CPU

    def _logits(self, h: torch.Tensor, shortlists: Sequence[Shortlist | None] | None = None) -> torch.Tensor:
        """fp32 logits on the CPU of the final hidden states ``h`` [rows, hidden] (kernel path);
        shortlisted where every row has a shortlist the screen can serve."""
        kern = self.rowgemm
        assert kern is not None
        normed = kern.rmsnorm(h, self.norm.weight, self.norm.variance_epsilon)
        if self.lm_head_screen is not None and shortlists is not None and h.shape[0] <= SHORTLIST_MAX_ROWS:
            rows = [s for s in shortlists if s is not None and self._screened(s)]
            if len(rows) == h.shape[0]:
                return kern.lm_head_shortlist(normed, self.lm_head_screen, self.lm_head.weight, rows)
        return kern(normed, self.lm_head.weight)

    def _screened(self, shortlist: Shortlist) -> bool:
        """Whether the screen pays for this shortlist (a k near the vocabulary reads it all)."""
        always = 0 if shortlist.always is None else shortlist.always.numel()
        return 1 <= shortlist.k <= SHORTLIST_MAX_K and always <= self.vocab // 8

    def _layers_in_kernels(
        self,
        ids: torch.Tensor,
        caches: Sequence[KVCache],
        positions: list[int],
        adapters: Sequence[LoraWeights | None],
    ) -> torch.Tensor:
        """Every decoder layer in the CPU kernels, one call: the same arithmetic as
        :meth:`_layers`; row i is token ``ids[i]`` at ``positions[i]`` of ``caches[i]``."""
        kern = self.rowgemm
        assert kern is not None
        step = cpu_kernels.DecodeCaches([c.k for c in caches], [c.v for c in caches], positions)
        h = self.embed(ids).to(torch.float32).contiguous()  # the residual stream, [B, hidden]
        tables: dict[int, int] = {}
        used: list[cpu_kernels.LoraTable] = []
        of_row = []
        for adapter in adapters:
            if adapter is None:
                of_row.append(-1)
                continue
            if id(adapter) not in tables:
                tables[id(adapter)] = len(used)
                used.append(self._lora_table(adapter))
            of_row.append(tables[id(adapter)])
        kern.decode_layers(
            h,
            shapes=self._shapes,
            weights=self._layer_pointers,
            kind=self.dtype,
            adapters=used,
            adapter_of_row=torch.tensor(of_row, dtype=torch.int64),
            cos=self._cos,
            sin=self._sin,
            caches=step,
        )
        return h

    def _plan(self, adapters: Sequence[LoraWeights | None], rows: int) -> LoraPlan:
        groups: dict[int, tuple[LoraWeights, list[int]]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(i)
        plan: LoraPlan = []
        for adapter, members in groups.values():
            if len(members) == rows:
                plan.append((None, adapter))
            else:
                plan.append((torch.tensor(members, dtype=torch.long, device=self.device), adapter))
        return plan

    # --- batch invariance -----------------------------------------------------------------------

    def calibrate(
        self,
        probe_ids: Sequence[Sequence[int]],
        adapters: Sequence[LoraWeights],
        cache_file: Path | None = None,
    ) -> None:
        """Find the row count above which matmuls are row-invariant, then check end to end
        that a sequence decodes to the same logits alone and mixed with others.

        The outcome depends only on hardware, library versions, thread count, dtype and
        shapes; with ``cache_file`` it is remembered under that key across restarts.
        """
        started = time.monotonic()
        key = self._calibration_key()
        known = _read_calibration(cache_file).get(key) if cache_file else None
        if known:
            self.min_rows, self.batch_invariant = int(known["min_rows"]), bool(known["invariant"])
            source = "cache"
        else:
            self.min_rows = self._probe_min_rows()
            self.batch_invariant = self._invariant(probe_ids, adapters)
            if not self.batch_invariant and self.min_rows < self.max_batch:
                self.min_rows = self.max_batch
                self.batch_invariant = self._invariant(probe_ids, adapters)
            source = "measured"
            if cache_file:
                _write_calibration(
                    cache_file, key, {"min_rows": self.min_rows, "invariant": self.batch_invariant}
                )
        if not self.batch_invariant:
            log.warning(
                "seeded generations may depend on batch composition on this backend",
                extra={"fields": {"device": str(self.device), "dtype": str(self.dtype)}},
            )
        log.info(
            "batch invariance calibrated",
            extra={
                "fields": {
                    "invariant": self.batch_invariant,
                    "min_rows": self.min_rows,
                    "dtype": str(self.dtype).replace("torch.", ""),
                    "source": source,
                    "seconds": round(time.monotonic() - started, 2),
                }
            },
        )

    def _calibration_key(self) -> str:
        hardware = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_model()
        shapes = sorted(
            {tuple(p.shape) for p in self.layers[0].parameters()} | {tuple(self.lm_head.weight.shape)}
        )
        parts = [
            CALIBRATION_VERSION,
            torch.__version__,
            hardware,
            str(self.dtype),
            "rowgemm" if self.rowgemm is not None else "torch",
            str(torch.get_num_threads()),
            str(self.max_batch),
        ]
        digest = hashlib.sha256(repr((parts, shapes)).encode()).hexdigest()[:16]
        return f"{self.device.type}-{str(self.dtype).replace('torch.', '')}-{digest}"

    @torch.inference_mode()
    def _probe_min_rows(self) -> int:
        """Smallest m such that a matmul's first row is bitwise the same for every row count >= m.

        Probed on the (out, in) shapes decode multiplies (base layers, lm_head, LoRA A and B at
        a few ranks) with adversarial weights: a huge term, its negation and ones between them,
        whose sum depends on the accumulation order by far more than a bf16 rounding step.
        """
        if self.max_batch == 1:
            return 1
        gen = torch.Generator().manual_seed(0)
        layer = self.layers[0]
        linears = [layer.get_submodule(name) for name in SUPPORTED_MODULES] + [self.lm_head]
        shapes = {(tuple(m.weight.shape), self.dtype) for m in linears}
        for rank in (8, 64):
            shapes |= {((rank, m.in_features), self.lora_dtype) for m in linears[:-1]}
            shapes |= {((m.out_features, rank), self.lora_dtype) for m in linears[:-1]}
        counts = sorted({*range(1, min(self.max_batch, 8) + 1), self.max_batch, max(1, self.max_batch - 1)})
        needed = 1
        for (out_features, in_features), dtype in sorted(shapes, key=repr):
            weight = _adversarial(out_features, in_features, gen, dtype).to(self.device, dtype)
            x = torch.ones(self.max_batch, in_features, dtype=self.compute_dtype, device=self.device)
            reference = self._matmul(x, weight)[0]
            for m in counts:
                if m > needed and not torch.equal(self._matmul(x[:m], weight)[0], reference):
                    needed = m + 1
        return min(needed, self.max_batch)

    def _run_probe(
        self, ids_list: Sequence[Sequence[int]], adapters: Sequence[LoraWeights | None], steps: int
    ) -> list[torch.Tensor]:
        caches = [self.new_cache(len(ids) + steps + 1) for ids in ids_list]
        first = [self.prefill(ids, c, a) for ids, c, a in zip(ids_list, caches, adapters, strict=True)]
        tokens = [int(f.argmax()) for f in first]
        outputs = [torch.stack(first)]
        for _ in range(steps):
            logits = self.decode(tokens, caches, adapters)
            outputs.append(logits)
            tokens = [int(row.argmax()) for row in logits]
        return [torch.cat([o[i : i + 1] for o in outputs]) for i in range(len(ids_list))]

    def _invariant(self, probe_ids: Sequence[Sequence[int]], adapters: Sequence[LoraWeights]) -> bool:
        target = probe_ids[0]
        own = adapters[0] if adapters else None
        alone = self._run_probe([target], [own], steps=3)[0]
        others = list(probe_ids[1:])
        mix: list[LoraWeights | None] = [None, *adapters[1:]]
        for size in sorted({2, min(self.max_batch, len(others) + 1)}):
            if size < 2 or size > self.max_batch:
                continue
            batch = [*others[: size - 1], target]
            batch_adapters = [mix[i % len(mix)] for i in range(size - 1)] + [own]
            mixed = self._run_probe(batch, batch_adapters, steps=3)[-1]
            if not torch.equal(alone, mixed):
                return False
        return True


def _allocate(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of ``count`` elements; on CPU in memory advised for transparent huge pages."""
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(count, dtype=dtype, device=device)
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    area = mmap.mmap(-1, nbytes)
    area.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(area, dtype=dtype, count=count)  # the tensor keeps ``area`` alive


def _missing(layer: Any, name: str) -> bool:
    try:
        return not isinstance(layer.get_submodule(name), torch.nn.Linear)
    except AttributeError:
        return True


def _cpu_model() -> str:
    """The CPU's model name and feature flags (what decides which matmul kernels run)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return platform.machine() + "-" + hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]


def _read_calibration(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_calibration(path: Path, key: str, value: dict[str, Any]) -> None:
    """Best effort, atomic: a cache that cannot be written only costs a re-measurement."""
    try:
        data = _read_calibration(path)
        data[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("calibration not cached", extra={"fields": {"path": str(path), "error": str(exc)}})


def _adversarial(rows: int, cols: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rows of ones and halves with one +2^e and one -2^e: order-sensitive sums
    (e kept where ``dtype`` cannot overflow: fp16 tops out at 65504)."""
    weight = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, 1.0, 0.5)
    top = 14 if dtype == torch.float16 else 26
    big = torch.exp2(torch.randint(top - 16, top, (rows,), generator=gen).float())
    index = torch.arange(rows)
    weight[index, torch.randint(0, cols, (rows,), generator=gen)] = big
    weight[index, torch.randint(0, cols, (rows,), generator=gen)] = -big
    return weight


def random_lora(engine: Engine, rank: int = 4, seed: int = 0) -> LoraWeights:
    """A random adapter on q_proj and v_proj, for calibration probes only."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[dict[str, LoraModule]] = []
    for layer in engine.layers:
        mods = {}
        for name in ("self_attn.q_proj", "self_attn.v_proj"):
            base = layer.get_submodule(name)
            a = torch.randn(rank, base.in_features, generator=gen) * 0.05
            b = torch.randn(base.out_features, rank, generator=gen) * 0.05
            mods[name] = LoraModule(
                a.to(engine.device, engine.lora_dtype), b.to(engine.device, engine.lora_dtype), 2.0
            )
        layers.append(mods)
    return LoraWeights(rank, 2.0 * rank, ["self_attn.q_proj", "self_attn.v_proj"], layers)
