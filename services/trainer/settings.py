"""The training settings of one part, resolved from a job's config (model-card defaults filled in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from novelcrafter.v1 import common_pb2


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    bias: str = "none"


JUDGE_FIELDS = ("memorization_prompts", "memorization_new_tokens", "style_prompts", "style_new_tokens")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what a part's training computes (and so its checkpoints)."""

    epochs: int = 3
    batch_size: int = 1
    grad_accum: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_length: int = 1024
    max_steps_per_part: int = 0  # 0 = the full schedule
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    packing: bool = True
    eval_max_chunks: int = 0  # 0 = all held-out chunks
    eval_earlier_parts: bool = False
    # Judged after perplexity (memorization.py, style.py); 0 prompts = off.
    memorization_prompts: int = 16
    memorization_new_tokens: int = 48
    style_prompts: int = 8
    style_new_tokens: int = 64
    # Replay (data.py): earlier parts' training chunks make up this share of a part's mix; 0 = off.
    replay_fraction: float = 0.0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_job_config(cls, config: common_pb2.JobConfig) -> TrainSettings:
        """Zero/empty fields mean "default" (proto3); the coordinator normally sends them filled."""
        tr, lo = config.training, config.lora
        d, dl = cls(), LoraSettings()
        return cls(
            epochs=tr.epochs or d.epochs,
            batch_size=tr.batch_size or d.batch_size,
            grad_accum=tr.grad_accum or d.grad_accum,
            learning_rate=tr.learning_rate or d.learning_rate,
            weight_decay=tr.weight_decay or d.weight_decay,
            warmup_steps=tr.warmup_steps or d.warmup_steps,
            max_length=tr.max_length or d.max_length,
            max_steps_per_part=tr.max_steps_per_part,
            checkpoint_every=tr.checkpoint_every or d.checkpoint_every,
            seed=tr.seed,
            precision=tr.precision or d.precision,
            packing=not tr.no_packing,
            eval_max_chunks=tr.eval_max_chunks,
            eval_earlier_parts=tr.eval_earlier_parts,
            # Optional fields: unset = default, an explicit 0 turns the evaluation off.
            **{name: getattr(tr, name) for name in JUDGE_FIELDS if tr.HasField(name)},
            replay_fraction=tr.replay_fraction,  # unset reads 0.0: no replay
            lora=LoraSettings(
                r=lo.r or dl.r,
                alpha=lo.alpha or dl.alpha,
                dropout=lo.dropout or dl.dropout,
                target_modules=tuple(lo.target_modules) or dl.target_modules,
                bias=lo.bias or dl.bias,
            ),
        )
