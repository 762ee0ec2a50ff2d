"""Fenced publishing: only a worker whose lease is live publishes its adapter.

A worker stages its adapter in its lease's own folder (``jobs/<job>/parts/<NN>/publish/<epoch>/``)
and CompletePart publishes it (files copied into ``adapters/<book>/<version>/``, meta.json, then
``latest``) in the transaction that checks the lease. A worker whose lease expired (paused,
partitioned) or whose job was cancelled is ABORTED and nothing of it is published; a late
staging never touches the files another worker committed.

In process: the real Coordinator on a real store. Then real processes: ``serve ingest`` with a
3-second lease and two ``serve trainer`` workers, the first frozen (SIGSTOP) between staging its
adapter and completing the part, past its lease.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from novelcrafter.coordinator import Coordinator
from test_coordinator_helpers import TEST_SETTINGS, CoordinatorServer, make_book, stage_adapter

from novelcrafter import adapters, layout
from novelcrafter.errors import Aborted, InvalidArgument, NotFound
from novelcrafter.store import Store, open_store
from novelcrafter.v1 import common_pb2, jobs_pb2

J = jobs_pb2
LEASE = 2.0


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "store"), TEST_SETTINGS, retry_seconds=1.0)


@pytest.fixture
def coordinator(store: Store) -> Iterator[Coordinator]:
    coord = Coordinator(store, TEST_SETTINGS, lease_seconds=LEASE)
    yield coord
    coord.close()


def _complete(coord: Coordinator, claim: J.ClaimPartResponse) -> J.Job:
    a = claim.assignment
    metrics = J.PartMetrics(
        train_loss=1.5, base_perplexity=30.0, adapter_perplexity=20.0, steps=3, device="cpu"
    )
    version = common_pb2.AdapterVersion(book_id=a.book_id, version=a.adapter_version, job_id=a.job_id)
    return coord.complete_part(claim.lease, metrics, version)


def _published(store: Store, book: str) -> dict[str, bytes]:
    """Everything under the book's adapters folder: versions, their meta.json, latest."""
    return {key: store.get(key) for key in store.list(layout.adapters_prefix(book))}


def _publish_fixture(store: Store, book: str, job_id: str) -> adapters.AdapterMeta:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_model.safetensors").write_bytes(b"an older job's weights")
        (Path(tmp) / "adapter_config.json").write_text('{"r": 8}')
        return adapters.publish_adapter(
            store, Path(tmp), book_id=book, job_id=job_id, part=0, base_model=TEST_SETTINGS.base_model
        )


# --- the coordinator ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_worker_whose_lease_expired_never_publishes(store: Store, coordinator: Coordinator) -> None:
    book = make_book(store, parts=2)
    older = _publish_fixture(store, book, "j-0000000000aa")  # `latest` before this job
    job = coordinator.create_job(book)
    version = layout.adapter_version_id(job.job_id, 0)
    meta_key = layout.adapter_meta_key(book, version)

    paused = coordinator.claim_part("paused", "cpu")
    assert paused.assigned and paused.assignment.part_index == 0
    stage_adapter(store, book, job.job_id, 0, paused.lease.epoch, weights=b"paused worker's weights")
    time.sleep(LEASE + 0.5)  # frozen past its lease (SIGSTOP, a partition)

    # Expired, nobody has taken the part yet: refused, nothing published.
    with pytest.raises(Aborted):
        _complete(coordinator, paused)
    assert not store.exists(meta_key)
    assert adapters.latest_version(store, book) == older.version

    # Another worker takes the part over and completes it.
    rescuer = coordinator.claim_part("rescuer", "cpu")
    assert rescuer.assigned and rescuer.assignment.part_index == 0
    assert rescuer.lease.epoch > paused.lease.epoch
    stage_adapter(store, book, job.job_id, 0, rescuer.lease.epoch, weights=b"rescuer's weights")
    coordinator.renew_lease(rescuer.lease)
    done = _complete(coordinator, rescuer)
    assert done.parts[0].state == J.PART_STATE_SUCCEEDED and done.parts[0].adapter_version == version
    meta = adapters.read_meta(store, book, version)
    weights = meta.files["adapter_model.safetensors"]
    assert weights["sha256"] == hashlib.sha256(b"rescuer's weights").hexdigest()
    assert store.get(meta.prefix + "adapter_model.safetensors") == b"rescuer's weights"
    assert adapters.latest_version(store, book) == version
    record = store.get_json(layout.part_metrics_key(job.job_id, 0))
    assert (record["worker_id"], record["epoch"]) == ("rescuer", rescuer.lease.epoch)
    committed = _published(store, book)

    # The paused worker wakes up: it stages again (into its own folder, never the version's)
    # and completes. The part is SUCCEEDED with "its" version id, but not under its lease: refused.
    stage_adapter(store, book, job.job_id, 0, paused.lease.epoch, weights=b"paused worker, late")
    assert layout.part_publish_prefix(job.job_id, 0, paused.lease.epoch) != layout.part_publish_prefix(
        job.job_id, 0, rescuer.lease.epoch
    )
    with pytest.raises(Aborted):
        _complete(coordinator, paused)
    with pytest.raises(Aborted):
        coordinator.renew_lease(paused.lease)
    assert _published(store, book) == committed  # the version's files, its meta.json, latest
    assert store.get_json(layout.part_metrics_key(job.job_id, 0))["worker_id"] == "rescuer"
    assert coordinator.get_job(job.job_id).parts[1].state == J.PART_STATE_READY


