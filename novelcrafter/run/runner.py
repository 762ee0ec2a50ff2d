"""``novelcrafter run``: the whole job on one machine, through the real services.

Steps: a run directory → the book (the typeset sample by default) → ingest, trainer and
inference as local processes on loopback → ``IngestBook`` (upload stream) →
``JobService.CreateJob`` → follow ``WatchJob`` → per-part table → the same prompt
continued by the base model and by the tuned adapter → report files → services stopped.
Everything goes over gRPC between real processes, as in a deployment.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from novelcrafter.errors import InvalidArgument, NovelCrafterError, from_rpc_error

# The quick schedule `make run` uses by default: ~10 parts of a short book trained and
# evaluated within the 15-minute budget on a 2-core CPU. A short run needs a higher
# learning rate than the model card's 5e-5 (meant for 3 full epochs of long books with
# 100 warmup steps) to move the adapter measurably; --full restores the model card.
QUICK_TRAINING = {
    "epochs": 3,
    "batch_size": 1,
    "grad_accum": 1,
    "learning_rate": 1e-3,
    "warmup_steps": 1,
    "max_length": 384,
    "max_steps_per_part": 12,
    "eval_max_chunks": 8,
    # Memorization and style decode 32 tokens (the least an extraction needs) in one greedy pass
    # for base and adapter (trainer/decode.py). On this schedule a part trains 3-12 steps, so
    # judging is a larger share of it than on a full schedule: measured in `make run` on a
    # 2-core CPU, 1.7-2.4 s of judging against 10-17 s of training per part. --full keeps the
    # job defaults (16 prompts and 8 prompts, 48 tokens).
    "memorization_new_tokens": 32,
    "style_new_tokens": 32,
}
DEFAULT_PROMPT = (
    "On the night of the great storm, Mr. Crewe climbed the hundred and twelve steps of the lighthouse, and"
)
UPLOAD_CHUNK = 1 << 20


@dataclass
class RunOptions:
    book: Path | None = None  # None: the project's sample story, typeset into the run directory
    store: str | None = None  # None: <run dir>/store
    run_dir: Path | None = None  # None: runs/<timestamp>
    quiet: bool = False
    full: bool = False
    parts: int = 10
    chunk_sentences: int = 10
    max_steps_per_part: int | None = None
    max_length: int | None = None
    learning_rate: float | None = None
    epochs: int | None = None
    replay_fraction: float | None = None
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    temperature: float = 0.8
    seed: int = 7
    keep_services: bool = False
    device: str | None = None
    startup_timeout: float = 600.0
    stop_grace: float = 30.0
    tty: bool | None = None  # None: detect


@dataclass
class Phases:
    """Wall-clock seconds per phase, for the report."""

    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.monotonic)

    def mark(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.seconds[name] = round(now - since, 1)
        return now

    def total(self) -> None:
        self.seconds["total"] = round(time.monotonic() - self._start, 1)


def training_config(opts: RunOptions) -> dict[str, Any]:
    """The TrainingConfig fields for this run (0/absent = the model-card default)."""
    config: dict[str, Any] = {} if opts.full else dict(QUICK_TRAINING)
    for name, value in (
        ("max_steps_per_part", opts.max_steps_per_part),
        ("max_length", opts.max_length),
        ("learning_rate", opts.learning_rate),
        ("epochs", opts.epochs),
        ("replay_fraction", opts.replay_fraction),
    ):
        if value is not None:
            config[name] = value
    return config


def check_options(opts: RunOptions) -> None:
    """Refuse bad input before any service starts (one clear line each)."""
    if opts.book is not None:
        book = Path(opts.book)
        if not book.exists():
            raise InvalidArgument(f"book file not found: {book}")
        if not book.is_file():
            raise InvalidArgument(f"not a file: {book}")
        try:
            with open(book, "rb") as fh:
                head = fh.read(1024)
        except OSError as exc:
            raise InvalidArgument(f"cannot read {book}: {exc.strerror}") from exc
        if not head:
            raise InvalidArgument(f"{book} is empty")
        if b"%PDF" not in head:
            raise InvalidArgument(f"{book} is not a PDF")
    if not 1 <= opts.parts <= 1000:
        raise InvalidArgument(f"--parts must be in 1..1000 (got {opts.parts})")
    if not 1 <= opts.chunk_sentences <= 1000:
        raise InvalidArgument(f"--chunk-sentences must be in 1..1000 (got {opts.chunk_sentences})")
    if opts.max_steps_per_part is not None and opts.max_steps_per_part < 0:
        raise InvalidArgument(f"--max-steps-per-part must be >= 0 (got {opts.max_steps_per_part})")
    if opts.max_length is not None and not 16 <= opts.max_length <= 131072:
        raise InvalidArgument(f"--max-length must be in 16..131072 (got {opts.max_length})")
    if opts.learning_rate is not None and not (
        0 < opts.learning_rate < 1 and math.isfinite(opts.learning_rate)
    ):
        raise InvalidArgument(f"--learning-rate must be > 0 and < 1 (got {opts.learning_rate})")
    if opts.epochs is not None and opts.epochs < 1:
        raise InvalidArgument(f"--epochs must be >= 1 (got {opts.epochs})")
    if opts.replay_fraction is not None and not (
        math.isfinite(opts.replay_fraction) and 0 <= opts.replay_fraction < 1
    ):
        raise InvalidArgument(f"--replay-fraction must be in [0, 1) (got {opts.replay_fraction})")
    if not opts.prompt.strip():
        raise InvalidArgument("--prompt must not be empty")
    if not 1 <= opts.max_new_tokens <= 2048:
        raise InvalidArgument(f"--max-new-tokens must be in 1..2048 (got {opts.max_new_tokens})")
    if opts.device not in (None, "cpu", "cuda"):
        raise InvalidArgument(f"--device must be cpu or cuda (got {opts.device!r})")
    if opts.store and opts.store.startswith("s3://"):
        return
    if opts.run_dir is not None and Path(opts.run_dir).exists() and not Path(opts.run_dir).is_dir():
        raise InvalidArgument(f"--run-dir {opts.run_dir} exists and is not a directory")


def make_run_dir(requested: Path | None, root: Path = Path("runs")) -> Path:
    if requested is not None:
        path = Path(requested)
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path.resolve()
        except FileExistsError:
            continue
    raise NovelCrafterError(f"cannot create a run directory under {root}")


class Terminal:
    """Output: rich on a terminal, plain lines otherwise."""

    def __init__(self, tty: bool, quiet: bool) -> None:
        from rich.console import Console

        self.tty = tty
        self.quiet = quiet
        self.console = Console(highlight=False, soft_wrap=not tty) if tty else None

    def say(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(text)
        else:
            print(f"\n== {text} ==", flush=True)

    @property
    def width(self) -> int:
        if self.console is not None:
            return self.console.width
        return max(80, min(140, shutil.get_terminal_size((100, 24)).columns))


def run(opts: RunOptions) -> int:
    """Execute a run; returns the process exit code (0: the job succeeded)."""
    from novelcrafter.run.services import LocalServices, free_port

    check_options(opts)
    tty = sys.stdout.isatty() if opts.tty is None else opts.tty
    out = Terminal(tty and not opts.quiet, opts.quiet)
    phases = Phases()
    run_dir = make_run_dir(opts.run_dir)
    out.say(f"run directory: {run_dir}")
    book_path = _prepare_book(opts, run_dir, out)
    store = opts.store or str(run_dir / "store")
    services = LocalServices(
        store=store,
        log_dir=run_dir / "logs",
        device=opts.device,
        console_listen=f"127.0.0.1:{free_port()}" if opts.keep_services else "off",  # to look around after
    )
    restore = _signals_to_keyboard_interrupt()
    job_id = ""
    try:
        t = time.monotonic()
        out.say(f"starting services (logs in {run_dir / 'logs'}) ...")
        services.start()
        (run_dir / "services.json").write_text(json.dumps(services.describe(), indent=2) + "\n")
        services.wait_ready(
            timeout=opts.startup_timeout,
            on_ready=lambda child, s: out.say(f"  {child.name} ready ({s:.0f} s)"),
        )
        t = phases.mark("startup", t)
        with _channel(services.coordinator) as channel:
            manifest = ingest(channel, book_path, opts, out)
            t = phases.mark("ingest", t)
            job = create_job(channel, manifest.book_id, opts)
            job_id = job.job_id
            out.say(f"job {job_id}: {len(job.parts)} parts")
            job = _follow(channel, job_id, opts, out, services)
            t = phases.mark("training", t)
        rows = _rows(job)
        continuations = []
        failure = ""
        if any(r.adapter_version for r in rows):
            try:
                with _channel(services.inference) as channel:
                    continuations = generate_pair(
                        channel, manifest.book_id, _last_version(rows), opts, services
                    )
            except grpc.RpcError as exc:  # the report is still worth writing
                failure = f"generation failed: {from_rpc_error(exc).message}"
                out.say(failure)
            phases.mark("generation", t)
        phases.total()
        from novelcrafter.v1 import jobs_pb2

        if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            failure = f"job {job_id} {_job_state(job)}: {job.error or 'see the service logs'}"
        summary = _summary(opts, manifest, book_path, job, rows, continuations, phases, failure)
        paths = _write_report(run_dir, summary)
        show_results(out, summary, paths)
        if opts.keep_services:
            _serve_until_interrupted(out, services)
        if failure:
            raise NovelCrafterError(failure)
        return 0
    except KeyboardInterrupt:
        out.say("\ninterrupted: cancelling the job and stopping the services ...")
        if job_id:
            _cancel_quietly(services.coordinator, job_id, out)
        raise
    finally:
        services.stop(grace=opts.stop_grace, on_stop=lambda name: None)
        restore()
        out.say(f"services stopped; everything is in {run_dir}")


# --- steps --------------------------------------------------------------------------------------


def _prepare_book(opts: RunOptions, run_dir: Path, out: Terminal) -> Path:
    if opts.book is not None:
        return Path(opts.book).resolve()
    from novelcrafter.run.typeset import typeset_sample

    info = typeset_sample(run_dir / "book.pdf")
    out.say(
        f"sample book: {info.title!r}, {info.words} words typeset into {info.pages} pages "
        f"({info.hyphenated_lines} lines hyphenated) -> {info.path}"
    )
    return info.path


def _upload(book: Path, opts: RunOptions, advance: Any = None) -> Iterator[Any]:
    from novelcrafter.v1 import common_pb2, ingest_pb2

    size = book.stat().st_size
    params = common_pb2.IngestParams(
        chunk_sentences=opts.chunk_sentences,
        parts=opts.parts,
        test_fraction=0.1,
        seed=0,
        auto_reduce_parts=True,
    )
    meta = ingest_pb2.IngestMetadata(filename=book.name, params=params, size_bytes=size)
    yield ingest_pb2.IngestBookRequest(metadata=meta)
    with open(book, "rb") as fh:
        while chunk := fh.read(UPLOAD_CHUNK):
            if advance is not None:
                advance(len(chunk))
            yield ingest_pb2.IngestBookRequest(chunk=chunk)


def ingest(channel: Any, book: Path, opts: RunOptions, out: Terminal) -> Any:
    """Upload the book with ``IngestBook`` and return its manifest."""
    from novelcrafter.v1 import ingest_pb2_grpc

    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    size = book.stat().st_size
    if out.console is not None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=out.console,
        ) as bar:
            upload = bar.add_task("upload", total=size, info=f"{size / 1e6:.1f} MB")
            extract = bar.add_task("extract, clean, split", total=None, visible=False, info="ingest service")

            def advance(n: int) -> None:
                bar.advance(upload, n)
                if bar.tasks[upload].completed >= size:
                    bar.update(extract, visible=True)

            response = stub.IngestBook(_upload(book, opts, advance), timeout=1800)
            bar.update(extract, total=1, completed=1, info="done")
    else:
        out.say(f"ingesting {book.name} ({size / 1e6:.1f} MB): extract, clean, split ...")
        response = stub.IngestBook(_upload(book, opts), timeout=1800)
    m = response.manifest
    cleaning = ", ".join(f"{k} {v}" for k, v in sorted(m.cleaning.items()) if v)
    out.say(
        f"book {m.book_id} {m.title!r}: {m.pages} pages, {m.sentences} sentences, {m.chunks} chunks "
        f"in {len(m.parts)} parts{' (already ingested)' if response.already_existed else ''}"
    )
    if cleaning:
        out.say(f"  cleaning: {cleaning}")
    for warning in m.warnings:
        out.say(f"  warning: {warning}")
    if len(m.parts) != opts.parts:
        out.say(f"  note: {opts.parts} parts requested, the book has text for {len(m.parts)}")
    return m


def create_job(channel: Any, book_id: str, opts: RunOptions) -> Any:
    from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

    config = common_pb2.JobConfig(training=common_pb2.TrainingConfig(**training_config(opts)))
    if opts.device:
        config.device = opts.device
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    return stub.CreateJob(jobs_pb2.CreateJobRequest(book_id=book_id, config=config), timeout=60)


def _follow(channel: Any, job_id: str, opts: RunOptions, out: Terminal, services: Any) -> Any:
    from novelcrafter.progress import JobView, follow
    from novelcrafter.run.views import BarView, LineView

    view: JobView = BarView(out.console, parts=opts.parts) if out.console else LineView(quiet=opts.quiet)
    return follow(channel, job_id, view, watchdog=services.check_alive)


def generate_pair(channel: Any, book_id: str, expected: str, opts: RunOptions, services: Any) -> list[Any]:
    """The same prompt and seed through the base model and the book's latest adapter."""
    from novelcrafter.run.report import Continuation
    from novelcrafter.v1 import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    def generate(adapter: str) -> tuple[Any, float]:
        request = inference_pb2.GenerateRequest(
            prompt=opts.prompt,
            book_id=book_id,
            adapter=adapter,
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            seed=opts.seed,
        )
        t = time.monotonic()
        response = stub.Generate(request, timeout=600)
        return response, time.monotonic() - t

    # The adapter watcher may not have seen the last part yet: ask for a re-scan and
    # wait (briefly) until `latest` is the version this job published last.
    deadline = time.monotonic() + 60
    while expected:
        services.check_alive()
        try:
            listed = stub.ReloadAdapters(inference_pb2.ReloadAdaptersRequest(book_id=book_id), timeout=60)
            if any(a.latest and a.version.version == expected for a in listed.adapters):
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # Both at once: the server batches concurrent requests (and a seeded request gives the
    # same text alone or batched), so the comparison costs one generation's time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        tuned_future = pool.submit(generate, "latest")
        base, base_seconds = generate("base")
        tuned, seconds = tuned_future.result()
    return [
        Continuation(
            "base model", base.adapter.version or "base", base.text, base.completion_tokens, base_seconds
        ),
        Continuation("tuned adapter", tuned.adapter.version, tuned.text, tuned.completion_tokens, seconds),
    ]


