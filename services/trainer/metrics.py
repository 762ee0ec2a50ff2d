"""Prometheus metrics of a trainer worker (served on its /metrics endpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:
    from .reports import Progress

PARTS = Counter(
    "novelcrafter_trainer_parts_total",
    "Parts this worker handled, by outcome (completed, released, failed, lease_lost)",
    ["outcome"],
)
STEPS = Counter("novelcrafter_trainer_optimizer_steps_total", "Optimizer steps trained")
CHECKPOINTS = Counter("novelcrafter_trainer_checkpoints_total", "Checkpoints written to the store")
TOKENS_PER_SECOND = Gauge(
    "novelcrafter_trainer_tokens_per_second",
    "Useful (non-padding) training tokens per second of the current part",
)
STEP = Gauge("novelcrafter_trainer_step", "Optimizer step of the current part")


def observe_update(update: Progress) -> None:
    """Account one progress update of the training loop."""
    if update.phase == "train":
        STEPS.inc()
        STEP.set(update.step)
        TOKENS_PER_SECOND.set(update.tokens_per_second)
    elif update.phase == "checkpoint":
        CHECKPOINTS.inc()
