"""``bench.inference --engine vllm``: our inference service with ``--engine vllm`` (generation on
vLLM's CPU build, from its own venv: bench/peers.py), the same requests and adapters as the
native rows, over real gRPC. Prints one tok/s row per concurrency level."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import peers


def start_vllm(model_dir: Path, port: int, max_num_seqs: int, max_loras: int, log: Path) -> subprocess.Popen:
    python = peers.vllm_python()
    argv = peers.vllm_serve_argv(python, model_dir, port, max_num_seqs=max_num_seqs, max_loras=max_loras)
    proc = subprocess.Popen(argv, env=peers.vllm_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited at start (exit {proc.returncode}); its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vLLM did not answer within 900 s; its log: {log}")


def measure(
    store: Path, model_dir: Path, books: list[str], levels: list[int], requests: int, tokens: int
) -> list[Any]:
    """The ``Level`` rows of our service on vLLM (same prompts, seeds and sampling as native)."""
    from novelcrafter.inference.client import build_request
    from novelcrafter.inference.server import InferenceConfig, InferenceServer

    from bench.inference import PROMPTS, SAMPLING, run_level
    from novelcrafter.config import get_settings
    from novelcrafter.rpc import connect
    from novelcrafter.v1 import inference_pb2_grpc

    port = _free_port()
    log = peers.peer_dir(peers.VLLM) / "bench-server.log"
    print(f"starting vLLM (CPU build) for the vllm rows; log {log}", file=sys.stderr, flush=True)
    vllm = start_vllm(model_dir, port, max(levels), len(books), log)
    settings = get_settings(store=str(store), metrics_listen="off")
    server = InferenceServer(
        InferenceConfig(
            listen="127.0.0.1:0",
            store=str(store),
            watch_interval=1.0,
            max_adapters=len(books),
            max_concurrency=max(levels),
            engine="vllm",
            vllm_url=f"http://127.0.0.1:{port}",
            vllm_adapter_dir=str(store.parent / "vllm-adapters"),
        ),
        settings,
    )
    try:
        server.start()
        server.load()
        stub = inference_pb2_grpc.InferenceServiceStub(connect(f"127.0.0.1:{server.port}", settings))

        def ours(i: int) -> tuple[int, float]:
            request = build_request(
                PROMPTS[i % len(PROMPTS)],
                book_id=books[i % len(books)],
                max_new_tokens=tokens,
                seed=i,
                **SAMPLING,
            )
            started = time.perf_counter()
            reply = stub.Generate(request, timeout=600)
            return reply.completion_tokens, time.perf_counter() - started

        run_level(ours, 1, 2)  # warm-up: adapter loads
        rows = []
        for level in levels:
            row = run_level(ours, level, requests or max(6, 2 * level))
            print(
                f"  concurrency {level}: ours on vLLM {row.aggregate:6.1f} tok/s "
                f"({row.per_stream:5.1f}/stream)"
            )
            rows.append(row)
        return rows
    finally:
        server.stop(5)
        vllm.terminate()
        vllm.wait(60)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
