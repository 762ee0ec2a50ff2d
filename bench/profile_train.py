"""Where one training micro-batch's time goes: the reference path (transformers + PEFT over a
packed sequence, as our trainer ran before ``packed_forward``) vs the packed forward.

    .venv/bin/python -m bench.profile_train [--threads 2] [--tokens 1024] [--chunk 490]

Real SmolLM2-135M weights, LoRA r 8 on q/v, one forward + backward of a packed sequence of
``--tokens`` tokens made of chunks of ~``--chunk`` tokens (random ids: time does not depend on
them), fp32 or the trainer's autocast dtype. Prints torch.profiler's self-CPU time grouped into
dense matmuls, attention, cross-entropy and element-wise/other operators, plus the top operators.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from typing import Any

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "cross-entropy": ("log_softmax", "nll_loss", "logsumexp", "aten::exp", "aten::gather", "aten::amax"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "element-wise/other"


def profile(fn: Any, model: Any, batch: Any, dtype: Any, repeats: int) -> tuple[float, dict[str, float], Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn(model, batch, "cpu", dtype).backward()  # warm-up: kernels are built on first use
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(model, batch, "cpu", dtype).backward()
        model.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / repeats
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(model, batch, "cpu", dtype).backward()
    model.zero_grad(set_to_none=True)
    groups: dict[str, float] = defaultdict(float)
    events = prof.key_averages()
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total / 1e6
    return seconds, dict(groups), events


def main() -> None:
    import torch
    from novelcrafter.trainer.data import collate, pack
    from novelcrafter.trainer.lora import attach
    from novelcrafter.trainer.training import autocast_dtype, batch_nll, reference_nll

    from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model
    from novelcrafter.train_settings import LoraSettings

    p = argparse.ArgumentParser(prog="python -m bench.profile_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=490)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = provision_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = attach(load_base_model(model_dir), LoraSettings())
    model.train()
    rng = random.Random(0)
    chunks, total = [], 0
    while total < args.tokens:
        n = min(rng.randrange(int(args.chunk * 0.8), int(args.chunk * 1.2)), args.tokens - total)
        chunks.append([rng.randrange(100, 40000) for _ in range(n)])
        total += n
    (sequence,) = pack(chunks, args.tokens)
    batch = collate([sequence], tokenizer.pad_token_id)
    dtype = autocast_dtype("auto", "cpu")
    n_params = sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)
    print(
        f"{sequence.tokens} tokens in {sequence.chunks} chunks, {args.threads} threads, "
        f"{'fp32' if dtype is None else dtype}"
    )
    for name, fn in (
        ("reference (transformers + PEFT, packed)", reference_nll),
        ("packed forward", batch_nll),
    ):
        seconds, groups, events = profile(fn, model, batch, dtype, args.repeats)
        flops = 4 * n_params * sequence.tokens / seconds
        print(
            f"\n{name}: {seconds:.2f} s per micro-batch, {sequence.tokens / seconds:.1f} tok/s, "
            f"{flops / 1e9:.1f} model GFLOP/s"
        )
        whole = sum(groups.values())
        for group, value in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {group:20} {value:7.2f} s  {100 * value / whole:5.1f}%")
        print("  top operators (self CPU):")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"    {event.key[:60]:60} {event.self_cpu_time_total / 1e6:6.2f} s  x{event.count}")


if __name__ == "__main__":
    main()
