"""What a part reports to the coordinator, typed: progress while it trains, metrics when done.

:class:`Progress` is one progress update of the training loop (what ``ReportProgress``
carries); :class:`PartMetrics` is a finished part's results as ``CompletePart`` carries
them, read from the part's metrics record (the JSON published in ``meta.json``). Both
build their proto message field by field, so a misspelt name fails instead of being
dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from novelcrafter.v1 import jobs_pb2


@dataclass(frozen=True)
class Progress(Mapping[str, Any]):
    """One progress update. It also reads like the record it is logged as (``update["phase"]``);
    ``loss`` and ``learning_rate`` are only there for a training step."""

    step: int  # optimizer step within the part
    total_steps: int
    phase: str  # train | eval | checkpoint | publish
    message: str = ""
    tokens_per_second: float = 0.0
    epoch: float = 0.0
    loss: float | None = None  # set for a training step
    learning_rate: float | None = None

    def to_proto(self) -> jobs_pb2.ProgressUpdate:
        return jobs_pb2.ProgressUpdate(
            step=self.step,
            total_steps=self.total_steps,
            phase=self.phase,
            message=self.message,
            tokens_per_second=self.tokens_per_second,
            epoch=self.epoch,
            loss=self.loss or 0.0,
            learning_rate=self.learning_rate or 0.0,
        )

    # -- the read-only mapping view ----------------------------------------------------------------
    def _present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str) -> Any:
        if key not in self._present():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())


@dataclass(frozen=True)
class Extraction:
    extraction_rate: float
    longest_copied_tokens: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Extraction:
        return cls(float(record["extraction_rate"]), int(record["longest_copied_tokens"]))

    def fill(self, out: jobs_pb2.Extraction) -> None:
        out.extraction_rate = _finite(self.extraction_rate)
        out.longest_copied_tokens = self.longest_copied_tokens


@dataclass(frozen=True)
class Memorization:
    prompts: int
    base: Extraction
    adapter: Extraction
    control_prompts: int = 0
    control_base: Extraction | None = None
    control_adapter: Extraction | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Memorization:
        control = record.get("control") or {}
        return cls(
            prompts=int(record["prompts"]),
            base=Extraction.from_record(record["base"]),
            adapter=Extraction.from_record(record["adapter"]),
            control_prompts=int(control.get("prompts", 0)),
            control_base=Extraction.from_record(control["base"]) if control.get("base") else None,
            control_adapter=Extraction.from_record(control["adapter"]) if control.get("adapter") else None,
        )


@dataclass(frozen=True)
class Style:
    metric: str
    base: float
    adapter: float
    prompts: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Style:
        return cls(
            str(record["metric"]), float(record["base"]), float(record["adapter"]), int(record["prompts"])
        )


@dataclass(frozen=True)
class PartMetrics:
    """A finished part's results, as the coordinator keeps them."""

    train_loss: float
    base_perplexity: float
    adapter_perplexity: float
    train_tokens: int
    eval_tokens: int
    train_seconds: float
    eval_seconds: float
    steps: int
    loss_curve: list[float]
    tokens_per_second: float
    device: str
    earlier_perplexity: dict[int, float] = field(default_factory=dict)
    replayed_chunks: int = 0
    replay_tokens: int = 0
    memorization: Memorization | None = None  # None when not measured
    style: Style | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PartMetrics:
        """From the part's metrics record (``PartResult.metrics``, ``meta.json``'s ``metrics``)."""
        memorized, style = record.get("memorization"), record.get("style")
        return cls(
            train_loss=float(record["train_loss"]),
            base_perplexity=float(record["base_perplexity"]),
            adapter_perplexity=float(record["adapter_perplexity"]),
            train_tokens=int(record["train_tokens"]),
            eval_tokens=int(record["eval_tokens"]),
            train_seconds=float(record["train_seconds"]),
            eval_seconds=float(record["eval_seconds"]),
            steps=int(record["steps"]),
            loss_curve=[float(x) for x in record["loss_curve"]],
            tokens_per_second=float(record["tokens_per_second"]),
            device=str(record["device"]),
            earlier_perplexity={int(part): value for part, value in record["earlier_perplexity"].items()},
            replayed_chunks=int(record.get("replayed_chunks", 0)),
            replay_tokens=int(record.get("replay_tokens", 0)),
            memorization=Memorization.from_record(memorized) if memorized else None,
            style=Style.from_record(style) if style else None,
        )

    def to_proto(self) -> jobs_pb2.PartMetrics:
        out = jobs_pb2.PartMetrics(
            train_loss=_finite(self.train_loss),
            base_perplexity=_finite(self.base_perplexity),
            adapter_perplexity=_finite(self.adapter_perplexity),
            train_tokens=self.train_tokens,
            eval_tokens=self.eval_tokens,
            train_seconds=self.train_seconds,
            eval_seconds=self.eval_seconds,
            steps=self.steps,
            loss_curve=self.loss_curve,
            tokens_per_second=self.tokens_per_second,
            device=self.device,
            replayed_chunks=self.replayed_chunks,
            replay_tokens=self.replay_tokens,
        )
        for part, value in self.earlier_perplexity.items():
            out.earlier_perplexity[part] = _finite(value)
        if self.memorization is not None:
            mem = self.memorization
            out.memorization.prompts = mem.prompts
            out.memorization.control_prompts = mem.control_prompts
            for target, source in (
                (out.memorization.base, mem.base),
                (out.memorization.adapter, mem.adapter),
                (out.memorization.control_base, mem.control_base),
                (out.memorization.control_adapter, mem.control_adapter),
            ):
                if source is not None:
                    source.fill(target)
        if self.style is not None:
            out.style.metric = self.style.metric
            out.style.base = _finite(self.style.base)
            out.style.adapter = _finite(self.style.adapter)
            out.style.prompts = self.style.prompts
        return out


def metrics_proto(record: Mapping[str, Any]) -> jobs_pb2.PartMetrics:
    """A part's metrics record as the ``PartMetrics`` message."""
    return PartMetrics.from_record(record).to_proto()


def _finite(value: float) -> float:
    return float(value) if value == value and abs(value) != float("inf") else 0.0
