"""``novelcrafter serve coordinator``, and the coordinator's client commands ``novelcrafter train``
and ``novelcrafter status`` (gRPC).

The coordinator is served by ``novelcrafter serve coordinator``, or hosted by ``novelcrafter
serve ingest`` beside IngestService (:mod:`novelcrafter.coordinator`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from novelcrafter.cli import (
    AllowUnauthenticatedOpt,
    BaseModelOpt,
    CoordinatorOpt,
    StoreOpt,
    setting_option,
)
from novelcrafter.config import DEFAULT_COORDINATOR_LISTEN, IngestSettings
from novelcrafter.train_settings import MAX_ATTEMPTS, LoraSettings, TrainSettings, default_text, help_of

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON on stdout (progress, if any, goes to stderr)")
]
RPC_TIMEOUT = 60.0
T = TypeVar("T")


def _help(name: str, settings: type = TrainSettings) -> str:
    """A training flag's help: the setting's declared meaning and default."""
    return f"{help_of(settings, name)} (default {default_text(getattr(settings(), name))})"


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("status")(status)
    serve_app.command("coordinator")(serve_coordinator_command)


def serve_coordinator_command(
    listen: Annotated[
        str | None, setting_option(IngestSettings, "listen", default=DEFAULT_COORDINATOR_LISTEN)
    ] = None,
    store: StoreOpt = None,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """Serve the job coordinator (JobService) on its own: any number of replicas on one database."""
    from novelcrafter.config import get_settings
    from novelcrafter.exposure import check_secrets

    from .server import serve_coordinator

    settings = get_settings(
        IngestSettings, listen=listen, store=store, allow_unauthenticated=allow_unauthenticated
    )
    check_secrets(settings)
    serve_coordinator(settings)


def _call(address: str, fn: Callable[[], T]) -> T:
    """Run an RPC; turn an unreachable coordinator into one actionable error."""
    import grpc

    from novelcrafter.errors import Unavailable, from_rpc_error

    try:
        return fn()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise Unavailable(
                f"cannot reach the job coordinator at {address} ({exc.details() or 'unavailable'}): "
                "start it with `novelcrafter serve coordinator` (or `serve ingest`, which hosts it) "
                "or point --coordinator / NOVELCRAFTER_COORDINATOR at it"
            ) from None
        raise from_rpc_error(exc) from None


def _job_json(message: Any) -> str:
    from google.protobuf import json_format

    return json.dumps(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
        indent=1,
    )


def train(
    book_id: Annotated[
        str, typer.Argument(help="The book to train on (its id, as `novelcrafter ingest` printed)")
    ],
    coordinator: CoordinatorOpt = None,
    epochs: Annotated[int | None, typer.Option(help=_help("epochs"))] = None,
    max_steps_per_part: Annotated[int | None, typer.Option(help=_help("max_steps_per_part"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=_help("learning_rate"))] = None,
    lora_r: Annotated[int | None, typer.Option(help=_help("r", LoraSettings))] = None,
    lora_alpha: Annotated[int | None, typer.Option(help=_help("alpha", LoraSettings))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=_help("grad_accum"))] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=_help("checkpoint_every"))] = None,
    seed: Annotated[int | None, typer.Option(help=_help("seed"))] = None,
    memorization_prompts: Annotated[int | None, typer.Option(help=_help("memorization_prompts"))] = None,
    memorization_new_tokens: Annotated[
        int | None, typer.Option(help=_help("memorization_new_tokens"))
    ] = None,
    style_prompts: Annotated[int | None, typer.Option(help=_help("style_prompts"))] = None,
    style_new_tokens: Annotated[int | None, typer.Option(help=_help("style_new_tokens"))] = None,
    replay_fraction: Annotated[float | None, typer.Option(help=_help("replay_fraction"))] = None,
    device: Annotated[
        str | None, typer.Option(help="Require workers of this device: cpu or cuda (default: any)")
    ] = None,
    init_adapter: Annotated[
        str | None,
        typer.Option(
            help="Start from an existing adapter: BOOK_ID/VERSION or BOOK_ID/latest (default: base model)"
        ),
    ] = None,
    base_model: BaseModelOpt = None,
    max_attempts: Annotated[
        int | None, typer.Option(help=f"Attempts per part before the job fails (default {MAX_ATTEMPTS})")
    ] = None,
    watch: Annotated[
        bool | None,
        typer.Option(
            "--watch/--no-watch",
            help="Follow the job until it ends (default: on a terminal, not with --json)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a training job for an ingested book on the coordinator, and follow it."""
    from novelcrafter.config import get_settings
    from novelcrafter.errors import FailedPrecondition, ResourceExhausted
    from novelcrafter.progress import follow_job, job_state_name
    from novelcrafter.rpc import connect
    from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

    settings = get_settings(coordinator=coordinator)
    config = common_pb2.JobConfig(
        base_model=base_model or "",
        device=device or "",
        init_adapter=init_adapter or "",
        max_attempts=max_attempts or 0,
    )
    # Zero means "default" in the API, so a flag of 0 would be silently ignored: refuse it here.
    for name, value in (
        ("--epochs", epochs),
        ("--max-length", max_length),
        ("--lr", lr),
        ("--lora-r", lora_r),
        ("--lora-alpha", lora_alpha),
        ("--grad-accum", grad_accum),
        ("--checkpoint-every", checkpoint_every),
        ("--max-attempts", max_attempts),
    ):
        if value is not None and value <= 0:
            from novelcrafter.errors import InvalidArgument

            raise InvalidArgument(f"{name} must be > 0 (got {value})")
    tr = config.training
    tr.epochs = epochs or 0
    tr.max_steps_per_part = max_steps_per_part or 0
    tr.max_length = max_length or 0
    tr.learning_rate = lr or 0.0
    tr.grad_accum = grad_accum or 0
    tr.checkpoint_every = checkpoint_every or 0
    tr.seed = seed or 0
    # Optional fields: set only when given, so an explicit 0 (off) reaches the coordinator.
    for name, value in (
        ("memorization_prompts", memorization_prompts),
        ("memorization_new_tokens", memorization_new_tokens),
        ("style_prompts", style_prompts),
        ("style_new_tokens", style_new_tokens),
    ):
        if value is not None:
            setattr(tr, name, value)
    if replay_fraction is not None:
        if not (math.isfinite(replay_fraction) and 0 <= replay_fraction < 1):
            from novelcrafter.errors import InvalidArgument

            raise InvalidArgument(f"--replay-fraction must be in [0, 1) (got {replay_fraction})")
        tr.replay_fraction = replay_fraction
    config.lora.r = lora_r or 0
    config.lora.alpha = lora_alpha or 0

    address = settings.coordinator
    follow = watch if watch is not None else (sys.stdout.isatty() and not as_json)
    # One channel for the whole run: the follower reconnects its stream on it, never a new one.
    with connect(address, settings) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = _call(
            address,
            lambda: stub.CreateJob(
                jobs_pb2.CreateJobRequest(book_id=book_id, config=config), timeout=RPC_TIMEOUT
            ),
        )
        progress_out = sys.stderr if as_json else sys.stdout
        print(
            f"created job {job.job_id} for book {job.book_id}: {len(job.parts)} parts",
            file=sys.stderr if as_json else sys.stdout,
            flush=True,
        )
        if follow:
            try:
                job = follow_job(channel, job.job_id, tty=progress_out.isatty(), out=progress_out)
            except KeyboardInterrupt:
                print(
                    f"stopped following; the job continues (see `novelcrafter status {job.job_id}`)",
                    file=sys.stderr,
                )
                raise
            except ResourceExhausted as exc:  # the coordinator's streams are all in use
                raise ResourceExhausted(
                    f"cannot follow job {job.job_id}: {exc.message}; the job continues "
                    f"(see `novelcrafter status {job.job_id}`)"
                ) from None
        if as_json:
            print(_job_json(job))
        if follow and job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise FailedPrecondition(
                f"job {job.job_id} {job_state_name(job.state)}: {job.error or 'no reason given'}"
            )


def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id: show its parts and metrics")] = None,
    coordinator: CoordinatorOpt = None,
    book: Annotated[str | None, typer.Option("--book", help="Only jobs of this book")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List training jobs, or show one job's parts with state and metrics."""
    from novelcrafter.config import get_settings
    from novelcrafter.progress import format_job, format_jobs
    from novelcrafter.rpc import connect
    from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

    settings = get_settings(coordinator=coordinator)
    address = settings.coordinator
    with connect(address, settings) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        if job_id:
            job = _call(
                address, lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)
            )
            print(_job_json(job) if as_json else format_job(job))
            return
        listing = _call(
            address, lambda: stub.ListJobs(jobs_pb2.ListJobsRequest(book_id=book or ""), timeout=RPC_TIMEOUT)
        )
        print(_job_json(listing) if as_json else format_jobs(list(listing.jobs)))
