"""``novelcrafter serve console`` (imports stay light: the app is imported inside the command)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    serve_app.command("console")(serve_console)


def serve_console(
    listen: Annotated[
        str, typer.Option(envvar="NOVELCRAFTER_CONSOLE_LISTEN", help="Address of the web console (HTTP).")
    ] = "0.0.0.0:8080",
    ingest: Annotated[
        str | None,
        typer.Option(
            help="Ingest + coordinator gRPC address [env NOVELCRAFTER_COORDINATOR, default 127.0.0.1:50051]"
        ),
    ] = None,
    inference: Annotated[
        str | None,
        typer.Option(help="Inference gRPC address [env NOVELCRAFTER_INFERENCE, default 127.0.0.1:50052]"),
    ] = None,
) -> None:
    """The web console for authors: upload a book, train it, watch it, compare base and tuned."""
    from novelcrafter.console.server import serve

    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging

    configure_logging()
    settings = get_settings(coordinator=ingest, inference=inference)
    serve(listen, settings.coordinator, settings.inference, settings)
