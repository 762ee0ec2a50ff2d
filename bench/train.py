"""Benchmark: our trainer vs. the original project's training setup, same model, same chunks.

    .venv/bin/python -m bench.train                      # a real book from ../shared (skips without it)
    .venv/bin/python -m bench.train --store DIR --book-id ID
    .venv/bin/python -m bench.train --device cuda --model-shape llama-3.2-1b   # GPU: tokens/s and MFU

Baseline = exactly how the original project trained (its training script and model card):
Hugging Face ``Trainer`` + PEFT LoRA (r 8, alpha 32, dropout 0.05, q_proj + v_proj), each
chunk tokenized with ``padding=False`` (its ``tokenize_function``: ``truncation=True``,
``max_length=1024``, no padding), ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``,
``per_device_train_batch_size=1`` × ``gradient_accumulation_steps=8`` (so no padding ever
happens), gradient checkpointing on (its ``prepare_model_for_kbit_training`` enables it),
fp32 on CPU (it asked for mixed precision on GPU only). ``--padded-baseline`` adds, as an
extra row only, the same with every chunk padded to ``max_length``.
Ours = :class:`novelcrafter.trainer.training.PartTraining`: chunks packed in book order and
:mod:`novelcrafter.trainer.packed_forward` (fused projections, per-chunk causal attention,
blockwise linear + cross-entropy), no gradient checkpointing, bf16 autocast with bf16 frozen
weights where the CPU has native bf16 (and on GPU), fp32 elsewhere.

Both run the same number of optimizer steps on the part's training chunks, with the same
LoRA config, learning rate, weight decay and warmup/decay schedule, from the same base
weights. Ours packs ~1024 tokens into each micro-batch where the baseline has one chunk, so in
the same steps it trains on more text; held-out perplexity is compared after the same number
of optimizer steps (token-weighted, same evaluator, fp32 for both), which is the schedule a
user runs.

Before training, the benchmark measures what this device can do: dense matmuls of the model's
own layer shapes (forward ``x·Wᵀ`` and backward ``dy·W`` of q/k/v/o/gate/up/down and the
lm_head, ``max_length`` rows) in the training precision of ours, timed; their FLOP-weighted
throughput is the peak. Model FLOPs of LoRA training = 4 · N · tokens (forward 2N, backward
through the frozen weights 2N; N = all parameters, the tied embedding counted once as the
lm_head matmul; attention scores, LoRA's own matmuls and checkpoint recomputation are not
counted). MFU = model FLOP/s ÷ measured peak (on CUDA also ÷ the card's datasheet dense bf16
peak).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from novelcrafter.train_settings import TRAIN_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
SHARED_BOOKS = ROOT.parent / "shared" / "corpus" / "books"
DEFAULT_BOOK = "pride-and-prejudice.pdf"

# Llama 3.2 shapes (config.json of meta-llama/Llama-3.2-{1B,3B}); random weights: throughput
# does not depend on them.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
    ),
}
LLAMA_COMMON = dict(
    vocab_size=128256,
    head_dim=None,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=128000,
    eos_token_id=128009,
)
# Dense bf16 peak of the cards we may get (tensor cores, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class Skip(Exception):
    pass


# -- data -----------------------------------------------------------------------------------------
def load_chunks(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(train chunks, held-out chunks, where they came from) of one part of a real book."""
    from novelcrafter.trainer.data import read_chunks

    from novelcrafter import layout
    from novelcrafter.store import open_store

    if args.store:
        store = open_store(args.store)
        if not args.book_id:
            raise SystemExit("error: --store needs --book-id")
        book_id = args.book_id
        source = f"store {args.store}, book {book_id}"
    else:
        pdf = Path(args.book) if args.book else SHARED_BOOKS / DEFAULT_BOOK
        if args.sample_book:
            from novelcrafter.run.typeset import typeset_sample

            pdf = typeset_sample(Path(tempfile.mkdtemp(prefix="nc-bench-")) / "sample.pdf").path
        if not pdf.exists():
            raise Skip(
                f"{pdf} is absent (the shared corpus lives beside the checkout); pass --book or --store"
            )
        from novelcrafter.ingest.pipeline import ingest_pdf

        cache = Path(tempfile.gettempdir()) / "novelcrafter-bench-store"
        store = open_store(str(cache))
        book_id = ingest_pdf(store, pdf.read_bytes(), filename=pdf.name)["book_id"]
        source = f"{pdf.name} (ingested: book {book_id})"
    if args.part >= 0:
        parts, where = [args.part], f"part {args.part:02d}"
    else:  # every part, in book order
        parts, where = (
            [p["index"] for p in store.get_json(layout.manifest_key(book_id))["parts"]],
            "all parts",
        )
    train = [c for p in parts for c in read_chunks(store, layout.part_train_key(book_id, p))]
    test = [c for p in parts for c in read_chunks(store, layout.part_test_key(book_id, p))]
    train = train[: args.chunks] if args.chunks else train
    test = test[: args.eval_chunks] if args.eval_chunks else test
    return train, test, f"{source}, {where}"


