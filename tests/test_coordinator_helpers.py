"""Helpers for the coordinator tests (no tests here): a book in the store, a real JobService
server on a socket, and a test worker that plays the trainer's role through the gRPC API."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import grpc
from novelcrafter.coordinator import Coordinator, job_service

from novelcrafter import adapters, layout
from novelcrafter.config import Settings, get_settings
from novelcrafter.rpc import GrpcServer, connect, start_server
from novelcrafter.store import Store
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

TEST_SETTINGS: Settings = get_settings(metrics_listen="off", grace_seconds=30)


def make_book(store: Store, parts: int = 3, tag: str = "book") -> str:
    """Write a small valid book (manifest + per-part train/test JSONL) as ingest would."""
    source = f"%PDF-1.4 test book {tag}".encode()
    book_id = layout.book_id_for(source)
    entries = []
    for index in range(parts):
        train = [{"text": f"{tag} part {index} chunk {i}. It was a dark and stormy night."} for i in range(9)]
        test = [{"text": f"{tag} part {index} held-out chunk. The rain fell."}]
        store.put(layout.part_train_key(book_id, index), "".join(json.dumps(r) + "\n" for r in train))
        store.put(layout.part_test_key(book_id, index), "".join(json.dumps(r) + "\n" for r in test))
        entries.append(
            {
                "index": index,
                "train_key": layout.part_train_key(book_id, index),
                "test_key": layout.part_test_key(book_id, index),
                "train_chunks": len(train),
                "test_chunks": len(test),
            }
        )
    manifest = {
        "book_id": book_id,
        "title": f"Test book {tag}",
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "pages": parts,
        "sentences": parts * 20,
        "chunks": parts * 10,
        "params": {"chunk_sentences": 2, "parts": parts, "test_fraction": 0.1, "seed": 0},
        "cleaning": {"headers_footers": 0, "page_numbers": 0, "hyphen_joins": 0, "ligatures": 0},
        "parts": entries,
    }
    store.put_json(layout.manifest_key(book_id), manifest)
    return book_id


class CoordinatorServer:
    """A real coordinator behind a real gRPC server on 127.0.0.1, as `serve ingest` hosts it."""

    def __init__(
        self, store: Store, lease_seconds: float = 1.0, port: int = 0, db: str | None = None
    ) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.db = db
        settings = TEST_SETTINGS.with_overrides(db=db)
        self.coordinator = Coordinator(store, settings, lease_seconds=lease_seconds)
        self.server: GrpcServer = start_server(
            [job_service(self.coordinator)], f"127.0.0.1:{port}", TEST_SETTINGS
        )
        self.server.on_stop.append(self.coordinator.close)
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"
        self.channel = connect(self.address, TEST_SETTINGS)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    def stop(self) -> None:
        self.server.stop(grace=5)
        self.channel.close()

    def restart(self) -> CoordinatorServer:
        """Stop this server and start a fresh coordinator on the same store, database and port."""
        self.stop()
        return CoordinatorServer(self.store, self.lease_seconds, port=self.port, db=self.db)

    def stored_state(self, job_id: str) -> str:
        """The job's state as its row in the database says (what a restart will read)."""
        with self.coordinator.db.transaction() as tx:
            row = tx.one("SELECT record FROM jobs WHERE job_id = ?", (job_id,))
        assert row is not None, f"job {job_id} is not in the database"
        return json.loads(row[0])["job"]["state"]

    def create(self, book_id: str, **config: object) -> jobs_pb2.Job:
        cfg = common_pb2.JobConfig(**config)  # type: ignore[arg-type]
        return self.stub.CreateJob(jobs_pb2.CreateJobRequest(book_id=book_id, config=cfg), timeout=30)

    def job(self, job_id: str) -> jobs_pb2.Job:
        return self.stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30)