@pytest.mark.timeout(60)
def test_a_cancelled_jobs_completion_publishes_nothing(store: Store, coordinator: Coordinator) -> None:
    book = make_book(store, parts=2)
    job = coordinator.create_job(book)
    claim = coordinator.claim_part("w", "cpu")
    stage_adapter(store, book, job.job_id, 0, claim.lease.epoch)
    assert coordinator.cancel_job(job.job_id).state == J.JOB_STATE_CANCELLED
    with pytest.raises(Aborted, match="cancelled"):
        _complete(coordinator, claim)
    assert _published(store, book) == {}
    assert adapters.latest_version(store, book) is None
    assert not store.exists(layout.part_metrics_key(job.job_id, 0))
    assert coordinator.get_job(job.job_id).parts[0].state == J.PART_STATE_CANCELLED


@pytest.mark.timeout(60)
def test_a_retried_completion_gets_the_job_again_and_changes_nothing(
    store: Store, coordinator: Coordinator
) -> None:
    """The commit went through but the answer was lost: the retry (same lease) is answered with
    the job, not ABORTED; the version stays exactly as first published."""
    book = make_book(store, parts=1)
    job = coordinator.create_job(book)
    claim = coordinator.claim_part("w", "cpu")
    staged = layout.part_publish_prefix(job.job_id, 0, claim.lease.epoch)
    stage_adapter(store, book, job.job_id, 0, claim.lease.epoch)
    first = _complete(coordinator, claim)
    assert first.state == J.JOB_STATE_SUCCEEDED
    assert store.list(staged) == []  # published: the staged copy is removed
    published = _published(store, book)
    again = _complete(coordinator, claim)
    assert again.state == J.JOB_STATE_SUCCEEDED and list(again.parts) == list(first.parts)
    assert _published(store, book) == published
    # Another lease of the same job presented for that part is still refused.
    forged = J.Lease(lease_id=uuid.uuid4().hex, job_id=job.job_id, part_index=0, epoch=claim.lease.epoch)
    with pytest.raises(Aborted):
        coordinator.complete_part(
            forged, J.PartMetrics(), common_pb2.AdapterVersion(version=claim.assignment.adapter_version)
        )
    assert _published(store, book) == published


# --- the worker --------------------------------------------------------------------------------


def _staged_result(store: Store, claim: J.ClaimPartResponse, tmp: Path) -> Any:
    from novelcrafter.trainer.part import PartResult
    from novelcrafter.trainer.reports import PartMetrics

    a = claim.assignment
    prefix = layout.part_publish_prefix(a.job_id, a.part_index, claim.lease.epoch)
    meta = stage_adapter(store, a.book_id, a.job_id, a.part_index, claim.lease.epoch)
    metrics = PartMetrics(
        train_loss=1.0,
        base_perplexity=30.0,
        adapter_perplexity=20.0,
        train_tokens=100,
        eval_tokens=10,
        train_seconds=1.0,
        eval_seconds=1.0,
        steps=2,
        loss_curve=[2.0, 1.0],
        tokens_per_second=100.0,
        device="cpu",
    )
    return PartResult(metrics, meta, tmp, "", staged_prefix=prefix)


