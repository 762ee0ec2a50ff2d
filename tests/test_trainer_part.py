"""One part end to end on the real base model: train, checkpoint, exact resume, evaluate, publish."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from novelcrafter.trainer import checkpoint as ckpt
from novelcrafter.trainer.data import read_chunks
from novelcrafter.trainer.memorization import eligible_chunks
from novelcrafter.trainer.part import BaseModel, Interrupted, PartHooks, PartJob, run_part
from safetensors.torch import load_file
from test_trainer_helpers import one_torch_thread, write_book  # noqa: F401 (autouse)

from novelcrafter import adapters, layout
from novelcrafter.store import open_store
from novelcrafter.train_settings import TrainSettings

BOOK = "a1b2c3d4e5f60718"
# Tiny but real: 2 micro-batches per optimizer step, 3 steps, a checkpoint after every step.
SETTINGS = TrainSettings(
    epochs=2,
    grad_accum=2,
    max_length=128,
    max_steps_per_part=3,
    checkpoint_every=1,
    learning_rate=1e-3,  # large enough that 3 steps visibly move the adapter
    seed=3,
    eval_max_chunks=1,
    eval_earlier_parts=True,
)
# Resumed training must reproduce the uninterrupted adapter. On the same machine and thread
# count every kernel runs the same way, so we expect bit-identical weights; the stated
# tolerance only allows for reduction-order noise: |a - b| <= 1e-6 + 1e-5 * |b|.
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> BaseModel:
    """A private copy of the base model: these tests attach LoRA to it."""
    from novelcrafter.models import load_base_model, load_tokenizer

    return BaseModel(
        load_base_model(base_model_dir), load_tokenizer(base_model_dir), "smollm2-135m-instruct", "cpu"
    )


@pytest.fixture
def store(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    write_book(store, BOOK, parts=2, train_chunks=8, test_chunks=2)
    return store


def _job(job_id: str, part: int = 0, **changes) -> PartJob:
    changes.setdefault("settings", SETTINGS)
    return PartJob(
        job_id=job_id,
        book_id=BOOK,
        part=part,
        num_parts=2,
        train_key=layout.part_train_key(BOOK, part),
        test_key=layout.part_test_key(BOOK, part),
        earlier_test_keys=[layout.part_test_key(BOOK, i) for i in range(part)],
        base_model="smollm2-135m-instruct",
        **changes,
    )


def _weights(store, meta: adapters.AdapterMeta, tmp: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapters.download_adapter(store, meta, tmp) / "adapter_model.safetensors"))


def _base_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.timeout(600)
def test_interrupted_and_resumed_part_equals_uninterrupted(base: BaseModel, store, tmp_path: Path):
    before = _base_digest(base.model)
    reports: list[tuple[dict, str]] = []
    whole = run_part(
        store, base, _job("j-00000000000a"), PartHooks(report=lambda u, k: reports.append((u, k)))
    )

    # The published version and its metrics.
    assert whole.adapter.version == "j-00000000000a-p00"
    assert adapters.latest_version(store, BOOK) == "j-00000000000a-p00"
    m = whole.metrics
    assert m["steps"] == 3 and len(m["loss_curve"]) == 3
    assert m["train_tokens"] > 0 and m["tokens_per_second"] > 0 and m["device"] == "cpu"
    assert math.isfinite(m["base_perplexity"]) and math.isfinite(m["adapter_perplexity"])
    assert m["adapter_perplexity"] != m["base_perplexity"]
    assert m["earlier_perplexity"] == {}  # part 0 has no earlier part
    # Memorization and style, base and adapter, on the default prompt counts.
    eligible = eligible_chunks(
        base.tokenizer,
        read_chunks(store, layout.part_train_key(BOOK, 0)),
        prompt_tokens=32,
        extracted_tokens=32,
        max_length=SETTINGS.max_length,
    )
    memorized = m["memorization"]
    assert memorized["prompts"] == min(len(eligible), SETTINGS.memorization_prompts) > 0
    for side in ("base", "adapter"):
        assert 0.0 <= memorized[side]["extraction_rate"] <= 1.0
        assert 0 <= memorized[side]["longest_copied_tokens"] <= SETTINGS.memorization_new_tokens
    assert m["style"]["metric"] == "burrows_delta_mfw100+punct+sentlen" and m["style"]["prompts"] > 0
    assert math.isfinite(m["style"]["base"]) and math.isfinite(m["style"]["adapter"])
    assert m["eval_seconds"] >= m["perplexity_seconds"] > 0
    stored = adapters.read_meta(store, BOOK, "j-00000000000a-p00").metrics  # metrics travel with the version
    assert stored["loss_curve"] == m["loss_curve"] and stored["precision"] in ("bf16", "fp32")
    assert stored["memorization"] == m["memorization"] and stored["style"] == m["style"]
    phases = [u["phase"] for u, _ in reports]
    assert phases.count("train") == 3 and "eval" in phases and phases[-1] == "publish"
    assert [k for u, k in reports if u["phase"] == "checkpoint"] == [
        layout.checkpoint_prefix("j-00000000000a", 0, s) for s in (1, 2, 3)
    ]
    # Old checkpoints are pruned; the pointer names the newest, whose manifest verifies.
    ckpt_root = layout.part_prefix("j-00000000000a", 0) + "checkpoints/"
    assert {k[len(ckpt_root) :].split("/")[0] for k in store.list(ckpt_root)} == {
        "step-0000002",
        "step-0000003",
        "last.json",
    }
    assert store.get_json(layout.last_checkpoint_key("j-00000000000a", 0))["step"] == 3

    # The worker's cached base model is untouched after the part (LoRA removed).
    assert _base_digest(base.model) == before
    assert not any("lora" in name for name, _ in base.model.named_modules())

    # Same part, new job: stop after 2 steps (the checkpoint of step 2 is the resume point) ...
    steps = []
    hooks = PartHooks(
        report=lambda u, k: steps.append(u["step"]) if u["phase"] == "train" else None,
        should_stop=lambda: len(steps) >= 2,
    )
    with pytest.raises(Interrupted) as stopped:
        run_part(store, base, _job("j-00000000000b"), hooks)
    assert stopped.value.checkpoint_key == layout.checkpoint_prefix("j-00000000000b", 0, 2)
    assert adapters.latest_version(store, BOOK) == "j-00000000000a-p00"  # nothing published
    # ... another worker resumes from that checkpoint and finishes.
    resumed_steps: list[int] = []
    resumed = run_part(
        store,
        base,
        _job("j-00000000000b", resume_checkpoint_key=stopped.value.checkpoint_key),
        PartHooks(report=lambda u, k: resumed_steps.append(u["step"]) if u["phase"] == "train" else None),
    )
    assert resumed_steps == [3]  # only the remaining steps were trained
    assert resumed.metrics["loss_curve"] == pytest.approx(m["loss_curve"], rel=RTOL, abs=ATOL)
    assert resumed.metrics["adapter_perplexity"] == pytest.approx(m["adapter_perplexity"], rel=RTOL)
    a = _weights(store, whole.adapter, tmp_path / "a")
    b = _weights(store, resumed.adapter, tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 2 * 30 * 2  # A and B of q_proj and v_proj, 30 layers
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL)
        moved += int(not torch.equal(a[name], torch.zeros_like(a[name])))
    assert moved == len(a)  # every LoRA matrix trained (B starts at zero)

    assert _base_digest(base.model) == before


@pytest.mark.timeout(300)
def test_only_a_verified_checkpoint_of_the_same_training_is_resumed(base: BaseModel, store):
    job = _job(
        "j-00000000000c",
        settings=TrainSettings(**{**SETTINGS.__dict__, "max_steps_per_part": 2, "eval_max_chunks": 1}),
    )
    steps: list[int] = []
    hooks = PartHooks(
        report=lambda u, k: steps.append(u["step"]) if u["phase"] == "train" else None,
        should_stop=lambda: len(steps) >= 1,
    )
    with pytest.raises(Interrupted) as stopped:
        run_part(store, base, job, hooks)
    key = stopped.value.checkpoint_key
    assert key == layout.checkpoint_prefix("j-00000000000c", 0, 1)
    print_ = store.get_json(key + ckpt.MANIFEST)["fingerprint"]

    found = ckpt.find_resume_point(store, "j-00000000000c", 0, key, print_)
    assert found is not None and found.step == 1 and found.progress.step == 1
    found.cleanup()
    # The pointer alone (the coordinator never heard of the checkpoint) is found too.
    assert ckpt.find_resume_point(store, "j-00000000000c", 0, "", print_).step == 1
    # Made for another training (other data, settings, start adapter or base model): not resumed.
    assert ckpt.find_resume_point(store, "j-00000000000c", 0, key, "another-fingerprint") is None
    # A hint outside this part, or a folder without a manifest: not resumed.
    other_part = layout.checkpoint_prefix("j-00000000000c", 1, 1)
    store.put(other_part + "training_state.pt", b"x")
    with pytest.raises(ckpt.CheckpointInvalid, match="no manifest"):
        ckpt.load(store, other_part, print_)
    # Flip the saved optimizer state: the checksum no longer matches, so nothing is resumed.
    store.put(key + "training_state.pt", b"garbage")
    with pytest.raises(ckpt.CheckpointInvalid, match="checksum"):
        ckpt.load(store, key, print_)
    assert ckpt.find_resume_point(store, "j-00000000000c", 0, key, print_) is None


def test_memorization_and_style_off_at_zero_prompts(base: BaseModel, store):
    settings = TrainSettings(
        **{**SETTINGS.__dict__, "max_steps_per_part": 1, "memorization_prompts": 0, "style_prompts": 0}
    )
    result = run_part(store, base, _job("j-00000000000d", settings=settings))
    assert "memorization" not in result.metrics and "style" not in result.metrics
    assert math.isfinite(result.metrics["adapter_perplexity"])
