"""``novelcrafter ingest`` and ``novelcrafter serve ingest``.

Module-level imports stay light: the heavy modules are imported inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from novelcrafter.cli import AllowUnauthenticatedOpt, StoreOpt, setting_option
from novelcrafter.config import DEFAULT_INGEST_LISTEN, Settings
from novelcrafter.errors import InvalidArgument

UPLOAD_CHUNK = 1 << 20


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    app.command("ingest")(ingest)
    serve_app.command("ingest")(serve_ingest_command)


def ingest(
    book: Annotated[Path, typer.Argument(help="The book PDF.", show_default=False)],
    store: StoreOpt = None,
    password: Annotated[str | None, typer.Option(help="Password of an encrypted PDF.")] = None,
    title: Annotated[str | None, typer.Option(help="Title (default: the PDF's title or file name).")] = None,
    parts: Annotated[int, typer.Option(help="Consecutive training parts.")] = 10,
    chunk_sentences: Annotated[int, typer.Option(help="Sentences per chunk.")] = 10,
    test_fraction: Annotated[float, typer.Option(help="Held-out share of each part.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the per-part train/test split.")] = 0,
    auto_reduce_parts: Annotated[
        bool, typer.Option("--auto-reduce-parts", help="Too little text: use fewer parts instead of failing.")
    ] = False,
    create_job: Annotated[
        bool, typer.Option("--create-job", help="Also create the training job (needs the coordinator).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the book manifest as JSON on stdout.")
    ] = False,
    server: Annotated[
        str | None,
        typer.Option(help="Ingest over gRPC on this server (HOST:PORT) instead of locally."),
    ] = None,
) -> None:
    """Extract, clean and chunk a book PDF into training parts in the store."""
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging

    from .params import IngestParams

    # The command's own output is the result; library chatter only when asked for.
    configure_logging(default_level="WARNING")
    settings = get_settings(store=store)
    params = IngestParams(
        chunk_sentences=chunk_sentences,
        parts=parts,
        test_fraction=test_fraction,
        seed=seed,
        auto_reduce_parts=auto_reduce_parts,
    )
    data = _read_pdf(book)
    job = None
    if server:
        manifest, existed, job = _ingest_remote(
            server, settings, data, book.name, title, password, params, create_job
        )
    else:
        manifest, existed = _ingest_local(settings, data, book.name, title, password, params)
        if create_job:
            job = _create_job_remote(settings, manifest["book_id"])
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    else:
        _print_summary(manifest, existed, job)


def _read_pdf(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"no such file: {path}")
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a PDF file")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}")


_STAGES = {"extract": "extracting pages", "clean": "cleaning", "write": "writing parts"}


class _Progress:
    """A progress bar on a terminal (stderr), nothing otherwise."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description:<18}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(_STAGES.get(stage, stage), total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _ingest_local(
    settings: Any, data: bytes, filename: str, title: str | None, password: str | None, params: Any
) -> tuple[dict, bool]:
    from novelcrafter.store import open_store

    from . import pipeline

    progress = _Progress()
    try:
        result = pipeline.ingest(
            open_store(settings=settings),
            data,
            title=title,
            password=password,
            params=params,
            filename=filename,
            progress=progress,
        )
    finally:
        progress.close()
    return result.manifest, result.already_existed


def _ingest_remote(
    address: str,
    settings: Any,
    data: bytes,
    filename: str,
    title: str | None,
    password: str | None,
    params: Any,
    create_job: bool,
) -> tuple[dict, bool, Any]:
    from novelcrafter.rpc import connect
    from novelcrafter.v1 import ingest_pb2, ingest_pb2_grpc

    from . import manifest as manifest_codec

    def requests() -> Any:
        yield ingest_pb2.IngestBookRequest(
            metadata=ingest_pb2.IngestMetadata(
                filename=filename,
                title=title or "",
                password=password or "",
                params=params.to_proto(),
                create_job=create_job,
                size_bytes=len(data),
            )
        )
        for start in range(0, len(data), UPLOAD_CHUNK):
            yield ingest_pb2.IngestBookRequest(chunk=data[start : start + UPLOAD_CHUNK])

    with connect(address, settings) as channel:
        response = ingest_pb2_grpc.IngestServiceStub(channel).IngestBook(requests(), wait_for_ready=False)
    job = response.job if response.HasField("job") else None
    return manifest_codec.from_proto(response.manifest), response.already_existed, job


def _create_job_remote(settings: Any, book_id: str) -> Any:
    """A local ingest registers its job with the running coordinator (one per store)."""
    import grpc

    from novelcrafter.errors import Unavailable
    from novelcrafter.rpc import connect
    from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

    with connect(settings.coordinator, settings) as channel:
        try:
            return jobs_pb2_grpc.JobServiceStub(channel).CreateJob(
                jobs_pb2.CreateJobRequest(book_id=book_id), timeout=30
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"the book was ingested ({book_id}) but no job coordinator answers at "
                    f"{settings.coordinator}: start `novelcrafter serve ingest` (or set "
                    "NOVELCRAFTER_COORDINATOR) and create the job with `novelcrafter train`"
                )
            raise


def _print_summary(manifest: dict, existed: bool, job: Any) -> None:
    cleaning = ", ".join(f"{k}={v}" for k, v in sorted(manifest.get("cleaning", {}).items()) if v)
    again = "  (already ingested)" if existed else ""
    print(f"book {manifest['book_id']}  {manifest.get('title', '')!r}{again}")
    print(
        f"  {manifest.get('pages', 0)} pages, {manifest.get('words', 0)} words, "
        f"{manifest.get('sentences', 0)} sentences, {manifest.get('chunks', 0)} chunks, "
        f"{len(manifest.get('parts', []))} parts"
    )
    if cleaning:
        print(f"  cleaning: {cleaning}")
    for warning in manifest.get("warnings", []):
        print(f"  warning: {warning}")
    if job is not None:
        print(f"  job {job.job_id} created")


def serve_ingest_command(
    listen: Annotated[str | None, setting_option(Settings, "listen", default=DEFAULT_INGEST_LISTEN)] = None,
    store: StoreOpt = None,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """Serve IngestService and the job coordinator (JobService) on one port."""
    from novelcrafter.config import IngestSettings, get_settings
    from novelcrafter.exposure import check_secrets

    from .server import serve_ingest

    settings = get_settings(
        IngestSettings, listen=listen, store=store, allow_unauthenticated=allow_unauthenticated
    )
    check_secrets(settings)
    serve_ingest(settings)
