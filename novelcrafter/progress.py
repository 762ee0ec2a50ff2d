"""Following a training job: the one WatchJob follower, its views, and job text.

:func:`follow` streams a job's events into a :class:`JobView` until the job finishes and
returns the final :class:`jobs_pb2.Job`. A coordinator restart or a dropped connection is
survived: the stream is reopened after the last event seen. Views decide what is shown:

* :class:`RichView` (the CLI on a terminal): one progress bar per part;
* :class:`PlainView` (the CLI otherwise): plain, throttled log lines;
* :class:`CallbackView`: hands each event to a function (the console's event stream);
* ``novelcrafter run`` has its own views (:mod:`novelcrafter.run.views`).

``follow_job(channel, job_id, tty=...)`` is :func:`follow` with the CLI's view.

``format_jobs(jobs)`` and ``format_job(job)`` render job lists and per-part metrics tables
(used by ``novelcrafter status``, ``train`` and ``run``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import grpc

from novelcrafter.errors import Unavailable, from_rpc_error
from novelcrafter.retry import WATCH_BACKOFF
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
PROGRESS_LINE_SECONDS = 2.0  # plain mode: at most one progress line per part this often

EventCallback = Callable[[jobs_pb2.JobEvent], None]


def job_state_name(state: int) -> str:
    """``SUCCEEDED`` for ``JOB_STATE_SUCCEEDED``."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def part_state_name(state: int) -> str:
    """``RUNNING`` for ``PART_STATE_RUNNING``."""
    return jobs_pb2.PartState.Name(state).removeprefix("PART_STATE_")


# --- views ---------------------------------------------------------------------------------------


class JobView:
    """What the follower shows; every method does nothing unless a view overrides it."""

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        """Every event of the stream, in order (replayed ones first)."""

    def note(self, text: str) -> None:
        """A word from the follower itself (e.g. "coordinator unreachable, reconnecting…")."""

    def finish(self, job: jobs_pb2.Job) -> None:
        """The job ended (SUCCEEDED, FAILED or CANCELLED)."""

    def close(self) -> None:
        """Following is over, whatever the outcome."""


class CallbackView(JobView):
    """Hands every event to ``callback`` and shows nothing itself."""

    def __init__(self, callback: EventCallback) -> None:
        self.callback = callback

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        self.callback(event)


# --- following ---------------------------------------------------------------------------------


def follow_job(
    channel: grpc.Channel,
    job_id: str,
    *,
    tty: bool,
    on_event: EventCallback | None = None,
    out: TextIO | None = None,
    after_sequence: int = 0,
    reconnect_seconds: float = 120.0,
) -> jobs_pb2.Job:
    """:func:`follow` with the CLI's view: progress bars (``tty``) or plain log lines,
    written to ``out`` (stdout). ``on_event`` is called with every event before it is shown
    (e.g. to collect metrics)."""
    out = out or sys.stdout
    view: JobView = RichView(out) if tty else PlainView(out)
    return follow(
        channel,
        job_id,
        view,
        on_event=on_event,
        after_sequence=after_sequence,
        reconnect_seconds=reconnect_seconds,
    )


def follow(
    channel: grpc.Channel,
    job_id: str,
    view: JobView,
    *,
    on_event: EventCallback | None = None,
    after_sequence: int = 0,
    reconnect_seconds: float = 120.0,
    watchdog: Callable[[], None] | None = None,
) -> jobs_pb2.Job:
    """Stream the job's events (replayed after ``after_sequence``, then live) into ``view``
    until it is SUCCEEDED, FAILED or CANCELLED, and return the final job; ``view.close()``
    is called at the end, whatever the outcome.

    ``on_event``: called with every event before the view gets it.
    While the coordinator is unreachable the stream is reopened for up to
    ``reconnect_seconds`` before :class:`~novelcrafter.errors.Unavailable` is raised;
    any other RPC error is raised as the matching domain error.
    ``watchdog``: called about once a second from another thread; if it raises (e.g. a
    service process died), the channel is closed and that exception is raised here.
    """
    if watchdog is None:
        return _follow(channel, job_id, view, on_event, after_sequence, reconnect_seconds)
    failures: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            try:
                watchdog()
            except BaseException as exc:
                failures.append(exc)
                channel.close()
                return

    threading.Thread(target=watch, name="job-watchdog", daemon=True).start()
    try:
        return _follow(channel, job_id, view, on_event, after_sequence, reconnect_seconds)
    except BaseException:
        if failures:
            raise failures[0] from None
        raise
    finally:
        done.set()


