"""Turning protos into what the templates show (numbers formatted, curves as SVG points)."""

from __future__ import annotations

import time
from typing import Any

from markdown_it import MarkdownIt

from novelcrafter.progress import job_state_name, judged_bits, part_state_name
from novelcrafter.v1 import jobs_pb2

CURVE_WIDTH, CURVE_HEIGHT = 160, 40
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in a card stays text


def render_markdown(text: str) -> str:
    """A model card as HTML: Markdown only, raw HTML escaped, javascript: links refused."""
    return _MARKDOWN.render(text)


def split_front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, Markdown body) of a Hugging Face model card."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end > 0:
            return card[4:end].strip(), card[end + 4 :].lstrip("-").lstrip("\n")
    return "", card


def when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def curve_points(values: list[float], width: int = CURVE_WIDTH, height: int = CURVE_HEIGHT) -> str:
    """A loss curve as an SVG polyline's points (numbers only, so safe in an attribute)."""
    values = [float(v) for v in values if v == v]  # drop NaN
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{height - 2 - (v - low) / span * (height - 4):.1f}" for i, v in enumerate(values)
    )


def part_row(part: jobs_pb2.Part) -> dict[str, Any]:
    m = part.metrics
    state = part_state_name(part.state)
    total = part.total_steps or m.steps
    step = part.step if part.state != jobs_pb2.PART_STATE_SUCCEEDED else (m.steps or part.step)
    return {
        "index": part.index,
        "state": state,
        "state_class": state.lower(),
        "step": step,
        "total": total,
        "percent": int(100 * step / total) if total else (100 if state == "SUCCEEDED" else 0),
        "train_loss": f"{m.train_loss:.4f}" if m.train_loss else "",
        "base_ppl": f"{m.base_perplexity:.2f}" if m.base_perplexity else "",
        "adapter_ppl": f"{m.adapter_perplexity:.2f}" if m.adapter_perplexity else "",
        "better": bool(
            m.adapter_perplexity and m.base_perplexity and m.adapter_perplexity < m.base_perplexity
        ),
        "curve": curve_points(list(m.loss_curve)),
        "judged": judged_bits(m),
        "version": part.adapter_version,
        "error": part.error if part.state != jobs_pb2.PART_STATE_SUCCEEDED else "",
    }


def job_view(job: jobs_pb2.Job) -> dict[str, Any]:
    tr, lora = job.config.training, job.config.lora
    done = sum(p.state == jobs_pb2.PART_STATE_SUCCEEDED for p in job.parts)
    settings = (
        f"LoRA r={lora.r} alpha={lora.alpha} · epochs {tr.epochs} · lr {tr.learning_rate:g} · "
        f"batch {tr.batch_size}×{tr.grad_accum} · max length {tr.max_length}"
        + (f" · {tr.max_steps_per_part} steps/part" if tr.max_steps_per_part else "")
        + (f" · device {job.config.device}" if job.config.device else "")
    )
    state = job_state_name(job.state)
    return {
        "job_id": job.job_id,
        "book_id": job.book_id,
        "state": state,
        "state_class": state.lower(),
        "terminal": job.state
        in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED),
        "done": done,
        "parts": [part_row(p) for p in job.parts],
        "error": job.error,
        "created": when(job.created_at),
        "settings": settings,
    }


def event_data(event: jobs_pb2.JobEvent, text: str) -> dict[str, Any]:
    """What the live page needs from a WatchJob event (JSON for server-sent events)."""
    kind = event.WhichOneof("event") or ""
    data: dict[str, Any] = {"seq": event.sequence, "part": event.part_index, "kind": kind, "text": text}
    if kind == "progress":
        p = event.progress
        data.update(step=p.step, total=p.total_steps, loss=p.loss, phase=p.phase)
    elif kind == "part_state":
        data["state"] = part_state_name(event.part_state)
    elif kind == "job_state":
        data["state"] = job_state_name(event.job_state)
    return data
