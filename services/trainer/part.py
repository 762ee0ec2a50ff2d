"""Train, checkpoint, evaluate and publish one part: everything a worker does with an assignment.

Independent of gRPC: the worker passes :class:`PartHooks` (progress reports, the stop
flag, a lease check before publishing); tests and the benchmark call it directly.

Publishing: a worker's part only *stages* its adapter, in its lease's folder
(``PartJob.publish_prefix``); the coordinator publishes it when the worker completes the part,
and only while that lease is live (see :func:`novelcrafter.adapters.commit_adapter`). Without
a coordinator (tests, benchmarks: no ``publish_prefix``) the part publishes it itself.

Optimizer state between parts (a deliberate choice): *resuming* a part
restores the optimizer, scheduler, RNG states and data cursor exactly from its
checkpoint; *moving on* to the next part starts a fresh AdamW and a fresh warmup/decay
schedule on top of the previous part's adapter weights. A part is a new schedule over
new text (as in the original project, which built a new Trainer per part); carrying
Adam moments across parts would tie a part's result to the worker history instead of
to the published adapter, which is the only state that moves between parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novelcrafter import adapters, layout
from novelcrafter.errors import FailedPrecondition, NotFound
from novelcrafter.logs import get_logger, kv
from novelcrafter.store import Store
from novelcrafter.train_settings import TrainSettings

from . import checkpoint as ckpt
from .data import (
    BatchPlan,
    one_per_sequence,
    pack,
    read_chunks,
    replay_texts,
    tokenize_chunks,
)
from .decode import base_and_adapter_greedy
from .evaluation import EvalInterrupted, perplexity, without_adapter
from .lora import attach, detach
from .memorization import EXTRACTED_TOKENS, PROMPT_TOKENS, choose, eligible_chunks, score
from .reports import Extraction, Memorization, PartMetrics, Progress, Style, Trained
from .style import METRIC, StyleReference
from .training import PartTraining, StepResult, part_seed, set_seed

log = get_logger(__name__)


@dataclass
class PartJob:
    """One part to train (what a PartAssignment says, typed)."""

    job_id: str
    book_id: str
    part: int
    train_key: str
    test_key: str
    settings: TrainSettings
    base_model: str
    num_parts: int = 0
    earlier_test_keys: list[str] = field(default_factory=list)
    earlier_train_keys: list[str] = field(default_factory=list)  # replay draws from these only
    init_adapter_key: str = ""  # store prefix of the adapter to start from ("" = fresh LoRA)
    resume_checkpoint_key: str = ""
    hub_repo_id: str = ""
    # The lease's staging folder (layout.part_publish_prefix of its epoch): the adapter is staged
    # there and CompletePart publishes it. "" = no coordinator: run_part publishes it itself.
    publish_prefix: str = ""

    @classmethod
    def from_assignment(cls, assignment: Any, epoch: int | None = None) -> PartJob:
        """The assignment's part; ``epoch``: the lease's, whose staging folder the adapter goes to."""
        publish_prefix = (
            layout.part_publish_prefix(assignment.job_id, assignment.part_index, epoch)
            if epoch is not None
            else ""
        )
        return cls(
            job_id=assignment.job_id,
            book_id=assignment.book_id,
            part=assignment.part_index,
            num_parts=assignment.num_parts,
            train_key=assignment.train_key,
            test_key=assignment.test_key,
            earlier_test_keys=list(assignment.earlier_test_keys),
            earlier_train_keys=list(assignment.earlier_train_keys),
            init_adapter_key=assignment.init_adapter_key,
            resume_checkpoint_key=assignment.resume_checkpoint_key,
            settings=TrainSettings.from_job_config(assignment.config),
            base_model=assignment.config.base_model,
            hub_repo_id=assignment.config.hub_repo_id,
            publish_prefix=publish_prefix,
        )


@dataclass
class BaseModel:
    """The base model cached by a worker between parts (the only state it keeps)."""

    model: Any
    tokenizer: Any
    name: str
    device: str


@dataclass
class PartHooks:
    """How the part talks to its worker. Every callback must return quickly."""

    report: Callable[[Progress, str], None] = lambda update, checkpoint_key: None
    should_stop: Callable[[], bool] = lambda: False
    before_publish: Callable[[], None] = lambda: None  # raises when the lease is lost: nothing staged
    # True once another worker may own the part: then nothing more is written for it.
    lease_lost: Callable[[], bool] = lambda: False


class Interrupted(Exception):
    """Stopped on request; ``checkpoint_key`` is the checkpoint to resume from ("" = none)."""

    def __init__(self, checkpoint_key: str) -> None:
        super().__init__(f"interrupted (resume from {checkpoint_key or 'the start'})")
        self.checkpoint_key = checkpoint_key


@dataclass
class PartResult:
    metrics: PartMetrics  # reads like its record (meta.json's metrics) too
    # The version's meta: as published, or as staged (published_at 0) when the coordinator
    # publishes it on completion (staged_prefix set).
    adapter: adapters.AdapterMeta
    adapter_dir: Path  # local copy of the version's files (the caller deletes it)
    checkpoint_key: str
    staged_prefix: str = ""  # where the adapter waits for CompletePart ("" = published here)


def _download_init_adapter(store: Store, prefix: str, dest: Path) -> Path:
    """The starting adapter, checksum-verified against its meta.json when it has one."""
    meta = adapters.meta_at(store, prefix)
    if meta is not None:
        return adapters.download_adapter(store, meta, dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in adapters.ADAPTER_FILES:
        try:
            store.download(prefix + name, dest / name)
        except NotFound:
            raise FailedPrecondition(f"starting adapter {prefix} lacks {name}")
    return dest


def _tokens_digest(sequences: list[Any]) -> str:
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(json.dumps(seq.input_ids).encode())
        digest.update(json.dumps(seq.position_ids).encode())
    return digest.hexdigest()


def build_plan(job: PartJob, tokenizer: Any, store: Store) -> BatchPlan:
    """The part's sequences and their seeded order: its own training chunks, then (replay) the
    earlier parts' training chunks drawn by :func:`data.choose_replay`, seeded by the part."""
    settings = job.settings
    held_out = {job.test_key, *job.earlier_test_keys}
    if held_out.intersection(job.earlier_train_keys) or job.train_key in job.earlier_train_keys:
        raise FailedPrecondition("replay may draw only earlier parts' training chunks, not held-out ones")
    own_texts = read_chunks(store, job.train_key)
    replayed = replay_texts(
        store,
        job.earlier_train_keys,
        len(own_texts),
        settings.replay_fraction,
        part_seed(settings.seed, job.part),
    )
    own = tokenize_chunks(tokenizer, own_texts, settings.max_length)
    chunks = own + tokenize_chunks(tokenizer, replayed, settings.max_length)
    sequences = (
        pack(chunks, settings.max_length, replay_from=len(own))
        if settings.packing
        else one_per_sequence(chunks, replay_from=len(own))
    )
    return BatchPlan(
        sequences, settings.batch_size, settings.epochs, seed=part_seed(settings.seed, job.part) + 1
    )


