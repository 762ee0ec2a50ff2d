"""``novelcrafter serve console`` (imports stay light: the app is imported inside the command)."""

from __future__ import annotations

from typing import Annotated

import typer

from novelcrafter.cli import AllowUnauthenticatedOpt, setting_option
from novelcrafter.config import ConsoleSettings, Settings


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    serve_app.command("console")(serve_console)


def serve_console(
    listen: Annotated[str | None, setting_option(ConsoleSettings, "console_listen")] = None,
    ingest: Annotated[str | None, setting_option(Settings, "coordinator", "--ingest")] = None,
    inference: Annotated[str | None, setting_option(Settings, "inference", "--inference")] = None,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """The web console for authors: upload a book, train it, watch it, compare base and tuned."""
    from novelcrafter.console.server import serve

    from novelcrafter.config import get_settings
    from novelcrafter.exposure import check_secrets
    from novelcrafter.logs import configure_logging

    configure_logging()
    settings = get_settings(
        ConsoleSettings,
        console_listen=listen,
        coordinator=ingest,
        inference=inference,
        allow_unauthenticated=allow_unauthenticated,
    )
    check_secrets(settings)
    serve(settings.console_listen, settings.coordinator, settings.inference, settings)