class Worker:
    """Plays a trainer worker through the public API: claim, progress, stage, complete, fail."""

    def __init__(self, server: CoordinatorServer, worker_id: str, device: str = "cpu") -> None:
        self.server = server
        self.worker_id = worker_id
        self.device = device

    @property
    def stub(self) -> jobs_pb2_grpc.JobServiceStub:
        return self.server.stub

    def claim(self, job_id: str = "") -> jobs_pb2.ClaimPartResponse:
        return self.stub.ClaimPart(
            jobs_pb2.ClaimPartRequest(worker_id=self.worker_id, device=self.device, job_id=job_id), timeout=30
        )

    def progress(
        self, lease: jobs_pb2.Lease, step: int, total: int = 10, loss: float = 2.5, checkpoint: str = ""
    ) -> jobs_pb2.ReportProgressResponse:
        update = jobs_pb2.ProgressUpdate(
            step=step,
            total_steps=total,
            loss=loss,
            learning_rate=5e-5,
            tokens_per_second=1234.0,
            phase="train",
        )
        return self.stub.ReportProgress(
            jobs_pb2.ReportProgressRequest(lease=lease, progress=update, checkpoint_key=checkpoint),
            timeout=30,
        )

    def renew(self, lease: jobs_pb2.Lease) -> jobs_pb2.Lease:
        return self.stub.RenewLease(jobs_pb2.RenewLeaseRequest(lease=lease), timeout=30)

    def complete(self, claim: jobs_pb2.ClaimPartResponse, loss: float = 2.0) -> jobs_pb2.Job:
        """Stage a fake adapter in the lease's folder, as the trainer does, and complete the part
        (the coordinator publishes it)."""
        a = claim.assignment
        meta = stage_adapter(self.server.store, a.book_id, a.job_id, a.part_index, claim.lease.epoch)
        metrics = jobs_pb2.PartMetrics(
            train_loss=loss,
            base_perplexity=30.0,
            adapter_perplexity=20.0 + a.part_index,
            earlier_perplexity={i: 21.0 + i for i in range(a.part_index)},
            train_tokens=1000,
            eval_tokens=100,
            train_seconds=1.5,
            eval_seconds=0.5,
            steps=10,
            loss_curve=[3.0, 2.5, loss],
            tokens_per_second=666.0,
            device=self.device,
        )
        version = common_pb2.AdapterVersion(
            book_id=a.book_id, version=meta.version, job_id=a.job_id, part=a.part_index, key=meta.prefix
        )
        return self.stub.CompletePart(
            jobs_pb2.CompletePartRequest(lease=claim.lease, metrics=metrics, adapter=version), timeout=30
        )

    def fail(
        self,
        lease: jobs_pb2.Lease,
        error: str = "boom",
        *,
        retryable: bool = True,
        release: bool = False,
        checkpoint: str = "",
    ) -> jobs_pb2.Job:
        return self.stub.FailPart(
            jobs_pb2.FailPartRequest(
                lease=lease, error=error, retryable=retryable, release=release, checkpoint_key=checkpoint
            ),
            timeout=30,
        )


def stage_adapter(
    store: Store, book_id: str, job_id: str, part: int, epoch: int, weights: bytes = b""
) -> adapters.AdapterMeta:
    """Stage an adapter version in the staging folder of the lease of ``epoch``, the way a worker
    does; CompletePart publishes it. (Its weights are not what is tested here: ``weights``, or
    bytes naming the job, part and epoch.)"""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = weights or f"weights of {job_id}-{part} epoch {epoch}".encode()
        (folder / "adapter_model.safetensors").write_bytes(data)
        (folder / "adapter_config.json").write_text(
            json.dumps({"r": 8, "base_model_name_or_path": "smollm2"})
        )
        return adapters.stage_adapter(
            store,
            folder,
            layout.part_publish_prefix(job_id, part, epoch),
            book_id=book_id,
            job_id=job_id,
            part=part,
            base_model=TEST_SETTINGS.base_model,
        )


def rpc_code(call: object) -> grpc.StatusCode:
    """The status code a call raised (call: a zero-argument callable)."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError("the call succeeded")


def wait_until(predicate: object, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