def _fingerprint_settings(settings: TrainSettings) -> dict[str, Any]:
    """The settings a checkpoint is tied to; without replay, exactly as before replay existed
    (so checkpoints written then stay resumable). Replayed data is in the data digest too."""
    data = settings.to_dict()
    if not settings.replay_fraction:
        del data["replay_fraction"]
    return data


def run_part(store: Store, base: BaseModel, job: PartJob, hooks: PartHooks | None = None) -> PartResult:
    """Train ``job`` on ``base`` (LoRA attached for the duration, then removed)."""
    hooks = hooks or PartHooks()
    settings = job.settings
    plan = build_plan(job, base.tokenizer, store)
    fingerprint = ckpt.fingerprint(
        settings=_fingerprint_settings(settings),
        data=_tokens_digest(plan.sequences),
        init_adapter=job.init_adapter_key,
        base_model=job.base_model,
        part=job.part,
    )
    workdir = Path(tempfile.mkdtemp(prefix="nc-part-"))
    try:
        init_dir = None
        if job.init_adapter_key:
            init_dir = _download_init_adapter(store, job.init_adapter_key, workdir / "init")
        set_seed(part_seed(settings.seed, job.part))
        model = attach(base.model, settings.lora, init_dir)
        if init_dir is not None:
            # A published config names the canonical hub id; PEFT's save_pretrained would look
            # that id up on the Hub (embedding-resize check). Saves name the local base, as for a
            # fresh LoRA; publishing writes the canonical id back.
            model.peft_config[model.active_adapter].base_model_name_or_path = None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        training = PartTraining(model, plan, settings, base.device, base.tokenizer.pad_token_id)
        checkpoint_key = _resume(store, job, training, fingerprint)
        checkpoint_key = _train(store, job, training, fingerprint, checkpoint_key, hooks)
        metrics = _evaluate(store, base, job, training, hooks, checkpoint_key)
        out = workdir / "adapter"
        model.save_pretrained(str(out))
        hooks.report(_update(training, "publish", "publishing the adapter"), "")
        hooks.before_publish()
        staged_prefix = job.publish_prefix or layout.part_publish_prefix(job.job_id, job.part, 0)
        # The card and canonical config are written into `out`: it then holds the version's files.
        meta = adapters.stage_adapter(
            store,
            out,
            staged_prefix,
            book_id=job.book_id,
            job_id=job.job_id,
            part=job.part,
            base_model=job.base_model,
            metrics=metrics.to_record(),
            settings=settings.to_dict(),
            started_from=layout.version_of_adapter_prefix(job.init_adapter_key),
        )
        where = kv(job=job.job_id, part=job.part, version=meta.version)
        if job.publish_prefix:
            log.info("part staged: the coordinator publishes it on completion", extra=where)
        else:  # no coordinator to complete with (tests, benchmarks): publish it here
            meta = adapters.commit_adapter(store, staged_prefix, meta, verify=False)
            store.delete_prefix(staged_prefix)
            log.info("part published", extra=where)
        # The caller owns the local copy from here (e.g. for a Hub push, card included).
        kept = Path(tempfile.mkdtemp(prefix="nc-adapter-"))
        for name in adapters.VERSION_FILES:
            shutil.copy2(out / name, kept / name)
        return PartResult(metrics, meta, kept, checkpoint_key, job.publish_prefix)
    finally:
        base.model = detach(model)
        shutil.rmtree(workdir, ignore_errors=True)


