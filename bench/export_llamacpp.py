"""Check: llama.cpp loads what ``novelcrafter export --format all`` writes, and generates with it.

    .venv/bin/python -m bench.export_llamacpp [--keep DIR] [--setup-only]

Not part of ``make test``: llama.cpp comes from ``llama-cpp-python`` built from its sdist
(C++, compiled once; plan on 15-50 minutes on 2 cores). The peer environment lives outside the
repository, in ``$NOVELCRAFTER_HOME/bench-peers/llamacpp`` (default
``~/.cache/novelcrafter/bench-peers/llamacpp``), and the first run builds it (``LLAMACPP`` in
bench/peers.py, shared with ``bench.inference --peers``)::

    python3.11 -m venv $NOVELCRAFTER_HOME/bench-peers/llamacpp
    .../bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 sentencepiece
    .../bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36  # unpacked in src/

The unpacked sdist provides llama.cpp's converter scripts (``vendor/llama.cpp/convert_*_to_gguf.py``
with its ``gguf-py``); they also need torch and transformers, which the peer takes from this
project's ``.venv`` through a ``.pth`` file (its own packages come first).

What one run does, on the real default base model (SmolLM2-135M-Instruct):

1. trains a small real LoRA on q/k/v/o (k_proj has grouped-query heads: both RoPE permutations
   are exercised), publishes it to a temporary store, and runs ``novelcrafter export BOOK DIR
   --format all`` as a user would;
2. converts the base model to GGUF (f32) with llama.cpp's own ``convert_hf_to_gguf.py``, and our
   exported PEFT folder with llama.cpp's own ``convert_lora_to_gguf.py``: every tensor of our
   ``adapter.gguf`` must equal the converter's (names, shapes, types, values) and the adapter
   metadata must agree;
3. loads the base GGUF with our ``adapter.gguf`` in llama.cpp, evaluates a prompt and compares
   the next-token logits with our inference engine's (same token ids); checks the adapter moved
   llama.cpp's logits the way it moves ours, and generates a few tokens.

Prints one JSON object; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import peers

LLAMA_CPP_VERSION = peers.LLAMA_CPP_VERSION
BASE = "smollm2-135m-instruct"
BOOK = "11aa22bb33cc44dd"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must "
    "be in want of a wife. However little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters."
)
PROMPT = "My dear Mr. Bennet, said his lady to him one day, have you heard that"
# llama.cpp side, run by the peer's python: base GGUF (+ adapter) -> last-position logits, greedy text.
LLAMA_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
base, adapter, ids_path, out = sys.argv[1:5]
ids = json.load(open(ids_path))
result = {}
for name, lora in (("base", None), ("adapter", adapter)):
    llm = Llama(model_path=base, lora_path=lora, n_ctx=256, n_threads=2, logits_all=True,
                verbose=False, seed=0)
    llm.eval(ids)
    np.save(f"{out}/llama_{name}.npy", np.asarray(llm.scores[len(ids) - 1], dtype=np.float32))
    llm.reset()
    text = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    result[name] = text
json.dump(result, open(f"{out}/llama_text.json", "w"))
"""


def peer_dir() -> Path:
    return peers.peer_dir(peers.LLAMACPP)


def peer_python(root: Path) -> Path:
    return root / "bin" / "python"


def llama_cpp_source(root: Path) -> Path:
    """The sdist's llama.cpp tree (its converter scripts and gguf-py), unpacked once."""
    return peers.llama_cpp_source(root)


