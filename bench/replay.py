"""Replay against forgetting: held-out perplexity of every part after the last one, by replay share.

``python -m bench.replay BOOK.pdf [--parts 4] [--max-steps 16] [--fractions 0,0.1,0.25]``

Ingests the book with the project's own pipeline (``--cut`` parts), then trains its first
``--parts`` parts in order with the trainer's own ``run_part`` (LoRA on top of the previous
part's adapter, exactly as a worker does), once per replay fraction. Part 0 has nothing earlier
to replay, so it is trained once and every fraction continues from that same adapter. After the
last part, the held-out split of every part is evaluated (``eval_earlier_parts``) — forgetting
is the rise of an earlier part's perplexity since the part was trained. The base model's
perplexity on each split is the reference.

Prints a table and a JSON document (``--json PATH`` writes it too). A short schedule (few steps
per part, ``--max-length`` tokens per sequence, the quick learning rate of ``make run``) keeps
it within minutes on a 2-core CPU; the numbers describe that schedule, not a full one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("pdf", type=Path, help="the book (a PDF)")
    parser.add_argument("--cut", type=int, default=10, help="parts the book is cut into (ingest)")
    parser.add_argument("--parts", type=int, default=4, help="consecutive parts trained, from part 0")
    parser.add_argument("--max-steps", type=int, default=16, help="optimizer steps per part")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--fractions", default="0,0.1,0.25", help="replay fractions, comma-separated")
    parser.add_argument("--eval-chunks", type=int, default=0, help="held-out chunks per part (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    if not 2 <= args.parts <= args.cut:
        parser.error("--parts must be in 2..--cut")
    if any(not 0 <= f < 1 for f in fractions):
        parser.error("replay fractions must be in [0, 1)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from novelcrafter.ingest.pipeline import ingest_pdf
    from novelcrafter.trainer.data import read_chunks
    from novelcrafter.trainer.evaluation import perplexity
    from novelcrafter.trainer.part import BaseModel, PartJob, run_part

    from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model
    from novelcrafter.store import open_store
    from novelcrafter.train_settings import TrainSettings

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="nc-bench-replay-"))
    store = open_store(str(tmp / "store"))
    manifest = ingest_pdf(
        store, args.pdf.read_bytes(), filename=args.pdf.name, params={"parts": args.cut, "seed": args.seed}
    )
    parts = manifest["parts"][: args.parts]
    model_dir = provision_base_model("smollm2-135m-instruct")
    base = BaseModel(load_base_model(model_dir), load_tokenizer(model_dir), "smollm2-135m-instruct", "cpu")
    settings = TrainSettings(
        epochs=1,
        grad_accum=1,
        learning_rate=args.lr,
        warmup_steps=1,
        max_length=args.max_length,
        max_steps_per_part=args.max_steps,
        checkpoint_every=10_000,
        seed=args.seed,
        eval_max_chunks=args.eval_chunks,
        memorization_prompts=0,  # perplexity is what this measures
        style_prompts=0,
    )

    def job(index: int, job_id: str, fraction: float, init: str) -> PartJob:
        last = index == len(parts) - 1
        return PartJob(
            job_id=job_id,
            book_id=manifest["book_id"],
            part=index,
            num_parts=len(manifest["parts"]),
            train_key=parts[index]["train_key"],
            test_key=parts[index]["test_key"],
            earlier_test_keys=[p["test_key"] for p in parts[:index]],
            earlier_train_keys=[p["train_key"] for p in parts[:index]],
            settings=replace(settings, replay_fraction=fraction, eval_earlier_parts=last),
            base_model=base.name,
            init_adapter_key=init,
        )

    def base_perplexity(key: str) -> float:
        texts = read_chunks(store, key, args.eval_chunks)
        return perplexity(
            base.model, base.tokenizer, texts, max_length=args.max_length, device="cpu", dtype=None
        ).perplexity

    reference = {i: base_perplexity(p["test_key"]) for i, p in enumerate(parts)}
    first = run_part(store, base, job(0, "j-b0000000000f", 0.0, ""))
    trained_on = {0: first.metrics["adapter_perplexity"]}  # each part's own, right after it
    runs: dict[str, Any] = {}
    for number, fraction in enumerate(fractions):
        job_id = f"j-b{number:010x}0"
        init, seconds, replayed, tokens = first.adapter.prefix, 0.0, 0, 0
        for index in range(1, len(parts)):
            result = run_part(store, base, job(index, job_id, fraction, init))
            init = result.adapter.prefix
            m = result.metrics
            seconds += m["train_seconds"]
            replayed += m.get("replay_tokens", 0)
            tokens += m["train_tokens"]
            if fraction == fractions[0]:
                trained_on[index] = m["adapter_perplexity"]
        after = {int(k): v for k, v in m["earlier_perplexity"].items()} | {index: m["adapter_perplexity"]}
        runs[str(fraction)] = {
            "replay_fraction": fraction,
            "perplexity_after_last_part": {str(k): after[k] for k in sorted(after)},
            "earlier_parts_mean": _geomean([after[k] for k in sorted(after) if k < index]),
            "last_part": after[index],
            "train_tokens": tokens,
            "replay_tokens": replayed,
            "train_seconds": round(seconds, 1),
        }
    doc = {
        "book": args.pdf.name,
        "book_id": manifest["book_id"],
        "parts_trained": len(parts),
        "chunks": [{"train": p["train_chunks"], "test": p["test_chunks"]} for p in parts],
        "schedule": {
            "max_steps_per_part": args.max_steps,
            "max_length": args.max_length,
            "learning_rate": args.lr,
            "batch": "1 x grad accum 1",
            "eval_chunks": args.eval_chunks or "all",
        },
        "base_perplexity": {str(k): v for k, v in reference.items()},
        "own_perplexity_right_after_training": {str(k): v for k, v in trained_on.items()},
        "right_after_with_replay": fractions[0],
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
        "threads": torch.get_num_threads(),
    }
    print(_table(doc))
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _table(doc: dict[str, Any]) -> str:
    parts = sorted(int(k) for k in doc["base_perplexity"])
    head = ["replay", *[f"part {k}" for k in parts], "earlier (geo mean)", "replayed tokens"]
    rows = [
        ["base model", *[f"{doc['base_perplexity'][str(k)]:.2f}" for k in parts], "", ""],
        [
            f"right after its part (replay {doc['right_after_with_replay']:g})",
            *[f"{doc['own_perplexity_right_after_training'][str(k)]:.2f}" for k in parts],
            "",
            "",
        ],
    ]
    for run in doc["runs"].values():
        after = run["perplexity_after_last_part"]
        rows.append(
            [
                f"{run['replay_fraction']:g}, after part {parts[-1]}",
                *[f"{after[str(k)]:.2f}" for k in parts],
                f"{run['earlier_parts_mean']:.2f}",
                f"{run['replay_tokens']} of {run['train_tokens']}",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