# --- results ------------------------------------------------------------------------------------


def _rows(job: Any) -> list[Any]:
    from novelcrafter.run.report import rows_from_job

    return rows_from_job(job)


def _last_version(rows: list[Any]) -> str:
    versions = [r.adapter_version for r in rows if r.adapter_version]
    return versions[-1] if versions else ""


def _job_state(job: Any) -> str:
    from novelcrafter.progress import job_state_name

    return job_state_name(job.state).lower()


def _summary(
    opts: RunOptions,
    manifest: Any,
    book_path: Path,
    job: Any,
    rows: list[Any],
    continuations: list[Any],
    phases: Phases,
    failure: str = "",
) -> Any:
    from google.protobuf.json_format import MessageToDict

    from novelcrafter.run.report import RunSummary

    return RunSummary(
        title=manifest.title,
        book_id=manifest.book_id,
        book_path=str(book_path),
        job_id=job.job_id,
        job_state=_job_state(job).upper(),
        rows=rows,
        prompt=opts.prompt,
        continuations=continuations,
        config=MessageToDict(job.config, preserving_proto_field_name=True),
        book={
            "pages": manifest.pages,
            "sentences": manifest.sentences,
            "chunks": manifest.chunks,
            "words": manifest.words,
            "parts": len(manifest.parts),
            "cleaning": dict(manifest.cleaning),
        },
        timings=dict(phases.seconds),
        error=failure or job.error,
    )


