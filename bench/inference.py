"""Benchmark: our inference server vs. a naive transformers server, same model and adapters, one run.

    .venv/bin/python -m bench.inference [--tokens 32] [--adapters 3] [--levels 1,4,8] [--engine vllm]

Ours = :class:`novelcrafter.inference.server.InferenceServer` over real gRPC on loopback:
continuous batching across requests and adapters (per-row LoRA), KV caches per sequence.
Baseline = what a straightforward server does: one request at a time under a lock,
``model.generate`` per request, and ``PeftModel.from_pretrained`` whenever the requested
adapter differs from the one loaded (``unload()`` first). The baseline is called
in-process (no gRPC cost), in the same precision as ours.

Requests are spread round-robin over ``--adapters`` real adapters (trained here for a few
steps and published to a temporary store). Printed: per-stream and aggregate generated
tokens/s at each concurrency level for both, their ratios; the precision choice on this CPU
(fp32 vs bf16: decode speed and loss on real text); the time from publishing a version to
serving it.

``--peers`` (bench/inference_peers.py): the same run also measures llama.cpp (llama-cpp-python
built from its sdist; our base model and adapters converted with llama.cpp's own scripts) and
vLLM's CPU build (OpenAI server, our published adapter folders), with the same prompts, seeds,
sampling and exactly ``--tokens`` tokens per request; prints tokens/s, time to first token for a
512-token prompt, the ratios, this machine's memory bandwidth and the fraction of it one stream
reaches. ``--shape 1b``: ours vs llama.cpp on a random Llama-3.2-1B-shaped model instead.
``--json FILE`` writes those figures. The peers' venvs are built once under
``$NOVELCRAFTER_HOME/bench-peers`` (bench/peers.py).

    nice .venv/bin/python -m bench.inference --peers --skip-precision --json peers.json
    nice .venv/bin/python -m bench.inference --shape 1b --tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "smollm2-135m-instruct"
PROMPTS = (
    "The night was long and",
    "She opened the letter slowly, knowing that",
    "At the edge of the village stood an old mill, where",
    "When the storm finally passed, the fishermen",
)
BOOK_TEXTS = (
    "The sea rose grey under the storm and the ship rolled hard to port. The captain lashed himself "
    "to the wheel while the crew hauled on the sheets, salt spray in their eyes.",
    "She whisked the eggs with sugar until pale, folded in the flour, and poured the batter into the "
    "buttered tin. The kitchen smelled of cake, and the kettle began to sing on the stove.",
    "Moss covered the old oaks, and the path wound between ferns and fallen birches. An owl called "
    "from the pines while mist crept low among the roots.",
    "The train crossed the frozen plain at dawn. Frost covered the windows, and the passengers "
    "wrapped themselves in grey blankets while the stove glowed red.",
)
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


@dataclass
class Level:
    concurrency: int
    requests: int
    seconds: float
    tokens: int
    per_stream: float  # mean tokens/s of one request

    @property
    def aggregate(self) -> float:
        return self.tokens / self.seconds


def run_level(call: Callable[[int], tuple[int, float]], concurrency: int, requests: int) -> Level:
    """``call(i)`` runs request i and returns (completion tokens, seconds)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    results: list[tuple[int, float]] = []

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            results.append(call(index))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    per_stream = statistics.mean(t / s for t, s in results)
    return Level(concurrency, requests, seconds, tokens, per_stream)


