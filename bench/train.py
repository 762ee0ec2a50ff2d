"""Benchmark: our trainer vs. the original project's training setup, same model, same chunks.

    .venv/bin/python -m bench.train                      # a real book from ../shared (skips without it)
    .venv/bin/python -m bench.train --store DIR --book-id ID
    .venv/bin/python -m bench.train --device cuda --model-shape llama-3.2-1b   # GPU: tokens/s and MFU

Baseline = how the original project trained: Hugging Face ``Trainer`` + PEFT LoRA, batch
size 1 with gradient accumulation 8, one chunk per sample padded to ``max_length``,
gradient checkpointing on, fp32 on CPU (mixed precision on GPU only).
Ours = :class:`novelcrafter.trainer.training.PartTraining`: chunks packed in book order
(no padding, block-diagonal attention), no gradient checkpointing, bf16 autocast where
the CPU has native bf16 (and on GPU).

Both run the same number of optimizer steps on the part's training chunks, with the same
LoRA config, learning rate, weight decay and warmup/decay schedule, from the same base
weights. We print *useful* (non-padding) tokens per second of each, their ratio, and the
held-out perplexity each reached (token-weighted, same evaluator, fp32 for both).
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
    from novelcrafter.trainer.settings import LoraSettings, TrainSettings
    from novelcrafter.trainer.training import PartTraining, set_seed

    sequences = pack(tokenize_chunks(tokenizer, train_texts, args.max_length), args.max_length)
    epochs = math.ceil(args.steps * args.grad_accum / len(sequences))
    settings = TrainSettings(
        epochs=epochs,
        batch_size=1,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=100,
        max_length=args.max_length,
        max_steps_per_part=args.steps,
        seed=0,
        precision="auto",
    )
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


def run_baseline(args, factory, tokenizer, train_texts, device, warmup: int) -> dict[str, Any]:
    """The original project's setup: Trainer + PEFT, bs 1 × accumulation 8, padded chunks, checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    encoded = tokenizer(train_texts, truncation=True, max_length=args.max_length, padding="max_length")
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
            weight_decay=0.01,
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
            seed=0,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=samples, data_collator=collate)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    hook.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    for step, loss in enumerate(losses, 1):
        print(f"  baseline  step {step}/{args.steps}  loss {loss:.4f}", flush=True)
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


def mfu(tokens_per_second: float, n_params: int, device: str) -> tuple[float | None, str]:
    """Model FLOPs utilization of LoRA training: 4·N FLOPs per token (forward 2N, backward through
    the frozen weights 2N; LoRA's own weight gradients are negligible), attention not counted."""
    import torch

    if not device.startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        return None, name
    return tokens_per_second * 4 * n_params / (peak * 1e12), name


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--book", help=f"book PDF to ingest (default ../shared/corpus/books/{DEFAULT_BOOK})")
    p.add_argument("--store", help="use an already ingested book from this store instead")
    p.add_argument(
        "--sample-book",
        action="store_true",
        help="the project's own story typeset as a PDF (for machines without ../shared, e.g. a GPU box)",
    )
    p.add_argument("--book-id")
    p.add_argument("--part", type=int, default=0, help="which part's chunks (-1 = all parts)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each trainer")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--chunks", type=int, default=0, help="cap on training chunks (0 = the whole part)")
    p.add_argument("--eval-chunks", type=int, default=16, help="cap on held-out chunks evaluated")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model-shape", default="smollm2-135m", choices=("smollm2-135m", *MODEL_SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the layer count of a shape (smoke tests)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip-baseline", action="store_true")
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

    base = factory()
    n_params = count_params(base)
    base_ppl = held_out_perplexity(base, tokenizer, test, args.max_length, device)
    del base
    results: dict[str, dict[str, Any]] = {}
    print("ours: packed chunks, no gradient checkpointing, autocast")
    results["ours"] = run_ours(args, factory, tokenizer, train, device)
    if not args.skip_baseline:
        print("baseline: HF Trainer + PEFT, padded chunks, gradient checkpointing")
        results["baseline"] = run_baseline(
            args, factory, tokenizer, train, device, results["ours"]["warmup_steps"]
        )
    for r in results.values():
        r["perplexity"] = held_out_perplexity(r.pop("model"), tokenizer, test, args.max_length, device)
        r["tokens_per_second"] = r["useful_tokens"] / r["seconds"]
        r["mfu"], card = mfu(r["tokens_per_second"], n_params, device)
        if device == "cuda":
            torch.cuda.empty_cache()

    print()
    print(
        f"{'trainer':9} {'steps':>5} {'precision':>9} {'useful tok':>10} {'processed':>10} "
        f"{'seconds':>8} {'useful tok/s':>12} {'held-out ppl':>12}" + ("  MFU" if device == "cuda" else "")
    )
    for name in ("baseline", "ours"):
        if name not in results:
            continue
        r = results[name]
        line = (
            f"{name:9} {r['steps']:>5} {r['precision']:>9} {r['useful_tokens']:>10} "
            f"{r['processed_tokens']:>10} "
            f"{r['seconds']:>8.1f} {r['tokens_per_second']:>12.1f} {r['perplexity']:>12.3f}"
        )
        if r["mfu"] is not None:
            line += f"  {100 * r['mfu']:.1f}%"
        print(line)
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
                "mfu",
            )
        },
    }
    if "baseline" in results:
        ratio = results["ours"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
        summary["ratio"] = ratio
        no_worse = results["ours"]["perplexity"] <= results["baseline"]["perplexity"]
        print(f"ratio (ours / baseline, useful tokens per second): {ratio:.2f}x  (target >= 2.0)")
        print(
            f"held-out perplexity: ours {results['ours']['perplexity']:.3f} vs baseline "
            f"{results['baseline']['perplexity']:.3f} -> {'no worse' if no_worse else 'WORSE'}"
            + (
                "  (random weights: perplexity carries no meaning)"
                if args.model_shape in MODEL_SHAPES
                else ""
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
