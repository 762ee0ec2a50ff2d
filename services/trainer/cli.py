"""``novelcrafter serve trainer``: a stateless trainer worker (the trainer container's entrypoint).

Module-level imports stay light: torch and transformers load inside the command.
"""

from __future__ import annotations

from typing import Annotated

import typer

from novelcrafter.errors import InvalidArgument

DEVICES = ("auto", "cpu", "cuda")


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    serve_app.command("trainer")(serve_trainer)


def serve_trainer(
    coordinator: Annotated[
        str | None,
        typer.Option(help="Job coordinator address [env NOVELCRAFTER_COORDINATOR, default 127.0.0.1:50051]"),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(help="Store URL: a path, file://PATH or s3://BUCKET/PREFIX [env NOVELCRAFTER_STORE]"),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="Base model to preload (name, hub id or path) [env NOVELCRAFTER_BASE_MODEL]"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    worker_id: Annotated[
        str | None, typer.Option(help="Name of this worker in leases and events [default HOST-PID]")
    ] = None,
    poll_seconds: Annotated[float, typer.Option(help="Wait between claims when there is no work")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Handle one part, then exit")] = False,
    max_parts: Annotated[
        int, typer.Option(help="Handle this many parts, then exit (0 = run until stopped)")
    ] = 0,
) -> None:
    """Claim parts from the coordinator, train, checkpoint, evaluate and publish them.

    SIGTERM: the current optimizer step finishes, a checkpoint is written, the part is
    released for another worker to resume, and the process exits 0.
    """
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging
    from novelcrafter.store import open_store

    if device not in DEVICES:
        raise InvalidArgument(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if poll_seconds <= 0:
        raise InvalidArgument("--poll-seconds must be > 0")
    if max_parts < 0:
        raise InvalidArgument("--max-parts must be >= 0")
    configure_logging()
    settings = get_settings(coordinator=coordinator, store=store, base_model=base_model)

    from novelcrafter.trainer.worker import serve

    code = serve(
        settings,
        open_store(settings=settings),
        device=device,
        worker_id=worker_id,
        poll_seconds=poll_seconds,
        max_parts=1 if once else max_parts,
    )
    raise typer.Exit(code)
