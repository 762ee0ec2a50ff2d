"""``novelcrafter export``: the PEFT folder loads in stock PEFT with our engine's logits, the GGUF
adapter reads back tensor by tensor as llama.cpp lays it out, and bad input is one error line
with nothing half-written (issue 13). llama.cpp itself runs the GGUF in bench/export_llamacpp.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_trainer_helpers import chunks, one_torch_thread, write_book  # noqa: F401 (autouse)

from novelcrafter import adapters, layout
from novelcrafter.cli import main as cli_main
from novelcrafter.store import file_sha256, open_store

BOOK = "7e8f9a0b1c2d3e4f"
JOB = "j-0000000000e1"
CANONICAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# q and k are stored RoPE-permuted by llama.cpp (k with grouped-query heads); v and o as they are.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def published(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with a book and two real versions (parts 0 and 1), trained here for a few steps."""
    from novelcrafter.inference.adapter_factory import train_lora

    from novelcrafter.models import load_base_model, load_tokenizer

    root = tmp_path_factory.mktemp("export")
    store = open_store(str(root / "store"))
    write_book(store, BOOK, parts=2)
    model, tokenizer = load_base_model(base_model_dir), load_tokenizer(base_model_dir)  # a private copy
    metas = []
    for part in range(2):
        local = train_lora(
            model, tokenizer, chunks()[part * 3 : part * 3 + 3], root / f"p{part}", steps=2, seed=part,
            targets=TARGETS,
        )  # fmt: skip
        metrics = {
            "base_perplexity": 20.0 + part,
            "adapter_perplexity": 15.0 + part,
            "earlier_perplexity": {},
        }
        metas.append(
            adapters.publish_adapter(
                store, local, book_id=BOOK, job_id=JOB, part=part,
                base_model="smollm2-135m-instruct", metrics=metrics,
            )
        )  # fmt: skip
    return {"store": store, "url": str(root / "store"), "metas": metas, "root": root, "model": model}