# -- models ---------------------------------------------------------------------------------------
def make_model_factory(args: argparse.Namespace, device: str) -> tuple[Any, Any, str]:
    """(fresh-model factory, tokenizer, description): every call returns identical base weights."""
    import torch

    from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model

    base_dir = provision_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base_dir)  # its ids are valid in the Llama 3.2 vocabulary too
    if args.model_shape == "smollm2-135m":
        return (lambda: load_base_model(base_dir, device)), tokenizer, "SmolLM2-135M-Instruct (real weights)"
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODEL_SHAPES[args.model_shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**LLAMA_COMMON, **shape)
    config.head_dim = config.hidden_size // config.num_attention_heads

    def build() -> Any:
        torch.manual_seed(1234)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model.eval()
        return model

    layers = shape["num_hidden_layers"]
    return build, tokenizer, f"{args.model_shape} shape, {layers} layers, random weights"


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the two trainers -----------------------------------------------------------------------------
def run_ours(args, factory, tokenizer, train_texts, device) -> dict[str, Any]:
    from novelcrafter.trainer.data import BatchPlan, collate, pack, tokenize_chunks
    from novelcrafter.trainer.lora import attach
    from novelcrafter.trainer.training import PartTraining, set_seed

    from novelcrafter.train_settings import LoraSettings, TrainSettings

    sequences = pack(tokenize_chunks(tokenizer, train_texts, args.max_length), args.max_length)
    epochs = math.ceil(args.steps * args.grad_accum / len(sequences))
    settings = TrainSettings(
        epochs=epochs,
        batch_size=1,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        max_length=args.max_length,
        max_steps_per_part=args.steps,
    )  # weight decay, warmup, seed and precision: the job defaults
    set_seed(0)
    model = attach(factory(), LoraSettings())
    training = PartTraining(
        model, BatchPlan(sequences, 1, epochs, seed=1), settings, device, tokenizer.pad_token_id
    )
    warm_up(model, collate(sequences[:1], tokenizer.pad_token_id), device, training.dtype)
    while not training.done:
        result = training.step()
        print(
            f"  ours      step {result.step}/{training.total_steps}  loss {result.loss:.4f}  "
            f"{result.tokens / result.seconds:7.1f} tok/s",
            flush=True,
        )
    progress = training.progress
    return {
        "model": model,
        "steps": progress.step,
        "useful_tokens": progress.tokens,
        "processed_tokens": progress.tokens,  # packing: nothing else is processed
        "seconds": progress.train_seconds,
        "precision": training.precision,
        "warmup_steps": training.warmup_steps,
        "loss_curve": progress.loss_curve,
    }


