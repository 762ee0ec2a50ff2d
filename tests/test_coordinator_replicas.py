"""The coordinator on PostgreSQL: several replicas at once, one killed mid-claims; a database outage.

Real processes (``novelcrafter serve coordinator``) and a real PostgreSQL server (the
``postgres`` fixture: Debian's binaries in a temporary folder). Workers are played over real
gRPC by :class:`test_coordinator_helpers.Worker`, spread over the replicas.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from novelcrafter.coordinator.db import Database
from support import NOVELCRAFTER, Proc, base_env, free_port
from test_coordinator_helpers import TEST_SETTINGS, CoordinatorServer, Worker, make_book, rpc_code

from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import Store, open_store
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

pytestmark = pytest.mark.integration
J = jobs_pb2
TERMINAL_PART = {J.PART_STATE_READY, J.PART_STATE_SUCCEEDED, J.PART_STATE_FAILED, J.PART_STATE_CANCELLED}


@dataclass
class Replica:
    """A ``serve coordinator`` process, reached through its own channel."""

    proc: Proc
    address: str
    store: Store
    channel: grpc.Channel = field(init=False)
    stub: jobs_pb2_grpc.JobServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = connect(self.address, TEST_SETTINGS)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    @property
    def alive(self) -> bool:
        return self.proc.popen.poll() is None


def start_replica(tmp_path: Path, name: str, store_dir: Path, db_url: str, lease_seconds: float) -> Replica:
    port = free_port()
    argv = [NOVELCRAFTER, "serve", "coordinator", "--listen", f"127.0.0.1:{port}", "--store", str(store_dir)]
    env = base_env(
        NOVELCRAFTER_DB=db_url,
        NOVELCRAFTER_LEASE_SECONDS=str(lease_seconds),
        NOVELCRAFTER_METRICS_LISTEN="off",
    )
    proc = Proc(argv, env, tmp_path / f"{name}.log")
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=60, settings=TEST_SETTINGS)
    except TimeoutError:
        raise AssertionError(f"{name} did not start:\n{proc.output()[-3000:]}")
    return Replica(proc, f"127.0.0.1:{port}", open_store(str(store_dir), TEST_SETTINGS))


@pytest.mark.slow
def test_three_replicas_share_one_queue_and_survive_one_killed(postgres, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir), TEST_SETTINGS)
    replicas = [start_replica(tmp_path, f"coordinator-{i}", store_dir, postgres.url, 3.0) for i in range(3)]
    try:
        jobs = [
            replicas[i % 3].stub.CreateJob(J.CreateJobRequest(book_id=make_book(store, parts=4)), timeout=30)
            for i in range(5)
        ]
        completed: list[tuple[str, int]] = []  # acknowledged to a worker
        lock = threading.Lock()
        stop = threading.Event()
        turn = itertools.count()

        def work(worker_id: str) -> None:
            worker = Worker(replicas[0], worker_id)  # type: ignore[arg-type]
            while not stop.is_set():
                live = [r for r in replicas if r.alive]
                worker.server = live[next(turn) % len(live)]  # type: ignore[assignment]
                try:
                    claim = worker.claim()
                    if not claim.assigned:
                        stop.wait(0.05)
                        continue
                    worker.renew(claim.lease)
                    worker.progress(claim.lease, step=1)
                    job = worker.complete(claim)
                except grpc.RpcError as exc:  # a replica killed under us, or a lease lost to expiry
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), exc
                    continue
                part = job.parts[claim.assignment.part_index]
                assert part.state == J.PART_STATE_SUCCEEDED
                with lock:
                    completed.append((claim.assignment.job_id, claim.assignment.part_index))

        workers = [threading.Thread(target=work, args=(f"w{i}",), daemon=True) for i in range(8)]
        for thread in workers:
            thread.start()
        time.sleep(2.0)  # claims are flowing through all three
        os.kill(replicas[1].proc.pid, signal.SIGKILL)
        replicas[1].proc.popen.wait(10)
        deadline = time.monotonic() + 180
        survivor = replicas[0].stub
        while time.monotonic() < deadline:
            states = [survivor.GetJob(J.GetJobRequest(job_id=j.job_id), timeout=30).state for j in jobs]
            if all(s == J.JOB_STATE_SUCCEEDED for s in states):
                break
            time.sleep(0.5)
        stop.set()
        for thread in workers:
            thread.join(60)
        final = [survivor.GetJob(J.GetJobRequest(job_id=j.job_id), timeout=30) for j in jobs]
        assert all(job.state == J.JOB_STATE_SUCCEEDED for job in final), [job.state for job in final]
        audit(postgres.url, final, completed)
    finally:
        for replica in replicas:
            replica.channel.close()
            replica.proc.stop()


def audit(db_url: str, jobs: list[jobs_pb2.Job], completed: list[tuple[str, int]]) -> None:
    """From the database's event history: no part was ever held by two live leases at once (a
    grant is always followed by that lease's end before the next grant), every part succeeded
    exactly once, and every completion a worker was told of is on record."""
    db = Database(db_url)
    try:
        with db.transaction() as tx:
            rows = tx.all("SELECT event FROM job_events ORDER BY job_id, seq")
    finally:
        db.close()
    events = [J.JobEvent.FromString(bytes(row[0])) for row in rows]
    grants = 0
    for job in jobs:
        for part in job.parts:
            states = [
                e.part_state
                for e in events
                if e.job_id == job.job_id
                and e.part_index == part.index
                and e.WhichOneof("event") == "part_state"
            ]
            held = False
            for state in states:
                if state == J.PART_STATE_RUNNING:
                    assert not held, f"{job.job_id} part {part.index} granted twice: {states}"
                    held = True
                    grants += 1
                elif state in TERMINAL_PART:
                    held = False
            assert states.count(J.PART_STATE_SUCCEEDED) == 1, (job.job_id, part.index, states)
    assert set(completed) <= {(job.job_id, part.index) for job in jobs for part in job.parts}
    assert len(completed) == len(set(completed)), "a part was completed twice"
    print(f"audit: {len(jobs)} jobs, {grants} grants, {len(completed)} completions acknowledged")


def test_a_database_outage_is_unavailable_and_loses_nothing(postgres, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), TEST_SETTINGS)
    server = CoordinatorServer(store, lease_seconds=60.0, db=postgres.url)
    try:
        job = server.create(make_book(store, parts=2))
        worker = Worker(server, "w")
        claim = worker.claim()
        postgres.stop()
        for call in (
            lambda: worker.renew(claim.lease),
            lambda: worker.claim(),
            lambda: server.job(job.job_id),
            lambda: server.create(job.book_id),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "database" in info.value.details() and postgres.password not in info.value.details()
        postgres.start()
        worker.renew(claim.lease)  # the pool reconnects: nothing to restart
        assert worker.complete(claim).parts[1].state == J.PART_STATE_READY
        assert rpc_code(lambda: worker.renew(claim.lease)) == grpc.StatusCode.ABORTED  # the part is done
    finally:
        server.stop()