class NaiveServer:
    """transformers ``generate`` per request; reload the adapter whenever it changes."""

    def __init__(self, model_dir: Path, dtype: Any, adapters: list[Path]) -> None:
        from novelcrafter.models import load_base_model, load_tokenizer

        self.base = load_base_model(model_dir, "cpu", dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.adapters = adapters
        self.model: Any = self.base
        self.current: int | None = None
        self.lock = threading.Lock()
        self.reloads = 0

    def generate(self, prompt: str, adapter: int, max_new_tokens: int, seed: int) -> tuple[int, float]:
        import torch
        from peft import PeftModel

        started = time.perf_counter()
        with self.lock:
            if adapter != self.current:
                if self.current is not None:
                    self.base = self.model.unload()
                self.model = PeftModel.from_pretrained(self.base, str(self.adapters[adapter])).eval()
                self.current = adapter
                self.reloads += 1
            ids = self.tokenizer(prompt, return_tensors="pt")
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(
                    **ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **SAMPLING,
                )
        return out.shape[1] - ids["input_ids"].shape[1], time.perf_counter() - started


def precision_report(model_dir: Path, tokens: int, rounds: int = 4) -> list[str]:
    """fp32 vs bf16 on this CPU: single-stream decode speed of our engine and loss on real text.

    The two precisions are measured in alternating rounds and the best round of each is kept,
    so a burst of load from other processes cannot favour one of them.
    """
    import torch
    from novelcrafter.inference.engine import Engine

    from novelcrafter.models import cpu_supports_bf16, load_base_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    text = " ".join(BOOK_TEXTS)
    ids = tok(text, return_tensors="pt")["input_ids"]
    prompt = tok(PROMPTS[0])["input_ids"]
    candidates = {"fp32": torch.float32, "bf16": torch.bfloat16}
    engines, losses, best = {}, {}, dict.fromkeys(candidates, float("inf"))
    for name, dtype in candidates.items():
        model = load_base_model(model_dir, "cpu", dtype)
        with torch.inference_mode():
            losses[name] = float(model(input_ids=ids, labels=ids).loss)
        engines[name] = Engine(model, device="cpu", dtype=dtype, max_batch=1)
    for _ in range(rounds):
        for name, engine in engines.items():
            cache = engine.new_cache(len(prompt) + tokens + 1)
            token = int(engine.prefill(prompt, cache, None).argmax())
            started = time.perf_counter()
            for _ in range(tokens):
                token = int(engine.decode([token], [cache], [None])[0].argmax())
            best[name] = min(best[name], time.perf_counter() - started)
    lines = [
        f"precision on this CPU (native bf16: {cpu_supports_bf16()}), best of {rounds} alternating rounds:"
    ]
    for name in candidates:
        lines.append(
            f"  {name}: {tokens / best[name]:7.1f} tokens/s single stream, "
            f"loss on sample text {losses[name]:.4f}"
        )
    lines.append(
        f"  bf16 vs fp32: {best['fp32'] / best['bf16']:.2f}x speed, "
        f"loss {losses['bf16'] - losses['fp32']:+.4f}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens per request")
    parser.add_argument("--adapters", type=int, default=3, help="adapters the requests are spread over")
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default 2 x level, min 6)"
    )
    parser.add_argument("--dtype", default="auto", help="precision of both servers (auto|fp32|bf16)")
    parser.add_argument("--skip-precision", action="store_true", help="skip the fp32 vs bf16 section")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's)")
    parser.add_argument(
        "--engine",
        choices=("native", "vllm"),
        default="native",
        help="vllm: also our service on vLLM's CPU build",
    )
    parser.add_argument(
        "--peers", action="store_true", help="also llama.cpp and vLLM's CPU build (bench/inference_peers.py)"
    )
    parser.add_argument(
        "--shape", choices=("smollm2", "1b"), default="smollm2", help="1b: a random Llama-3.2-1B-shaped model"
    )
    parser.add_argument("--json", type=Path, help="with --peers or --shape 1b: write the figures here")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=12,
        help="with --peers: rounds of one request each to ours and llama.cpp, for the one-stream ratio",
    )
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench import inference_peers

    if args.shape == "1b":
        return inference_peers.run_shape(args, levels)
    from novelcrafter.inference.adapter_factory import train_lora
    from novelcrafter.inference.client import build_request
    from novelcrafter.inference.engine import resolve_dtype
    from novelcrafter.inference.server import InferenceConfig, InferenceServer

    from novelcrafter.adapters import publish_adapter
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging
    from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model
    from novelcrafter.rpc import connect
    from novelcrafter.store import open_store
    from novelcrafter.v1 import inference_pb2_grpc

    configure_logging("WARNING", "text")
    model_dir = provision_base_model(BASE)
    print(f"bench.inference: {BASE}, {torch.get_num_threads()} threads, {args.tokens} new tokens per request")
    report: list[str] = []
    if not args.skip_precision:
        report += precision_report(model_dir, args.tokens)
        print("\n".join(report), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="nc-bench-inference-"))
    trainer, tok = load_base_model(model_dir), load_tokenizer(model_dir)
    books = [f"{i + 1:016x}" for i in range(args.adapters)]
    adapter_dirs = [
        train_lora(
            trainer, tok, [BOOK_TEXTS[i % len(BOOK_TEXTS)]], tmp / f"adapter{i}", steps=2, lr=5e-3, seed=i
        )
        for i in range(args.adapters)
    ]
    del trainer
    store = open_store(str(tmp / "store"))
    for i, (book, local) in enumerate(zip(books, adapter_dirs, strict=True)):
        publish_adapter(store, local, book_id=book, job_id=f"j-{i + 1:012x}", part=0, base_model=BASE)

    dtype = resolve_dtype("cpu", args.dtype)
    settings = get_settings(store=str(tmp / "store"), metrics_listen="off")
    server = InferenceServer(
        InferenceConfig(
            listen="127.0.0.1:0",
            store=str(tmp / "store"),
            base_model=BASE,
            watch_interval=1.0,
            max_concurrency=max(levels),
            dtype=args.dtype,
        ),
        settings,
    )
    server.start()
    server.load()
    # --peers: every server generates exactly --tokens tokens (inference_peers.ignore_eos).
    ban_ids = inference_peers.ignore_eos(server) if args.peers else set()
    channel = connect(f"127.0.0.1:{server.port}", settings)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    naive = NaiveServer(model_dir, dtype, adapter_dirs)

    def ours(i: int) -> tuple[int, float]:
        request = build_request(
            PROMPTS[i % len(PROMPTS)],
            book_id=books[i % len(books)],
            max_new_tokens=args.tokens,
            seed=i,
            **SAMPLING,
        )
        started = time.perf_counter()
        reply = stub.Generate(request, timeout=600)
        return reply.completion_tokens, time.perf_counter() - started

    def baseline(i: int) -> tuple[int, float]:
        return naive.generate(PROMPTS[i % len(PROMPTS)], i % len(books), args.tokens, seed=i)

    run_level(ours, 1, 2)  # warm-up (kernel selection, adapter loads)
    run_level(baseline, 1, 2)
    rows = []
    for level in levels:
        count = args.requests or max(6, 2 * level)
        mine = run_level(ours, level, count)
        theirs = run_level(baseline, level, count)
        rows.append((mine, theirs))
        print(
            f"  concurrency {level}: ours {mine.aggregate:6.1f} tok/s ({mine.per_stream:5.1f}/stream), "
            f"baseline {theirs.aggregate:6.1f} tok/s ({theirs.per_stream:5.1f}/stream)",
            flush=True,
        )

    # Publish -> served: new versions of one book while the server runs (watch interval 1 s).
    latencies = []
    for part in (1, 2, 3):
        meta = publish_adapter(
            store,
            adapter_dirs[part % len(adapter_dirs)],
            book_id=books[0],
            job_id="j-0000000000ff",
            part=part,
            base_model=BASE,
        )
        while True:
            reply = stub.Generate(build_request(PROMPTS[0], book_id=books[0], max_new_tokens=1), timeout=60)
            if reply.adapter.version == meta.version:
                latencies.append(time.time() - meta.published_at)
                break
            time.sleep(0.02)
    measured = None
    if args.peers:  # ours' single stream and time to first token, while it runs
        single = next((m for m, _ in rows if m.concurrency == 1), None) or run_level(
            ours, 1, args.requests or 6
        )
        measured = inference_peers.measure_ours(stub, books, tok, [m for m, _ in rows], single, server.engine)
        measured["paired"] = inference_peers.paired_or_none(
            ours, model_dir, adapter_dirs, dtype=dtype, tokens=args.tokens, threads=torch.get_num_threads(),
            ban_ids=ban_ids, rounds=args.paired_rounds,
        )  # fmt: skip
    engine = server.engine
    server.stop(5)
    peer_report = None
    if args.peers:  # the peers on the same model, adapters, prompts and token counts
        peer_report = inference_peers.run_peers(
            model_name=BASE, model_dir=model_dir, adapter_dirs=adapter_dirs, dtype=dtype, ours=measured,
            levels=levels, requests=args.requests, tokens=args.tokens, threads=torch.get_num_threads(),
            ban_ids=ban_ids,
        )  # fmt: skip
    vllm_rows = []
    if args.engine == "vllm":  # the same requests through --engine vllm (bench/inference_vllm.py)
        from bench.inference_vllm import measure

        vllm_rows = measure(tmp / "store", model_dir, books, levels, args.requests, args.tokens)

    print()
    print("=" * 78)
    for line in report:
        print(line)
    kernel = f"{engine.rowgemm.isa} bf16 loop" if engine.rowgemm is not None else "off (torch matmuls)"
    print(
        f"serving precision: {str(dtype).replace('torch.', '')} (auto on this machine: "
        f"{str(resolve_dtype('cpu')).replace('torch.', '')}); batch invariance: "
        f"{'exact' if engine.batch_invariant else 'NOT exact'} (decode matmuls >= {engine.min_rows} rows); "
        f"CPU kernel: {kernel}"
    )
    print(
        f"requests spread over {len(books)} adapters, {args.tokens} new tokens each; baseline reloaded "
        f"its adapter {naive.reloads} times"
    )
    print(
        f"{'concurrency':>11} | {'ours tok/s':>10} {'per stream':>10} | "
        f"{'base tok/s':>10} {'per stream':>10} | {'ratio':>6}"
    )
    for mine, theirs in rows:
        print(
            f"{mine.concurrency:>11} | {mine.aggregate:10.1f} {mine.per_stream:10.1f} | "
            f"{theirs.aggregate:10.1f} {theirs.per_stream:10.1f} | {mine.aggregate / theirs.aggregate:5.2f}x"
        )
    single_ratio = rows[0][0].per_stream / rows[0][1].per_stream
    print(f"single stream ratio (concurrency {rows[0][0].concurrency}): {single_ratio:.2f}x")
    top = rows[-1]
    print(f"aggregate ratio at concurrency {top[0].concurrency}: {top[0].aggregate / top[1].aggregate:.2f}x")
    print(
        f"publish -> served (watch interval 1.0 s): mean {statistics.mean(latencies):.2f} s, "
        f"max {max(latencies):.2f} s over {len(latencies)} publications"
    )
    if peer_report is not None:
        print("\n".join(inference_peers.format_report(peer_report)))
        inference_peers.write_json(args.json, peer_report)
    for row, (mine, _) in zip(vllm_rows, rows[: len(vllm_rows)], strict=True):
        print(
            f"ours on vLLM (--engine vllm), concurrency {row.concurrency}: {row.aggregate:.1f} tok/s "
            f"({row.per_stream:.1f}/stream), {row.aggregate / mine.aggregate:.2f}x native"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