def warm_up(model: Any, batch: Any, device: str, dtype: Any) -> None:
    """One untimed forward/backward for each trainer: the CPU's kernels are built on first
    use, which is start-up cost, not training throughput."""
    import torch
    from novelcrafter.trainer.data import Batch
    from novelcrafter.trainer.training import batch_nll

    model.train()
    if isinstance(batch, Batch):
        loss = batch_nll(model, batch, device, dtype)
    else:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_baseline(
    args, factory, tokenizer, train_texts, device, warmup: int, padded: bool = False
) -> dict[str, Any]:
    """The original project's setup: Trainer + PEFT, bs 1 × accumulation 8, ``padding=False``,
    gradient checkpointing (``padded``: every chunk padded to ``max_length``, an extra row only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    padding: Any = "max_length" if padded else False
    encoded = tokenizer(train_texts, truncation=True, max_length=args.max_length, padding=padding)
    samples = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    torch.manual_seed(0)
    model = get_peft_model(
        factory(),
        LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )
    warm_up(model, collate(samples[:1]), device, None)
    counted = {"useful": 0, "processed": 0}

    def count(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        # Counted where the model runs: the data loader may prefetch a batch it never trains on.
        mask = kwargs.get("attention_mask")
        if mask is not None and torch.is_grad_enabled():
            counted["useful"] += int(mask.sum())
            counted["processed"] += int(mask.numel())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="nc-bench-hf-") as out:
        arguments = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            learning_rate=args.lr,
            weight_decay=TRAIN_DEFAULTS.weight_decay,
            warmup_steps=warmup,
            lr_scheduler_type="linear",
            optim="adamw_torch",
            gradient_checkpointing=True,
            bf16=cuda,  # the original used mixed precision on GPU only
            use_cpu=not cuda,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=TRAIN_DEFAULTS.seed,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=samples, data_collator=collate)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    hook.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    name = "padded" if padded else "baseline"
    for step, loss in enumerate(losses, 1):
        print(f"  {name:9} step {step}/{args.steps}  loss {loss:.4f}", flush=True)
    return {
        "model": model,
        "steps": output.global_step,
        "useful_tokens": counted["useful"],
        "processed_tokens": counted["processed"],
        "seconds": seconds,
        "precision": "bf16" if cuda else "fp32",
        "loss_curve": losses,
    }


def held_out_perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int, device: str) -> float:
    from novelcrafter.trainer.evaluation import perplexity

    return perplexity(model, tokenizer, texts, max_length=max_length, device=device, dtype=None).perplexity


def layer_shapes(config: Any) -> list[tuple[int, int]]:
    """(in, out) of every dense matmul of one token's forward pass, the lm_head included."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = [
        (hidden, config.num_attention_heads * head_dim),
        (hidden, kv),
        (hidden, kv),
        (config.num_attention_heads * head_dim, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    return per_layer * config.num_hidden_layers + [(hidden, config.vocab_size)]


def measure_peak(config: Any, rows: int, dtype: Any, device: str, repeats: int = 3) -> float:
    """Achievable dense matmul FLOP/s on this device in ``dtype``: the model's own layer shapes
    with ``rows`` tokens, forward (x·Wᵀ) and input-gradient (dy·W) matmuls, each distinct shape
    timed (best of ``repeats``) and weighted by how often the model runs it."""
    import collections

    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    flops = seconds = 0.0
    for (k, n), count in collections.Counter(layer_shapes(config)).items():
        x = torch.randn(rows, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device)
        dy = torch.randn(rows, n, dtype=dtype, device=device)
        for a, b in ((x, w.t()), (dy, w)):
            torch.matmul(a, b)  # first call: kernel selection, not throughput
            sync()
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                torch.matmul(a, b)
                sync()
                best = min(best, time.perf_counter() - started)
            flops += count * 2 * rows * k * n
            seconds += count * best
        del x, w, dy
    return flops / seconds


def model_flops(tokens_per_second: float, n_params: int) -> float:
    """Model FLOP/s of LoRA training: 4·N per token (forward 2N, backward through the frozen
    weights 2N; LoRA's own weight gradients are negligible; attention scores not counted)."""
    return 4 * n_params * tokens_per_second


def datasheet_peak(device: str) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s from the card's datasheet, device name); None off CUDA or unknown card."""
    import torch

    if not device.startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return (peak * 1e12 if peak else None), name


class RssPeak:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> RssPeak:
        import threading

        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--book", help=f"book PDF to ingest (default ../shared/corpus/books/{DEFAULT_BOOK})")
    p.add_argument("--store", help="use an already ingested book from this store instead")
    p.add_argument(
        "--sample-book",
        action="store_true",
        help="the project's own story typeset as a PDF (for machines without a book corpus, e.g. GPUs)",
    )
    p.add_argument("--book-id")
    p.add_argument("--part", type=int, default=0, help="which part's chunks (-1 = all parts)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each trainer")
    p.add_argument("--grad-accum", type=int, default=TRAIN_DEFAULTS.grad_accum)
    p.add_argument("--max-length", type=int, default=TRAIN_DEFAULTS.max_length)
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS.learning_rate)
    p.add_argument("--chunks", type=int, default=0, help="cap on training chunks (0 = the whole part)")
    p.add_argument("--eval-chunks", type=int, default=16, help="cap on held-out chunks evaluated")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model-shape", default="smollm2-135m", choices=("smollm2-135m", *MODEL_SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the layer count of a shape (smoke tests)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--padded-baseline",
        action="store_true",
        help="also run the baseline with every chunk padded to max_length (an extra row, not the baseline)",
    )
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from novelcrafter.logs import configure_logging

    args = parse(argv)
    configure_logging(level="WARNING")
    try:
        train, test, source = load_chunks(args)
    except Skip as exc:
        print(f"SKIPPED: {exc}")
        return 0
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    factory, tokenizer, model_desc = make_model_factory(args, device)
    print(f"data: {source}: {len(train)} training chunks, {len(test)} held-out chunks")
    print(f"model: {model_desc}; device {device}; torch threads {torch.get_num_threads()}")
    print(
        f"both: {args.steps} optimizer steps, batch 1 x accumulation {args.grad_accum}, "
        f"max_length {args.max_length}, lr {args.lr}"
    )

    from novelcrafter.trainer.training import autocast_dtype, precision_name

    base = factory()
    n_params = count_params(base)
    train_dtype = autocast_dtype("auto", device) or torch.float32
    peak = measure_peak(base.config, args.max_length, train_dtype, device)
    sheet, card = datasheet_peak(device)
    print(
        f"device peak (measured: dense matmuls of this model's layer shapes, {args.max_length} rows, "
        f"{precision_name(None if train_dtype == torch.float32 else train_dtype)}): {peak / 1e9:,.0f} GFLOP/s"
        + (f"; datasheet dense bf16 of {card}: {sheet / 1e12:,.0f} TFLOP/s" if sheet else "")
    )
    base_ppl = held_out_perplexity(base, tokenizer, test, args.max_length, device)
    del base
    results: dict[str, dict[str, Any]] = {}
    print("ours: packed chunks, packed forward (fused projections, per-chunk attention, blockwise CE)")
    with RssPeak() as rss:
        results["ours"] = run_ours(args, factory, tokenizer, train, device)
    results["ours"]["peak_rss"] = rss.peak
    runs = [] if args.skip_baseline else [("baseline", False)]
    if args.padded_baseline:
        runs.append(("padded", True))
    for name, padded in runs:
        print(
            f"{name}: HF Trainer + PEFT, batch 1, "
            f"{'every chunk padded to max_length' if padded else 'padding=False'}, gradient checkpointing"
        )
        with RssPeak() as rss:
            results[name] = run_baseline(
                args, factory, tokenizer, train, device, results["ours"]["warmup_steps"], padded=padded
            )
        results[name]["peak_rss"] = rss.peak
    for r in results.values():
        r["perplexity"] = held_out_perplexity(r.pop("model"), tokenizer, test, args.max_length, device)
        r["tokens_per_second"] = r["useful_tokens"] / r["seconds"]
        r["model_flops"] = model_flops(r["tokens_per_second"], n_params)
        r["mfu"] = r["model_flops"] / peak
        r["mfu_datasheet"] = r["model_flops"] / sheet if sheet else None
        if device == "cuda":
            torch.cuda.empty_cache()

    print()
    print(
        f"{'trainer':9} {'steps':>5} {'precision':>9} {'useful tok':>10} {'processed':>10} "
        f"{'seconds':>8} {'useful tok/s':>12} {'model GFLOP/s':>13} {'MFU':>6} "
        + (f"{'MFU sheet':>9} " if sheet else "")
        + f"{'peak RSS':>9} {'held-out ppl':>12}"
    )
    for name in ("baseline", "padded", "ours"):
        if name not in results:
            continue
        r = results[name]
        print(
            f"{name:9} {r['steps']:>5} {r['precision']:>9} {r['useful_tokens']:>10} "
            f"{r['processed_tokens']:>10} {r['seconds']:>8.1f} {r['tokens_per_second']:>12.1f} "
            f"{r['model_flops'] / 1e9:>13.1f} {100 * r['mfu']:>5.1f}% "
            + (f"{100 * r['mfu_datasheet']:>8.1f}% " if sheet else "")
            + f"{r['peak_rss'] / 2**30:>7.2f} GiB {r['perplexity']:>12.3f}"
        )
    print(f"model FLOP/s = 4 x N x useful tokens/s, N = {n_params} parameters; MFU = model FLOP/s / peak")
    print(f"base model held-out perplexity: {base_ppl:.3f}")
    summary: dict[str, Any] = {
        "source": source,
        "model": model_desc,
        "device": device,
        "card": card,
        "params": n_params,
        "steps": args.steps,
        "max_length": args.max_length,
        "grad_accum": args.grad_accum,
        "threads": torch.get_num_threads(),
        "peak_flops": peak,
        "datasheet_peak_flops": sheet,
        "base_perplexity": base_ppl,
        **{
            f"{k}_{f}": v[f]
            for k, v in results.items()
            for f in (
                "tokens_per_second",
                "perplexity",
                "useful_tokens",
                "processed_tokens",
                "seconds",
                "precision",
                "model_flops",
                "mfu",
                "mfu_datasheet",
                "peak_rss",
            )
        },
    }
    if "baseline" in results:
        ratio = results["ours"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
        summary["ratio"] = ratio
        no_worse = results["ours"]["perplexity"] <= results["baseline"]["perplexity"]
        print(f"ratio (ours / baseline, useful tokens per second): {ratio:.2f}x  (target >= 3.0)")
        print(
            f"MFU: ours {100 * results['ours']['mfu']:.1f}% (target >= 40%), "
            f"baseline {100 * results['baseline']['mfu']:.1f}%"
        )
        print(
            f"held-out perplexity after {args.steps} optimizer steps: ours "
            f"{results['ours']['perplexity']:.3f} vs baseline "
            f"{results['baseline']['perplexity']:.3f} -> {'no worse' if no_worse else 'WORSE'}"
            + (
                "  (random weights: perplexity carries no meaning)"
                if args.model_shape in MODEL_SHAPES
                else ""
            )
        )
    if "padded" in results:
        padded_ratio = results["ours"]["tokens_per_second"] / results["padded"]["tokens_per_second"]
        summary["padded_ratio"] = padded_ratio
        print(f"(extra) ours / padded variant of the baseline: {padded_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
