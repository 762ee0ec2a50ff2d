"""Form fields -> protos, with one clear message per bad field (shown in the page, HTTP 400)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from novelcrafter.errors import InvalidArgument
from novelcrafter.v1 import common_pb2, inference_pb2

MAX_FORM_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 4000


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the console's forms); last value wins."""
    if len(body) > MAX_FORM_BYTES:
        raise InvalidArgument(f"form too large (over {MAX_FORM_BYTES // 1024} KB)")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        raise InvalidArgument("the form is not valid UTF-8")


def _int(form: Mapping[str, str], name: str, label: str, low: int, high: int) -> int | None:
    raw = (form.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{label} must be a whole number, got {raw!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{label} must be between {low} and {high}, got {value}")
    return value


def _float(form: Mapping[str, str], name: str, label: str, low: float, high: float) -> float | None:
    raw = (form.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{label} must be a number, got {raw!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{label} must be between {low:g} and {high:g}, got {value:g}")
    return value


def ingest_params(form: Mapping[str, str]) -> common_pb2.IngestParams:
    """Parts and chunk size for an upload (empty = ingest's defaults)."""
    return common_pb2.IngestParams(
        parts=_int(form, "parts", "parts", 1, 100) or 0,
        chunk_sentences=_int(form, "chunk_sentences", "sentences per chunk", 1, 1000) or 0,
        auto_reduce_parts=True,  # a short book trains on fewer parts rather than failing
    )


def job_config(form: Mapping[str, str]) -> common_pb2.JobConfig:
    """The advanced training settings; every empty field keeps the coordinator's default."""
    training = common_pb2.TrainingConfig(
        epochs=_int(form, "epochs", "epochs", 1, 100) or 0,
        learning_rate=_float(form, "learning_rate", "learning rate", 1e-7, 1.0) or 0.0,
        max_length=_int(form, "max_length", "max length", 16, 8192) or 0,
        max_steps_per_part=_int(form, "max_steps_per_part", "steps per part", 0, 1_000_000) or 0,
        grad_accum=_int(form, "grad_accum", "gradient accumulation", 1, 1024) or 0,
        eval_max_chunks=_int(form, "eval_max_chunks", "held-out chunks evaluated", 0, 100_000) or 0,
    )
    if form.get("max_steps_per_part", "").strip():
        # A step budget below the default warm-up would never leave it.
        steps = training.max_steps_per_part
        training.warmup_steps = max(1, min(100, steps // 10)) if steps else 0
        training.checkpoint_every = max(1, min(50, steps)) if steps else 0
    for name, label in (("memorization_prompts", "memorization prompts"), ("style_prompts", "style prompts")):
        value = _int(form, name, label, 0, 1000)
        if value is not None:
            setattr(training, name, value)
    lora = common_pb2.LoraConfig(
        r=_int(form, "lora_r", "LoRA rank", 1, 256) or 0,
        alpha=_int(form, "lora_alpha", "LoRA alpha", 1, 1024) or 0,
    )
    device = (form.get("device") or "").strip()
    if device not in ("", "cpu", "cuda"):
        raise InvalidArgument(f"device must be any, cpu or cuda, got {device!r}")
    return common_pb2.JobConfig(training=training, lora=lora, device=device)


def generate_request(form: Mapping[str, str], *, book_id: str, adapter: str) -> inference_pb2.GenerateRequest:
    """One side of a comparison; both sides get the same prompt, seed and sampling."""
    prompt = form.get("prompt") or ""
    if not prompt.strip():
        raise InvalidArgument("write a prompt to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    request = inference_pb2.GenerateRequest(
        prompt=prompt,
        book_id=book_id,
        adapter=adapter,
        max_new_tokens=_int(form, "max_new_tokens", "tokens", 1, 1024) or 64,
    )
    temperature = _float(form, "temperature", "temperature", 0.0, 2.0)
    if temperature is not None:
        request.temperature = temperature
    top_p = _float(form, "top_p", "top-p", 0.01, 1.0)
    if top_p is not None:
        request.top_p = top_p
    seed = _int(form, "seed", "seed", 0, 2**62)
    if seed is not None:
        request.seed = seed
    return request


def comparison(
    form: Mapping[str, str],
) -> tuple[inference_pb2.GenerateRequest, inference_pb2.GenerateRequest]:
    """(base, tuned) requests for the Try-it page."""
    book_id = (form.get("book_id") or "").strip()
    if not book_id:
        raise InvalidArgument("choose a book (ingest and train one first)")
    version = (form.get("adapter") or "latest").strip() or "latest"
    return (
        generate_request(form, book_id=book_id, adapter="base"),
        generate_request(form, book_id=book_id, adapter=version),
    )
