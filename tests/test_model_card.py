"""Model cards of published versions: canonical base model ids, the card's metadata and numbers,
and the card as a checksummed file of the version (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from novelcrafter import adapters, layout
from novelcrafter.errors import FailedPrecondition
from novelcrafter.modelcard import build_card, canonical_base_model, card_version
from novelcrafter.store import open_store

BOOK = "5a6b7c8d9e0f1a2b"
JOB = "j-0000000000c1"
MANIFEST = {
    "book_id": BOOK,
    "title": "A Study in Scarlet",
    "source_sha256": "ab" * 32,
    "pages": 97,
    "sentences": 2450,
    "chunks": 245,
    "words": 43000,
    "params": {"chunk_sentences": 10, "parts": 3, "test_fraction": 0.1, "seed": 0},
    "cleaning": {"running_headers": 180, "page_numbers": 95, "hyphen_joins": 41, "ligatures": 0},
    "parts": [
        {"index": i, "train_key": "", "test_key": "", "train_chunks": 73, "test_chunks": 8} for i in range(3)
    ],
}
METRICS = {
    "base_perplexity": 31.417,
    "adapter_perplexity": 22.05811,
    "earlier_perplexity": {"0": 23.5, "1": 21.25},
    "train_loss": 3.02,
    "train_tokens": 51234,
    "eval_tokens": 6123,
    "train_seconds": 812.5,
    "eval_seconds": 41.0,
    "steps": 27,
    "tokens_per_second": 63.06,
    "device": "cpu",
    "precision": "bf16",
    "warmup_steps": 3,
}
SETTINGS = {
    "epochs": 3,
    "batch_size": 1,
    "grad_accum": 8,
    "learning_rate": 5e-05,
    "weight_decay": 0.01,
    "max_length": 1024,
    "packing": True,
    "seed": 0,
    "precision": "auto",
    "eval_max_chunks": 0,
}
LORA = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["v_proj", "q_proj"],
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "/root/.cache/novelcrafter/models/smollm2-135m-instruct",
}


def _meta(part: int = 2, metrics: dict | None = None, base: str = "smollm2-135m-instruct"):
    return adapters.AdapterMeta(
        BOOK, layout.adapter_version_id(JOB, part), JOB, part, base, metrics=dict(metrics or METRICS)
    )


def _results(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("store:my-llama", "my-llama"),
        # What older versions carry: the trainer's model cache (alias, hub download, store model) ...
        ("/root/.cache/novelcrafter/models/smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("/home/u/nc/models/meta-llama--Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"),
        ("/srv/nc/models/store--my-llama--0123456789ab", "my-llama"),
        # ... or a directory of the user's own: its name, never the path.
        ("/data/checkpoints/my-base/", "my-base"),
    ],
)
def test_canonical_base_model(name: str, canonical: str) -> None:
    assert canonical_base_model(name) == canonical


def test_card_metadata_and_numbers_come_from_the_version() -> None:
    card = ModelCard(str(build_card(_meta(), LORA, manifest=MANIFEST, settings=SETTINGS, started_from="x")))
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"lora", "peft", "novelcrafter"} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert card_version(data) == {"book_id": BOOK, "version": f"{JOB}-p02", "job_id": JOB, "part": 2}
    # model-index: exactly the measured numbers, at full precision.
    assert _results(card) == {
        ("part-02", "Perplexity (adapter)"): 22.05811,
        ("part-02", "Perplexity (base model)"): 31.417,
        ("part-00", "Perplexity (adapter)"): 23.5,
        ("part-01", "Perplexity (adapter)"): 21.25,
    }
    assert {r.metric_type for r in data.eval_results} == {"perplexity"}
    assert {r.dataset_revision for r in data.eval_results} == {"ab" * 32}
    body = card.text
    for fact in (
        "A Study in Scarlet",
        "ab" * 32,  # source sha256
        "| Pages | 97 |",
        "| Parts | 3 |",
        "| This part | 73 training chunks, 8 held-out chunks |",
        "| running headers | 180 |",
        "| hyphen joins | 41 |",
        "| Rank r | 8 |",
        "| Alpha | 32 |",
        "| Target modules | q_proj, v_proj |",
        "| Batch size x gradient accumulation | 1 x 8 |",
        "| Training tokens | 51,234 |",
        "| Training time | 812.5 s (63.1 tokens/s) |",
        "| Device | cpu |",
        "| Precision | bf16 |",
        "| part 02 (this part) | 31.417 | 22.058 |",
        "| part 00 (earlier part: forgetting) | — | 23.500 |",
        "## Out-of-Scope Use",
        "verbatim",
    ):
        assert fact in body, fact
    assert "ligatures" not in body  # zero counts are not listed
    assert "/root/.cache" not in str(card)  # no local path anywhere


def test_card_shows_book_so_far_and_judgements_when_measured_and_skips_what_is_not() -> None:
    metrics = {
        **METRICS,
        "adapter_perplexity": float("nan"),  # e.g. a failed evaluation: never a number in the index
        "earlier_perplexity": {},
        "book_perplexity": {"base": 30.0, "adapter": 24.5},
        "memorization": {
            "prompts": 16,
            "base": {"extraction_rate": 0.0, "longest_copied_tokens": 3},
            "adapter": {"extraction_rate": 0.125, "longest_copied_tokens": 41},
        },
        "style": {"metric": "burrows-delta", "base": 1.42, "adapter": 0.97},
    }
    card = ModelCard(str(build_card(_meta(metrics=metrics), LORA, manifest=None, settings=None)))
    assert _results(card) == {
        ("part-02", "Perplexity (base model)"): 31.417,
        ("book-so-far", "Perplexity (adapter)"): 24.5,
        ("book-so-far", "Perplexity (base model)"): 30.0,
    }
    body = card.text
    assert "| the book so far (parts 00-02) | 30.000 | 24.500 |" in body
    assert "| extraction rate | 0.000 | 0.125 |" in body
    assert "burrows-delta" in body
    # Without a manifest or settings the card says what it lacks instead of inventing it.
    assert "manifest was not available" in body and "settings were not recorded" in body


def test_store_and_local_models_name_no_license_they_cannot_know() -> None:
    card = ModelCard(str(build_card(_meta(base="store:my-llama"), LORA, manifest=MANIFEST)))
    assert card.data.base_model == "my-llama" and card.data.license is None
    assert "huggingface.co/my-llama" not in str(card)  # a store model has no Hub page
    llama = ModelCard(str(build_card(_meta(base="meta-llama/Llama-3.2-1B-Instruct"), LORA)))
    assert llama.data.license == "llama3.2"


def _tiny_adapter(folder: Path) -> Path:
    """A real PEFT LoRA on a tiny random Llama (the card does not care about the weights),
    saved the way the trainer saves: PEFT records the base model's local directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    model.name_or_path = str(folder.parent / "models" / "smollm2-135m-instruct")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(folder))
    return folder


