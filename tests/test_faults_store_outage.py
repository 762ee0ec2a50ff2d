"""The object store goes away for about 20 seconds in the middle of training.

Real processes: ``serve ingest`` (with the coordinator) and ``serve trainer``, both on a
moto S3 server behind a FaultProxy that cuts every connection and refuses new ones for
the outage. Both retry with backoff (their logs show it) instead of failing; training
carries on afterwards, the job succeeds, and every checkpoint and adapter left in the
store verifies (checksums) and loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    book_pdf,
    client_settings,
    create_job,
    get_job,
    ingest_book,
    start_ingest,
    start_trainer,
    tiny_job_config,
    verify_job_outputs,
    wait_for,
    wait_job,
)
from faultproxy import FaultProxy

from novelcrafter.rpc import connect
from novelcrafter.store import open_store
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

OUTAGE_SECONDS = 20
RETRY_LINE = "failed, retrying"  # what the store logs on each retried operation (novelcrafter/store.py)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_training_survives_a_20_second_store_outage(
    moto_server: dict[str, str], base_model: tuple[Any, Any], tmp_path: Path
) -> None:
    proxy = FaultProxy(int(moto_server["NOVELCRAFTER_S3_ENDPOINT"].rsplit(":", 1)[1]))
    env = {
        **moto_server,
        "NOVELCRAFTER_S3_ENDPOINT": proxy.address,
        "NOVELCRAFTER_STORE_RETRY_SECONDS": str(OUTAGE_SECONDS * 3),  # rides out the outage
    }
    store_url = "s3://outage-training/run"
    ingest = start_ingest(store_url, tmp_path, env=env)
    trainer = start_trainer(store_url, ingest.address, tmp_path, env=env)

    def logs() -> str:
        return f"--- ingest\n{ingest.output()[-3000:]}\n--- trainer\n{trainer.output()[-5000:]}"

    try:
        manifest = ingest_book(ingest.address, book_pdf(80, seed=41), parts=2).manifest
        job = create_job(ingest.address, manifest.book_id, tiny_job_config(steps=1))
        # Cut the network the moment part 1 is claimed: the worker is about to read its data
        # and the previous part's adapter, the coordinator to persist progress.
        claimed = f"part claimed job={job.job_id} part=1"
        wait_for("part 1 to be claimed", lambda: claimed in trainer.output(), 600, every=0.05, logs=logs)
        proxy.cut()
        cut_at = time.monotonic()
        during = get_job(ingest.address, job.job_id)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
        proxy.restore()
        assert during.state == jobs_pb2.JOB_STATE_RUNNING

        done = wait_job(ingest.address, job.job_id, 600, logs=logs)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{done.error}\n{logs()}"
        assert proxy.refused > 0, "nothing tried the store during the outage"
        assert RETRY_LINE in trainer.output(), "the worker did not retry the store:\n" + logs()
        # The coordinator's job state is in its database: it needs the store only to publish.
        assert "Traceback" not in trainer.output() + ingest.output(), logs()
    finally:
        trainer.stop()
        ingest.stop()
        proxy.close()

    store = open_store(store_url, client_settings(**_s3(moto_server)))
    counts = verify_job_outputs(store, done, base_model[0], "smollm2-135m-instruct")
    assert counts["adapters"] == 2 and counts["checkpoints"] >= 2, counts


def _s3(env: dict[str, str]) -> dict[str, str]:
    return {
        "s3_endpoint": env["NOVELCRAFTER_S3_ENDPOINT"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_coordinator_answers_reads_and_renewals_during_a_store_outage(
    moto_server: dict[str, str], tmp_path: Path
) -> None:
    """While the store is away, job state the coordinator already holds stays readable and a
    running worker's lease stays renewable: only durable changes wait for the store."""
    proxy = FaultProxy(int(moto_server["NOVELCRAFTER_S3_ENDPOINT"].rsplit(":", 1)[1]))
    env = {**moto_server, "NOVELCRAFTER_S3_ENDPOINT": proxy.address, "NOVELCRAFTER_STORE_RETRY_SECONDS": "60"}
    ingest = start_ingest("s3://outage-reads/run", tmp_path, env=env)
    try:
        manifest = ingest_book(ingest.address, book_pdf(60, seed=43), parts=1).manifest
        job = create_job(ingest.address, manifest.book_id, tiny_job_config())
        with connect(ingest.address, client_settings()) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            claim = stub.ClaimPart(jobs_pb2.ClaimPartRequest(worker_id="w-outage"), timeout=30)
            assert claim.assigned
            proxy.cut()
            started = time.monotonic()
            for _ in range(10):  # ~10 s of a worker's heartbeats and a client's polling
                stub.RenewLease(jobs_pb2.RenewLeaseRequest(lease=claim.lease), timeout=10)
                progress = jobs_pb2.ProgressUpdate(step=1, total_steps=2, loss=1.0, phase="train")
                stub.ReportProgress(
                    jobs_pb2.ReportProgressRequest(lease=claim.lease, progress=progress), timeout=10
                )
                assert stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=10).parts[0].step == 1
                time.sleep(1)
            assert time.monotonic() - started < 60  # still inside the outage: nothing waited for it
    finally:
        proxy.restore()
        ingest.stop()
        proxy.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_claim_that_timed_out_in_a_store_outage_is_not_lost(
    moto_server: dict[str, str], tmp_path: Path
) -> None:
    proxy = FaultProxy(int(moto_server["NOVELCRAFTER_S3_ENDPOINT"].rsplit(":", 1)[1]))
    env = {**moto_server, "NOVELCRAFTER_S3_ENDPOINT": proxy.address, "NOVELCRAFTER_STORE_RETRY_SECONDS": "60"}
    ingest = start_ingest("s3://outage-claims/run", tmp_path, env=env)
    try:
        manifest = ingest_book(ingest.address, book_pdf(60, seed=47), parts=1).manifest
        job = create_job(ingest.address, manifest.book_id, tiny_job_config())
        with connect(ingest.address, client_settings()) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            request = jobs_pb2.ClaimPartRequest(worker_id="w-claims")
            proxy.cut()
            # Job state is in the coordinator's database: claims need no store.
            first = stub.ClaimPart(request, timeout=10)
            assert first.assigned
            # Its answer was lost (a timeout): the worker asks again, as it does after a
            # transient error, and gets the same lease back, renewed.
            claim = stub.ClaimPart(request, timeout=10)
            assert claim.assigned and claim.lease.lease_id == first.lease.lease_id, "the part is stranded"
            assert claim.lease.epoch == first.lease.epoch and claim.lease.expires_at >= first.lease.expires_at
            proxy.restore()
            part = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=10).parts[0]
            assert part.attempts == 0
    finally:
        proxy.restore()
        ingest.stop()
        proxy.close()
