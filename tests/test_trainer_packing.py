"""Packing: chunks packed into one sequence compute exactly the losses of the chunks run alone."""

from __future__ import annotations

import pytest
import torch
from novelcrafter.trainer.data import IGNORE, BatchPlan, collate, one_per_sequence, pack, tokenize_chunks
from novelcrafter.trainer.training import batch_nll
from test_trainer_helpers import chunks, one_torch_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def token_chunks(base_model):
    _model, tokenizer = base_model
    return tokenize_chunks(tokenizer, chunks()[:6], max_length=128)


def _nll(model, sequences, pad_id: int) -> float:
    with torch.no_grad():
        return float(batch_nll(model, collate(sequences, pad_id), "cpu", None))


def test_pack_keeps_chunks_whole_in_book_order(token_chunks):
    packed = pack(token_chunks, max_length=128)
    assert len(packed) < len(token_chunks)  # something was actually packed
    assert all(s.tokens <= 128 for s in packed)
    flat = [t for s in packed for t in s.input_ids]
    assert flat == [t for ids in token_chunks for t in ids]  # book order, nothing dropped or padded
    assert sum(s.chunks for s in packed) == len(token_chunks)
    for seq in packed:  # positions restart at every chunk; a chunk's first token has no target
        starts = [i for i, p in enumerate(seq.position_ids) if p == 0]
        assert len(starts) == seq.chunks
        assert all(seq.labels[i] == IGNORE for i in starts)


def test_packed_loss_equals_unpacked_loss(base_model, token_chunks):
    model, tokenizer = base_model
    pad = tokenizer.pad_token_id
    group = token_chunks[:3]
    (packed,) = pack(group, max_length=sum(len(c) for c in group))
    assert packed.chunks == 3
    alone = sum(_nll(model, [seq], pad) for seq in one_per_sequence(group))
    together = _nll(model, [packed], pad)
    assert together == pytest.approx(alone, rel=1e-5)
    assert packed.targets == sum(len(c) - 1 for c in group)

    # Control: the same tokens with positions that do not restart let each chunk see its
    # predecessor (the contamination packing must avoid) and the loss changes.
    leaky = collate([packed], pad)
    leaky.position_ids = torch.arange(packed.tokens).unsqueeze(0)
    with torch.no_grad():
        contaminated = float(batch_nll(model, leaky, "cpu", None))
    assert abs(contaminated - alone) / alone > 1e-3


def test_padding_segment_of_a_batch_changes_nothing(base_model, token_chunks):
    model, tokenizer = base_model
    pad = tokenizer.pad_token_id
    long, short = pack(token_chunks[:3], 400)[0], pack(token_chunks[3:4], 400)[0]
    batch = collate([long, short], pad)
    assert batch.input_ids.shape == (2, long.tokens)
    assert batch.tokens == long.tokens + short.tokens
    assert _nll(model, [long, short], pad) == pytest.approx(
        _nll(model, [long], pad) + _nll(model, [short], pad), rel=1e-5
    )


def test_batch_plan_is_a_seeded_permutation_per_epoch(token_chunks):
    sequences = one_per_sequence(token_chunks)
    plan = BatchPlan(sequences, batch_size=2, epochs=2, seed=7)
    assert plan.total == 2 * 3
    again = BatchPlan(sequences, batch_size=2, epochs=2, seed=7)
    other = BatchPlan(sequences, batch_size=2, epochs=2, seed=8)
    order = [plan.batch(i) for i in range(plan.total)]
    assert order == [again.batch(i) for i in range(plan.total)]
    assert order != [other.batch(i) for i in range(plan.total)]
    for epoch in range(2):  # each epoch sees every sequence once
        seen = [s for i in range(epoch * 3, epoch * 3 + 3) for s in plan.batch(i)]
        assert sorted(map(id, seen)) == sorted(map(id, sequences))