def _resume(store: Store, job: PartJob, training: PartTraining, fingerprint: str) -> str:
    found = ckpt.find_resume_point(store, job.job_id, job.part, job.resume_checkpoint_key, fingerprint)
    if found is None:
        if job.resume_checkpoint_key:
            log.warning(
                "no usable checkpoint: the part starts over",
                extra=kv(job=job.job_id, part=job.part, hint=job.resume_checkpoint_key),
            )
        return ""
    try:
        ckpt.restore(training, found)
    finally:
        found.cleanup()
    log.info(
        "resumed from checkpoint", extra=kv(job=job.job_id, part=job.part, step=found.step, key=found.key)
    )
    return found.key


def _update(
    training: PartTraining, phase: str, message: str = "", step: StepResult | None = None
) -> Progress:
    progress = training.progress
    rate = progress.tokens / progress.train_seconds if progress.train_seconds > 0 else 0.0
    return Progress(
        step=progress.step,
        total_steps=training.total_steps,
        phase=phase,
        message=message,
        tokens_per_second=rate,
        epoch=progress.micro_batch / training.plan.per_epoch,
        loss=step.loss if step is not None else None,
        learning_rate=step.learning_rate if step is not None else None,
    )


def _train(
    store: Store,
    job: PartJob,
    training: PartTraining,
    fingerprint: str,
    checkpoint_key: str,
    hooks: PartHooks,
) -> str:
    every = job.settings.checkpoint_every
    saved_step = training.progress.step if checkpoint_key else -1
    log.info(
        "training part",
        extra=kv(
            job=job.job_id,
            part=job.part,
            steps=training.total_steps,
            warmup=training.warmup_steps,
            sequences=len(training.plan.sequences),
            precision=training.precision,
            device=training.device,
            start_step=training.progress.step,
        ),
    )
    while not training.done:
        if hooks.should_stop():
            unsaved = training.progress.step > 0 and saved_step != training.progress.step
            if unsaved and not hooks.lease_lost():
                checkpoint_key = ckpt.save(store, job.job_id, job.part, training, fingerprint)
                hooks.report(_update(training, "checkpoint", "checkpoint before stopping"), checkpoint_key)
            raise Interrupted(checkpoint_key)
        result = training.step()
        hooks.report(_update(training, "train", step=result), "")
        if result.step % every == 0 or training.done:
            checkpoint_key = ckpt.save(store, job.job_id, job.part, training, fingerprint)
            saved_step = result.step
            hooks.report(_update(training, "checkpoint", f"checkpoint at step {result.step}"), checkpoint_key)
    if saved_step != training.progress.step:  # e.g. a resumed, already complete part with no pointer
        checkpoint_key = ckpt.save(store, job.job_id, job.part, training, fingerprint)
    return checkpoint_key