def _write_report(run_dir: Path, summary: Any) -> dict[str, Path]:
    from novelcrafter.run.report import write_report

    return write_report(run_dir, summary)


def show_results(out: Terminal, summary: Any, paths: dict[str, Path]) -> None:
    from novelcrafter.run.report import format_table, side_by_side

    ppl = summary.perplexity
    out.heading("per-part results")
    if out.console is not None:
        out.console.print(_rich_table(summary.rows))
    else:
        out.say(format_table(summary.rows))
    if ppl.parts:
        verdict = "below" if ppl.improved else "NOT below"
        out.say(
            f"held-out perplexity on the book: base {ppl.base:.2f}, tuned adapter {ppl.adapter:.2f} "
            f"({(ppl.adapter / ppl.base - 1) * 100:+.1f}%): the adapter is {verdict} the base model"
        )
    if summary.continuations:
        out.heading("the same prompt, base model vs tuned adapter")
        left, right = summary.continuations
        if out.console is not None:
            out.console.print(_rich_pair(summary.prompt, left, right))
        else:
            out.say(side_by_side(left, right, width=out.width, prompt=summary.prompt))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in summary.timings.items())
    out.heading("report")
    out.say(f"time: {timings}")
    for name, path in paths.items():
        out.say(f"{name}: {path}")