def test_published_version_carries_a_verified_card_and_canonical_config(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    store.put_json(layout.manifest_key(BOOK), MANIFEST)
    local = _tiny_adapter(tmp_path / "adapter")
    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"].startswith("/")
    meta = adapters.publish_adapter(
        store, local, book_id=BOOK, job_id=JOB, part=2, base_model="smollm2-135m-instruct", metrics=METRICS
    )
    assert set(meta.files) == set(adapters.VERSION_FILES)
    stored = adapters.read_meta(store, BOOK, meta.version)
    assert stored.files == meta.files  # the card is in meta.json's checksums
    config = json.loads(store.get(meta.prefix + "adapter_config.json"))
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard(store.get(meta.prefix + adapters.CARD).decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _results(card)[("part-02", "Perplexity (adapter)")] == METRICS["adapter_perplexity"]
    # The local folder is now exactly what was published.
    for name in adapters.VERSION_FILES:
        assert (local / name).read_bytes() == store.get(meta.prefix + name)

    got = adapters.download_adapter(store, stored, tmp_path / "down")
    assert (got / adapters.CARD).read_bytes() == (local / adapters.CARD).read_bytes()
    # A card altered in the store no longer matches its checksum: the version is refused.
    store.put(meta.prefix + adapters.CARD, store.get(meta.prefix + adapters.CARD) + b"\nedited")
    with pytest.raises(FailedPrecondition, match=r"README\.md does not match"):
        adapters.download_adapter(store, stored, tmp_path / "again")


def test_versions_published_before_cards_still_download(tmp_path: Path) -> None:
    """An older meta.json lists only the two adapter files (and its config names a path)."""
    store = open_store(str(tmp_path / "store"))
    local = _tiny_adapter(tmp_path / "adapter")
    meta = adapters.AdapterMeta(BOOK, f"{JOB}-p00", JOB, 0, "smollm2-135m-instruct")
    for name in adapters.ADAPTER_FILES:
        meta.files[name] = {"size": (local / name).stat().st_size, "sha256": _sha(local / name)}
        store.put_file(meta.prefix + name, local / name)
    store.put_json(meta.prefix + adapters.META, meta.__dict__)
    got = adapters.download_adapter(store, adapters.read_meta(store, BOOK, meta.version), tmp_path / "d")
    assert sorted(p.name for p in got.iterdir()) == sorted(adapters.ADAPTER_FILES)


def _sha(path: Path) -> str:
    from novelcrafter.store import file_sha256

    return file_sha256(path)
