"""Replay against forgetting: earlier parts' training chunks mixed into a part's sequences.

What must hold: replay 0 is exactly training without replay; replay draws (seeded, the same
every time) only from the training chunks of earlier parts, never from held-out chunks or
from later parts; packed replayed chunks stay isolated from their neighbours; replayed
tokens are counted apart; and a part resumed from a checkpoint reproduces the
uninterrupted one with replay on.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from novelcrafter.trainer.data import (
    IGNORE,
    choose_replay,
    collate,
    one_per_sequence,
    pack,
    read_chunks,
    replay_count,
    tokenize_chunks,
)
from novelcrafter.trainer.part import (
    BaseModel,
    Interrupted,
    PartHooks,
    PartJob,
    _fingerprint_settings,
    build_plan,
    run_part,
)
from novelcrafter.trainer.training import batch_nll, part_seed
from safetensors.torch import load_file
from test_trainer_helpers import one_torch_thread, write_book  # noqa: F401 (autouse)

from novelcrafter import adapters, layout
from novelcrafter.errors import FailedPrecondition
from novelcrafter.store import open_store
from novelcrafter.train_settings import TrainSettings

BOOK = "b1b2c3d4e5f60718"
PARTS = 3
SETTINGS = TrainSettings(
    epochs=2,
    grad_accum=2,
    max_length=128,
    max_steps_per_part=3,
    checkpoint_every=1,
    learning_rate=1e-3,
    seed=5,
    eval_max_chunks=1,
    memorization_prompts=0,  # judged elsewhere; replay is about the training data
    style_prompts=0,
)


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path):
    from novelcrafter.models import load_tokenizer

    return load_tokenizer(base_model_dir)


@pytest.fixture
def store(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    # Consecutive, distinct chunks of a real text (21 of them): 5 training + 2 held-out per part.
    write_book(store, BOOK, parts=PARTS, train_chunks=5, test_chunks=2)
    return store


def _job(part: int, settings: TrainSettings = SETTINGS, job_id: str = "j-000000000000", **changes) -> PartJob:
    return PartJob(
        job_id=job_id,
        book_id=BOOK,
        part=part,
        num_parts=PARTS,
        train_key=layout.part_train_key(BOOK, part),
        test_key=layout.part_test_key(BOOK, part),
        earlier_test_keys=[layout.part_test_key(BOOK, i) for i in range(part)],
        earlier_train_keys=[layout.part_train_key(BOOK, i) for i in range(part)],
        settings=settings,
        base_model="smollm2-135m-instruct",
        **changes,
    )


def _with(**changes) -> TrainSettings:
    return dataclasses.replace(SETTINGS, **changes)


def _chunks(plan) -> list[tuple[int, ...]]:
    """Every chunk of a plan's sequences, as token ids (a chunk starts where position ids restart)."""
    out = []
    for seq in plan.sequences:
        starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [seq.tokens]
        out.extend(tuple(seq.input_ids[a:b]) for a, b in itertools.pairwise(starts))
    return out


def _ids(tokenizer, store, key: str, max_length: int = 128) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in tokenize_chunks(tokenizer, read_chunks(store, key), max_length)]


def test_replay_count_rule():
    # round(f / (1 - f) * own), capped by what earlier parts hold; f is the replayed share of the mix.
    assert replay_count(0.0, 100, 1000) == 0
    assert replay_count(0.1, 90, 1000) == 10  # 10 of 100 = 10%
    assert replay_count(0.25, 90, 1000) == 30  # 30 of 120 = 25%
    assert replay_count(0.25, 90, 7) == 7  # part 1 of a book: only part 0 to draw from
    assert replay_count(0.5, 10, 0) == 0  # part 0: nothing earlier
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="replay_fraction"):
            replay_count(bad, 10, 10)


def test_replay_zero_is_training_without_replay(store, tokenizer):
    """f = 0 builds exactly the sequences and order of the code before replay existed."""
    for part in range(PARTS):
        plan = build_plan(_job(part), tokenizer, store)
        own = tokenize_chunks(tokenizer, read_chunks(store, layout.part_train_key(BOOK, part)), 128)
        assert plan.sequences == pack(own, 128)  # the pre-replay packing, field for field
        assert all(s.replayed_chunks == 0 and s.replay_tokens == 0 for s in plan.sequences)
        assert plan.seed == part_seed(SETTINGS.seed, part) + 1
    unpacked = build_plan(_job(2, _with(packing=False)), tokenizer, store)
    assert unpacked.sequences == one_per_sequence(
        tokenize_chunks(tokenizer, read_chunks(store, layout.part_train_key(BOOK, 2)), 128)
    )
    # Checkpoints are tied to the same fingerprint settings as before replay existed.
    assert "replay_fraction" not in _fingerprint_settings(SETTINGS)
    assert _fingerprint_settings(_with(replay_fraction=0.25))["replay_fraction"] == 0.25


