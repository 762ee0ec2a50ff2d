"""The decode step's projections on CPU: our own row-GEMM kernel (``kernels/rowgemm.cpp``).

A decode step multiplies a few rows by every weight of the model, so it is bound by reading
the weights from memory. Two things in torch's CPU path cost us there: its fp32 GEMV reaches
about half of this machine's read bandwidth, and on a CPU without native bf16 (AVX2 only) its
bf16 matmul is emulated. The kernel reads weights stored in bf16, fp16 or fp32, widens them
in registers and multiplies in fp32 with software prefetch, and computes every output
element in one fixed order, so a row's result does not depend on the other rows of the batch.

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
import tempfile
import threading
from pathlib import Path

import torch

from novelcrafter.logs import get_logger

log = get_logger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "rowgemm.cpp"
PREBUILT = SOURCE.with_suffix(".so")
FLAGS = ("-O3", "-march=haswell", "-mtune=generic", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ABI = 1

_lock = threading.Lock()
_loaded: dict[str, RowGemm | None] = {}


class RowGemm:
    """``y = x @ w.T`` for fp32 rows ``x`` and weights ``w`` in fp32, bf16 or fp16."""

    def __init__(self, library: ctypes.CDLL, threads: int) -> None:
        self._fn = library.nc_rowgemm
        self._fn.restype = None
        self._fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        self.threads = max(1, threads)
        self._scratch = torch.empty(0)

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"rowgemm: x {tuple(x.shape)} {x.dtype} does not fit w {tuple(w.shape)}")
        x = x.contiguous()
        rows, k = x.shape
        y = torch.empty(rows, w.shape[0], dtype=torch.float32)
        if self._scratch.numel() < rows * k:  # bf16 reorders x into it; grows, never shrinks
            self._scratch = torch.empty(rows * k)
        self._fn(
            KINDS[w.dtype],
            x.data_ptr(),
            rows,
            k,
            w.data_ptr(),
            w.shape[0],
            y.data_ptr(),
            self.threads,
            self._scratch.data_ptr(),
        )
        return y


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
    if not supported_cpu():
        log.info("CPU kernels off: needs an x86-64 CPU with AVX2, FMA and F16C")
        return None
    for path in (PREBUILT, _build(home)):
        if path is None or not path.exists():
            continue
        try:
            library = ctypes.CDLL(str(path))
            if library.nc_rowgemm_abi() == ABI:
                return library
        except (OSError, AttributeError) as exc:
            log.warning("CPU kernel not loadable", extra={"fields": {"path": str(path), "error": str(exc)}})
    return None


def _build(home: str | Path | None) -> Path | None:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        log.warning("CPU kernels off: no C++ compiler (g++) to build them; decode uses torch matmuls")
        return None
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(source + repr((FLAGS, version)).encode()).hexdigest()[:16]
    from novelcrafter.config import get_settings

    root = Path(home or get_settings().home).expanduser() / "kernels"
    target = root / f"rowgemm-{digest}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU kernel (once per machine)", extra={"fields": {"target": str(target)}})
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True
        )
        if result.returncode != 0:
            log.warning(
                "CPU kernel build failed; decode uses torch matmuls",
                extra={"fields": {"compiler": compiler, "error": result.stderr.strip()[-500:]}},
            )
            return None
        os.replace(partial, target)  # atomic: a concurrent process sees all of it or nothing
    return target
