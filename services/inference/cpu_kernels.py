"""The decode step's projections on CPU: our own row-GEMM kernel (``kernels/rowgemm.cpp``).

A decode step multiplies a few rows by every weight of the model, so it is bound by reading
the weights from memory. Two things in torch's CPU path cost us there: its fp32 GEMV reaches
about half of this machine's read bandwidth, and on a CPU without native bf16 (AVX2 only) its
bf16 matmul is emulated. The kernel reads weights stored in bf16, fp16 or fp32, widens them
in registers and multiplies in fp32 with software prefetch, and computes every output
element in one fixed order, so a row's result does not depend on the other rows of the batch.
Its bf16 loop has an AVX-512 variant, picked at run time where the CPU has AVX-512 (F, BW):
a cache line per load, and several rows share each widened weight vector (a batch is
compute-bound on that loop otherwise); measured in ``bench/RESULTS.md``.

The source ships with the package and is compiled once per machine with the system's C++
compiler into ``$NOVELCRAFTER_HOME/kernels`` (a build of the same source and flags is
reused; a prebuilt ``rowgemm.so`` beside the source, as the container image has, is used
first). Where there is no x86-64 CPU with AVX2/FMA/F16C or no compiler, :func:`load`
returns None and the engine keeps torch's matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from novelcrafter.logs import get_logger

log = get_logger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "rowgemm.cpp"
PREBUILT = SOURCE.with_suffix(".so")
FLAGS = ("-O3", "-march=haswell", "-mtune=generic", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ABI = 7
ISAS = {"avx2": 0, "avx512": 1}  # the bf16 loops the library carries (chosen at run time)

_lock = threading.Lock()
_loaded: dict[str, RowGemm | None] = {}


_P, _L, _I, _F, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_double
_SIGNATURES = {
    "nc_rowgemm": [_I, _P, _L, _L, _P, _L, _P, _L, _F, _I, _I, _P],
    "nc_rmsnorm": [_P, _L, _L, _P, _I, _F, _P],
    "nc_silu_mul": [_P, _L, _L, _P],
    "nc_decode_attention": [_P, _L, _L, _L, _L, _P, _P, _P, _P, _P, _P, _L, _F, _P, _P, _L, _I],
    "nc_lm_head_shortlist": [_P, _L, _L, _P, _P, _P, _P, _I, _L, _P, _P, _P, _P, _I, _P],
    "nc_decode_layers": [
        *(_P, _L, _L, _L, _P, _I, _F, _L, _L, _L, _L, _L, _P, _P, _P, _P),
        *(_P, _P, _P, _P, _P, _P, _F, _L, _I),
    ],
}


class RowGemm:
    """The kernels of one engine: ``y = x @ w.T`` for fp32 rows ``x`` and weights ``w`` in fp32,
    bf16 or fp16, and the decode step's row-wise ops (RMSNorm, SiLU-gate, attention).

    Each method checks what it is given (shapes, dtypes, contiguity): a wrong call raises
    instead of reading out of bounds.
    """

    def __init__(self, library: ctypes.CDLL, threads: int) -> None:
        for name, argtypes in _SIGNATURES.items():
            getattr(library, name).argtypes = argtypes
            getattr(library, name).restype = None
        library.nc_rowgemm_isa.argtypes = [_I]
        library.nc_rowgemm_isa.restype = _I
        library.nc_sample.argtypes = [_P, _L, _P, _L, _F, _D, _L, _D, _D]
        library.nc_sample.restype = _L
        self._lib = library
        self.threads = max(1, threads)
        self._scratch = torch.empty(0)
        self._stack_memo: tuple[tuple[weakref.ref[LoraTable], ...], tuple[torch.Tensor, ...]] | None = None

    @property
    def isa(self) -> str:
        """The bf16 loop in use: "avx512" where the CPU has AVX-512 (F and BW), else "avx2"."""
        code = self._lib.nc_rowgemm_isa(-1)
        return next(name for name, value in ISAS.items() if value == code)

    def use_isa(self, name: str) -> str:
        """Ask for one bf16 loop (process-wide; benchmarks and tests compare the two); returns
        the one in use, which stays "avx2" on a CPU without AVX-512."""
        if name not in ISAS:
            raise ValueError(f"rowgemm: unknown ISA {name!r}; expected one of {sorted(ISAS)}")
        self._lib.nc_rowgemm_isa(ISAS[name])
        return self.isa

    def __call__(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        alpha: float = 1.0,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """``x @ w.T`` into a new tensor, or into ``out`` (which may be a column slice);
        with ``accumulate``: ``out += alpha * x @ w.T``."""
        if x.dtype != torch.float32 or x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"rowgemm: x {tuple(x.shape)} {x.dtype} does not fit w {tuple(w.shape)}")
        if not w.is_contiguous() or w.dtype not in KINDS:
            raise ValueError(f"rowgemm: weights must be contiguous fp32/bf16/fp16, got {w.dtype}")
        x = x.contiguous()
        rows, k = x.shape
        if out is None:
            if accumulate:
                raise ValueError("rowgemm: accumulate needs out")
            out = torch.empty(rows, w.shape[0], dtype=torch.float32)
        elif out.shape != (rows, w.shape[0]) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"rowgemm: out {tuple(out.shape)} does not fit ({rows}, {w.shape[0]})")
        if self._scratch.numel() < rows * k:  # bf16 reorders x into it; grows, never shrinks
            self._scratch = torch.empty(rows * k)
        self._lib.nc_rowgemm(
            KINDS[w.dtype],
            x.data_ptr(),
            rows,
            k,
            w.data_ptr(),
            w.shape[0],
            out.data_ptr(),
            out.stride(0),
            alpha,
            int(accumulate),
            self.threads,
            self._scratch.data_ptr(),
        )
        return out

    def sample(self, logits: torch.Tensor, params: Any, seen: torch.Tensor | None, u: float) -> int:
        """The next token of one fp32 logits row (penalized in place) for ``params`` (a
        ``SamplingParams``) and the request's uniform draw ``u``: see ``sampling.next_token``."""
        if logits.dtype != torch.float32 or logits.dim() != 1 or not logits.is_contiguous():
            raise ValueError(f"sample: logits must be one contiguous fp32 row, got {tuple(logits.shape)}")
        vocab = logits.shape[0]
        count = 0 if seen is None else _checked_ids(seen, vocab, "sample: seen").numel()
        return int(
            self._lib.nc_sample(
                logits.data_ptr(),
                vocab,
                seen.data_ptr() if count else None,  # type: ignore[union-attr]
                count,
                params.repetition_penalty,
                params.temperature,
                params.top_k,
                params.top_p,
                u,
            )
        )

    def _stacked(self, adapters: list[LoraTable], layers: int) -> tuple[torch.Tensor, ...]:
        """The step's adapter tables stacked for the C loop; the last step's are reused when the
        same tables come again (one stream, or a steady batch). The memo holds them weakly: it
        never keeps an evicted adapter alive, and a hit needs the very same live tables."""
        memo = self._stack_memo
        if (
            memo is not None
            and len(memo[0]) == len(adapters)
            and all(ref() is a for ref, a in zip(memo[0], adapters, strict=True))
        ):
            return memo[1]
        if adapters:
            stacked = (
                torch.stack([a.pointers for a in adapters]),
                torch.stack([a.scales for a in adapters]),
                torch.stack([a.ranks for a in adapters]),
            )
        else:
            stacked = (
                torch.zeros(1, layers, 7, 2, dtype=torch.int64),
                torch.zeros(1, layers, 7),
                torch.zeros(1, layers, 7, dtype=torch.int64),
            )
        self._stack_memo = (tuple(weakref.ref(a) for a in adapters), stacked)
        return stacked

    def lm_head_shortlist(
        self, x: torch.Tensor, screen: LmHeadScreen, weight: torch.Tensor, rows: list[Shortlist]
    ) -> torch.Tensor:
        """Logits [B, vocab] of the final-normed rows ``x`` where row b needs only its
        ``rows[b].k`` best logits and those of ``rows[b].always``: those are exactly the full
        product's (``x @ weight.T``), every other one is -inf (see the C source for why)."""
        batch, width = x.shape
        vocab = weight.shape[0]
        if (
            x.dtype != torch.float32
            or not x.is_contiguous()
            or len(rows) != batch
            or weight.shape != (vocab, width)
            or not weight.is_contiguous()
            or weight.dtype not in KINDS
            or screen.q.shape != weight.shape
        ):
            raise ValueError("lm_head_shortlist: inputs do not fit")
        always = []
        for row in rows:
            if not 1 <= row.k < vocab // 2:
                raise ValueError(f"lm_head_shortlist: k {row.k} is out of range")
            ids = row.always if row.always is not None else torch.empty(0, dtype=torch.int64)
            always.append(_checked_ids(ids, vocab, "lm_head_shortlist: always"))
        counts = [a.numel() for a in always]
        table = torch.tensor([[r.k for r in rows], [a.data_ptr() for a in always], counts], dtype=torch.int64)
        if self._scratch.numel() < batch * width:
            self._scratch = torch.empty(batch * width)
        out = torch.empty(batch, vocab)
        self._lib.nc_lm_head_shortlist(
            x.data_ptr(),
            batch,
            width,
            screen.q.data_ptr(),
            screen.scale.data_ptr(),
            screen.bound.data_ptr(),
            weight.data_ptr(),
            KINDS[weight.dtype],
            vocab,
            table[0].data_ptr(),
            table[1].data_ptr(),
            table[2].data_ptr(),
            out.data_ptr(),
            self.threads,
            self._scratch.data_ptr(),
        )
        return out

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or weight.shape != (x.shape[1],):
            raise ValueError(f"rmsnorm: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        self._lib.nc_rmsnorm(
            x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), KINDS[weight.dtype], eps, out.data_ptr()
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for the fused [rows, 2 * I] gate/up output."""
        if gate_up.dtype != torch.float32 or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"silu_mul: bad gate/up {tuple(gate_up.shape)}")
        gate_up = gate_up.contiguous()
        half = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], half)
        self._lib.nc_silu_mul(gate_up.data_ptr(), gate_up.shape[0], half, out.data_ptr())
        return out

    def decode_attention(
        self,
        qkv: torch.Tensor,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: DecodeCaches,
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        """Rotary, KV-cache write and one-query attention for every row at its cache's length
        (``qkv`` is rotated in place); ``cos``/``sin``: [positions, head_dim] tables."""
        rows = qkv.shape[0]
        if (
            qkv.dtype != torch.float32
            or not qkv.is_contiguous()
            or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim
            or caches.rows != rows
            or caches.head_dim != head_dim
            or caches.kv_heads != kv_heads
            or cos.shape != sin.shape
            or cos.shape[1] != head_dim
            or caches.max_len > cos.shape[0]
            or not 0 <= layer < caches.layers
        ):
            raise ValueError("decode_attention: inputs do not fit")
        out = torch.empty(rows, heads * head_dim)
        scores = torch.empty(rows * heads * caches.max_len)
        self._lib.nc_decode_attention(
            qkv.data_ptr(),
            rows,
            heads,
            kv_heads,
            head_dim,
            caches.positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            caches.k.data_ptr(),
            caches.v.data_ptr(),
            caches.capacity.data_ptr(),
            layer,
            scale,
            out.data_ptr(),
            scores.data_ptr(),
            caches.max_len,
            self.threads,
        )
        return out

    def decode_layers(
        self,
        h: torch.Tensor,
        *,
        shapes: LayerShapes,
        weights: torch.Tensor,
        kind: torch.dtype,
        adapters: list[LoraTable],
        adapter_of_row: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: DecodeCaches,
    ) -> None:
        """Every decoder layer; ``h`` [rows, hidden] fp32 is the residual stream, updated in
        place. ``weights``: int64 [layers, 6] pointers (see the C source) that the caller keeps
        alive; ``adapter_of_row`` (int64 [rows]): each row's index into ``adapters``, or -1."""
        rows = h.shape[0]
        layers = weights.shape[0]
        count = len(adapters)
        pointers, scales, ranks = self._stacked(adapters, layers)
        if (
            h.dtype != torch.float32
            or not h.is_contiguous()
            or h.shape[1] != shapes.hidden
            or weights.shape != (layers, 6)
            or pointers.shape[1:] != (layers, 7, 2)
            or adapter_of_row.shape != (rows,)
            or adapter_of_row.dtype != torch.int64
            or int(adapter_of_row.max()) >= count
            or caches.rows != rows
            or caches.layers != layers
            or caches.kv_heads != shapes.kv_heads
            or caches.head_dim != shapes.head_dim
            or caches.max_len > cos.shape[0]
        ):
            raise ValueError("decode_layers: inputs do not fit")
        self._lib.nc_decode_layers(
            h.data_ptr(),
            rows,
            shapes.hidden,
            layers,
            weights.data_ptr(),
            KINDS[kind],
            shapes.eps,
            shapes.heads,
            shapes.kv_heads,
            shapes.head_dim,
            shapes.intermediate,
            count,
            pointers.data_ptr(),
            scales.data_ptr(),
            ranks.data_ptr(),
            adapter_of_row.data_ptr(),
            caches.positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            caches.k.data_ptr(),
            caches.v.data_ptr(),
            caches.capacity.data_ptr(),
            shapes.attn_scale,
            caches.max_len,
            self.threads,
        )


