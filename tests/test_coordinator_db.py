"""The coordinator's database: its URL, migrations, the one-time import of jobs an older
coordinator kept in the store, and memory that does not grow with the history."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from novelcrafter.coordinator.core import Coordinator
from novelcrafter.coordinator.db import SCHEMA_VERSION, Database, default_url
from novelcrafter.coordinator.record import JobRecord, PartData
from test_coordinator_helpers import TEST_SETTINGS, CoordinatorServer, Worker, make_book

from novelcrafter import layout
from novelcrafter.errors import FailedPrecondition, InvalidArgument, Unavailable
from novelcrafter.store import open_store
from novelcrafter.v1 import common_pb2, jobs_pb2

J = jobs_pb2


def test_the_url_picks_the_database_and_a_bad_one_is_one_clear_error(tmp_path: Path) -> None:
    assert default_url(str(tmp_path / "data")) == f"sqlite:///{tmp_path}/data/coordinator.sqlite3"
    with pytest.raises(FailedPrecondition, match="set NOVELCRAFTER_DB"):
        default_url("s3://bucket/prefix")
    with pytest.raises(InvalidArgument, match="NOVELCRAFTER_DB must be sqlite"):
        Database("mysql://user:secret@host/db")
    unreachable = Database("postgresql://novelcrafter:s3cret-password@127.0.0.1:1/none")
    with pytest.raises(Unavailable) as info:
        unreachable.migrate()
    assert "127.0.0.1:1" in info.value.message and "s3cret-password" not in info.value.message


def test_a_newer_schema_is_refused_and_migrations_run_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/coordinator.sqlite3"
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(Database(url).migrate())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [SCHEMA_VERSION] * 4
    db = Database(url)
    with db.transaction() as tx:
        assert tx.all("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(FailedPrecondition, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
        db.migrate()
    db.close()


def test_postgres_migrations_run_once_for_replicas_starting_together(postgres) -> None:
    url = postgres.create_database()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(Database(url).migrate())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [SCHEMA_VERSION] * 4
    db = Database(url)
    with db.transaction() as tx:
        assert tx.all("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    db.close()


def _legacy_job(store, book_id: str, running_worker: str) -> JobRecord:
    """A job as an older coordinator wrote it: part 0 done, part 1 running under a lease."""
    from novelcrafter.coordinator.record import LeaseInfo

    job = J.Job(job_id=layout.new_job_id(), book_id=book_id, state=J.JOB_STATE_RUNNING)
    job.config.CopyFrom(common_pb2.JobConfig(max_attempts=3, base_model=TEST_SETTINGS.base_model))
    job.created_at = job.updated_at = 1.0
    job.parts.add(
        index=0, state=J.PART_STATE_SUCCEEDED, adapter_version=layout.adapter_version_id(job.job_id, 0)
    )
    job.parts.add(index=1, state=J.PART_STATE_RUNNING, worker_id=running_worker)
    parts = [PartData(layout.part_train_key(book_id, i), layout.part_test_key(book_id, i)) for i in range(2)]
    rec = JobRecord(job=job, part_data=parts)
    rec.leases[1] = LeaseInfo("legacy-lease-id", running_worker, "cpu", 4_000_000_000.0)
    data = rec.to_json()
    data["seq_reserved"] = 10_000  # what the older format also carried
    store.put_json(layout.job_key(job.job_id), data)
    events = [
        J.JobEvent(job_id=job.job_id, sequence=1, part_index=-1, job_state=J.JOB_STATE_PENDING),
        J.JobEvent(job_id=job.job_id, sequence=2, part_index=0, message="part 00 succeeded"),
    ]
    from google.protobuf import json_format

    lines = "".join(json.dumps(json_format.MessageToDict(e)) + "\n" for e in events)
    store.put(layout.job_events_key(job.job_id), lines)
    return rec


def test_jobs_kept_in_the_store_are_imported_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), TEST_SETTINGS)
    book = make_book(store, parts=2)
    legacy = _legacy_job(store, book, "old-worker")
    server = CoordinatorServer(store, lease_seconds=30.0)
    try:
        job = server.job(legacy.job_id)
        assert [p.state for p in job.parts] == [J.PART_STATE_SUCCEEDED, J.PART_STATE_RUNNING]
        events = list(server.coordinator.event_log(legacy.job_id).after(0))
        assert [e.sequence for e in events] == [1, 2]
        # The old worker's lease is honoured: it completes its part through the new coordinator.
        worker = Worker(server, "old-worker")
        again = worker.claim()  # it lost nothing: the same lease comes back
        assert again.lease.lease_id == "legacy-lease-id" and again.assignment.part_index == 1
        assert worker.complete(again).state == J.JOB_STATE_SUCCEEDED
        # A second start does not import again (the store's job.json is now stale).
        server = server.restart()
        assert server.job(legacy.job_id).state == J.JOB_STATE_SUCCEEDED
        with server.coordinator.db.transaction() as tx:
            assert tx.one("SELECT COUNT(*) FROM jobs")[0] == 1
    finally:
        server.stop()


def test_memory_and_claims_do_not_grow_with_the_history(tmp_path: Path) -> None:
    """Finished jobs live in the database only: the coordinator holds none of them in memory,
    and a claim reads one job's row, not the history."""
    from novelcrafter.coordinator.core import insert_job

    store = open_store(str(tmp_path / "store"), TEST_SETTINGS)
    book = make_book(store, parts=1)
    coordinator = Coordinator(store, TEST_SETTINGS, lease_seconds=30.0)
    try:
        with coordinator.db.transaction() as tx:
            for n in range(2000):
                job = J.Job(job_id=layout.new_job_id(), book_id=book, state=J.JOB_STATE_SUCCEEDED)
                job.created_at = float(n)
                job.parts.add(index=0, state=J.PART_STATE_SUCCEEDED)
                parts = [PartData(layout.part_train_key(book, 0), layout.part_test_key(book, 0))]
                insert_job(tx, JobRecord(job=job, part_data=parts), [])
        live = coordinator.create_job(book)
        claim = coordinator.claim_part("w", "cpu")
        assert claim.assigned and claim.assignment.job_id == live.job_id
        assert not hasattr(coordinator, "_jobs") and len(coordinator._logs) == 0
    finally:
        coordinator.close()