def _evaluate(
    store: Store, base: BaseModel, job: PartJob, training: PartTraining, hooks: PartHooks, checkpoint_key: str
) -> PartMetrics:
    settings = job.settings
    hooks.report(_update(training, "eval", "evaluating held-out perplexity"), "")
    started = time.perf_counter()

    def evaluate(key: str) -> Any:
        texts = read_chunks(store, key, settings.eval_max_chunks)
        return perplexity(
            training.model,
            base.tokenizer,
            texts,
            max_length=settings.max_length,
            device=base.device,
            dtype=training.dtype,
            should_stop=hooks.should_stop,
        )

    try:
        adapter_ppl = evaluate(job.test_key)
        with without_adapter(training.model):
            base_ppl = evaluate(job.test_key)
        eval_tokens = adapter_ppl.targets + base_ppl.targets
        earlier: dict[int, float] = {}
        # The book so far (this part and every earlier one), token-weighted, base and adapter:
        # measured when every earlier part's held-out text is evaluated (or there is none).
        so_far = {"base": [base_ppl.nll, base_ppl.targets], "adapter": [adapter_ppl.nll, adapter_ppl.targets]}
        if settings.eval_earlier_parts:
            for position, key in enumerate(job.earlier_test_keys):
                result = evaluate(key)
                earlier[_part_of(key, position)] = result.perplexity
                with without_adapter(training.model):
                    base_result = evaluate(key)
                for name, measured in (("adapter", result), ("base", base_result)):
                    so_far[name][0] += measured.nll
                    so_far[name][1] += measured.targets
                eval_tokens += result.targets + base_result.targets
        book_perplexity = (
            {
                name: math.exp(nll / targets) if targets else float("nan")
                for name, (nll, targets) in so_far.items()
            }
            if settings.eval_earlier_parts or not job.earlier_test_keys
            else {}
        )
        perplexity_seconds = time.perf_counter() - started
        judged = _judge(store, base, job, training, hooks)
    except EvalInterrupted:
        raise Interrupted(checkpoint_key)
    eval_seconds = time.perf_counter() - started
    progress = training.progress
    replaying = settings.replay_fraction > 0
    metrics = PartMetrics(
        train_loss=training.last_epoch_loss(),
        base_perplexity=base_ppl.perplexity,
        adapter_perplexity=adapter_ppl.perplexity,
        earlier_perplexity=earlier,
        book_perplexity=book_perplexity or None,
        train_tokens=progress.tokens,
        replay_fraction=settings.replay_fraction if replaying else None,
        replayed_chunks=sum(s.replayed_chunks for s in training.plan.sequences) if replaying else 0,
        replay_tokens=progress.replay_tokens if replaying else 0,
        eval_tokens=eval_tokens,
        train_seconds=progress.train_seconds,
        eval_seconds=eval_seconds,
        perplexity_seconds=perplexity_seconds,
        judge_seconds=judged.seconds if judged is not None else None,
        memorization=judged.memorization if judged is not None else None,
        style=judged.style if judged is not None else None,
        steps=progress.step,
        loss_curve=list(progress.loss_curve),
        tokens_per_second=progress.tokens / progress.train_seconds if progress.train_seconds else 0.0,
        device=base.device,
        trained=Trained(
            total_steps=training.total_steps,
            warmup_steps=training.warmup_steps,
            precision=training.precision,
            sequences=len(training.plan.sequences),
            test_chunks=adapter_ppl.chunks,
            base_model=job.base_model,
        ),
    )
    log.info(
        "part evaluated",
        extra=kv(
            job=job.job_id,
            part=job.part,
            base_ppl=round(base_ppl.perplexity, 3),
            adapter_ppl=round(adapter_ppl.perplexity, 3),
            earlier={k: round(v, 3) for k, v in earlier.items()},
            memorization=metrics.memorization.adapter.to_record() if metrics.memorization else None,
            style=metrics.style.adapter if metrics.style else None,
            eval_seconds=round(eval_seconds, 1),
        ),
    )
    return metrics