@pytest.mark.timeout(120)
def test_the_worker_treats_a_repeated_completion_as_done_and_a_refused_one_as_lost(
    store: Store, tmp_path: Path
) -> None:
    """services/trainer/worker.py's CompletePart path: a completion whose first answer was lost is
    done (the published meta, with published_at, comes back for the Hub push); a refused one
    (the job cancelled) publishes nothing and is given up without a FailPart."""
    from novelcrafter.trainer.reports import metrics_proto
    from novelcrafter.trainer.worker import Worker

    server = CoordinatorServer(store, lease_seconds=30.0)
    worker = Worker(
        TEST_SETTINGS.with_overrides(coordinator=server.address), store, device="cpu", worker_id="w"
    )
    try:
        book = make_book(store, parts=1)
        job = server.create(book)
        claim = worker.client.claim("w", "cpu")
        result = _staged_result(store, claim, tmp_path)
        assert result.adapter.published_at == 0 and not store.exists(result.adapter.prefix + adapters.META)
        # The first CompletePart goes through; its answer is lost; the worker's call is the retry.
        worker.client.complete(claim.lease, metrics_proto(result.metrics), result.adapter.to_proto())
        published = worker._complete(claim.lease, result)
        assert published is not None
        assert published == adapters.read_meta(store, book, result.adapter.version)
        assert published.published_at > 0 and published.files == result.adapter.files
        assert server.job(job.job_id).state == J.JOB_STATE_SUCCEEDED

        other = server.create(make_book(store, parts=1, tag="other"))
        claim = worker.client.claim("w", "cpu")
        assert claim.assignment.job_id == other.job_id
        result = _staged_result(store, claim, tmp_path)
        server.stub.CancelJob(J.CancelJobRequest(job_id=other.job_id))
        assert worker._complete(claim.lease, result) is None
        assert not store.exists(result.adapter.prefix + adapters.META)
        assert adapters.latest_version(store, other.book_id) is None
        assert server.job(other.job_id).parts[0].state == J.PART_STATE_CANCELLED
    finally:
        worker.client.close()
        server.stop()


# --- the store and the commit ----------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"))
    else:
        request.getfixturevalue("s3_settings")
        yield open_store(f"s3://fencing-{uuid.uuid4().hex[:8]}/root")


def test_store_copy(any_store: Store) -> None:
    store = any_store
    store.put("jobs/a/src.bin", b"x" * 3000)
    store.copy("jobs/a/src.bin", "adapters/b/dst.bin")
    assert store.get("adapters/b/dst.bin") == b"x" * 3000
    store.put("jobs/a/src.bin", b"new")
    store.copy("jobs/a/src.bin", "adapters/b/dst.bin")  # replaces
    assert store.get("adapters/b/dst.bin") == b"new" and store.get("jobs/a/src.bin") == b"new"
    with pytest.raises(NotFound):
        store.copy("jobs/a/missing.bin", "adapters/b/other.bin")
    assert not store.exists("adapters/b/other.bin")
    with pytest.raises(InvalidArgument):
        store.copy("jobs/a/src.bin", "../escape")
    assert sorted(store.list("")) == ["adapters/b/dst.bin", "jobs/a/src.bin"]


def test_commit_keeps_a_recommitted_version_and_replaces_a_different_one(store: Store) -> None:
    book, job = "0123456789abcdef", "j-00000000cafe"
    first = stage_adapter(store, book, job, 0, 1, weights=b"one")
    staged1 = layout.part_publish_prefix(job, 0, 1)
    committed = adapters.commit_adapter(store, staged1, None)  # the staged meta read from the store
    assert committed.files == first.files and committed.published_at > 0
    again = adapters.commit_adapter(store, staged1)
    assert again.published_at == committed.published_at  # nothing a reader sees changed
    stage_adapter(store, book, job, 0, 2, weights=b"two")
    replaced = adapters.commit_adapter(store, layout.part_publish_prefix(job, 0, 2))
    assert replaced.files["adapter_model.safetensors"]["sha256"] == hashlib.sha256(b"two").hexdigest()
    assert adapters.read_meta(store, book, first.version) == replaced
    assert store.get(replaced.prefix + "adapter_model.safetensors") == b"two"


# --- real processes ----------------------------------------------------------------------------

