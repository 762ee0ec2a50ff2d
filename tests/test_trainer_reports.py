"""What a part reports, typed (novelcrafter.trainer.reports): progress updates and part metrics."""

from __future__ import annotations

import dataclasses

import pytest
from novelcrafter.trainer.reports import Progress, metrics_proto


def test_progress_reads_like_its_record_and_carries_every_field() -> None:
    plain = Progress(
        step=3, total_steps=10, phase="eval", message="evaluating", tokens_per_second=5.0, epoch=0.5
    )
    assert plain["phase"] == "eval" and plain["step"] == 3 and "loss" not in plain
    assert dict(plain) == {
        "step": 3,
        "total_steps": 10,
        "phase": "eval",
        "message": "evaluating",
        "tokens_per_second": 5.0,
        "epoch": 0.5,
    }
    step = Progress(step=4, total_steps=10, phase="train", loss=2.5, learning_rate=1e-4)
    assert step["loss"] == 2.5 and step.get("learning_rate") == 1e-4
    proto = step.to_proto()
    assert (proto.step, proto.total_steps, proto.phase, proto.loss, proto.learning_rate) == (
        4,
        10,
        "train",
        2.5,
        1e-4,
    )
    with pytest.raises(TypeError):
        Progress(step=1, total_steps=2, phase="train", los=1.0)  # type: ignore[call-arg]


def test_memorization_and_style_reach_the_part_metrics_proto() -> None:
    """The part's metrics dict → PartMetrics (what `status JOB`, WatchJob and the run report read)."""
    base_metrics = {
        "train_loss": 2.0,
        "base_perplexity": 30.0,
        "adapter_perplexity": 25.0,
        "earlier_perplexity": {},
        "train_tokens": 100,
        "eval_tokens": 10,
        "train_seconds": 5.0,
        "eval_seconds": 1.0,
        "steps": 2,
        "loss_curve": [2.1, 2.0],
        "tokens_per_second": 20.0,
        "device": "cpu",
    }
    judged = {
        "memorization": {
            "base": {"extraction_rate": 0.0, "longest_copied_tokens": 2},
            "adapter": {"extraction_rate": 0.5, "longest_copied_tokens": 48},
            "prompts": 4,
            "control": {
                "base": {"extraction_rate": 0.0, "longest_copied_tokens": 1},
                "adapter": {"extraction_rate": 0.0, "longest_copied_tokens": 3},
                "prompts": 2,
            },
        },
        "style": {"metric": "burrows_delta_mfw100+punct+sentlen", "base": 0.8, "adapter": 0.6, "prompts": 2},
    }
    out = metrics_proto({**base_metrics, **judged})
    mem = out.memorization
    assert (mem.prompts, mem.control_prompts) == (4, 2)
    assert (mem.adapter.extraction_rate, mem.adapter.longest_copied_tokens) == (0.5, 48)
    assert (mem.base.longest_copied_tokens, mem.control_adapter.longest_copied_tokens) == (2, 3)
    assert (out.style.metric, out.style.base, out.style.adapter, out.style.prompts) == (
        "burrows_delta_mfw100+punct+sentlen",
        0.8,
        0.6,
        2,
    )
    off = metrics_proto(base_metrics)  # not measured: the fields stay unset, not zeros
    assert not off.HasField("memorization") and not off.HasField("style")


def test_part_metrics_record_has_optional_parts_only_when_set() -> None:
    from novelcrafter.trainer.reports import Extraction, Memorization, PartMetrics, Style

    plain = PartMetrics(
        train_loss=2.0,
        base_perplexity=30.0,
        adapter_perplexity=25.0,
        train_tokens=100,
        eval_tokens=10,
        train_seconds=5.0,
        eval_seconds=1.0,
        steps=2,
        loss_curve=[2.1, 2.0],
        tokens_per_second=20.0,
        device="cpu",
        earlier_perplexity={0: 28.0},
    )
    record = plain.to_record()
    assert "memorization" not in plain and "replay_tokens" not in record and "judge_seconds" not in record
    assert plain["loss_curve"] == [2.1, 2.0] and dict(plain) == record
    judged = dataclasses.replace(
        plain,
        replay_fraction=0.25,
        replayed_chunks=2,
        replay_tokens=40,
        judge_seconds=1.5,
        memorization=Memorization(prompts=4, base=Extraction(0.0, 2), adapter=Extraction(0.5, 48)),
        style=Style("burrows", 0.8, 0.6, 2, new_tokens=64),
    )
    record = judged.to_record()
    assert (record["replay_fraction"], record["replayed_chunks"], record["replay_tokens"]) == (0.25, 2, 40)
    assert record["memorization"]["control"] is None and record["style"]["new_tokens"] == 64
    assert metrics_proto(record) == judged.to_proto() == metrics_proto(judged)
