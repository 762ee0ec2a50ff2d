"""The training core of one part: AdamW + linear warmup/decay over packed sequences.

One optimizer step consumes ``grad_accum`` micro-batches; its loss is token-weighted
(summed NLL / target tokens of the whole accumulation window), so a step means the same
whatever the packing. Everything that decides the next step — adapter weights,
optimizer, scheduler, grad scaler, RNG states, data cursor — is in :meth:`state`
and restored by :meth:`restore`, which is what makes a resumed part identical to an
uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from novelcrafter.train_settings import TrainSettings

from .data import IGNORE, Batch, BatchPlan, collate


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def part_seed(seed: int, part: int) -> int:
    """Different parts draw different dropout masks, reproducibly."""
    return (seed * 1_000_003 + part) % (2**63 - 1)


def autocast_dtype(precision: str, device: str) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    import torch

    from novelcrafter.models import cpu_supports_bf16

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def precision_name(dtype: Any) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _autocast(device: str, dtype: Any) -> Any:
    """The autocast context both forward paths run under (``dtype`` None = plain fp32)."""
    import torch

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batch_nll(model: Any, batch: Batch, device: str, dtype: Any) -> Any:
    """Summed next-token NLL of a (packed) batch; positions whose target is IGNORE do not count.

    Llama-architecture models with vanilla LoRA take :mod:`packed_forward` (fused projections,
    per-chunk attention, blockwise linear + cross-entropy); anything else the reference path.
    """
    from . import packed_forward

    if not packed_forward.supports(model):
        return reference_nll(model, batch, device, dtype)
    with _autocast(device, dtype):
        return packed_forward.packed_nll(
            model, batch.input_ids.to(device), batch.position_ids.to(device), batch.labels.to(device), dtype
        )


def reference_nll(model: Any, batch: Batch, device: str, dtype: Any) -> Any:
    """:func:`batch_nll` through the model's own (transformers + PEFT) forward: the reference."""
    import torch.nn.functional as F

    input_ids = batch.input_ids.to(device)
    position_ids = batch.position_ids.to(device)
    labels = batch.labels.to(device)
    with _autocast(device, dtype):
        # No attention mask and no cache: transformers derives the block-diagonal causal
        # mask from the restarting position ids.
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE, reduction="sum"
    )


def total_steps(settings: TrainSettings, plan: BatchPlan) -> int:
    full = math.ceil(plan.total / settings.grad_accum)
    return min(full, settings.max_steps_per_part) if settings.max_steps_per_part > 0 else full


def warmup_steps(settings: TrainSettings, steps: int) -> int:
    """The configured warmup, capped at ~10% of this part's steps (a small part has no room for 100)."""
    return min(settings.warmup_steps, round(0.1 * steps))


@dataclass
class Progress:
    """What has been trained so far in this part (saved with every checkpoint)."""

    step: int = 0
    micro_batch: int = 0  # global micro-batch index: the data cursor
    tokens: int = 0  # real tokens trained on (replayed ones included)
    targets: int = 0
    train_seconds: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    epoch_nll: dict[int, list[float]] = field(default_factory=dict)  # epoch -> [nll, targets]
    replay_tokens: int = 0  # of ``tokens``, in chunks replayed from earlier parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batch": self.micro_batch,
            "tokens": self.tokens,
            "targets": self.targets,
            "train_seconds": self.train_seconds,
            "loss_curve": list(self.loss_curve),
            "epoch_nll": {str(k): v for k, v in self.epoch_nll.items()},
            "replay_tokens": self.replay_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(
            step=int(data["step"]),
            micro_batch=int(data["micro_batch"]),
            tokens=int(data["tokens"]),
            targets=int(data["targets"]),
            train_seconds=float(data["train_seconds"]),
            loss_curve=[float(x) for x in data["loss_curve"]],
            epoch_nll={int(k): [float(v[0]), float(v[1])] for k, v in data["epoch_nll"].items()},
            replay_tokens=int(data.get("replay_tokens", 0)),  # absent in checkpoints made before replay
        )


@dataclass
class StepResult:
    step: int
    loss: float
    learning_rate: float
    tokens: int
    seconds: float
    epoch: float


class PartTraining:
    """Trains one part's adapter step by step (``model`` is a trainable PeftModel)."""

    def __init__(
        self, model: Any, plan: BatchPlan, settings: TrainSettings, device: str, pad_id: int
    ) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.model = model
        self.plan = plan
        self.settings = settings
        self.device = device
        self.pad_id = pad_id
        self.dtype = autocast_dtype(settings.precision, device)
        self.total_steps = total_steps(settings, plan)
        self.warmup_steps = warmup_steps(settings, self.total_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, self.warmup_steps, self.total_steps)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.progress = Progress()

    @property
    def done(self) -> bool:
        return self.progress.step >= self.total_steps

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def step(self) -> StepResult:
        """One optimizer step over the next ``grad_accum`` micro-batches."""
        import torch

        if self.done:
            raise RuntimeError("the part's schedule is complete")
        started = time.perf_counter()
        self.model.train()
        progress = self.progress
        first = progress.micro_batch
        last = min(first + self.settings.grad_accum, self.plan.total)
        batches = [collate(self.plan.batch(i), self.pad_id) for i in range(first, last)]
        window_targets = sum(b.targets for b in batches)
        nll_total = 0.0
        for index, batch in zip(range(first, last), batches, strict=True):
            nll = batch_nll(self.model, batch, self.device, self.dtype)
            loss = nll / max(window_targets, 1)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            value = float(nll.detach())
            nll_total += value
            epoch = self.plan.position(index)[0]
            acc = progress.epoch_nll.setdefault(epoch, [0.0, 0.0])
            acc[0] += value
            acc[1] += batch.targets
            progress.tokens += batch.tokens
            progress.targets += batch.targets
            progress.replay_tokens += batch.replay_tokens
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        loss_value = nll_total / max(window_targets, 1)
        progress.step += 1
        progress.micro_batch = last
        progress.train_seconds += seconds
        progress.loss_curve.append(loss_value)
        return StepResult(
            step=progress.step,
            loss=loss_value,
            learning_rate=lr,
            tokens=sum(b.tokens for b in batches),
            seconds=seconds,
            epoch=last / self.plan.per_epoch,
        )

    def last_epoch_loss(self) -> float:
        """Token-weighted mean training loss of the last epoch trained (NaN before any step)."""
        if not self.progress.epoch_nll:
            return float("nan")
        nll, targets = self.progress.epoch_nll[max(self.progress.epoch_nll)]
        return nll / targets if targets else float("nan")

    # -- exact resume ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Optimizer, scheduler, scaler, RNG and cursor (the adapter weights are saved separately)."""
        import torch

        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": _python_rng_to_list(random.getstate()),
            "numpy": _numpy_rng_to_dict(np.random.get_state()),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
        }

    def restore(self, state: dict[str, Any], progress: Progress) -> None:
        import torch

        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_rng_from_list(rng["python"]))
        np.random.set_state(_numpy_rng_from_dict(rng["numpy"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.progress = progress


def _python_rng_to_list(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_list(data: list[Any]) -> tuple:
    version, internal, gauss = data
    return (int(version), tuple(int(x) for x in internal), gauss)


def _numpy_rng_to_dict(state: tuple) -> dict[str, Any]:
    import torch

    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_rng_from_dict(data: dict[str, Any]) -> tuple:
    keys = data["keys"].numpy().astype(np.uint32)
    return (data["name"], keys, data["pos"], data["has_gauss"], data["cached"])