def _export(
    published: dict[str, Any], *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    try:
        cli_main(["export", *args, "--store", published["url"]])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub: a PEFT or transformers call that tried to fetch the canonical id would fail."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.timeout(600)
def test_peft_export_loads_in_stock_peft_with_our_engines_logits(
    published, base_model_dir: Path, base_model, tmp_path: Path, offline, capsys
) -> None:
    from novelcrafter.inference.engine import Engine
    from novelcrafter.inference.lora import load_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dest = tmp_path / "peft"
    code, out, err = _export(published, BOOK, str(dest), capsys=capsys)
    assert code == 0, err
    latest = published["metas"][1]
    assert latest.version in out
    assert sorted(p.name for p in dest.iterdir()) == sorted(adapters.VERSION_FILES)
    for name in adapters.VERSION_FILES:  # exactly the published, checksummed files
        assert (dest / name).read_bytes() == published["store"].get(latest.prefix + name)
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == CANONICAL
    assert ModelCard.load(dest / "README.md").data.base_model == CANONICAL

    # Stock PEFT on the locally provisioned base (a model object: nothing is fetched for the id).
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), str(dest))
    peft_model.eval()
    model, tokenizer = base_model
    ids = tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]
    with torch.inference_mode():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    engine = Engine(model, device="cpu", dtype=torch.float32, max_batch=1)
    weights = load_lora(dest, model, dtype=torch.float32, trained_on=latest.base_model, base_name=CANONICAL)
    ours = engine.prefill(ids, engine.new_cache(len(ids)), weights)
    base = engine.prefill(ids, engine.new_cache(len(ids)), None)
    # The adapter moves the logits well beyond the tolerance, and both apply it alike.
    assert (theirs - plain).abs().max() > 0.05
    torch.testing.assert_close(base, plain, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
    assert int(ours.argmax()) == int(theirs.argmax())


def _hf_row(g: int, heads: int, out: int) -> int:
    """Which transformers row llama.cpp's q/k row ``g`` holds: within a head, llama.cpp
    interleaves the RoPE pairs (x0, x_d/2, x1, x_d/2+1, ...) that transformers keeps in halves."""
    d = out // heads
    head, within = divmod(g, d)
    return head * d + (within % 2) * (d // 2) + within // 2


@pytest.mark.timeout(600)
def test_gguf_export_reads_back_as_llama_cpp_lays_it_out(
    published, base_model_dir: Path, tmp_path: Path, offline, capsys
) -> None:
    import gguf

    dest = tmp_path / "all"
    first = published["metas"][0]
    code, _out, err = _export(
        published, BOOK, str(dest), "--adapter", "part-0", "--format", "all", capsys=capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [*adapters.VERSION_FILES, "adapter.gguf", "Modelfile"]
    )
    assert (dest / "adapter_model.safetensors").read_bytes() == published["store"].get(
        first.prefix + "adapter_model.safetensors"
    )
    base_config = json.loads((base_model_dir / "config.json").read_text())
    heads, kv_heads = base_config["num_attention_heads"], base_config["num_key_value_heads"]
    config = json.loads((dest / "adapter_config.json").read_text())

    reader = gguf.GGUFReader(str(dest / "adapter.gguf"))

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == pytest.approx(config["lora_alpha"])

    # Every LoRA matrix of the adapter, under llama.cpp's name, f32, untransposed, q/k rows permuted.
    peft_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    expected: dict[str, np.ndarray] = {}
    for key, tensor in load_file(str(dest / "adapter_model.safetensors")).items():
        parts = key.split(".")  # base_model.model.model.layers.N.self_attn.X.lora_A.weight
        layer, module, which = int(parts[4]), parts[6], parts[7][-1].lower()
        array = tensor.float().numpy()
        if which == "b" and module in ("q_proj", "k_proj"):
            n = heads if module == "q_proj" else kv_heads
            array = array[[_hf_row(g, n, array.shape[0]) for g in range(array.shape[0])]]
        expected[f"blk.{layer}.{peft_names[module]}.weight.lora_{which}"] = array
    assert len(expected) == 2 * len(TARGETS) * base_config["num_hidden_layers"]
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    for name, array in expected.items():
        tensor = got[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        # GGUF lists dimensions fastest-first: ne = (in, r) for lora_a, (r, out) for lora_b.
        assert tuple(int(n) for n in tensor.shape) == tuple(reversed(array.shape)), name
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(array.shape), array, err_msg=name)

    modelfile = (dest / "Modelfile").read_text()
    lines = [line for line in modelfile.splitlines() if line and not line.startswith("#")]
    assert lines == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert CANONICAL in modelfile and "convert_hf_to_gguf.py" in modelfile


@pytest.mark.timeout(300)
def test_bad_requests_are_one_error_line_and_leave_nothing_behind(published, tmp_path: Path, capsys) -> None:
    store = published["store"]
    cases = [
        ([BOOK[:-1] + "0", str(tmp_path / "a")], "unknown book"),
        (["not-a-book", str(tmp_path / "a")], "invalid book id"),
        ([BOOK, str(tmp_path / "a"), "--adapter", "j-0000000000ff-p00"], "not found"),
        ([BOOK, str(tmp_path / "a"), "--adapter", "part-7"], "no published adapter for part 7"),
        ([BOOK, str(tmp_path / "a"), "--adapter", "newest"], "invalid adapter"),
        ([BOOK, str(tmp_path / "a"), "--format", "onnx"], "invalid format"),
        ([BOOK, str(tmp_path / "no" / "such" / "dir")], "does not exist"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append(([BOOK, str(tmp_path / "file" / "sub")], "does not exist"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    cases.append(([BOOK, str(full)], "is not empty"))
    for args, message in cases:
        code, out, err = _export(published, *args, capsys=capsys)
        assert code != 0, args
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert "Traceback" not in err and out == ""
    assert not (tmp_path / "a").exists()
    assert [p.name for p in full.iterdir()] == ["mine.txt"]

    # A failure after the PEFT files are written (the base model for the GGUF layout is missing):
    # neither the destination nor a temporary folder is left.
    other = "0f0e0d0c0b0a0908"
    local = tmp_path / "copy"
    adapters.download_adapter(store, published["metas"][0], local)
    adapters.publish_adapter(
        store, local, book_id=other, job_id="j-0000000000e2", part=0, base_model="store:missing-model"
    )
    dest = tmp_path / "half"
    code, _out, err = _export(published, other, str(dest), "--format", "gguf", capsys=capsys)
    assert code != 0 and err.startswith("error: ") and "missing-model" in err, err
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]


@pytest.mark.timeout(300)
def test_a_version_published_before_cards_exports_with_a_card_and_canonical_config(
    published, base_model, tmp_path: Path, offline, capsys
) -> None:
    """Older versions: no README.md in meta.json, the trainer's cache path in the config. The
    inference loader still serves them; export canonicalizes the config and writes a card."""
    from novelcrafter.inference.lora import load_lora
    from novelcrafter.inference.registry import AdapterRegistry

    store = published["store"]
    book = "1f2e3d4c5b6a7988"
    write_book(store, book, parts=1)
    source = adapters.download_adapter(store, published["metas"][0], tmp_path / "src")
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/root/.cache/novelcrafter/models/smollm2-135m-instruct"
    (source / "adapter_config.json").write_text(json.dumps(config))
    meta = adapters.AdapterMeta(book, "j-0000000000e3-p00", "j-0000000000e3", 0, "smollm2-135m-instruct")
    for name in adapters.ADAPTER_FILES:
        meta.files[name] = {"size": (source / name).stat().st_size, "sha256": file_sha256(source / name)}
        store.put_file(meta.prefix + name, source / name)
    meta.published_at = 1.0
    store.put_json(meta.prefix + adapters.META, meta.__dict__)
    store.put_json(layout.latest_key(book), {"version": meta.version})

    model, _tokenizer = base_model
    registry = AdapterRegistry(
        store,
        lambda path, m: load_lora(
            path, model, dtype=torch.float32, trained_on=m.base_model, base_name="smollm2-135m-instruct"
        ),
    )
    registry.refresh(book)
    assert registry.resolve(book, "latest").version == meta.version

    dest = tmp_path / "old"
    code, _out, err = _export(published, book, str(dest), capsys=capsys)
    assert code == 0, err
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == CANONICAL
    card = ModelCard.load(dest / "README.md")
    assert card.data.base_model == CANONICAL and "Pride and Prejudice" in card.text
    assert os.access(dest / "README.md", os.R_OK)


@pytest.mark.timeout(600)
def test_parts_continue_from_canonical_and_from_older_path_versions(
    published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume/continue: a part trained on top of a published version (canonical id) or of an older
    one (a local path) trains, and publishes a canonical config and a card. PEFT never looks the
    canonical id up on the Hub while the trainer saves (its embedding-resize check would)."""
    import peft.utils.save_and_load as peft_save
    from novelcrafter.trainer.part import BaseModel, PartJob, run_part

    from novelcrafter.models import load_tokenizer, provision_base_model
    from novelcrafter.train_settings import TrainSettings

    lookups: list[str] = []  # what PEFT would look up on the Hub (recorded, not fetched)
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda repo, *a, **k: lookups.append(repo))
    store = published["store"]
    canonical_version = published["metas"][0]
    # An older version of the same adapter: no card, the trainer's cache path in its config.
    old = adapters.AdapterMeta(BOOK, "j-0000000000e4-p00", "j-0000000000e4", 0, "smollm2-135m-instruct")
    source = adapters.download_adapter(store, canonical_version, tmp_path / "src")
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/root/.cache/novelcrafter/models/smollm2-135m-instruct"
    (source / "adapter_config.json").write_text(json.dumps(config))
    for name in adapters.ADAPTER_FILES:
        old.files[name] = {"size": (source / name).stat().st_size, "sha256": file_sha256(source / name)}
        store.put_file(old.prefix + name, source / name)
    store.put_json(old.prefix + adapters.META, old.__dict__)

    base_dir = provision_base_model("smollm2-135m-instruct")
    base = BaseModel(published["model"], load_tokenizer(base_dir), "smollm2-135m-instruct", "cpu")
    settings = TrainSettings(
        epochs=1, grad_accum=1, max_length=64, max_steps_per_part=1, checkpoint_every=1, eval_max_chunks=1
    )
    for job_id, start in (("j-0000000000e5", canonical_version), ("j-0000000000e6", old)):
        job = PartJob(
            job_id=job_id,
            book_id=BOOK,
            part=1,
            num_parts=2,
            train_key=layout.part_train_key(BOOK, 1),
            test_key=layout.part_test_key(BOOK, 1),
            settings=settings,
            base_model="smollm2-135m-instruct",
            init_adapter_key=start.prefix,
        )
        result = run_part(store, base, job)
        try:
            meta = result.adapter
            assert set(meta.files) == set(adapters.VERSION_FILES)
            stored = json.loads(store.get(meta.prefix + "adapter_config.json"))
            assert stored["base_model_name_or_path"] == CANONICAL
            card = ModelCard(store.get(meta.prefix + adapters.CARD).decode())
            assert start.version in card.text  # the card names the version it continued
            assert sorted(p.name for p in result.adapter_dir.iterdir()) == sorted(adapters.VERSION_FILES)
        finally:
            shutil.rmtree(result.adapter_dir, ignore_errors=True)
    assert CANONICAL not in lookups