def _rich_table(rows: list[Any]) -> Any:
    from rich.table import Table

    from novelcrafter.run.report import TABLE_HEADER, book_perplexity, table_cells, total_cells

    table = Table(show_footer=False)
    for i, name in enumerate(TABLE_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in table_cells(rows):
        table.add_row(*cells)
    table.add_section()
    table.add_row(*total_cells(rows, book_perplexity(rows)), style="bold")
    return table


def _rich_pair(prompt: str, left: Any, right: Any) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False, expand=True)
    table.add_column(Text(f"{left.label} [{left.version}]"), ratio=1)
    table.add_column(Text(f"{right.label} [{right.version}]"), ratio=1)
    cell = [Text(prompt, style="dim") + Text(c.text) for c in (left, right)]
    table.add_row(*cell)
    return table


# --- plumbing -----------------------------------------------------------------------------------


def _channel(address: str) -> Any:
    from novelcrafter.rpc import connect

    return connect(address)


def _cancel_quietly(coordinator: str, job_id: str, out: Terminal) -> None:
    """A run owns its job: cancel it so a later run on the same store does not resume it."""
    from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

    try:
        with _channel(coordinator) as channel:
            job = jobs_pb2_grpc.JobServiceStub(channel).CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job_id), timeout=5
            )
        out.say(f"job {job_id} {_job_state(job)}")
    except Exception as exc:
        out.say(f"job {job_id} could not be cancelled: {exc}")


def _serve_until_interrupted(out: Terminal, services: Any) -> None:
    out.say(
        f"services keep running (--keep-services): coordinator/ingest {services.coordinator}, "
        f"inference {services.inference}; Ctrl-C stops them"
    )
    if services.console_url:
        out.say(f"console: open {services.console_url} in a browser")
    try:
        while True:
            services.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        out.say("stopping the services ...")


def _signals_to_keyboard_interrupt() -> Any:
    """SIGTERM/SIGHUP end a run the way Ctrl-C does: job cancelled, services stopped."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