def build_peer(root: Path | None = None) -> Path:
    """The llama-cpp-python venv (bench/peers.py's ``LLAMACPP``), built once from the sdist."""
    return peers.ensure(peers.LLAMACPP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup-only", action="store_true", help="build the peer environment and stop")
    parser.add_argument("--keep", type=Path, help="write the work files here (kept) instead of a temp dir")
    args = parser.parse_args(argv)
    root = peer_dir()
    python = build_peer(root)
    vendor = llama_cpp_source(root)
    if args.setup_only:
        print(json.dumps({"peer_python": str(python), "llama_cpp": str(vendor)}))
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="nc-bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_checks(python, vendor, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0 if all(report["checks"].values()) else 1


def run_checks(python: Path, vendor: Path, work: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from novelcrafter.inference.adapter_factory import train_lora
    from novelcrafter.inference.engine import Engine
    from novelcrafter.inference.lora import load_lora

    from novelcrafter.adapters import publish_adapter
    from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model
    from novelcrafter.store import open_store

    started = time.monotonic()
    base_dir = provision_base_model(BASE)
    model, tokenizer = load_base_model(base_dir), load_tokenizer(base_dir)

    # 1. A real adapter, published and exported the way a user does it.
    local = train_lora(model, tokenizer, [TEXT], work / "trained", steps=6, lr=3e-3, targets=TARGETS)
    store_url = str(work / "store")
    publish_adapter(
        open_store(store_url), local, book_id=BOOK, job_id="j-0000000be7c4", part=0, base_model=BASE
    )
    export = work / "export"
    shutil.rmtree(export, ignore_errors=True)
    novelcrafter = Path(sys.executable).parent / "novelcrafter"
    subprocess.run(
        [str(novelcrafter), "export", BOOK, str(export), "--store", store_url, "--format", "all"], check=True
    )

    # 2. llama.cpp's own converters: the base model, and our PEFT folder as a reference adapter.
    reference = work / "reference-lora.gguf"
    env = {**os.environ, "PYTHONPATH": str(vendor / "gguf-py")}
    base_gguf = peers.gguf_base(base_dir, "f32")  # cached by content under the peer's folder
    subprocess.run(
        [str(python), str(vendor / "convert_lora_to_gguf.py"), str(export), "--base", str(base_dir),
         "--outtype", "f32", "--outfile", str(reference)],
        check=True, env=env, cwd=vendor, capture_output=True,
    )  # fmt: skip
    tensors = compare_gguf(export / "adapter.gguf", reference)

    # 3. llama.cpp runs the base GGUF with our adapter.gguf; our engine runs the exported folder.
    ids = tokenizer(PROMPT)["input_ids"]
    (work / "ids.json").write_text(json.dumps(ids))
    subprocess.run(
        [str(python), "-c", LLAMA_SCRIPT, str(base_gguf), str(export / "adapter.gguf"),
         str(work / "ids.json"), str(work)],
        check=True,
    )  # fmt: skip
    llama = {n: np.load(work / f"llama_{n}.npy") for n in ("base", "adapter")}
    texts = json.loads((work / "llama_text.json").read_text())
    engine = Engine(model, device="cpu", dtype=torch.float32, max_batch=1)
    weights = load_lora(export, model, dtype=torch.float32, trained_on=BASE, base_name=BASE)
    ours = {
        "base": engine.prefill(ids, engine.new_cache(len(ids)), None).numpy(),
        "adapter": engine.prefill(ids, engine.new_cache(len(ids)), weights).numpy(),
    }
    delta_llama, delta_ours = llama["adapter"] - llama["base"], ours["adapter"] - ours["base"]
    correlation = float(np.corrcoef(delta_llama, delta_ours)[0, 1])
    max_diff = float(np.abs(llama["adapter"] - ours["adapter"]).max())
    report = {
        "llama_cpp_python": LLAMA_CPP_VERSION,
        "tensors": tensors["count"],
        "tensor_mismatches": tensors["mismatches"][:5],
        "metadata": tensors["metadata"],
        "logits_max_abs_diff_adapter": max_diff,
        "logits_max_abs_diff_base": float(np.abs(llama["base"] - ours["base"]).max()),
        "adapter_shift_max": float(np.abs(delta_ours).max()),
        "adapter_shift_correlation": correlation,
        "argmax": {"llama_cpp": int(llama["adapter"].argmax()), "ours": int(ours["adapter"].argmax())},
        "llama_cpp_text": texts,
        "seconds": round(time.monotonic() - started, 1),
    }
    report["checks"] = {
        "gguf_equals_llama_cpp_converter": not tensors["mismatches"] and tensors["metadata_equal"],
        "llama_cpp_applies_the_adapter": report["adapter_shift_max"] > 0.05 and correlation > 0.99,
        "same_next_token": report["argmax"]["llama_cpp"] == report["argmax"]["ours"],
        "logits_within_0.05": max_diff < 0.05,
        "generates_text": bool(texts.get("adapter", "").strip()),
    }
    return report


def compare_gguf(ours: Path, reference: Path) -> dict[str, Any]:
    """Our adapter.gguf against llama.cpp's converter output: every tensor and the adapter keys."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(reference))
    mine, theirs = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    mismatches = sorted(set(mine) ^ set(theirs))
    for name in sorted(set(mine) & set(theirs)):
        x, y = mine[name], theirs[name]
        same = (
            x.tensor_type == y.tensor_type
            and list(x.shape) == list(y.shape)
            and np.array_equal(np.asarray(x.data), np.asarray(y.data))
        )
        if not same:
            mismatches.append(name)
    keys = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")

    def value(reader: Any, key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    metadata = {key: [value(a, key), value(b, key)] for key in keys}
    return {
        "count": len(mine),
        "mismatches": mismatches,
        "metadata": metadata,
        "metadata_equal": all(x == y for x, y in metadata.values()),
    }


if __name__ == "__main__":
    raise SystemExit(main())
