"""The run's results: a per-part table, side-by-side continuations, a plot, report files.

Everything here works on plain data (:class:`PartRow`, :class:`Continuation`), built
from the job the coordinator returns, so it is testable without services.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLOT_NAME = "report.png"
REPORT_NAME = "report.md"
METRICS_NAME = "metrics.json"


@dataclass
class PartRow:
    """One trained part, as the table and the plot show it."""

    index: int
    state: str = "SUCCEEDED"
    steps: int = 0
    train_loss: float = math.nan
    base_perplexity: float = math.nan
    adapter_perplexity: float = math.nan
    train_tokens: int = 0
    eval_tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens_per_second: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    adapter_version: str = ""
    # {"base": {"extraction_rate", "longest_copied_tokens"}, "adapter": {…}, "prompts": N, "control": {…}}
    memorization: dict[str, Any] | None = None
    style: dict[str, Any] | None = None  # {"metric": name, "base": x, "adapter": y, "prompts": N}
    replayed_chunks: int = 0  # earlier parts' training chunks mixed in (replay)
    replay_tokens: int = 0  # of train_tokens, in replayed chunks

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.eval_seconds

    @property
    def change(self) -> float:
        """Relative change of held-out perplexity, adapter vs base (negative = better)."""
        if _ok(self.base_perplexity) and _ok(self.adapter_perplexity) and self.base_perplexity > 0:
            return self.adapter_perplexity / self.base_perplexity - 1.0
        return math.nan


@dataclass
class Continuation:
    label: str  # "base model" / "tuned adapter"
    version: str  # the exact adapter version that produced it ("base" for the base model)
    text: str
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class BookPerplexity:
    """Token-weighted held-out perplexity over all evaluated parts (exp of the mean NLL)."""

    base: float
    adapter: float
    eval_tokens: int
    parts: int

    @property
    def improved(self) -> bool:
        return _ok(self.base) and _ok(self.adapter) and self.adapter < self.base


def _ok(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def rows_from_job(job: Any) -> list[PartRow]:
    """Rows from a ``jobs_pb2.Job``."""
    from novelcrafter.progress import part_state_name

    rows = []
    for part in job.parts:
        m = part.metrics
        has_metrics = part.HasField("metrics")
        rows.append(
            PartRow(
                index=part.index,
                state=part_state_name(part.state),
                steps=m.steps,
                train_loss=m.train_loss if has_metrics else math.nan,
                base_perplexity=m.base_perplexity if has_metrics and m.base_perplexity > 0 else math.nan,
                adapter_perplexity=(
                    m.adapter_perplexity if has_metrics and m.adapter_perplexity > 0 else math.nan
                ),
                train_tokens=m.train_tokens,
                eval_tokens=m.eval_tokens,
                train_seconds=m.train_seconds,
                eval_seconds=m.eval_seconds,
                tokens_per_second=m.tokens_per_second,
                loss_curve=list(m.loss_curve),
                adapter_version=part.adapter_version,
                memorization=_memorization(m) if has_metrics and m.HasField("memorization") else None,
                style=_style(m) if has_metrics and m.HasField("style") else None,
                replayed_chunks=m.replayed_chunks,
                replay_tokens=m.replay_tokens,
            )
        )
    return rows


def _extraction(e: Any) -> dict[str, Any]:
    return {"extraction_rate": e.extraction_rate, "longest_copied_tokens": e.longest_copied_tokens}


def _memorization(m: Any) -> dict[str, Any]:
    mem = m.memorization
    return {
        "base": _extraction(mem.base),
        "adapter": _extraction(mem.adapter),
        "prompts": mem.prompts,
        "control": {
            "base": _extraction(mem.control_base),
            "adapter": _extraction(mem.control_adapter),
            "prompts": mem.control_prompts,
        },
    }


def _style(m: Any) -> dict[str, Any]:
    return {
        "metric": m.style.metric,
        "base": m.style.base,
        "adapter": m.style.adapter,
        "prompts": m.style.prompts,
    }


def book_perplexity(rows: Sequence[PartRow]) -> BookPerplexity:
    """Combine per-part perplexities weighted by held-out tokens: exp(Σ n·log ppl / Σ n).

    Each part's perplexity is exp(its mean NLL), so this is exactly the perplexity over
    all held-out tokens (base model vs each part's adapter on its own part).
    """
    use = [r for r in rows if _ok(r.base_perplexity) and _ok(r.adapter_perplexity)]
    weights = [max(r.eval_tokens, 1) for r in use]
    total = sum(weights)
    if not use:
        return BookPerplexity(math.nan, math.nan, 0, 0)

    def mean(values: Iterable[float]) -> float:
        return math.exp(sum(w * math.log(v) for w, v in zip(weights, values, strict=True)) / total)

    return BookPerplexity(
        base=mean(r.base_perplexity for r in use),
        adapter=mean(r.adapter_perplexity for r in use),
        eval_tokens=sum(r.eval_tokens for r in use),
        parts=len(use),
    )


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float | int) and math.isfinite(x) else "-"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%" if math.isfinite(x) else "-"


TABLE_HEADER = (
    "part",
    "steps",
    "train loss",
    "ppl base",
    "ppl adapter",
    "change",
    "extracted base/adapter",
    "style base/adapter",
    "tokens",
    "time s",
)


def _extracted_cell(memorization: dict[str, Any] | None) -> str:
    """``0/16 → 3/16`` training prompts extracted (longest copied run in brackets)."""
    if not memorization or not memorization.get("prompts"):
        return "-"
    n = memorization["prompts"]

    def one(side: dict[str, Any]) -> str:
        return f"{round(side['extraction_rate'] * n)}/{n} ({side['longest_copied_tokens']})"

    return f"{one(memorization['base'])} → {one(memorization['adapter'])}"


def _style_cell(style: dict[str, Any] | None) -> str:
    return f"{_f(style['base'], 3)} → {_f(style['adapter'], 3)}" if style else "-"


def table_cells(rows: Sequence[PartRow]) -> list[tuple[str, ...]]:
    cells = []
    for r in rows:
        cells.append(
            (
                f"{r.index:02d}" + ("" if r.state == "SUCCEEDED" else f" ({r.state.lower()})"),
                str(r.steps),
                _f(r.train_loss, 3),
                _f(r.base_perplexity),
                _f(r.adapter_perplexity),
                _pct(r.change),
                _extracted_cell(r.memorization),
                _style_cell(r.style),
                str(r.train_tokens),
                _f(r.seconds, 1),
            )
        )
    return cells


def total_cells(rows: Sequence[PartRow], book: BookPerplexity) -> tuple[str, ...]:
    change = book.adapter / book.base - 1 if _ok(book.base) and _ok(book.adapter) else math.nan
    return (
        "book",
        str(sum(r.steps for r in rows)),
        "",
        _f(book.base),
        _f(book.adapter),
        _pct(change),
        "",
        "",
        str(sum(r.train_tokens for r in rows)),
        _f(sum(r.seconds for r in rows), 1),
    )


def format_table(rows: Sequence[PartRow]) -> str:
    """A plain fixed-width table (stdout when not a terminal, logs, tests)."""
    body = [*table_cells(rows), total_cells(rows, book_perplexity(rows))]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(TABLE_HEADER)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(TABLE_HEADER), rule, *(line(c) for c in body[:-1]), rule, line(body[-1])])


def markdown_table(rows: Sequence[PartRow]) -> str:
    body = [*table_cells(rows), total_cells(rows, book_perplexity(rows))]
    out = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 1)) + "|",
    ]
    for i, cells in enumerate(body):
        cells = tuple(f"**{c}**" if i == len(body) - 1 and c else c for c in cells)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def side_by_side(left: Continuation, right: Continuation, width: int = 100, prompt: str = "") -> str:
    """Two continuations in two wrapped columns, titled with the version that wrote each."""
    col = max(24, (width - 3) // 2)

    def column(c: Continuation) -> list[str]:
        lines = [f"{c.label} [{c.version}]"[:col], "-" * col]
        for para in (prompt + c.text).split("\n"):
            lines.extend(textwrap.wrap(para, col) or [""])
        return lines

    a, b = column(left), column(right)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x.ljust(col)} | {y}".rstrip() for x, y in zip(a, b, strict=True))


def plot(rows: Sequence[PartRow], path: Path, title: str = "") -> Path:
    """Training loss across all parts (left) and held-out perplexity per part (right)."""
    import logging

    # The first import on a machine builds matplotlib's font cache and says so on its logger
    # ("generated new fontManager", "building the font cache"): not part of the report.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = any(r.memorization or r.style for r in rows)
    fig, axes = plt.subplots(1, 3 if judged else 2, figsize=(18 if judged else 12, 4.5), dpi=110)
    ax_loss, ax_ppl = axes[0], axes[1]
    step0 = 0
    colors = plt.get_cmap("viridis")
    n = max(len(rows), 1)
    for i, r in enumerate(rows):
        if not r.loss_curve:
            continue
        xs = list(range(step0 + 1, step0 + len(r.loss_curve) + 1))
        ax_loss.plot(xs, r.loss_curve, color=colors(i / n), linewidth=1.4, label=f"part {r.index:02d}")
        if step0:
            ax_loss.axvline(step0 + 0.5, color="0.85", linewidth=0.8, zorder=0)
        step0 += len(r.loss_curve)
    ax_loss.set_xlabel("optimizer step (all parts, in order)")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_title("Training loss across parts")
    ax_loss.grid(alpha=0.3)
    if 1 < len(rows) <= 12:
        ax_loss.legend(fontsize=7, ncol=2)

    parts = [r.index for r in rows]
    ax_ppl.plot(parts, [r.base_perplexity for r in rows], "o--", color="tab:gray", label="base model")
    ax_ppl.plot(parts, [r.adapter_perplexity for r in rows], "o-", color="tab:red", label="tuned adapter")
    ax_ppl.set_xlabel("part")
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_title("Held-out perplexity per part")
    ax_ppl.set_xticks(parts)
    ax_ppl.grid(alpha=0.3)
    ax_ppl.legend()
    if judged:
        _plot_judged(axes[2], rows)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _plot_judged(ax: Any, rows: Sequence[PartRow]) -> None:
    """Style distance per part (lines) and the share of training prompts extracted (bars)."""
    parts = [r.index for r in rows]
    for side, fmt, color in (("base", "o--", "tab:gray"), ("adapter", "o-", "tab:red")):
        values = [r.style[side] if r.style else math.nan for r in rows]
        ax.plot(parts, values, fmt, color=color, label=f"style distance, {side}")
    ax.set_xlabel("part")
    ax.set_ylabel("style distance to the book (lower = closer)")
    metric = next((r.style["metric"] for r in rows if r.style), "")
    ax.set_title(f"Style ({metric}) and memorization" if metric else "Memorization")
    ax.set_xticks(parts)
    ax.grid(alpha=0.3)
    rate = ax.twinx()
    for offset, side, color in ((-0.2, "base", "0.7"), (0.2, "adapter", "tab:orange")):
        values = [r.memorization[side]["extraction_rate"] if r.memorization else 0.0 for r in rows]
        rate.bar(
            [p + offset for p in parts], values, width=0.4, color=color, alpha=0.5, label=f"extracted, {side}"
        )
    rate.set_ylim(0, 1)
    rate.set_ylabel("share of training prompts extracted")
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = rate.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, fontsize=7)


@dataclass
class RunSummary:
    """Everything the report says about one run."""

    title: str
    book_id: str
    book_path: str
    job_id: str
    job_state: str
    rows: list[PartRow]
    prompt: str
    continuations: list[Continuation]
    config: dict[str, Any] = field(default_factory=dict)
    book: dict[str, Any] = field(default_factory=dict)  # manifest summary
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    error: str = ""

    @property
    def perplexity(self) -> BookPerplexity:
        return book_perplexity(self.rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(run_dir: Path, summary: RunSummary) -> dict[str, Path]:
    """Write metrics.json, report.png and report.md into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ppl = summary.perplexity
    metrics = {
        "title": summary.title,
        "book_id": summary.book_id,
        "book_path": summary.book_path,
        "job_id": summary.job_id,
        "job_state": summary.job_state,
        "error": summary.error,
        "book": summary.book,
        "config": summary.config,
        "parts": [asdict(r) | {"seconds": r.seconds, "change": r.change} for r in summary.rows],
        "book_perplexity": asdict(ppl) | {"improved": ppl.improved},
        "prompt": summary.prompt,
        "continuations": [asdict(c) for c in summary.continuations],
        "timings": summary.timings,
    }
    paths = {"metrics": run_dir / METRICS_NAME, "plot": run_dir / PLOT_NAME, "report": run_dir / REPORT_NAME}
    _atomic_text(paths["metrics"], json.dumps(_json_safe(metrics), indent=2) + "\n")
    plot(summary.rows, paths["plot"], title=f"{summary.title} — job {summary.job_id}")
    _atomic_text(paths["report"], render_markdown(summary))
    return paths


def render_markdown(summary: RunSummary) -> str:
    ppl = summary.perplexity
    verdict = (
        f"The tuned adapter's held-out perplexity on the book is **{ppl.adapter:.2f}** against the base "
        f"model's **{ppl.base:.2f}** ({(ppl.adapter / ppl.base - 1) * 100:+.1f}%, token-weighted over "
        f"{ppl.parts} parts, {ppl.eval_tokens} held-out tokens)."
        if _ok(ppl.base) and _ok(ppl.adapter)
        else "No held-out perplexity was measured."
    )
    lines = [
        f"# NovelCrafter run: {summary.title}",
        "",
        f"- book: `{summary.book_id}` ({summary.book_path})",
        f"- job: `{summary.job_id}` — {summary.job_state.lower()}",
    ]
    if summary.book:
        b = summary.book
        lines.append(
            f"- text: {b.get('pages', '?')} pages, {b.get('sentences', '?')} sentences, "
            f"{b.get('chunks', '?')} chunks in {b.get('parts', '?')} parts"
        )
    if summary.timings:
        lines.append("- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary.timings.items()))
    if summary.error:
        lines.append(f"- error: {summary.error}")
    lines += ["", verdict, "", f"![training loss and held-out perplexity]({PLOT_NAME})", ""]
    lines += ["## Parts", "", markdown_table(summary.rows), ""]
    styled = next((r.style for r in summary.rows if r.style), None)
    if styled or any(r.memorization for r in summary.rows):
        lines += [
            "*extracted*: training chunks whose first 32 greedily decoded tokens after a 32-token prompt "
            "are the book's own (longest run of copied tokens in brackets), base → adapter. "
            + (f"*style*: {styled['metric']} to the book's held-out text, lower = closer. " if styled else "")
            + "Eval time is in *time s*; metrics.json has each part's eval_seconds.",
            "",
        ]
    if summary.continuations:
        lines += ["## The same prompt, base model and tuned adapter", ""]
        lines += [f"Prompt: *{summary.prompt.strip()}*", ""]
        for c in summary.continuations:
            lines += [f"### {c.label} (`{c.version}`)", ""]
            quoted = (summary.prompt + c.text).strip().split("\n")
            lines += ["> " + line for line in quoted]
            lines.append("")
    if summary.config:
        lines += ["## Configuration", "", "```json", json.dumps(summary.config, indent=2), "```", ""]
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
