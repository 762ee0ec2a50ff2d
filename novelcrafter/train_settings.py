"""Training settings of a part: every default declared once, with its meaning.

:class:`TrainSettings` (with :class:`LoraSettings`) is the one declaration of what a part's
training computes and of the model-card defaults. The coordinator fills a job's config from
it (:func:`with_defaults`), the trainer reads an assignment into it
(:meth:`TrainSettings.from_job_config`), and ``novelcrafter train`` and the benchmarks take
their defaults and help from it.

Proto3 cannot tell "unset" from zero in a plain field, so each field says how a job's
config gives it (``given``):

* ``"nonzero"``: zero/empty means "the default" (a weight decay or warmup of exactly 0 is
  therefore not expressible; use a tiny value);
* ``"optional"``: a proto ``optional`` field; unset means the default, an explicit 0 is a value
  (turns a judge off);
* ``"as_is"``: the field's zero is itself the default (``max_steps_per_part`` 0 = the full
  schedule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from novelcrafter.v1 import common_pb2

MAX_ATTEMPTS = 3  # attempts per part before its job fails (JobConfig.max_attempts; zero = this)


def _setting(default: Any, help: str, given: str = "nonzero") -> Any:
    return field(default=default, metadata={"help": help, "given": given})


def help_of(cls: type, name: str) -> str:
    """The declared meaning of a setting."""
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def default_text(value: Any) -> str:
    """A default as the help text shows it (``5e-5``, ``0.01``, ``q_proj,v_proj``)."""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return format(value, "g").replace("e-0", "e-")
    return str(value)


# From the model card of the original project.
@dataclass(frozen=True)
class LoraSettings:
    r: int = _setting(8, "LoRA rank")
    alpha: int = _setting(32, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = _setting(0.05, "LoRA dropout")
    target_modules: tuple[str, ...] = _setting(("q_proj", "v_proj"), "Modules that get LoRA adapters")
    bias: str = _setting("none", "Which biases train: none | all | lora_only")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what a part's training computes (and so its checkpoints)."""

    epochs: int = _setting(3, "Epochs per part")
    batch_size: int = _setting(1, "Sequences per micro-batch")
    grad_accum: int = _setting(8, "Gradient accumulation steps")
    learning_rate: float = _setting(5e-5, "Learning rate")
    weight_decay: float = _setting(0.01, "AdamW weight decay")
    warmup_steps: int = _setting(100, "Learning-rate warmup steps, capped by the part's size")
    max_length: int = _setting(1024, "Tokens per packed sequence")
    max_steps_per_part: int = _setting(0, "Optimizer-step budget per part (0 = the full schedule)", "as_is")
    checkpoint_every: int = _setting(50, "Optimizer steps between checkpoints")
    seed: int = _setting(0, "Training seed")
    precision: str = _setting("auto", "auto | fp32 | bf16 | fp16")
    packing: bool = _setting(True, "Pack chunks into sequences (JobConfig: no_packing = False)", "as_is")
    eval_max_chunks: int = _setting(0, "Cap on held-out chunks evaluated per split (0 = all)", "as_is")
    eval_earlier_parts: bool = _setting(
        False, "Also evaluate earlier parts' held-out splits (forgetting)", "as_is"
    )
    # Judged after perplexity (trainer memorization.py, style.py); 0 prompts = off.
    memorization_prompts: int = _setting(
        16, "Training chunks prompted for verbatim extraction after each part (0 = off)", "optional"
    )
    memorization_new_tokens: int = _setting(
        48, "Tokens decoded per extraction prompt (at least 32)", "optional"
    )
    style_prompts: int = _setting(
        8, "Held-out prompts continued for the style distance after each part (0 = off)", "optional"
    )
    # 48 = memorization's default: both judgements share one greedy pass of one length, which
    # keeps judging within ~15% of a part's training time on CPU (bench/RESULTS.md).
    style_new_tokens: int = _setting(48, "Tokens generated per style prompt", "optional")
    # Replay (trainer data.py): earlier parts' training chunks make up this share of a part's mix.
    replay_fraction: float = _setting(
        0.0,
        "Replay against forgetting: share of each part's training chunks drawn (seeded) from "
        "earlier parts' training chunks, in [0, 1) (0 = off)",
        "optional",
    )
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_job_config(cls, config: common_pb2.JobConfig) -> TrainSettings:
        """Unset fields mean "default" (see the module doc); the coordinator normally sends them filled."""
        tr, lo = config.training, config.lora
        values: dict[str, Any] = {}
        for f in _training_fields():
            if f.name == "packing":
                values[f.name] = not tr.no_packing
            elif f.metadata["given"] == "optional":
                if tr.HasField(f.name):
                    values[f.name] = getattr(tr, f.name)
            elif f.metadata["given"] == "nonzero":
                values[f.name] = getattr(tr, f.name) or f.default
            else:
                values[f.name] = getattr(tr, f.name)
        lora = {f.name: _lora_value(lo, f.name) or f.default for f in fields(LoraSettings)}
        return cls(**values, lora=LoraSettings(**lora))


TRAIN_DEFAULTS = TrainSettings()
LORA_DEFAULTS = LoraSettings()


def _training_fields() -> list[Any]:
    return [f for f in fields(TrainSettings) if f.name != "lora"]


def _lora_value(lora: common_pb2.LoraConfig, name: str) -> Any:
    value = getattr(lora, name)
    return tuple(value) if name == "target_modules" else value


def with_defaults(config: common_pb2.JobConfig, *, base_model: str) -> common_pb2.JobConfig:
    """A copy of ``config`` with every unset field replaced by its default (the coordinator
    stores a job's config complete, so a worker trains exactly what the job says, whichever
    version of the defaults it has)."""
    full = common_pb2.JobConfig()
    full.CopyFrom(config)
    full.base_model = full.base_model or base_model
    lora = full.lora
    for f in fields(LoraSettings):
        if f.name == "target_modules":
            if not lora.target_modules:
                lora.target_modules.extend(f.default)
        elif not getattr(lora, f.name):
            setattr(lora, f.name, f.default)
    training = full.training
    for f in _training_fields():
        given = f.metadata["given"]
        if (given == "nonzero" and not getattr(training, f.name)) or (
            given == "optional" and not training.HasField(f.name)
        ):
            setattr(training, f.name, f.default)
    full.max_attempts = full.max_attempts or MAX_ATTEMPTS
    return full