def _checked_ids(ids: torch.Tensor, vocab: int, what: str) -> torch.Tensor:
    """``ids`` if it is a contiguous int64 vector of ids below ``vocab`` (the C code indexes a
    logits row with them), else ValueError."""
    if ids.dtype != torch.int64 or ids.dim() != 1 or not ids.is_contiguous():
        raise ValueError(f"{what} ids must be a contiguous int64 vector")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise ValueError(f"{what}: an id is out of range, outside the vocabulary of {vocab}")
    return ids


@dataclass(frozen=True)
class Shortlist:
    """What a row's sampler reads of its logits: its ``k`` best and those of ``always`` (int64
    ids whose logits it changes itself, e.g. the repetition penalty's)."""

    k: int
    always: torch.Tensor | None = None


@dataclass(frozen=True)
class LmHeadScreen:
    """An int8 copy of an LM head that bounds every logit (``lm_head_shortlist``): q [V, K]
    int8, per-row ``scale`` (w ~ scale * q) and ``bound`` with |x.w - x.(scale q)| plus the
    fp32 rounding of both sums <= |x| * bound for any x."""

    q: torch.Tensor
    scale: torch.Tensor
    bound: torch.Tensor

    @property
    def nbytes(self) -> int:
        """What a screened step reads of it (all of it)."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.bound))

    @classmethod
    def build(cls, weight: torch.Tensor, chunk: int = 4096) -> LmHeadScreen:
        rows = weight.shape[0]
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(rows)
        bound = torch.empty(rows)
        for start in range(0, rows, chunk):  # float64 a chunk at a time: no full-size copy
            w = weight[start : start + chunk].detach().to("cpu", torch.float64)
            s32 = (w.abs().amax(dim=1) / 127).float()
            s32 = torch.where(s32 > 0, s32, torch.ones_like(s32))
            qc = torch.round(w / s32.double()[:, None]).clamp(-127, 127)
            approx = qc * s32.double()[:, None]  # what the kernel multiplies by, exactly
            # 1e-4 (|w| + |s q|) covers the rounding of two fp32 dot products of K terms
            # (K * 2^-24 < 1e-4 for K < 1677); * (1 + 1e-6) rounds the bound up to fp32.
            error = (w - approx).norm(dim=1) + 1e-4 * (w.norm(dim=1) + approx.norm(dim=1))
            q[start : start + chunk] = qc.to(torch.int8)
            scale[start : start + chunk] = s32
            bound[start : start + chunk] = (error * (1 + 1e-6)).float()
        return cls(q, scale, bound)


@dataclass(frozen=True)
class LayerShapes:
    """What :meth:`RowGemm.decode_layers` needs to know of the model."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    attn_scale: float


