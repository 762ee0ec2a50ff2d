"""The ``novelcrafter`` command.

Subcommands are contributed by the service packages (``register(app, serve_app)`` in
``novelcrafter.<service>.cli``), so each service owns its flags and the core only
owns dispatch and error handling: user-facing failures are one ``error: …`` line
on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Any

import grpc
import typer

from novelcrafter import __version__
from novelcrafter.config import Settings, flag_of, help_text
from novelcrafter.errors import NovelCrafterError, from_rpc_error

app = typer.Typer(
    name="novelcrafter",
    help="Train LoRA adapters that write like a book, and serve them over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help text is plain: "[env …]" must not be eaten as markup
)
serve_app = typer.Typer(
    help="Run a service: ingest (with the job coordinator), trainer, inference, console, or all.",
    no_args_is_help=True,
)
model_app = typer.Typer(help="Base models: provision, or upload to the object store.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(model_app, name="model")

# Modules that contribute commands; each has register(app, serve_app).
COMMAND_MODULES = (
    "novelcrafter.ingest.cli",
    "novelcrafter.coordinator.cli",
    "novelcrafter.trainer.cli",
    "novelcrafter.inference.cli",
    "novelcrafter.console.cli",
    "novelcrafter.run.cli",
)


def setting_option(
    settings_class: type[Settings], name: str, *flags: str, default: str | None = None, **extra: Any
) -> Any:
    """The CLI flag of a declared setting (:mod:`novelcrafter.config`): its flag, help, variable
    and default come from the declaration. The flag's own default is None: the command passes
    it to ``get_settings(…)``, where a given flag wins over the environment."""
    declared_flag = flag_of(settings_class, name)
    names = flags or ((declared_flag,) if declared_flag else ())
    return typer.Option(*names, help=help_text(settings_class, name, default), **extra)


# The flags several commands share.
StoreOpt = Annotated[str | None, setting_option(Settings, "store")]
BaseModelOpt = Annotated[str | None, setting_option(Settings, "base_model")]
CoordinatorOpt = Annotated[str | None, setting_option(Settings, "coordinator")]
AllowUnauthenticatedOpt = Annotated[bool | None, setting_option(Settings, "allow_unauthenticated")]


@model_app.command("provision")
def model_provision(base_model: BaseModelOpt = None) -> None:
    """Convert or download the base model into the cache (once) and print its directory."""
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging
    from novelcrafter.models import provision_base_model

    configure_logging()
    settings = get_settings(base_model=base_model)
    print(provision_base_model(settings.base_model, settings))


@model_app.command("upload")
def model_upload(
    model_dir: Annotated[str, typer.Argument(help="Model directory: config.json, *.safetensors, tokenizer")],
    name: Annotated[str, typer.Option("--name", help="Name in the store; use it as --base-model store:NAME")],
    store: StoreOpt = None,
) -> None:
    """Upload a base model directory to the object store, for services that cannot reach the Hub."""
    from pathlib import Path

    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging
    from novelcrafter.models import STORE_SCHEME, upload_base_model
    from novelcrafter.store import open_store

    configure_logging()
    settings = get_settings(store=store)
    manifest = upload_base_model(open_store(settings.store, settings), Path(model_dir), name)
    size = sum(f["size"] for f in manifest["files"].values()) / 1e6
    print(
        f"base model {name}: {len(manifest['files'])} files, {size:.1f} MB in {settings.store}; "
        f"use it with --base-model {STORE_SCHEME}{name} (NOVELCRAFTER_BASE_MODEL)"
    )


@app.command("export")
def export(
    book_id: Annotated[
        str, typer.Argument(metavar="BOOK_ID", help="The book id (first 16 hex digits of the PDF's sha256)")
    ],
    dest: Annotated[str, typer.Argument(metavar="DIR", help="A new (or empty) directory to write")],
    adapter: Annotated[
        str, typer.Option("--adapter", help="latest, part-N or a version id like j-0123456789ab-p03")
    ] = "latest",
    store: StoreOpt = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="peft (adapter files + model card), gguf (adds adapter.gguf for llama.cpp and an "
            "Ollama Modelfile), or all",
        ),
    ] = "peft",
) -> None:
    """Write a published adapter version as a PEFT folder, plus a llama.cpp GGUF LoRA and an Ollama
    Modelfile with --format gguf|all."""
    import logging
    from pathlib import Path

    from novelcrafter.config import get_settings
    from novelcrafter.export import export_adapter
    from novelcrafter.logs import configure_logging
    from novelcrafter.store import open_store

    configure_logging()
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    settings = get_settings(store=store)
    result = export_adapter(
        open_store(settings.store, settings), book_id, Path(dest), adapter=adapter, fmt=fmt, settings=settings
    )
    print(f"exported {book_id} {result.meta.version} (part {result.meta.part}) to {result.dest}:")
    for name in result.files:
        print(f"  {name}")


@app.command("version")
def version() -> None:
    """Print the version."""
    print(__version__)


# The modules of pyproject's optional dependency sets, by the extra that brings them: an image
# or install without one (ingest's image has no torch) names the extra instead of a traceback.
EXTRA_OF_MODULE = {
    "pdfminer": "ingest",
    "nltk": "ingest",
    "jinja2": "console",
    "markdown_it": "console",
    "starlette": "console",
    "uvicorn": "console",
    "torch": "model",
    "transformers": "model",
    "peft": "model",
    "safetensors": "model",
    "accelerate": "model",
    "gguf": "model",
    "huggingface_hub": "model",
    "matplotlib": "all",
    "fpdf": "all",
    "pyphen": "all",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What to install for a module that an optional dependency set would have brought."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"this command needs {module}, which this installation lacks: pip install 'novelcrafter[{extra}]'"


def _load_commands() -> None:
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app, serve_app)


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _load_commands()
    try:
        app(args=argv, prog_name="novelcrafter")
    except NovelCrafterError as exc:
        fail(exc.message)
    except grpc.RpcError as exc:
        fail(from_rpc_error(exc).message)
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        fail(message)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except BrokenPipeError:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
