"""Mid-part checkpoints in the store: written atomically, verified on load, pruned.

A checkpoint of (job, part, step) lives under ``layout.checkpoint_prefix(job, part, step)``::

    adapter_model.safetensors, adapter_config.json   the adapter (PEFT format)
    training_state.pt        optimizer, scheduler, grad scaler, RNG states (torch/python/numpy/cuda)
    manifest.json            written LAST in the folder: sizes + sha256 of the files above,
                             the data cursor and progress, and a fingerprint of what is trained

then ``layout.last_checkpoint_key(job, part)`` (the last-good pointer) is moved to it, and
older checkpoints of the part are deleted. A reader trusts a checkpoint only when its
manifest exists, every file matches its checksum and the fingerprint matches the
training it would resume (same data, settings, starting adapter and base model).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novelcrafter import layout
from novelcrafter.errors import NotFound, StoreError
from novelcrafter.logs import get_logger, kv
from novelcrafter.store import Store, file_sha256

from .training import PartTraining, Progress

log = get_logger(__name__)

MANIFEST = "manifest.json"
STATE = "training_state.pt"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FORMAT = 1
_STEP_RE = re.compile(r"checkpoints/step-([0-9]+)/")


class CheckpointInvalid(Exception):
    """A checkpoint is incomplete, corrupt, or belongs to a different training."""


@dataclass
class Checkpoint:
    key: str  # store prefix
    step: int
    progress: Progress
    local_dir: Path  # downloaded, verified files

    def cleanup(self) -> None:
        shutil.rmtree(self.local_dir, ignore_errors=True)


def fingerprint(**parts: Any) -> str:
    """A stable hash of what a part trains on; checkpoints of anything else are not resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save(store: Store, job_id: str, part: int, training: PartTraining, print_: str, *, keep: int = 2) -> str:
    """Write a checkpoint of ``training`` now; returns its store prefix (after the pointer moved)."""
    import torch

    step = training.progress.step
    prefix = layout.checkpoint_prefix(job_id, part, step)
    tmp = Path(tempfile.mkdtemp(prefix="nc-ckpt-"))
    try:
        training.model.save_pretrained(str(tmp))
        torch.save(training.state(), tmp / STATE)
        files: dict[str, dict[str, Any]] = {}
        for name in (*ADAPTER_FILES, STATE):
            path = tmp / name
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
            store.put_file(prefix + name, path)
        manifest = {
            "format": FORMAT,
            "job_id": job_id,
            "part": part,
            "step": step,
            "total_steps": training.total_steps,
            "fingerprint": print_,
            "files": files,
            "progress": training.progress.to_dict(),
            "cursor": {
                "epoch": training.plan.position(training.progress.micro_batch)[0],
                "batch_in_epoch": training.plan.position(training.progress.micro_batch)[1],
                "micro_batch": training.progress.micro_batch,
                "step": step,
            },
            "created_at": time.time(),
        }
        store.put_json(prefix + MANIFEST, manifest)
        store.put_json(layout.last_checkpoint_key(job_id, part), {"key": prefix, "step": step})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(store, job_id, part, keep=keep)
    log.info("checkpoint written", extra=kv(job=job_id, part=part, step=step, key=prefix))
    return prefix


def prune(store: Store, job_id: str, part: int, *, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoints of a part (never the one the pointer names)."""
    root = layout.part_checkpoints_prefix(job_id, part)
    try:
        pointer = store.get_json(layout.last_checkpoint_key(job_id, part)).get("key", "")
    except (NotFound, StoreError, ValueError):
        pointer = ""
    steps = sorted({int(m.group(1)) for key in store.list(root) if (m := _STEP_RE.search(key))})
    for step in steps[:-keep] if keep > 0 else steps:
        prefix = layout.checkpoint_prefix(job_id, part, step)
        if prefix != pointer:
            store.delete_prefix(prefix)


def load(store: Store, prefix: str, print_: str) -> Checkpoint:
    """Download and verify the checkpoint at ``prefix`` (raises :class:`CheckpointInvalid`)."""
    try:
        manifest = store.get_json(prefix + MANIFEST)
    except NotFound:
        raise CheckpointInvalid(f"{prefix} has no manifest (incomplete checkpoint)")
    except ValueError:
        raise CheckpointInvalid(f"{prefix}{MANIFEST} is not valid JSON")
    if manifest.get("format") != FORMAT:
        raise CheckpointInvalid(f"{prefix}: unknown checkpoint format {manifest.get('format')!r}")
    if manifest.get("fingerprint") != print_:
        raise CheckpointInvalid(f"{prefix} was made for a different training (data, settings or base)")
    tmp = Path(tempfile.mkdtemp(prefix="nc-resume-"))
    try:
        for name in (*ADAPTER_FILES, STATE):
            expected = manifest["files"].get(name)
            if not expected:
                raise CheckpointInvalid(f"{prefix}: manifest lacks {name}")
            try:
                path = store.download(prefix + name, tmp / name)
            except NotFound:
                raise CheckpointInvalid(f"{prefix}{name} is missing")
            if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                raise CheckpointInvalid(f"{prefix}{name} does not match its checksum")
        return Checkpoint(prefix, int(manifest["step"]), Progress.from_dict(manifest["progress"]), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_resume_point(store: Store, job_id: str, part: int, hint: str, print_: str) -> Checkpoint | None:
    """The newest valid checkpoint among the coordinator's ``hint`` and the part's last-good pointer.

    The pointer can be newer than the hint: a worker killed between writing a checkpoint
    and reporting it leaves only the pointer behind.
    """
    candidates: list[str] = []
    if hint:
        candidates.append(hint)
    try:
        pointed = store.get_json(layout.last_checkpoint_key(job_id, part)).get("key", "")
        if pointed and pointed not in candidates:
            candidates.append(pointed)
    except (NotFound, ValueError, AttributeError):
        pass
    best: Checkpoint | None = None
    for prefix in candidates:
        if not prefix.startswith(layout.part_prefix(job_id, part)):
            log.warning("ignoring a checkpoint of another part", extra=kv(key=prefix))
            continue
        try:
            found = load(store, prefix, print_)
        except CheckpointInvalid as exc:
            log.warning("checkpoint not usable", extra=kv(key=prefix, reason=str(exc)))
            continue
        if best is None or found.step > best.step:
            if best is not None:
                best.cleanup()
            best = found
        else:
            found.cleanup()
    return best


def restore(training: PartTraining, checkpoint: Checkpoint) -> None:
    """Put the adapter weights and the full training state of ``checkpoint`` into ``training``."""
    import torch
    from safetensors.torch import load_file

    from .lora import load_trainable_state

    weights = load_file(str(checkpoint.local_dir / "adapter_model.safetensors"), device="cpu")
    load_trainable_state(training.model, weights)
    state = torch.load(checkpoint.local_dir / STATE, map_location="cpu", weights_only=True)
    training.restore(state, checkpoint.progress)