@dataclass
class LoraTable:
    """One adapter's A/B pointers, scales and ranks per layer and module, for the C loop."""

    pointers: torch.Tensor  # int64 [layers, 7, 2], 0 where the module has no LoRA
    scales: torch.Tensor  # fp32 [layers, 7]
    ranks: torch.Tensor  # int64 [layers, 7]
    keep: tuple[torch.Tensor, ...] = ()  # the tensors pointed at

    @classmethod
    def build(cls, layers: int, modules: tuple[str, ...], adapter: Any) -> LoraTable:
        pointers = torch.zeros(layers, len(modules), 2, dtype=torch.int64)
        scales = torch.zeros(layers, len(modules), dtype=torch.float32)
        ranks = torch.zeros(layers, len(modules), dtype=torch.int64)
        keep: list[torch.Tensor] = []
        for layer in range(layers if adapter is not None else 0):
            for index, name in enumerate(modules):
                lora = adapter.layers[layer].get(name)
                if lora is None:
                    continue
                if lora.a.dtype != torch.float32 or lora.b.dtype != torch.float32:
                    raise ValueError("decode_layers: LoRA tensors must be fp32")
                a, b = lora.a.contiguous(), lora.b.contiguous()
                keep += [a, b]
                pointers[layer, index, 0] = a.data_ptr()
                pointers[layer, index, 1] = b.data_ptr()
                scales[layer, index] = lora.scale
                ranks[layer, index] = a.shape[0]
        return cls(pointers, scales, ranks, tuple(keep))


