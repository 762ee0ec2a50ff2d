"""Assemble the ``--engine vllm`` runtime: our tokenizer, registry and validation, vLLM's engine."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from novelcrafter.errors import InvalidArgument
from novelcrafter.logs import get_logger

from .service import EngineInfo, LockedTokenizer, Runtime
from .vllm_backend import VLLM_NOTE, VllmBackend, VllmScheduler
from .vllm_client import VllmClient

if TYPE_CHECKING:
    from .server import InferenceServer

log = get_logger(__name__)


def shape_model(model_dir: Path) -> Any:
    """The base model's module tree on the meta device: layer shapes for validating adapters,
    no weights in memory (vLLM holds those)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def share_base_model(model_dir: Path, target: Path) -> bool:
    """Copy the provisioned base model (our cache, the hub or the store: wherever
    ``provision_base_model`` found it) to ``target`` for a vLLM server that waits for it there.
    Atomic (copy beside, then rename); skipped when ``target`` already holds this model.
    True when copied."""
    source = str(model_dir.resolve())
    stamp = target / ".novelcrafter-source"
    if stamp.exists() and stamp.read_text() == source:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    (staging / ".novelcrafter-source").write_text(source)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    log.info("base model shared with vLLM", extra={"fields": {"from": source, "to": str(target)}})
    return True


def load_vllm(server: InferenceServer) -> None:
    """Connect to vLLM (waiting while it starts), then serve through it."""
    import torch

    from novelcrafter.models import load_tokenizer, provision_base_model

    from . import metrics
    from .lora import load_lora
    from .server import _observe_finished, end_token_ids

    started = time.monotonic()
    settings, config = server.settings, server.config
    if not config.vllm_url:
        raise InvalidArgument(
            "--engine vllm needs the vLLM server's URL: --vllm-url or NOVELCRAFTER_VLLM_URL"
        )
    base_name = config.base_model or settings.base_model
    model_dir = provision_base_model(base_name, settings)
    tokenizer = load_tokenizer(model_dir)
    shapes = shape_model(model_dir)
    if config.vllm_model_dir:
        share_base_model(model_dir, Path(config.vllm_model_dir))

    def validate(path: Path, meta: Any) -> Any:
        # The native engine's validation, on meta tensors: nothing is kept but rank and targets.
        return load_lora(
            path, shapes, dtype=torch.float32, device="meta", trained_on=meta.base_model, base_name=base_name
        )

    adapter_dir = Path(
        config.vllm_adapter_dir or Path(settings.home).expanduser() / "inference" / "vllm-adapters"
    )
    backend = VllmBackend(VllmClient(config.vllm_url), adapter_dir, validate, set_serving=server.set_serving)
    backend.connect(config.vllm_wait)
    scheduler = VllmScheduler(
        backend,
        end_token_ids(tokenizer, shapes),
        max_concurrency=config.max_concurrency,
        max_queued=server.max_queued,
        on_finish=_observe_finished,
        on_slot=metrics.QUEUE_WAIT_SECONDS.observe,
    )
    registry = server.make_registry(backend.load, on_drop=backend.dropped)
    engine = EngineInfo("vllm", batch_invariant_seeds=False, note=VLLM_NOTE, healthy=lambda: backend.healthy)
    locked = LockedTokenizer(tokenizer)
    server.activate(Runtime(locked, scheduler, registry, backend.context, engine, on_close=(backend.close,)))
    backend.start_watching()
    log.info(
        "inference ready",
        extra={
            "fields": {
                "model": base_name,
                "engine": "vllm",
                "vllm": backend.client.url,
                "vllm_model": backend.base_name,
                "context": backend.context,
                "store": registry.store.url,
                "slots": config.max_concurrency,
                "max_queued": server.max_queued,
                "seconds": round(time.monotonic() - started, 1),
            }
        },
    )
