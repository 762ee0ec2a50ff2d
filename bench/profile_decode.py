"""Where a decode step's time goes: the inference engine alone (no server), per configuration.

    .venv/bin/python -m bench.profile_decode [--batches 1,8] [--steps 30] [--threads 2]

For the real base model and a rank-8 LoRA on q/v (as the trainer's default), prints for each
configuration (torch path or our CPU kernels; fp32 or bf16 weights) and batch size the best and
median step time, tokens/s, the weight bytes a step reads (every projection and the LM head in
the serving dtype: the floor a decode step cannot go below) and the fraction of this machine's
read bandwidth that achieves (measured here: ``torch.sum`` over 512 MiB). A "+top-50" row is
the same step when the sampler reads only its top 50 logits (the LM head through its int8
screen; the bytes counted are those it reads, less the few exact rows). With ``--profile`` it
adds torch's operator table for the torch path, which is what showed where the time went.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

BASE = "smollm2-135m-instruct"


def _timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def weight_bytes(engine) -> int:  # type: ignore[no-untyped-def]
    """Bytes one decode step must read: every decoder projection and the LM head."""
    return engine._buffer.numel() * engine._buffer.element_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=64, help="prompt tokens before the timed steps")
    parser.add_argument("--profile", action="store_true", help="torch's operator table (torch path)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from novelcrafter.inference.cpu_kernels import Shortlist
    from novelcrafter.inference.engine import SHORTLIST_MAX_ROWS, Engine, random_lora

    from novelcrafter.logs import configure_logging
    from novelcrafter.models import load_base_model, provision_base_model

    configure_logging("WARNING", "text")
    model_dir = provision_base_model(BASE)
    from bench.inference_peers import measure_bandwidth

    bandwidth = measure_bandwidth()["read_bytes_per_s"]
    print(f"bench.profile_decode: {BASE}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(
        f"{'path':>8} {'weights':>7} {'batch':>5} | {'best ms':>7} {'median':>7} | "
        f"{'tok/s':>7} | bytes/step  bw"
    )
    for kernels, dtype in (
        ("off", torch.float32),
        ("off", torch.bfloat16),
        ("auto", torch.float32),
        ("auto", torch.bfloat16),
    ):
        engine = Engine(
            load_base_model(model_dir, dtype=dtype).eval(),
            device="cpu",
            dtype=dtype,
            max_batch=8,
            kernels=kernels,
        )
        if kernels == "auto" and engine.rowgemm is None:
            print("  (no CPU kernels on this machine: kernel rows skipped)")
            continue
        lora = random_lora(engine, rank=8)
        path = "kernels" if engine.rowgemm is not None else "torch"
        if engine.rowgemm is not None:
            print(f"  (kernels: the {engine.rowgemm.isa} bf16 loop)")
        for batch in [int(b) for b in args.batches.split(",")]:
            caches = [engine.new_cache(args.context + 2 * args.steps + 8) for _ in range(batch)]
            for cache in caches:
                engine.prefill(list(range(100, 100 + args.context)), cache, lora)
            tokens, adapters = [5] * batch, [lora] * batch
            engine.decode(tokens, caches, adapters)
            times = [_timed(engine.decode, tokens, caches, adapters) for _ in range(args.steps)]
            best, median = min(times), statistics.median(times)
            nbytes = weight_bytes(engine)
            print(
                f"{path:>8} {str(dtype).replace('torch.', ''):>7} {batch:>5} | "
                f"{best * 1e3:7.1f} {median * 1e3:7.1f} | "
                f"{batch / median:7.1f} | {nbytes / 1e6:6.0f} MB  {nbytes / median / bandwidth:4.0%}"
            )
            if engine.lm_head_screen is not None and batch <= SHORTLIST_MAX_ROWS:  # what a top-k sampler gets
                top = [Shortlist(50)] * batch
                times = [_timed(engine.decode, tokens, caches, adapters, top) for _ in range(args.steps)]
                best, median = min(times), statistics.median(times)
                screened = nbytes - engine.lm_head.weight.numel() * engine.lm_head.weight.element_size()
                screened += engine.lm_head_screen.nbytes
                print(
                    f"{'+top-50':>8} {str(dtype).replace('torch.', ''):>7} {batch:>5} | "
                    f"{best * 1e3:7.1f} {median * 1e3:7.1f} | "
                    f"{batch / median:7.1f} | {screened / 1e6:6.0f} MB  {screened / median / bandwidth:4.0%}"
                )
            if args.profile and path == "torch" and batch == 1:
                from torch.profiler import profile

                with profile() as prof:
                    for _ in range(5):
                        engine.decode(tokens, caches, adapters)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        del engine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