FREEZE_AFTER_STAGING = '''
"""Test shim (sitecustomize of one trainer process): freeze this process (SIGSTOP) right after it
stages its first adapter, i.e. between the last lease check and CompletePart."""
import os
import signal
import sys

from novelcrafter import adapters

_stage = adapters.stage_adapter
_frozen = []


def _stage_then_freeze(*args, **kwargs):
    meta = _stage(*args, **kwargs)
    if not _frozen:
        _frozen.append(True)
        print("FENCING-TEST: staged, freezing", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    return meta


adapters.stage_adapter = _stage_then_freeze
'''


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_trainer_frozen_past_its_lease_never_publishes(base_model_dir: Path, tmp_path: Path) -> None:
    from fault_support import (
        book_pdf,
        create_job,
        get_job,
        ingest_book,
        start_ingest,
        start_trainer,
        tiny_job_config,
        wait_for,
        wait_job,
    )

    store_dir = str(tmp_path / "store")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FREEZE_AFTER_STAGING)
    pythonpath = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    ingest = start_ingest(store_dir, tmp_path, env={"NOVELCRAFTER_LEASE_SECONDS": "3"})
    first = start_trainer(store_dir, ingest.address, tmp_path, name="first", env={"PYTHONPATH": pythonpath})
    trainers = [first]

    def logs() -> str:
        parts = [f"--- ingest\n{ingest.output()[-4000:]}"]
        parts += [f"--- {t.name}\n{t.output()[-4000:]}" for t in trainers]
        return "\n".join(parts)

    try:
        book = ingest_book(ingest.address, book_pdf(60, seed=77), parts=1).manifest.book_id
        job = create_job(ingest.address, book, tiny_job_config(steps=2))
        version = layout.adapter_version_id(job.job_id, 0)
        store = open_store(store_dir)

        # 1. The first trainer trains part 0, stages its adapter and freezes before completing.
        wait_for("the first trainer to stage and freeze", lambda: "FENCING-TEST: staged" in first.output(),
                 600, logs=logs)  # fmt: skip
        wait_for(
            "the first trainer to be stopped", lambda: _state(first.proc.popen.pid) == "T", 30, logs=logs
        )
        staged = store.list(layout.part_prefix(job.job_id, 0) + "publish/")
        assert any(key.endswith("/" + adapters.META) for key in staged), staged
        assert not store.exists(layout.adapter_meta_key(book, version))

        # 2. Its lease runs out; a second trainer takes the part over and completes it.
        def part_back() -> bool:
            part = get_job(ingest.address, job.job_id).parts[0]
            return part.state == J.PART_STATE_READY and part.attempts == 1

        wait_for("the frozen trainer's lease to expire", part_back, 60, every=0.2, logs=logs)
        second = start_trainer(store_dir, ingest.address, tmp_path, name="second")
        trainers.append(second)
        done = wait_job(ingest.address, job.job_id, 600, logs=logs)
        assert done.state == J.JOB_STATE_SUCCEEDED, f"{done.error}\n{logs()}"
        assert done.parts[0].worker_id == "second" and done.parts[0].adapter_version == version
        committed = _published(store, book)
        record = store.get_json(layout.part_metrics_key(job.job_id, 0))
        assert record["worker_id"] == "second"
        assert adapters.latest_version(store, book) == version

        # 3. The first trainer thaws: its completion is refused and publishes nothing.
        first.proc.signal(signal.SIGCONT)
        refused = "part abandoned: the coordinator refused its completion"
        wait_for("the thawed trainer's completion to be refused", lambda: refused in first.output(), 120,
                 logs=logs)  # fmt: skip
        assert "JobService/CompletePart code=ABORTED" in ingest.output(), logs()
        assert "part completion refused: nothing published" in ingest.output(), logs()
        assert _published(store, book) == committed  # files, meta.json and latest: the second's
        assert store.get_json(layout.part_metrics_key(job.job_id, 0)) == record
        assert "part completed" not in first.output()
        assert first.alive() and second.alive()
        # The first's staging stays in its own epoch's folder, the second's was published and removed.
        left = {
            key.split("/publish/")[1].split("/")[0]
            for key in store.list(layout.part_prefix(job.job_id, 0) + "publish/")
        }
        assert len(left) == 1 and int(left.pop()) < record["epoch"]
        final = get_job(ingest.address, job.job_id)
        assert final.state == J.JOB_STATE_SUCCEEDED and final.parts[0].attempts == 1
    finally:
        for trainer in trainers:
            trainer.proc.signal(signal.SIGCONT)
            trainer.stop()
        ingest.stop()
