"""What a part reports, typed: progress while it trains, metrics when done.

:class:`Progress` is one progress update of the training loop (what ``ReportProgress``
carries); :class:`PartMetrics` is a finished part's results: what ``CompletePart`` carries
(:meth:`PartMetrics.to_proto`) and the metrics record published in ``meta.json``
(:meth:`PartMetrics.to_record`). Both build their proto message field by field, so a
misspelt name fails instead of being dropped; both also read like the record they are
logged or published as (``update["phase"]``, ``metrics["loss_curve"]``).
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

    def to_record(self) -> dict[str, Any]:
        return {"extraction_rate": self.extraction_rate, "longest_copied_tokens": self.longest_copied_tokens}

    def fill(self, out: jobs_pb2.Extraction) -> None:
        out.extraction_rate = _finite(self.extraction_rate)
        out.longest_copied_tokens = int(self.longest_copied_tokens)


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

    def to_record(self) -> dict[str, Any]:
        control = None
        if self.control_base is not None and self.control_adapter is not None:
            control = {
                "base": self.control_base.to_record(),
                "adapter": self.control_adapter.to_record(),
                "prompts": self.control_prompts,
            }
        return {
            "base": self.base.to_record(),
            "adapter": self.adapter.to_record(),
            "prompts": self.prompts,
            "control": control,
        }


@dataclass(frozen=True)
class Style:
    metric: str
    base: float
    adapter: float
    prompts: int
    new_tokens: int | None = None  # per continuation (in the record only)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Style:
        return cls(
            str(record["metric"]), float(record["base"]), float(record["adapter"]), int(record["prompts"])
        )

    def to_record(self) -> dict[str, Any]:
        record = {"metric": self.metric, "base": self.base, "adapter": self.adapter, "prompts": self.prompts}
        if self.new_tokens is not None:
            record["new_tokens"] = self.new_tokens
        return record


@dataclass(frozen=True)
class Trained:
    """What was trained (in the record only: meta.json, the run's metrics.json)."""

    total_steps: int
    warmup_steps: int
    precision: str
    sequences: int
    test_chunks: int
    base_model: str

    def to_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PartMetrics(Mapping[str, Any]):
    """A finished part's results: the coordinator's ``PartMetrics`` and more (the record)."""

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
    # In the record only (each absent from it when None):
    book_perplexity: dict[str, float] | None = None  # base/adapter over the book so far
    replay_fraction: float | None = None  # set when the part replayed earlier chunks
    perplexity_seconds: float | None = None
    judge_seconds: float | None = None  # set when memorization or style was asked for
    trained: Trained | None = None

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

    def to_record(self) -> dict[str, Any]:
        """The metrics record (``meta.json``'s ``metrics``): JSON-ready, optional parts only when set."""
        record: dict[str, Any] = {
            "train_loss": self.train_loss,
            "base_perplexity": self.base_perplexity,
            "adapter_perplexity": self.adapter_perplexity,
            "earlier_perplexity": dict(self.earlier_perplexity),
        }
        if self.book_perplexity:
            record["book_perplexity"] = dict(self.book_perplexity)
        record["train_tokens"] = self.train_tokens
        if self.replay_fraction is not None:
            record["replay_fraction"] = self.replay_fraction
            record["replayed_chunks"] = self.replayed_chunks
            record["replay_tokens"] = self.replay_tokens  # of train_tokens
        record["eval_tokens"] = self.eval_tokens
        record["train_seconds"] = self.train_seconds
        record["eval_seconds"] = self.eval_seconds
        if self.perplexity_seconds is not None:
            record["perplexity_seconds"] = self.perplexity_seconds
        if self.judge_seconds is not None:
            record["judge_seconds"] = self.judge_seconds
        if self.memorization is not None:
            record["memorization"] = self.memorization.to_record()
        if self.style is not None:
            record["style"] = self.style.to_record()
        record["steps"] = self.steps
        record["loss_curve"] = list(self.loss_curve)
        record["tokens_per_second"] = self.tokens_per_second
        record["device"] = self.device
        if self.trained is not None:
            record.update(self.trained.to_record())
        return record

    # -- the read-only mapping view (the record) ---------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_record()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_record())

    def __len__(self) -> int:
        return len(self.to_record())

    def to_proto(self) -> jobs_pb2.PartMetrics:
        out = jobs_pb2.PartMetrics(
            train_loss=_finite(self.train_loss),
            base_perplexity=_finite(self.base_perplexity),
            adapter_perplexity=_finite(self.adapter_perplexity),
            train_tokens=int(self.train_tokens),
            eval_tokens=int(self.eval_tokens),
            train_seconds=float(self.train_seconds),
            eval_seconds=float(self.eval_seconds),
            steps=int(self.steps),
            loss_curve=[float(x) for x in self.loss_curve],
            tokens_per_second=float(self.tokens_per_second),
            device=str(self.device),
            replayed_chunks=int(self.replayed_chunks),
            replay_tokens=int(self.replay_tokens),
        )
        for part, value in self.earlier_perplexity.items():
            out.earlier_perplexity[int(part)] = _finite(value)
        if self.memorization is not None:
            mem = self.memorization
            out.memorization.prompts = int(mem.prompts)
            out.memorization.control_prompts = int(mem.control_prompts)
            for target, source in (
                (out.memorization.base, mem.base),
                (out.memorization.adapter, mem.adapter),
                (out.memorization.control_base, mem.control_base),
                (out.memorization.control_adapter, mem.control_adapter),
            ):
                if source is not None:
                    source.fill(target)
        if self.style is not None:
            out.style.metric = str(self.style.metric)
            out.style.base = _finite(self.style.base)
            out.style.adapter = _finite(self.style.adapter)
            out.style.prompts = int(self.style.prompts)
        return out


def metrics_proto(record: Mapping[str, Any]) -> jobs_pb2.PartMetrics:
    """A part's metrics (or its record, e.g. from ``meta.json``) as the ``PartMetrics`` message."""
    metrics = record if isinstance(record, PartMetrics) else PartMetrics.from_record(record)
    return metrics.to_proto()


def _finite(value: float) -> float:
    return float(value) if value == value and abs(value) != float("inf") else 0.0