def test_replay_draws_only_earlier_training_chunks_deterministically(store, tokenizer):
    train = {p: _ids(tokenizer, store, layout.part_train_key(BOOK, p)) for p in range(PARTS)}
    test = {t for p in range(PARTS) for t in _ids(tokenizer, store, layout.part_test_key(BOOK, p))}
    assert not test & {t for ts in train.values() for t in ts}  # the fixture's splits are disjoint
    settings = _with(replay_fraction=0.25)
    assert (
        build_plan(_job(0, settings), tokenizer, store).sequences
        == build_plan(_job(0), tokenizer, store).sequences
    )  # part 0: nothing to replay
    for part in (1, 2):
        plan = build_plan(_job(part, settings), tokenizer, store)
        chunks = _chunks(plan)
        own, replayed = chunks[: len(train[part])], chunks[len(train[part]) :]
        assert own == train[part]  # own chunks whole, first, in book order
        earlier = [t for p in range(part) for t in train[p]]
        assert len(replayed) == replay_count(0.25, len(train[part]), len(earlier)) == 2
        assert set(replayed) <= set(earlier)  # earlier parts' training chunks only
        assert not set(replayed) & test  # never a held-out chunk
        assert replayed == [t for t in earlier if t in replayed]  # book order, no repeats
        assert sum(s.replayed_chunks for s in plan.sequences) == len(replayed)
        # Seeded by (job seed, part): the same draw every time, another seed draws otherwise.
        again = build_plan(_job(part, settings), tokenizer, store)
        assert again.sequences == plan.sequences
        assert [again.order(e) for e in range(2)] == [plan.order(e) for e in range(2)]
    pool = [[f"p{p}-c{i}" for i in range(40)] for p in range(3)]
    draws = {tuple(choose_replay(pool, 30, 0.25, seed)) for seed in range(5)}
    assert len(draws) == 5 and all(len(d) == 10 for d in draws)
    assert choose_replay(pool, 30, 0.25, 3) == choose_replay(pool, 30, 0.25, 3)


def test_a_held_out_file_is_never_a_replay_source(store, tokenizer):
    job = _job(2, _with(replay_fraction=0.25))
    for leaked in (job.earlier_test_keys[0], job.test_key, job.train_key):
        bad = dataclasses.replace(job, earlier_train_keys=[job.earlier_train_keys[0], leaked])
        with pytest.raises(FailedPrecondition, match="training chunks"):
            build_plan(bad, tokenizer, store)


def test_replayed_chunks_stay_isolated_when_packed(store, tokenizer, base_model):
    """A sequence holding own and replayed chunks computes exactly the losses of its chunks alone."""
    model, _ = base_model
    settings = _with(replay_fraction=0.25, max_length=1024)  # everything in one long sequence
    plan = build_plan(_job(2, settings), tokenizer, store)
    mixed = [s for s in plan.sequences if 0 < s.replayed_chunks < s.chunks]
    assert mixed, "expected a sequence holding own and replayed chunks"
    seq = mixed[0]
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0]
    assert len(starts) == seq.chunks and all(seq.labels[i] == IGNORE for i in starts)
    bounds = [*starts, seq.tokens]
    alone = one_per_sequence([seq.input_ids[a:b] for a, b in itertools.pairwise(bounds)])
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        together = float(batch_nll(model, collate([seq], pad), "cpu", None))
        separate = sum(float(batch_nll(model, collate([s], pad), "cpu", None)) for s in alone)
    assert together == pytest.approx(separate, rel=1e-5)
    # Token accounting: replayed tokens are the replayed chunks' tokens, counted apart.
    replayed = _chunks(plan)[5:]  # after the part's own 5 chunks
    assert len(replayed) == 2 and sum(s.replay_tokens for s in plan.sequences) == sum(map(len, replayed))
    assert collate([seq], pad).replay_tokens == seq.replay_tokens > 0


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> BaseModel:
    """A private copy of the base model: these tests attach LoRA to it."""
    from novelcrafter.models import load_base_model, load_tokenizer

    return BaseModel(
        load_base_model(base_model_dir), load_tokenizer(base_model_dir), "smollm2-135m-instruct", "cpu"
    )


@pytest.mark.timeout(600)
def test_resumed_part_with_replay_equals_uninterrupted(base: BaseModel, store, tmp_path: Path):
    settings = _with(replay_fraction=0.25)
    plan = build_plan(_job(2, settings), base.tokenizer, store)
    whole = run_part(store, base, _job(2, settings, "j-000000000001"))
    m = whole.metrics
    assert m["replayed_chunks"] == sum(s.replayed_chunks for s in plan.sequences) == 2
    # Every micro-batch of the 3 steps is counted: own + replayed tokens, replayed ones apart.
    trained = [plan.batch(i) for i in range(3 * settings.grad_accum)]
    assert m["train_tokens"] == sum(s.tokens for b in trained for s in b)
    assert m["replay_tokens"] == sum(s.replay_tokens for b in trained for s in b)
    assert 0 < m["replay_tokens"] < m["train_tokens"]
    stored = adapters.read_meta(store, BOOK, "j-000000000001-p02").metrics  # meta.json
    assert (stored["replay_tokens"], stored["replayed_chunks"]) == (m["replay_tokens"], 2)

    steps: list[int] = []
    hooks = PartHooks(
        report=lambda u, k: steps.append(u["step"]) if u["phase"] == "train" else None,
        should_stop=lambda: len(steps) >= 2,
    )
    with pytest.raises(Interrupted) as stopped:
        run_part(store, base, _job(2, settings, "j-000000000002"), hooks)
    resumed = run_part(
        store, base, _job(2, settings, "j-000000000002", resume_checkpoint_key=stopped.value.checkpoint_key)
    )
    r = resumed.metrics
    assert r["loss_curve"] == pytest.approx(m["loss_curve"], rel=1e-5, abs=1e-6)
    assert (r["train_tokens"], r["replay_tokens"], r["replayed_chunks"]) == (
        m["train_tokens"],
        m["replay_tokens"],
        m["replayed_chunks"],
    )
    a = load_file(
        str(adapters.download_adapter(store, whole.adapter, tmp_path / "a") / "adapter_model.safetensors")
    )
    b = load_file(
        str(adapters.download_adapter(store, resumed.adapter, tmp_path / "b") / "adapter_model.safetensors")
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    # Without replay the same part trains on other sequences: replay changed what was trained.
    plain = run_part(store, base, _job(2, SETTINGS, "j-000000000003"))
    assert "replay_tokens" not in plain.metrics and plain.metrics["loss_curve"] != m["loss_curve"]