def _follow(
    channel: grpc.Channel,
    job_id: str,
    view: JobView,
    on_event: EventCallback | None,
    after_sequence: int,
    reconnect_seconds: float,
) -> jobs_pb2.Job:
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    last = after_sequence
    outage_since: float | None = None
    delays = WATCH_BACKOFF.delays()
    try:
        while True:
            try:
                for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)):
                    outage_since, delays = None, WATCH_BACKOFF.delays()
                    last = max(last, event.sequence)
                    if on_event:
                        on_event(event)
                    view.on_event(event)
                # The stream ends when the job is terminal, or when the coordinator shuts down.
                job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))
                if job.state in TERMINAL:
                    view.finish(job)
                    return job
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(exc) from None
                if outage_since is None:
                    outage_since = time.monotonic()
                    view.note("coordinator unreachable, reconnecting…")
                elif time.monotonic() - outage_since > reconnect_seconds:
                    raise Unavailable(
                        f"lost the coordinator for more than {reconnect_seconds:.0f}s while following "
                        f"job {job_id}: {exc.details() or 'unavailable'}"
                    ) from None
            time.sleep(next(delays))
    finally:
        view.close()


class PlainView(JobView):
    """Plain lines for logs and pipes: every state change and result, throttled progress."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._last_progress: dict[int, float] = {}

    def _print(self, text: str, when: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(when or time.time()))
        print(f"{stamp} {text}", file=self.out, flush=True)

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "job_state" and event.job_state in TERMINAL:
            return  # finish() prints the outcome with a summary
        if kind == "progress":
            p = event.progress
            now = time.monotonic()
            final = p.total_steps and p.step >= p.total_steps
            if not final and now - self._last_progress.get(event.part_index, 0.0) < PROGRESS_LINE_SECONDS:
                return
            self._last_progress[event.part_index] = now
        text = describe_event(event)
        if text:
            self._print(text, event.time)

    def note(self, text: str) -> None:
        self._print(text)

    def finish(self, job: jobs_pb2.Job) -> None:
        done = sum(p.state == jobs_pb2.PART_STATE_SUCCEEDED for p in job.parts)
        tail = f": {job.error}" if job.error and job.state != jobs_pb2.JOB_STATE_SUCCEEDED else ""
        self._print(f"job {job.job_id} {job_state_name(job.state)} ({done}/{len(job.parts)} parts){tail}")


class RichView(JobView):
    """One progress bar per part; messages and metrics printed above the bars."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=out)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[int, Any] = {}
        self.progress.start()

    def _task(self, part: int) -> Any:
        if part not in self.tasks:
            self.tasks[part] = self.progress.add_task(f"part {part:02d}", total=None, info="")
        return self.tasks[part]

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        part = event.part_index
        if kind == "progress":
            p = event.progress
            info = f"loss {p.loss:.4f}" if p.loss else ""
            if p.tokens_per_second:
                info += f" · {p.tokens_per_second:,.0f} tok/s"
            if p.phase and p.phase != "train":
                info += f" · {p.phase}"
            self.progress.update(
                self._task(part), total=p.total_steps or None, completed=p.step, info=info.strip(" ·")
            )
        elif kind == "part_state":
            state = event.part_state
            if state == jobs_pb2.PART_STATE_RUNNING:
                self._task(part)
            if part in self.tasks or state in (jobs_pb2.PART_STATE_SUCCEEDED, jobs_pb2.PART_STATE_FAILED):
                task = self._task(part)
                name = part_state_name(state).lower()
                if state == jobs_pb2.PART_STATE_SUCCEEDED:
                    total = self.progress.tasks[task].total
                    self.progress.update(task, completed=total or 1, total=total or 1, info="done")
                else:
                    self.progress.update(task, info=name)
        elif kind in ("metrics", "message") or (kind == "job_state" and event.job_state not in TERMINAL):
            text = describe_event(event)
            if text:
                self.progress.console.print(text, markup=False, highlight=False)

    def note(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def finish(self, job: jobs_pb2.Job) -> None:
        self.progress.stop()
        done = sum(p.state == jobs_pb2.PART_STATE_SUCCEEDED for p in job.parts)
        tail = f": {job.error}" if job.error and job.state != jobs_pb2.JOB_STATE_SUCCEEDED else ""
        self.console.print(
            f"job {job.job_id} {job_state_name(job.state)} ({done}/{len(job.parts)} parts){tail}",
            markup=False,
            highlight=False,
        )

    def close(self) -> None:
        self.progress.stop()


# --- text ----------------------------------------------------------------------------------------


def describe_event(event: jobs_pb2.JobEvent) -> str:
    """One human line for an event ("" for nothing worth a line)."""
    kind = event.WhichOneof("event")
    part = f"part {event.part_index:02d}" if event.part_index >= 0 else "job"
    if kind == "job_state":
        return f"job {event.job_id} {job_state_name(event.job_state)}"
    if kind == "part_state":
        return f"{part} {part_state_name(event.part_state)}"
    if kind == "message":
        return message_line(event)
    if kind == "metrics":
        return f"{part} results: {format_metrics(event.metrics)}"
    if kind == "progress":
        p = event.progress
        bits = [f"{part}"]
        if p.phase and p.phase != "train":
            bits.append(p.phase)
        if p.total_steps:
            bits.append(f"step {p.step}/{p.total_steps}")
        elif p.step:
            bits.append(f"step {p.step}")
        if p.loss:
            bits.append(f"loss {p.loss:.4f}")
        if p.learning_rate:
            bits.append(f"lr {p.learning_rate:.2e}")
        if p.tokens_per_second:
            bits.append(f"{p.tokens_per_second:,.0f} tok/s")
        if p.message:
            bits.append(p.message)
        return " ".join(bits)
    return ""


def message_line(event: jobs_pb2.JobEvent) -> str:
    """A coordinator message, prefixed with its part unless it already names it."""
    where = f"part {event.part_index:02d}"
    if event.part_index < 0 or event.message.startswith(where):
        return event.message
    return f"{where}: {event.message}"


def judged_bits(metrics: jobs_pb2.PartMetrics) -> list[str]:
    """Memorization and style of a part, when they were measured."""
    bits = []
    if metrics.HasField("memorization"):
        m = metrics.memorization

        def extraction(e: jobs_pb2.Extraction) -> str:
            return f"{e.extraction_rate:.0%} extracted (longest run {e.longest_copied_tokens})"

        line = f"memorization on {m.prompts} training prompts base {extraction(m.base)}"
        line += f" → adapter {extraction(m.adapter)}"
        if m.control_prompts:
            line += f", held-out control adapter {extraction(m.control_adapter)}"
        bits.append(line)
    if metrics.HasField("style"):
        st = metrics.style
        bits.append(f"style {st.metric} base {st.base:.3f} → adapter {st.adapter:.3f} (lower = closer)")
    return bits


def format_metrics(metrics: jobs_pb2.PartMetrics) -> str:
    """``train loss 2.3142 · perplexity base 35.20 → adapter 28.10 · earlier p00 30.12 · …``"""
    bits = []
    if metrics.train_loss:
        bits.append(f"train loss {metrics.train_loss:.4f}")
    if metrics.base_perplexity or metrics.adapter_perplexity:
        bits.append(
            f"perplexity base {metrics.base_perplexity:.2f} → adapter {metrics.adapter_perplexity:.2f}"
        )
    if metrics.earlier_perplexity:
        earlier = " ".join(f"p{k:02d} {v:.2f}" for k, v in sorted(metrics.earlier_perplexity.items()))
        bits.append(f"earlier parts {earlier}")
    bits += judged_bits(metrics)
    if metrics.steps:
        bits.append(f"{metrics.steps} steps")
    if metrics.train_tokens:
        bits.append(f"{metrics.train_tokens:,} tokens")
    if metrics.train_seconds:
        speed = f", {metrics.tokens_per_second:,.0f} tok/s" if metrics.tokens_per_second else ""
        bits.append(f"{metrics.train_seconds:.1f}s train{speed}")
    if metrics.eval_seconds:
        bits.append(f"{metrics.eval_seconds:.1f}s eval")
    if metrics.device:
        bits.append(metrics.device)
    return " · ".join(bits) or "(no metrics)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    return "\n".join(lines)


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if value else "-"


def _ago(when: float) -> str:
    if not when:
        return "-"
    seconds = max(0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def format_jobs(jobs: list[jobs_pb2.Job]) -> str:
    """A table of jobs: id, book, state, parts done, the running part, age, error."""
    if not jobs:
        return "no jobs"
    rows = []
    for job in jobs:
        done = sum(p.state == jobs_pb2.PART_STATE_SUCCEEDED for p in job.parts)
        running = [p for p in job.parts if p.state == jobs_pb2.PART_STATE_RUNNING]
        current = "-"
        if running:
            p = running[0]
            current = f"part {p.index:02d} step {p.step}/{p.total_steps or '?'}"
        rows.append(
            [
                job.job_id,
                job.book_id,
                job_state_name(job.state),
                f"{done}/{len(job.parts)}",
                current,
                _ago(job.created_at),
                (job.error[:60] + "…") if len(job.error) > 60 else job.error,
            ]
        )
    return _table(["JOB", "BOOK", "STATE", "PARTS", "CURRENT", "CREATED", "ERROR"], rows)


def format_job(job: jobs_pb2.Job) -> str:
    """A job's header, config summary and per-part table with its metrics."""
    cfg, tr, lora = job.config, job.config.training, job.config.lora
    lines = [
        f"job      {job.job_id}",
        f"book     {job.book_id}",
        f"state    {job_state_name(job.state)}" + (f" ({job.error})" if job.error else ""),
        f"model    {cfg.base_model}" + (f" from adapter {cfg.init_adapter}" if cfg.init_adapter else ""),
        f"config   LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout:g} "
        f"targets={','.join(lora.target_modules)}; epochs={tr.epochs} lr={tr.learning_rate:g} "
        f"batch={tr.batch_size}x{tr.grad_accum} max_length={tr.max_length}"
        + (f" max_steps/part={tr.max_steps_per_part}" if tr.max_steps_per_part else "")
        + (f" device={cfg.device}" if cfg.device else ""),
        f"created  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.created_at))}",
        "",
    ]
    rows = []
    for p in job.parts:
        mt = p.metrics
        steps = f"{p.step}/{p.total_steps}" if p.total_steps else (str(p.step) if p.step else "-")
        where = p.adapter_version or p.worker_id or ""
        rows.append(
            [
                f"{p.index:02d}",
                part_state_name(p.state),
                str(p.attempts),
                steps,
                _num(mt.train_loss, ".4f"),
                _num(mt.base_perplexity, ".2f"),
                _num(mt.adapter_perplexity, ".2f"),
                f"{mt.train_tokens:,}" if mt.train_tokens else "-",
                f"{mt.train_seconds + mt.eval_seconds:.1f}s" if mt.train_seconds or mt.eval_seconds else "-",
                where,
            ]
        )
    header = [
        "PART",
        "STATE",
        "FAILS",
        "STEP",
        "LOSS",
        "BASE_PPL",
        "ADAPTER_PPL",
        "TOKENS",
        "TIME",
        "VERSION/WORKER",
    ]
    lines.append(_table(header, rows))
    for p in job.parts:
        if p.metrics.earlier_perplexity:
            earlier = ", ".join(f"p{k:02d} {v:.2f}" for k, v in sorted(p.metrics.earlier_perplexity.items()))
            lines.append(f"part {p.index:02d} adapter perplexity on earlier parts: {earlier}")
        lines += [f"part {p.index:02d} {bit}" for bit in judged_bits(p.metrics)]
        if p.error and p.state != jobs_pb2.PART_STATE_SUCCEEDED:
            lines.append(f"part {p.index:02d} last error: {p.error}")
    return "\n".join(lines)
