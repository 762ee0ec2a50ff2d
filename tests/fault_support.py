"""Helpers for the reliability suite: real service processes, a tiny book, a tiny job.

Every service here is the installed ``novelcrafter serve …`` command in its own process,
reached over real gRPC; nothing is imported in-process in place of the thing under test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from support import NOVELCRAFTER, Proc, base_env, free_port

from novelcrafter.config import Settings
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, jobs_pb2, jobs_pb2_grpc

T = TypeVar("T")
TOKEN = "s3cr3t-T0ken-for-tests-only-7f9a"  # distinctive, so a leak into a log is easy to find
UPLOAD_CHUNK = 64 * 1024


def client_settings(token: str | None = None, **extra: Any) -> Settings:
    """Settings for an in-test client; independent of this process's environment."""
    return Settings(auth_token=token, **extra)


@dataclass
class Service:
    """A real ``novelcrafter serve …`` process and the address it listens on."""

    name: str
    proc: Proc
    address: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return self.proc.output()

    def alive(self) -> bool:
        return self.proc.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        return self.proc.stop(timeout)

    def kill(self) -> None:
        self.proc.kill()


def _serve(
    kind: str,
    args: list[str],
    log_dir: Path,
    *,
    name: str | None = None,
    env: dict[str, str] | None = None,
    address: str | None = None,
    wait: bool = True,
    health_timeout: float = 120.0,
    health_settings: Settings | None = None,
) -> Service:
    address = address or f"127.0.0.1:{free_port()}"
    name = name or kind
    # The coordinator's database: its own file, kept across restarts of this service (an S3
    # store has no default one).
    database = {"NOVELCRAFTER_DB": f"sqlite:///{log_dir}/{name}-coordinator.sqlite3"}
    database = database if kind == "ingest" else {}
    child_env = base_env(**{"NOVELCRAFTER_METRICS_LISTEN": "off", **database, **(env or {})})
    argv = [NOVELCRAFTER, "serve", kind, "--listen", address, *args]
    log_path = log_dir / f"{name}.log"
    if log_path.exists():  # a restart: keep the first run's log beside the new one
        log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    service = Service(name, Proc(argv, child_env, log_path), address, argv, child_env)
    if wait:
        wait_healthy(service, health_timeout, settings=health_settings)
    return service


def wait_healthy(service: Service, timeout: float = 120.0, *, settings: Settings | None = None) -> None:
    """Wait for SERVING (health needs no token; ``settings`` carry TLS where the service uses it);
    fail with the service's log if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise AssertionError(f"{service.name} exited early:\n{service.output()[-4000:]}")
        try:
            wait_for_health(service.address, timeout=2, settings=settings or client_settings())
            return
        except TimeoutError:
            continue
    service.kill()
    raise AssertionError(f"{service.name} not SERVING after {timeout}s:\n{service.output()[-4000:]}")


def start_ingest(store: str, log_dir: Path, **kw: Any) -> Service:
    """``novelcrafter serve ingest`` (IngestService + the job coordinator's JobService)."""
    return _serve("ingest", ["--store", store], log_dir, **kw)


def start_trainer(
    store: str, coordinator: str, log_dir: Path, *, name: str = "trainer", env: dict[str, str] | None = None
) -> Service:
    """``novelcrafter serve trainer``: a worker (no gRPC port of its own; it polls the coordinator)."""
    child_env = base_env(**{"NOVELCRAFTER_METRICS_LISTEN": "off", **(env or {})})
    argv = [
        NOVELCRAFTER, "serve", "trainer", "--store", store, "--coordinator", coordinator,
        "--worker-id", name, "--poll-seconds", "0.5",
    ]  # fmt: skip
    return Service(name, Proc(argv, child_env, log_dir / f"{name}.log"), coordinator, argv, child_env)


def start_inference(store: str, log_dir: Path, **kw: Any) -> Service:
    """``novelcrafter serve inference`` (waits until the base model is loaded)."""
    return _serve("inference", ["--store", store], log_dir, **kw)


def restart(service: Service, *, wait: bool = True, health_timeout: float = 120.0) -> Service:
    """The same command, environment and address again (after the old process ended)."""
    assert not service.alive(), "restart() needs the old process gone"
    log_dir = service.proc.log_path.parent
    log_path = log_dir / f"{service.name}-restart-{time.monotonic_ns()}.log"
    new = Service(service.name, Proc(service.argv, service.env, log_path), service.address, service.argv)
    new.env = service.env
    if wait:
        wait_healthy(new, health_timeout)
    return new


# --- a tiny book and a tiny job -------------------------------------------------------------------


def book_pdf(sentences: int = 80, seed: int = 11) -> bytes:
    """A short, unique book of plain sentences (fpdf2). ``seed`` makes a different book."""
    from fpdf import FPDF

    rng = random.Random(seed)
    names = ["Mara", "Tobin", "Elsie", "The ferryman", "The old miller", "Captain Reed", "The widow"]
    verbs = ["watched", "carried", "mended", "followed", "counted", "painted", "buried", "found"]
    things = ["the lantern", "a broken oar", "the grey nets", "a letter", "the salt barrels", "a box"]
    places = ["by the harbour", "under the bridge", "near the chapel", "on the cliff path", "in the cellar"]
    pdf = FPDF()
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    endings = ["and nobody spoke", "while the bells rang", "before the storm came", "and the tide turned"]
    text = " ".join(
        f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} {rng.choice(places)}, "
        f"{rng.choice(endings)}."
        for _ in range(sentences)
    )
    pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def tiny_job_config(steps: int = 2, **overrides: Any) -> common_pb2.JobConfig:
    """A job that trains in seconds on a CPU: 64-token sequences, ``steps`` optimizer steps per
    part, a checkpoint after every step, one held-out chunk evaluated."""
    training = common_pb2.TrainingConfig(
        epochs=1,
        grad_accum=1,
        max_length=64,
        max_steps_per_part=steps,
        checkpoint_every=1,
        warmup_steps=1,
        eval_max_chunks=1,
        learning_rate=1e-3,
    )
    return common_pb2.JobConfig(training=training, max_attempts=overrides.pop("max_attempts", 5), **overrides)


