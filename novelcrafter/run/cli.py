"""Commands: ``novelcrafter run`` and ``novelcrafter serve all`` (imports stay light)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from novelcrafter.cli import AllowUnauthenticatedOpt, StoreOpt, setting_option
from novelcrafter.config import (
    DEFAULT_INFERENCE_LISTEN,
    DEFAULT_INGEST_LISTEN,
    ConsoleSettings,
    InferenceSettings,
)


def run_command(
    book: Annotated[
        Path | None,
        typer.Argument(help="Book PDF to train on (default: the project's sample story, typeset now)"),
    ] = None,
    store: StoreOpt = None,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="Where logs, the store and the report go (default: runs/<time>)"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Plain lines, no per-step progress")] = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="The model card's full schedule (3 epochs, grad accum 8, lr 5e-5, max length 1024, "
            "no step budget) instead of the quick default",
        ),
    ] = False,
    max_steps_per_part: Annotated[
        int | None,
        typer.Option("--max-steps-per-part", help="Optimizer-step budget per part (0 = the full schedule)"),
    ] = None,
    parts: Annotated[int, typer.Option("--parts", help="Consecutive parts to train, in order")] = 10,
    chunk_sentences: Annotated[int, typer.Option("--chunk-sentences", help="Sentences per chunk")] = 10,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per sequence")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", help="Peak learning rate")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs per part")] = None,
    replay_fraction: Annotated[
        float | None,
        typer.Option(
            "--replay-fraction",
            help="Share of each part's training chunks replayed (seeded) from earlier parts, in [0, 1)",
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt continued by the base model and the tuned adapter")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (the same for both models)")] = 7,
    device: Annotated[str | None, typer.Option("--device", help="Trainer device: cpu or cuda")] = None,
    keep_services: Annotated[
        bool, typer.Option("--keep-services", help="Keep the services up after the report (until Ctrl-C)")
    ] = False,
) -> None:
    """The main job in one command: ingest a book, train all parts, compare base and tuned models.

    Runs the real services (ingest + coordinator, a trainer, inference) as local processes on loopback. Writes report.md, report.png and metrics.json into the run directory.
    """  # noqa: E501
    from novelcrafter.logs import configure_logging
    from novelcrafter.run.runner import DEFAULT_PROMPT, RunOptions, run

    configure_logging()
    options = RunOptions(
        book=book,
        store=store,
        run_dir=run_dir,
        quiet=quiet,
        full=full,
        parts=parts,
        chunk_sentences=chunk_sentences,
        max_steps_per_part=max_steps_per_part,
        max_length=max_length,
        learning_rate=learning_rate,
        epochs=epochs,
        replay_fraction=replay_fraction,
        prompt=prompt if prompt is not None else DEFAULT_PROMPT,
        max_new_tokens=max_new_tokens,
        seed=seed,
        device=device,
        keep_services=keep_services,
    )
    raise typer.Exit(run(options))


def serve_all_command(
    store: StoreOpt = None,
    ingest_listen: Annotated[
        str, typer.Option("--ingest-listen", help="Address of ingest + coordinator")
    ] = DEFAULT_INGEST_LISTEN,
    inference_listen: Annotated[
        str, typer.Option("--inference-listen", help="Address of inference")
    ] = DEFAULT_INFERENCE_LISTEN,
    http_listen: Annotated[str | None, setting_option(InferenceSettings, "http_listen")] = None,
    console_listen: Annotated[
        str | None, setting_option(ConsoleSettings, "console_listen", "--console-listen")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Trainer device: cpu or cuda")] = None,
    log_dir: Annotated[
        Path | None, typer.Option("--log-dir", help="One log file per service here (default: stdout)")
    ] = None,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """Ingest (with the coordinator), one trainer worker, inference and the web console on loopback,
    until Ctrl-C."""
    from novelcrafter.config import get_settings
    from novelcrafter.exposure import check_listen, check_secrets
    from novelcrafter.logs import configure_logging
    from novelcrafter.run.services import LocalServices, serve_forever

    configure_logging()
    settings = get_settings(
        ConsoleSettings,
        store=store,
        console_listen=console_listen,
        allow_unauthenticated=allow_unauthenticated,
    )
    http = get_settings(InferenceSettings, http_listen=http_listen)
    check_secrets(settings)
    # Refused here, once, rather than by each child after the others started.
    for listen, what in (
        (ingest_listen, "ingest"),
        (inference_listen, "inference"),
        (http.http_listen, "HTTP API"),
        (settings.console_listen, "console"),
    ):
        if listen.lower() != "off":
            check_listen(listen, what, settings)
    services = LocalServices(
        store=settings.store,
        log_dir=log_dir,
        ingest_listen=ingest_listen,
        inference_listen=inference_listen,
        http_listen=http.http_listen,
        console_listen=settings.console_listen,
        device=device,
        extra_env={"NOVELCRAFTER_ALLOW_UNAUTHENTICATED": "1"} if settings.allow_unauthenticated else {},
    )
    serve_forever(services)


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    app.command("run")(run_command)
    serve_app.command("all")(serve_all_command)
