"""``novelcrafter run``'s views of a job's progress: bars on a terminal, lines otherwise.

The run follows its job with the shared WatchJob follower (:func:`novelcrafter.progress.follow`,
with a watchdog on the service processes) and one of these views:

* :class:`BarView` (a terminal): an overall bar over parts, one bar per part's training
  (step, loss, tokens/s, ETA) and one for its evaluation, with finished-part results
  printed above the bars.
* :class:`LineView` (not a terminal, or ``--quiet``): one plain line per state change and
  result, and (unless quiet) a throttled progress line while a part trains.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from novelcrafter.progress import JobView, job_state_name, judged_bits, message_line, part_state_name
from novelcrafter.v1 import jobs_pb2


def metrics_line(part: int, m: jobs_pb2.PartMetrics) -> str:
    """One line with a finished part's results."""

    def f(x: float, d: int = 2) -> str:
        return f"{x:.{d}f}" if x and math.isfinite(x) else "-"

    change = ""
    if m.base_perplexity > 0 and m.adapter_perplexity > 0:
        change = f" ({(m.adapter_perplexity / m.base_perplexity - 1) * 100:+.1f}%)"
    judged = "".join(f", {bit}" for bit in judged_bits(m))
    return (
        f"part {part:02d} done: train loss {f(m.train_loss, 3)}, held-out perplexity "
        f"base {f(m.base_perplexity)} → adapter {f(m.adapter_perplexity)}{change}{judged}, "
        f"{m.steps} steps, {m.train_tokens} tokens, "
        f"{m.train_seconds:.0f} s train + {m.eval_seconds:.0f} s eval"
    )


class LineView(JobView):
    """Plain lines: state changes and results; training progress every ``every`` seconds."""

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False, every: float = 15.0) -> None:
        self.out = out or sys.stdout
        self.quiet = quiet
        self.every = every
        self._last_progress: dict[int, float] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        part = event.part_index
        if kind == "job_state":
            self._print(f"job {event.job_id}: {job_state_name(event.job_state).lower()}")
        elif kind == "part_state":
            self._print(f"part {part:02d}: {part_state_name(event.part_state).lower()}")
        elif kind == "metrics":
            self._print(metrics_line(part, event.metrics))
        elif kind == "message" and event.message:
            self._print(message_line(event))
        elif kind == "progress" and not self.quiet:
            p = event.progress
            now = time.monotonic()
            last_step = p.total_steps and p.step >= p.total_steps
            if p.phase == "train" and (now - self._last_progress.get(part, -1e9) >= self.every or last_step):
                self._last_progress[part] = now
                self._print(
                    f"part {part:02d}: step {p.step}/{p.total_steps} loss {p.loss:.3f} "
                    f"{p.tokens_per_second:.0f} tok/s"
                )
            elif p.phase and p.phase != "train" and p.message:
                self._print(f"part {part:02d}: {p.phase}: {p.message}")


class BarView(JobView):
    """Rich progress bars for a terminal."""

    def __init__(self, console: Any, parts: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(bar_width=32),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.overall = self.progress.add_task("job", total=parts, info="")
        self.train: dict[int, Any] = {}
        self.eval: dict[int, Any] = {}
        self.progress.start()

    def _train_task(self, part: int, total: int) -> Any:
        if part not in self.train:
            self.train[part] = self.progress.add_task(f"part {part:02d} train", total=total or None, info="")
        return self.train[part]

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        part = event.part_index
        if kind == "job_state":
            self.progress.update(self.overall, info=job_state_name(event.job_state).lower())
        elif kind == "part_state":
            state = event.part_state
            if state == jobs_pb2.PART_STATE_RUNNING:
                self._train_task(part, 0)
            elif state == jobs_pb2.PART_STATE_SUCCEEDED:
                # Its results line is printed above the bars; keep the live area small.
                self.progress.advance(self.overall)
                for tasks in (self.train, self.eval):
                    if part in tasks:
                        self.progress.remove_task(tasks.pop(part))
            elif state in (jobs_pb2.PART_STATE_FAILED, jobs_pb2.PART_STATE_CANCELLED):
                self.console.print(f"part {part:02d}: {part_state_name(state).lower()}", markup=False)
        elif kind == "metrics":
            if part in self.eval:
                self.progress.update(self.eval[part], total=1, completed=1, info="done")
            self.console.print(metrics_line(part, event.metrics), markup=False, highlight=False)
        elif kind == "message" and event.message:
            self.console.print(message_line(event), markup=False, highlight=False)
        elif kind == "progress":
            p = event.progress
            if p.phase == "train":
                task = self._train_task(part, p.total_steps)
                self.progress.update(
                    task,
                    completed=p.step,
                    total=p.total_steps or None,
                    info=f"loss {p.loss:.3f} · {p.tokens_per_second:.0f} tok/s",
                )
            elif p.phase == "eval":
                # The worker reports when evaluation starts (its step fields are the training
                # steps): a pulsing bar until the part's results arrive.
                if part not in self.eval:
                    self.eval[part] = self.progress.add_task(f"part {part:02d} eval", total=None, info="")
                self.progress.update(self.eval[part], info=p.message or "held-out perplexity")
            elif p.message:
                task = self._train_task(part, 0)
                self.progress.update(task, info=f"{p.phase}: {p.message}")

    def close(self) -> None:
        self.progress.stop()