class DecodeCaches:
    """The KV caches of one decode step's rows, as the attention kernel takes them: fp32
    ``[layers, kv_heads, capacity, head_dim]`` contiguous tensors, one per row, each holding
    ``lengths[row]`` positions; this step writes position ``lengths[row]``."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]) -> None:
        if not keys or len(lengths) != len(keys) or len(values) != len(keys):
            raise ValueError("decode caches: one key, value and length per row, at least one row")
        layers, kv_heads, _, head_dim = keys[0].shape
        for k, v, length in zip(keys, values, lengths, strict=True):
            for t in (k, v):
                if t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 4:
                    raise ValueError("decode caches must be contiguous 4-d fp32 tensors")
                if (t.shape[0], t.shape[1], t.shape[3]) != (layers, kv_heads, head_dim) or t.shape != k.shape:
                    raise ValueError("decode caches must share layers, kv heads and head size")
            if not 0 <= length < k.shape[2]:
                raise ValueError(f"decode cache full: length {length} of capacity {k.shape[2]}")
        self.rows = len(keys)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        pointers = [[k.data_ptr() for k in keys], [v.data_ptr() for v in values]]
        table = torch.tensor(  # one tensor, four rows: a step builds this every time
            [*pointers, [k.shape[2] for k in keys], lengths], dtype=torch.int64
        )
        self.k, self.v, self.capacity, self.positions = table.unbind(0)
        self.max_len = max(lengths) + 1
        self._keep = (keys, values)  # the pointers above stay valid while this object lives


def supported_cpu() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        ).split()
    except OSError:
        return False
    return all(flag in flags for flag in REQUIRED_CPU_FLAGS)


def load(home: str | Path | None = None, threads: int | None = None) -> RowGemm | None:
    """The compiled kernel (built once per machine), or None where it cannot run here.

    Each engine gets its own :class:`RowGemm` (its scratch buffer is not shared between
    threads); the shared library is compiled and opened once per process.
    """
    threads = threads or torch.get_num_threads()
    library = _library(home)
    return RowGemm(library, threads) if library is not None else None


def _library(home: str | Path | None) -> ctypes.CDLL | None:
    key = str(home)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _open(home)
        cached = _loaded[key]
    return cached  # type: ignore[return-value]


def _open(home: str | Path | None) -> ctypes.CDLL | None:
    """The prebuilt library where there is one (a container image's), else this machine's own
    build (compiled once); each start logs which one runs, or why none does."""
    if not supported_cpu():
        log.info("CPU kernels off: needs an x86-64 CPU with AVX2, FMA and F16C")
        return None
    if PREBUILT.exists():
        library = _checked(PREBUILT)
        if library is not None:
            return library
    built = _build(home)
    return _checked(built) if built is not None else None


def _checked(path: Path) -> ctypes.CDLL | None:
    """Open ``path`` if it is a kernel library of this ABI, and say so."""
    try:
        library = ctypes.CDLL(str(path))
        abi = library.nc_rowgemm_abi()
    except (OSError, AttributeError) as exc:
        log.warning("CPU kernel not loadable", extra={"fields": {"path": str(path), "error": str(exc)}})
        return None
    if abi != ABI:
        log.warning(
            "CPU kernel of another version ignored", extra={"fields": {"path": str(path), "abi": abi}}
        )
        return None
    source = "prebuilt" if path == PREBUILT else "built on this machine"
    log.info(f"CPU kernels on ({source})", extra={"fields": {"path": str(path)}})
    return library


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _build(home: str | Path | None) -> Path | None:
    compiler = _compiler()
    if compiler is None:
        log.warning(
            "CPU kernels off: no prebuilt library and no C++ compiler (g++) to build one; "
            "decode uses torch matmuls",
            extra={"fields": {"prebuilt": str(PREBUILT)}},
        )
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, version)).encode()).hexdigest()[:16]
    from novelcrafter.config import get_settings

    target = Path(home or get_settings().home).expanduser() / "kernels" / f"rowgemm-{digest}.so"
    if target.exists():
        return target
    log.info("building the CPU kernel (once per machine)", extra={"fields": {"target": str(target)}})
    return target if _compile(compiler, target) else None


def _compile(compiler: str, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True
        )
        if result.returncode != 0:
            log.warning(
                "CPU kernel build failed; decode uses torch matmuls",
                extra={"fields": {"compiler": compiler, "error": result.stderr.strip()[-500:]}},
            )
            return False
        os.replace(partial, target)  # atomic: a concurrent process sees all of it or nothing
    return True


def main() -> int:
    """``python -m novelcrafter.inference.cpu_kernels``: compile the kernel beside its source
    (``rowgemm.so``), as a container image does at build time so its runtime needs no compiler."""
    compiler = _compiler()
    if compiler is None:
        print("error: no C++ compiler found (install g++ or set CXX)", file=sys.stderr)
        return 1
    if not _compile(compiler, PREBUILT):
        print(f"error: compiling {SOURCE} failed (see the log above)", file=sys.stderr)
        return 1
    print(PREBUILT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