@dataclass(frozen=True)
class Judgement:
    """Memorization and style of a part (each None when not measured), and the time it took."""

    seconds: float
    memorization: Memorization | None = None
    style: Style | None = None


def _judge(
    store: Store, base: BaseModel, job: PartJob, training: PartTraining, hooks: PartHooks
) -> Judgement | None:
    """Memorization (training chunks, held-out control) and style distance, base and adapter.

    One greedy decoding pass (decode.py: the LoRA on the adapter's rows only) holds every prompt
    for both models: the training prompts, and held-out prompts that serve as the memorization
    control and, their continuations decoded, as the style candidates. Same prompts for base and
    adapter (seeded by the part), so the two are compared on equal terms. Prompts need a chunk of
    at least 32 + 32 tokens (memorization.py); shorter chunks are skipped.
    """
    settings = job.settings
    mem_on, style_on = settings.memorization_prompts > 0, settings.style_prompts > 0
    if not (mem_on or style_on):
        return None
    hooks.report(_update(training, "eval", "measuring memorization and style"), "")
    started = time.perf_counter()
    seed = part_seed(settings.seed, job.part)
    tokenizer = base.tokenizer

    def pick(key: str, count: int) -> list[list[int]]:
        chunks = eligible_chunks(
            tokenizer,
            read_chunks(store, key),
            prompt_tokens=PROMPT_TOKENS,
            extracted_tokens=EXTRACTED_TOKENS,
            max_length=settings.max_length,
        )
        return choose(chunks, count, seed) if count > 0 else []

    held_out_texts = read_chunks(store, job.test_key)
    train = pick(job.train_key, settings.memorization_prompts if mem_on else 0)
    held = pick(job.test_key, max(settings.memorization_prompts if mem_on else 0, settings.style_prompts))
    control, styled = (
        held[: settings.memorization_prompts],
        held[: settings.style_prompts] if style_on else [],
    )
    new_tokens = max(
        settings.memorization_new_tokens if mem_on else 0, settings.style_new_tokens if style_on else 0
    )
    prompts = [ids[:PROMPT_TOKENS] for ids in [*train, *held]]
    outputs = base_and_adapter_greedy(
        training.model, prompts, new_tokens, device=base.device, should_stop=hooks.should_stop
    )
    results = {}
    for name, generated in zip(("base", "adapter"), outputs, strict=True):
        memorized = [g[: settings.memorization_new_tokens] for g in generated]
        results[name] = (
            score(train, memorized[: len(train)]),
            score(control, memorized[len(train) : len(train) + len(control)]),
            "\n".join(
                tokenizer.decode(g[: settings.style_new_tokens])
                for g in generated[len(train) :][: len(styled)]
            ),
        )
    # No chunk long enough for a prompt and an extractable continuation: nothing measured.
    memorization = style = None
    if mem_on and train:
        memorization = Memorization(
            prompts=len(train),
            base=_extraction(results["base"][0]),
            adapter=_extraction(results["adapter"][0]),
            control_prompts=len(control) if control else 0,
            control_base=_extraction(results["base"][1]) if control else None,
            control_adapter=_extraction(results["adapter"][1]) if control else None,
        )
    if style_on and styled:
        reference = StyleReference(" ".join(held_out_texts))
        style = Style(
            metric=METRIC,
            base=reference.distance(results["base"][2]).distance,
            adapter=reference.distance(results["adapter"][2]).distance,
            prompts=len(styled),
            new_tokens=settings.style_new_tokens,
        )
    return Judgement(time.perf_counter() - started, memorization, style)


def _extraction(result: Any) -> Extraction:
    return Extraction(result.extraction_rate, result.longest_copied_tokens)


def _part_of(key: str, position: int) -> int:
    """The part index in a ``…/parts/NN/test.jsonl`` key (else its position in the list)."""
    match = re.search(r"/parts/([0-9]+)/", key)
    return int(match.group(1)) if match else position
