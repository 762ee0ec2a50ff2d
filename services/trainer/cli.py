"""``novelcrafter serve trainer``: a stateless trainer worker (the trainer container's entrypoint).

Module-level imports stay light: torch and transformers load inside the command.
"""

from __future__ import annotations

from typing import Annotated

import typer

from novelcrafter.cli import AllowUnauthenticatedOpt, BaseModelOpt, CoordinatorOpt, StoreOpt, setting_option
from novelcrafter.config import Settings, TrainerSettings
from novelcrafter.errors import InvalidArgument

DEVICES = ("auto", "cpu", "cuda")


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    serve_app.command("trainer")(serve_trainer)


def serve_trainer(
    coordinator: CoordinatorOpt = None,
    store: StoreOpt = None,
    base_model: BaseModelOpt = None,
    device: Annotated[str | None, setting_option(Settings, "device")] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="Name of this worker in leases and events [default HOST-PID]")
    ] = None,
    poll_seconds: Annotated[float | None, setting_option(TrainerSettings, "poll_seconds")] = None,
    once: Annotated[bool, typer.Option("--once", help="Handle one part, then exit")] = False,
    max_parts: Annotated[
        int, typer.Option(help="Handle this many parts, then exit (0 = run until stopped)")
    ] = 0,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """Claim parts from the coordinator, train, checkpoint, evaluate and publish them.

    SIGTERM: the current optimizer step finishes, a checkpoint is written, the part is
    released for another worker to resume, and the process exits 0.
    """
    from novelcrafter.config import get_settings
    from novelcrafter.exposure import check_secrets
    from novelcrafter.logs import configure_logging
    from novelcrafter.store import open_store

    settings = get_settings(
        TrainerSettings,
        coordinator=coordinator,
        store=store,
        base_model=base_model,
        device=device,
        poll_seconds=poll_seconds,
        allow_unauthenticated=allow_unauthenticated,
    )
    check_secrets(settings)
    device, poll_seconds = settings.device or "auto", settings.poll_seconds
    if device not in DEVICES:
        raise InvalidArgument(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if poll_seconds <= 0:
        raise InvalidArgument("--poll-seconds must be > 0")
    if max_parts < 0:
        raise InvalidArgument("--max-parts must be >= 0")
    configure_logging()

    from .worker import serve

    code = serve(
        settings,
        open_store(settings=settings),
        device=device,
        worker_id=worker_id,
        poll_seconds=poll_seconds,
        max_parts=1 if once else max_parts,
    )
    raise typer.Exit(code)
