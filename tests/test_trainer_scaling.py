"""Scaling with real processes: a coordinator (`serve ingest`) and two `serve trainer` workers.

Two jobs progress in parallel, one per worker; then one worker is SIGKILLed mid-part, and
the other finishes that job after the lease expires, resuming from the dead worker's
checkpoint. Every part ends up published exactly once; the survivor exits 0 on SIGTERM.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from support import NOVELCRAFTER, Proc, base_env, free_port
from test_trainer_helpers import write_book

from novelcrafter import adapters, layout
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

BOOKS = ("1111aaaa2222bbbb", "3333cccc4444dddd")
LEASE_SECONDS = 6  # short, so the test waits little for the dead worker's lease to expire


def _wait(what: str, predicate, timeout: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.popen.poll() is not None and proc.popen.returncode not in (0, -9):
                raise AssertionError(
                    f"{proc.args[1:3]} exited {proc.popen.returncode}:\n{proc.output()[-3000:]}"
                )
        time.sleep(0.1)
    logs = "\n\n".join(p.output()[-2500:] for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_workers_two_jobs_then_a_killed_worker_is_replaced(tmp_path: Path, base_model_dir: Path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    for offset, book in enumerate(BOOKS):
        write_book(store, book, parts=2, train_chunks=4, test_chunks=1, offset=offset * 10)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = base_env(
        NOVELCRAFTER_STORE=str(store_dir),
        NOVELCRAFTER_COORDINATOR=address,
        NOVELCRAFTER_LEASE_SECONDS=str(LEASE_SECONDS),
        NOVELCRAFTER_METRICS_LISTEN="off",
        OMP_NUM_THREADS="1",  # two workers share two cores
    )
    procs: list[Proc] = []
    try:
        coordinator = Proc(
            [NOVELCRAFTER, "serve", "ingest", "--listen", address], env, tmp_path / "coordinator.log"
        )
        procs.append(coordinator)
        wait_for_health(address, timeout=120)
        channel = connect(address)
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        training = common_pb2.TrainingConfig(
            epochs=2, grad_accum=2, max_length=96, max_steps_per_part=3, checkpoint_every=1, eval_max_chunks=1
        )
        jobs = [
            stub.CreateJob(
                jobs_pb2.CreateJobRequest(book_id=book, config=common_pb2.JobConfig(training=training)),
                timeout=30,
            ).job_id
            for book in BOOKS
        ]
        workers = {
            name: Proc(
                [
                    NOVELCRAFTER,
                    "serve",
                    "trainer",
                    "--device",
                    "cpu",
                    "--worker-id",
                    name,
                    "--poll-seconds",
                    "0.3",
                ],
                env,
                tmp_path / f"{name}.log",
            )
            for name in ("worker-a", "worker-b")
        }
        procs.extend(workers.values())

        def get(job_id: str) -> jobs_pb2.Job:
            return stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)

        # 1. Both jobs run at the same time, on different workers.
        running: dict[str, tuple[str, int]] = {}

        def both_running() -> bool:
            running.clear()
            for job_id in jobs:
                for part in get(job_id).parts:
                    if part.state == jobs_pb2.PART_STATE_RUNNING:
                        running[part.worker_id] = (job_id, part.index)
            return len(running) == 2

        _wait("both jobs running in parallel", both_running, 300, procs)
        assert {job for job, _ in running.values()} == set(jobs)

        # 2. SIGKILL the worker that holds a part with a checkpoint, in the middle of that part.
        victim: dict[str, object] = {}

        def mid_part_with_checkpoint() -> bool:
            for job_id in jobs:
                for part in get(job_id).parts:
                    if (
                        part.state == jobs_pb2.PART_STATE_RUNNING
                        and 1 <= part.step < 3
                        and part.checkpoint_key
                    ):
                        victim.update(
                            worker=part.worker_id, job=job_id, part=part.index, key=part.checkpoint_key
                        )
                        return True
            return False

        _wait("a part in progress with a checkpoint", mid_part_with_checkpoint, 300, procs)
        workers[victim["worker"]].kill()
        survivor = next(name for name in workers if name != victim["worker"])

        # 3. The survivor finishes everything, including the dead worker's part after its lease expired.
        def all_done() -> bool:
            return all(get(job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED for job_id in jobs)

        _wait("both jobs to succeed", all_done, 400, procs)
        taken = get(victim["job"]).parts[victim["part"]]
        assert taken.worker_id == survivor
        assert taken.attempts == 1  # the expired lease counted as one failed attempt
        events = list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=victim["job"]), timeout=30))
        messages = [e.message for e in events if e.HasField("message")]
        assert any("expired" in m for m in messages)
        claims = [
            m for m in messages if m.startswith(f"part {victim['part']:02d} claimed by worker {survivor}")
        ]
        assert len(claims) == 1 and "resuming from" in claims[0]  # resumed from the checkpoint, not from 0

        for book, job_id in zip(BOOKS, jobs, strict=True):
            job = get(job_id)
            versions = [layout.adapter_version_id(job_id, i) for i in range(2)]
            assert [p.adapter_version for p in job.parts] == versions
            for p in job.parts:  # the whole schedule was trained (a few optimizer steps)
                assert p.state == jobs_pb2.PART_STATE_SUCCEEDED
                assert p.metrics.steps == len(p.metrics.loss_curve) == p.total_steps >= 2
            # Every part's adapter exactly once: one complete version per part, one success event per part.
            assert [(m.job_id, m.part) for m in adapters.list_versions(store, book)] == [
                (job_id, 0),
                (job_id, 1),
            ]
            assert adapters.latest_version(store, book) == versions[-1]
            succeeded = [
                e.part_index
                for e in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=30)
                if e.HasField("part_state") and e.part_state == jobs_pb2.PART_STATE_SUCCEEDED
            ]
            assert succeeded == [0, 1]
        channel.close()

        # 4. The survivor, idle now, stops cleanly on SIGTERM.
        workers[survivor].signal(signal.SIGTERM)
        assert workers[survivor].popen.wait(60) == 0
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=30)
