"""Job configuration: every field of a defaults-filled config checked, the starting adapter resolved.

The defaults themselves, and how an unset field is told apart, are declared once in
:mod:`novelcrafter.train_settings` (:func:`~novelcrafter.train_settings.with_defaults`).
"""

from __future__ import annotations

import math
import re

from novelcrafter import adapters, layout
from novelcrafter.config import Settings
from novelcrafter.errors import InvalidArgument, NotFound
from novelcrafter.models import check_job_base_model
from novelcrafter.store import Store
from novelcrafter.v1 import common_pb2

DEVICES = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LORA_BIASES = ("none", "all", "lora_only")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")
_HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")


def validate(config: common_pb2.JobConfig, settings: Settings) -> None:
    """Raise one :class:`InvalidArgument` listing every problem of a defaults-filled config.

    ``settings`` (the coordinator's) say which base models and Hub pushes jobs may ask for."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    lora, tr = config.lora, config.training
    need(0 < lora.r <= 1024, f"lora.r must be in 1..1024 (got {lora.r})")
    need(0 < lora.alpha <= 65536, f"lora.alpha must be > 0 (got {lora.alpha})")
    need(
        _finite(lora.dropout) and 0 <= lora.dropout < 1,
        f"lora.dropout must be in [0, 1) (got {lora.dropout})",
    )
    bad_modules = [m for m in lora.target_modules if not _MODULE_RE.fullmatch(m)]
    need(not bad_modules, f"lora.target_modules has invalid module names {bad_modules[:5]}")
    need(lora.bias in LORA_BIASES, f"lora.bias must be one of {', '.join(LORA_BIASES)} (got {lora.bias!r})")
    need(0 < tr.epochs <= 1000, f"training.epochs must be in 1..1000 (got {tr.epochs})")
    need(0 < tr.batch_size <= 1024, f"training.batch_size must be in 1..1024 (got {tr.batch_size})")
    need(0 < tr.grad_accum <= 4096, f"training.grad_accum must be in 1..4096 (got {tr.grad_accum})")
    need(
        _finite(tr.learning_rate) and 0 < tr.learning_rate < 1,
        f"training.learning_rate must be > 0 and < 1 (got {tr.learning_rate})",
    )
    need(
        _finite(tr.weight_decay) and 0 <= tr.weight_decay < 1,
        f"training.weight_decay must be in [0, 1) (got {tr.weight_decay})",
    )
    need(tr.warmup_steps >= 0, f"training.warmup_steps must be >= 0 (got {tr.warmup_steps})")
    need(16 <= tr.max_length <= 131072, f"training.max_length must be in 16..131072 (got {tr.max_length})")
    need(
        tr.max_steps_per_part >= 0, f"training.max_steps_per_part must be >= 0 (got {tr.max_steps_per_part})"
    )
    need(tr.checkpoint_every > 0, f"training.checkpoint_every must be > 0 (got {tr.checkpoint_every})")
    need(tr.seed >= 0, f"training.seed must be >= 0 (got {tr.seed})")
    need(
        tr.precision in PRECISIONS,
        f"training.precision must be one of {', '.join(PRECISIONS)} (got {tr.precision!r})",
    )
    need(tr.eval_max_chunks >= 0, f"training.eval_max_chunks must be >= 0 (got {tr.eval_max_chunks})")
    for name in ("memorization_prompts", "style_prompts"):
        value = getattr(tr, name)
        need(0 <= value <= 4096, f"training.{name} must be in 0..4096 (got {value})")
    need(
        32 <= tr.memorization_new_tokens <= 1024,
        f"training.memorization_new_tokens must be in 32..1024 (got {tr.memorization_new_tokens})",
    )
    need(
        1 <= tr.style_new_tokens <= 1024,
        f"training.style_new_tokens must be in 1..1024 (got {tr.style_new_tokens})",
    )
    need(
        _finite(tr.replay_fraction) and 0 <= tr.replay_fraction < 1,
        f"training.replay_fraction must be in [0, 1) (got {tr.replay_fraction})",
    )
    need(
        config.device in ("", *DEVICES),
        f"device must be empty (any), {' or '.join(DEVICES)} (got {config.device!r})",
    )
    need(0 < config.max_attempts <= 100, f"max_attempts must be in 1..100 (got {config.max_attempts})")
    if 0 < len(config.base_model) <= 500 and not _CTRL_RE.search(config.base_model):
        try:
            check_job_base_model(config.base_model, settings)
        except InvalidArgument as exc:
            problems.append(exc.message)
    else:
        problems.append("base_model must be a model name, hub id, store:NAME or folder")
    if config.hub_repo_id:
        need(
            bool(_HUB_REPO_RE.fullmatch(config.hub_repo_id)),
            f"hub_repo_id must look like 'owner/name' (got {config.hub_repo_id[:100]!r})",
        )
        need(
            settings.hub_push,
            "hub_repo_id: this coordinator does not push to the Hugging Face Hub "
            "(the operator allows it with NOVELCRAFTER_HUB_PUSH=1)",
        )
        namespace = (settings.hub_namespace or "").strip("/")
        need(
            not (settings.hub_push and namespace) or config.hub_repo_id.startswith(namespace + "/"),
            f"hub_repo_id must be in the namespace {namespace!r} (NOVELCRAFTER_HUB_NAMESPACE)",
        )
    if problems:
        raise InvalidArgument("invalid job config: " + "; ".join(problems))


def resolve_init_adapter(store: Store, spec: str, base_model: str) -> tuple[str, str]:
    """``"<book_id>/<version>"`` or ``"<book_id>/latest"`` → (resolved spec, adapter store prefix).

    Resolving ``latest`` now makes the job reproducible: it starts from the version that
    was latest when it was created, not whatever is latest when part 0 is claimed.
    """
    book_id, sep, version = spec.partition("/")
    if not sep:
        raise InvalidArgument(
            f"invalid init_adapter {spec[:100]!r}: expected '<book_id>/<version>' or '<book_id>/latest'"
        )
    layout.check_book_id(book_id)
    if version == "latest":
        latest = adapters.latest_version(store, book_id)
        if latest is None:
            raise NotFound(f"init adapter {spec}: book {book_id} has no published adapter")
        version = latest
    layout.check_version(version)
    meta = adapters.read_meta(store, book_id, version)  # NotFound when the version is incomplete/absent
    if meta.base_model and meta.base_model != base_model:
        raise InvalidArgument(
            f"init adapter {book_id}/{version} was trained on base model {meta.base_model!r}, "
            f"but the job uses {base_model!r}"
        )
    return f"{book_id}/{version}", meta.prefix


def _finite(value: float) -> bool:
    return math.isfinite(value)