def ingest_requests(
    data: bytes, *, parts: int = 2, chunk_sentences: int = 4, size_bytes: int = 0, **meta: Any
) -> Iterator[ingest_pb2.IngestBookRequest]:
    yield ingest_pb2.IngestBookRequest(
        metadata=ingest_pb2.IngestMetadata(
            filename=meta.pop("filename", "book.pdf"),
            params=common_pb2.IngestParams(chunk_sentences=chunk_sentences, parts=parts),
            size_bytes=size_bytes,
            **meta,
        )
    )
    for start in range(0, len(data), UPLOAD_CHUNK):
        yield ingest_pb2.IngestBookRequest(chunk=data[start : start + UPLOAD_CHUNK])


def ingest_book(
    address: str, data: bytes, *, token: str | None = None, timeout: float = 120, **kw: Any
) -> ingest_pb2.IngestBookResponse:
    with connect(address, client_settings(token)) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        return stub.IngestBook(ingest_requests(data, **kw), timeout=timeout)


def create_job(
    address: str, book_id: str, config: common_pb2.JobConfig, *, token: str | None = None
) -> jobs_pb2.Job:
    with connect(address, client_settings(token)) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        return stub.CreateJob(jobs_pb2.CreateJobRequest(book_id=book_id, config=config), timeout=60)


def get_job(address: str, job_id: str, *, token: str | None = None) -> jobs_pb2.Job:
    with connect(address, client_settings(token)) as channel:
        return jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30)


TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    *,
    every: float = 0.5,
    logs: Callable[[], str] = str,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``logs()`` after ``timeout``.
    RPC errors (a peer restarting) count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
            last = result
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})\n{logs()[-6000:]}")


def wait_job(
    address: str, job_id: str, timeout: float, *, token: str | None = None, logs: Callable[[], str] = str
) -> jobs_pb2.Job:
    """Poll until the job ends (any terminal state) and return it."""

    def probe() -> jobs_pb2.Job | None:
        job = get_job(address, job_id, token=token)
        return job if job.state in TERMINAL else None

    return wait_for(f"job {job_id} to end", probe, timeout, logs=logs)


# --- what a finished job left in the store ---------------------------------------------------------


def verify_job_outputs(store: Any, job: jobs_pb2.Job, model: Any, base_name: str) -> dict[str, int]:
    """Every checkpoint and adapter the job left in the store is whole and loadable.

    Checkpoints: each file matches the size and sha256 in the checkpoint's manifest, the
    adapter weights load with safetensors and the training state with ``torch.load``
    (weights only); the last-good pointer names a complete checkpoint. Adapters: each
    published version downloads checksum-verified and passes the inference server's own
    validation against the base model (names, shapes, finite values).
    """
    import hashlib
    import tempfile

    import torch
    from novelcrafter.inference.lora import load_lora
    from safetensors.torch import load_file

    from novelcrafter import adapters, layout

    counts = {"checkpoints": 0, "adapters": 0}
    with tempfile.TemporaryDirectory(prefix="nc-verify-") as tmp:
        for part in job.parts:
            root = layout.part_checkpoints_prefix(job.job_id, part.index)
            keys = store.list(root)
            for manifest_key in [k for k in keys if k.endswith("/manifest.json")]:
                prefix = manifest_key[: -len("manifest.json")]
                manifest = store.get_json(manifest_key)
                folder = Path(tmp) / f"ckpt-{counts['checkpoints']}"
                for name, expected in manifest["files"].items():
                    path = store.download(prefix + name, folder / name)
                    assert path.stat().st_size == expected["size"], f"{prefix}{name}: size"
                    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected["sha256"], (
                        f"{prefix}{name}"
                    )
                assert load_file(str(folder / "adapter_model.safetensors"))
                torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
                counts["checkpoints"] += 1
            if layout.last_checkpoint_key(job.job_id, part.index) in keys:
                pointed = store.get_json(layout.last_checkpoint_key(job.job_id, part.index))["key"]
                assert store.exists(pointed + "manifest.json"), f"last.json names an incomplete {pointed}"
        for meta in adapters.list_versions(store, job.book_id):
            if meta.job_id != job.job_id:
                continue
            folder = adapters.download_adapter(store, meta, Path(tmp) / meta.version, verify=True)
            load_lora(folder, model, dtype=torch.float32, trained_on=meta.base_model, base_name=base_name)
            counts["adapters"] += 1
    return counts
