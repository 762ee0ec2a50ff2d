"""The job coordinator over real gRPC: the tests play trainer workers through the JobService API."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from test_coordinator_helpers import (
    TEST_SETTINGS,
    CoordinatorServer,
    Worker,
    make_book,
    rpc_code,
    stage_adapter,
    wait_until,
)

from novelcrafter import adapters, layout
from novelcrafter.progress import follow_job
from novelcrafter.store import Store, open_store
from novelcrafter.train_settings import TrainSettings
from novelcrafter.v1 import jobs_pb2

J = jobs_pb2
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "store"), TEST_SETTINGS, retry_seconds=1.0)


@pytest.fixture
def server(store: Store) -> Iterator[CoordinatorServer]:
    srv = CoordinatorServer(store, lease_seconds=1.0)
    yield srv
    srv.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_create_job_fills_model_card_defaults_and_persists(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=3)
    job = server.create(book)
    cfg = job.config
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.target_modules), cfg.lora.bias) == (
        8,
        32,
        0.05,
        ["q_proj", "v_proj"],
        "none",
    )
    tr = cfg.training
    assert (tr.epochs, tr.batch_size, tr.grad_accum, tr.learning_rate, tr.weight_decay) == (
        3,
        1,
        8,
        5e-5,
        0.01,
    )
    assert (tr.warmup_steps, tr.max_length, tr.checkpoint_every, tr.seed) == (100, 1024, 50, 0)
    judging = (tr.memorization_prompts, tr.memorization_new_tokens, tr.style_prompts, tr.style_new_tokens)
    assert judging == (16, 48, 8, 48)
    assert cfg.max_attempts == 3 and cfg.base_model == "smollm2-135m-instruct"
    assert job.state == J.JOB_STATE_PENDING and job.book_id == book
    assert [p.state for p in job.parts] == [J.PART_STATE_READY, J.PART_STATE_PENDING, J.PART_STATE_PENDING]
    with server.coordinator.db.transaction() as tx:  # persisted before the answer
        stored = json.loads(tx.one("SELECT record FROM jobs WHERE job_id = ?", (job.job_id,))[0])
    assert stored["job"]["config"]["training"]["epochs"] == 3
    # Explicit values win over defaults.
    job2 = server.create(book, training={"epochs": 1, "learning_rate": 1e-4}, lora={"r": 4})
    assert (job2.config.training.epochs, job2.config.training.learning_rate, job2.config.lora.r) == (
        1,
        1e-4,
        4,
    )
    assert job2.config.lora.alpha == 32
    assert metric("novelcrafter_coordinator_jobs", state="pending") == 2
    listed = server.stub.ListJobs(J.ListJobsRequest(book_id=book)).jobs
    assert [j.job_id for j in listed] == [job.job_id, job2.job_id]
    assert not server.stub.ListJobs(J.ListJobsRequest(book_id="0" * 16)).jobs


def test_memorization_and_style_settings_default_and_zero_turns_off(
    server: CoordinatorServer, store: Store
) -> None:
    """Optional fields: unset gets the default, an explicit 0 (off) is kept and reaches the worker."""
    book = make_book(store, parts=2)
    cfg = server.create(book).config
    assert TrainSettings.from_job_config(cfg).memorization_prompts == 16
    off = server.create(book, training={"memorization_prompts": 0, "style_prompts": 0}).config
    assert (off.training.memorization_prompts, off.training.style_prompts) == (0, 0)
    assert (off.training.memorization_new_tokens, off.training.style_new_tokens) == (48, 48)
    settings = TrainSettings.from_job_config(off)
    assert (settings.memorization_prompts, settings.style_prompts) == (0, 0)


def test_replay_fraction_defaults_to_off_and_reaches_the_worker(store: Store) -> None:
    """Unset = 0 (no replay, stored explicitly); a value in [0, 1) is kept; part k's assignment
    lists the training files of parts 0..k-1 (replay draws from them, never from test files)."""
    server = CoordinatorServer(store, lease_seconds=30.0)  # no lease expiry on a busy machine
    try:
        _replay_settings_reach_the_worker(server, store)
    finally:
        server.stop()


def _replay_settings_reach_the_worker(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=3)
    cfg = server.create(book).config
    assert cfg.training.HasField("replay_fraction") and cfg.training.replay_fraction == 0.0
    assert TrainSettings.from_job_config(cfg).replay_fraction == 0.0
    job = server.create(book, training={"replay_fraction": 0.25})
    assert TrainSettings.from_job_config(job.config).replay_fraction == 0.25
    worker = Worker(server, "replay-worker")
    for index in range(3):
        claim = worker.claim(job.job_id)
        assert claim.assigned and claim.assignment.part_index == index
        assert claim.assignment.config.training.replay_fraction == 0.25
        assert list(claim.assignment.earlier_train_keys) == [
            layout.part_train_key(book, i) for i in range(index)
        ]
        assert list(claim.assignment.earlier_test_keys) == [
            layout.part_test_key(book, i) for i in range(index)
        ]
        worker.complete(claim)


def test_bad_requests_are_clear_errors_and_write_nothing(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    stub = server.stub

    def create(book_id: str, **config: object) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            server.create(book_id, **config)
        return err.value

    err = create("0123456789abcdef")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ingest it first" in err.details()
    assert create("../etc/passwd").code() == grpc.StatusCode.INVALID_ARGUMENT
    err = create(book, lora={"r": -1}, training={"learning_rate": -0.5, "epochs": -2}, device="tpu")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in ("lora.r", "training.learning_rate", "training.epochs", "device"):
        assert needle in err.details()
    err = create(book, training={"memorization_prompts": -1, "memorization_new_tokens": 8})
    assert (
        "training.memorization_prompts" in err.details()
        and "training.memorization_new_tokens" in err.details()
    )
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        err = create(book, training={"replay_fraction": bad})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "training.replay_fraction must be in [0, 1)" in err.details(), (bad, err.details())
    err = create(book, init_adapter=f"{book}/j-0123456789ab-p00")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = create(book, init_adapter=f"{book}/latest")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no published adapter" in err.details()
    assert create(book, init_adapter="nonsense").code() == grpc.StatusCode.INVALID_ARGUMENT
    assert store.list("jobs/") == []  # nothing half-written
    assert (
        rpc_code(lambda: stub.GetJob(J.GetJobRequest(job_id="j-000000000000"))) == grpc.StatusCode.NOT_FOUND
    )
    assert rpc_code(lambda: stub.GetJob(J.GetJobRequest(job_id="x/../y"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        rpc_code(lambda: stub.CancelJob(J.CancelJobRequest(job_id="nope")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    bad_lease = J.Lease(lease_id="abc", job_id="j-000000000000", part_index=0)
    assert rpc_code(lambda: Worker(server, "w").renew(bad_lease)) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(lambda: Worker(server, "has space").claim()) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(lambda: Worker(server, "w", device="tpu").claim()) == grpc.StatusCode.INVALID_ARGUMENT
    # The service keeps serving.
    assert server.create(book).state == J.JOB_STATE_PENDING


def test_claims_are_sequential_within_a_job_and_parallel_across_jobs(
    server: CoordinatorServer, store: Store
) -> None:
    book = make_book(store, parts=2)
    first = server.create(book)
    second = server.create(book, training={"max_steps_per_part": 4})
    a, b, c = Worker(server, "worker-a"), Worker(server, "worker-b"), Worker(server, "worker-c")
    claimed_before = metric("novelcrafter_coordinator_parts_claimed_total")

    ca = a.claim()
    assert ca.assigned and (ca.assignment.job_id, ca.assignment.part_index) == (
        first.job_id,
        0,
    )  # oldest first
    cb = b.claim()
    assert cb.assigned and (cb.assignment.job_id, cb.assignment.part_index) == (second.job_id, 0)
    assert not c.claim().assigned  # part 1 of either job waits for its part 0
    assert metric("novelcrafter_coordinator_parts_claimed_total") == claimed_before + 2

    asg = ca.assignment
    assert asg.book_id == book and asg.num_parts == 2
    assert (asg.train_key, asg.test_key) == (layout.part_train_key(book, 0), layout.part_test_key(book, 0))
    assert (
        list(asg.earlier_test_keys) == [] and asg.init_adapter_key == "" and asg.resume_checkpoint_key == ""
    )
    assert asg.checkpoint_prefix == layout.part_checkpoints_prefix(first.job_id, 0)
    assert asg.adapter_version == layout.adapter_version_id(first.job_id, 0)
    assert asg.config.training.epochs == 3 and asg.config.lora.r == 8  # complete config
    assert cb.assignment.config.training.max_steps_per_part == 4
    assert ca.lease.ttl_seconds == 1.0 and ca.lease.expires_at > time.time() - 1
    assert ca.lease.worker_id == "worker-a"

    job = a.complete(ca)
    assert [p.state for p in job.parts] == [J.PART_STATE_SUCCEEDED, J.PART_STATE_READY]
    assert job.parts[0].adapter_version == asg.adapter_version and job.parts[0].metrics.train_loss == 2.0
    metrics_doc = store.get_json(layout.part_metrics_key(first.job_id, 0))
    assert (
        metrics_doc["metrics"]["train_loss"] == 2.0 and metrics_doc["adapter_version"] == asg.adapter_version
    )

    cc = c.claim()
    assert (cc.assignment.job_id, cc.assignment.part_index) == (first.job_id, 1)
    assert cc.assignment.init_adapter_key == layout.adapter_prefix(book, asg.adapter_version)
    assert list(cc.assignment.earlier_test_keys) == [layout.part_test_key(book, 0)]
    job = c.complete(cc)
    assert job.state == J.JOB_STATE_SUCCEEDED
    assert rpc_code(lambda: c.claim(first.job_id)) == grpc.StatusCode.FAILED_PRECONDITION  # finished job
    # Completing twice (a retried RPC whose answer was lost) answers the job again and changes
    # nothing: the version stays as first published.
    published = store.get(layout.adapter_meta_key(book, cc.assignment.adapter_version))
    again = c.complete(cc)
    assert again.state == J.JOB_STATE_SUCCEEDED and list(again.parts) == list(job.parts)
    assert store.get(layout.adapter_meta_key(book, cc.assignment.adapter_version)) == published


def test_concurrent_claims_never_hand_out_a_part_twice(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    jobs = {server.create(book).job_id for _ in range(3)}
    barrier = threading.Barrier(8)
    results: list[jobs_pb2.ClaimPartResponse] = []

    def claim(n: int) -> None:
        barrier.wait()
        results.append(Worker(server, f"racer-{n}").claim())

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [(r.assignment.job_id, r.assignment.part_index) for r in results if r.assigned]
    assert sorted(won) == sorted((job_id, 0) for job_id in jobs)  # each job's part 0 exactly once
    assert len(results) == 8


def test_complete_requires_the_right_staged_adapter(server: CoordinatorServer, store: Store) -> None:
    """CompletePart publishes what the lease staged: a wrong version, nothing staged in the lease's
    folder, or staged files that do not match their checksums are refused and publish nothing;
    then a good staging completes. (Renewals keep the 1-second lease alive throughout.)"""
    from novelcrafter.v1 import common_pb2

    book = make_book(store, parts=1)
    job = server.create(book)
    w = Worker(server, "w1")
    claim = w.claim()
    version = claim.assignment.adapter_version
    wrong = common_pb2.AdapterVersion(version=layout.adapter_version_id(job.job_id, 5))
    request = J.CompletePartRequest(lease=claim.lease, adapter=wrong)
    assert rpc_code(lambda: server.stub.CompletePart(request)) == grpc.StatusCode.INVALID_ARGUMENT
    unstaged = common_pb2.AdapterVersion(version=version)
    request = J.CompletePartRequest(lease=claim.lease, adapter=unstaged)
    assert rpc_code(lambda: server.stub.CompletePart(request)) == grpc.StatusCode.FAILED_PRECONDITION
    # Staged in another lease's folder (another epoch): not this lease's adapter.
    stage_adapter(store, book, job.job_id, 0, claim.lease.epoch + 1)
    w.renew(claim.lease)
    assert rpc_code(lambda: server.stub.CompletePart(request)) == grpc.StatusCode.FAILED_PRECONDITION
    # Staged, then a file changed: its checksum no longer matches the staged meta.
    stage_adapter(store, book, job.job_id, 0, claim.lease.epoch)
    staged = layout.part_publish_prefix(job.job_id, 0, claim.lease.epoch)
    store.put(staged + "adapter_model.safetensors", b"tampered")
    w.renew(claim.lease)
    err = rpc_code(lambda: server.stub.CompletePart(request))
    assert err == grpc.StatusCode.FAILED_PRECONDITION
    assert server.job(job.job_id).parts[0].state == J.PART_STATE_RUNNING
    assert store.list(layout.adapters_prefix(book)) == []  # nothing published
    assert adapters.latest_version(store, book) is None
    w.renew(claim.lease)
    assert w.complete(claim).state == J.JOB_STATE_SUCCEEDED
    meta = adapters.read_meta(store, book, version)
    assert adapters.latest_version(store, book) == version and meta.published_at > 0
    assert (
        store.get(meta.prefix + "adapter_model.safetensors")
        == f"weights of {job.job_id}-0 epoch {claim.lease.epoch}".encode()
    )
    assert store.list(staged) == []  # the staged copy is gone once published


def test_expired_lease_is_reclaimed_and_the_zombie_is_refused(
    server: CoordinatorServer, store: Store
) -> None:
    book = make_book(store, parts=2)
    job = server.create(book)
    zombie, rescuer = Worker(server, "zombie"), Worker(server, "rescuer")
    expiries = metric("novelcrafter_coordinator_lease_expiries_total")
    old = zombie.claim()
    checkpoint = layout.checkpoint_prefix(job.job_id, 0, 5)
    zombie.progress(old.lease, step=5, checkpoint=checkpoint)
    assert not rescuer.claim().assigned  # leased
    wait_until(lambda: server.job(job.job_id).parts[0].state == J.PART_STATE_READY, what="lease expiry")
    part = server.job(job.job_id).parts[0]
    assert part.attempts == 1 and "expired" in part.error and part.checkpoint_key == checkpoint
    assert metric("novelcrafter_coordinator_lease_expiries_total") == expiries + 1

    new = rescuer.claim()
    assert new.assigned and new.assignment.part_index == 0
    assert new.assignment.resume_checkpoint_key == checkpoint  # the rescuer resumes where the zombie was
    assert new.lease.lease_id != old.lease.lease_id
    for call in (
        lambda: zombie.complete(old),
        lambda: zombie.renew(old.lease),
        lambda: zombie.progress(old.lease, step=6),
        lambda: zombie.fail(old.lease, "late failure"),
    ):
        err_code = rpc_code(call)
        assert err_code == grpc.StatusCode.ABORTED
    forged = J.Lease(lease_id="f" * 32, job_id=job.job_id, part_index=0, worker_id="rescuer")
    assert rpc_code(lambda: rescuer.renew(forged)) == grpc.StatusCode.ABORTED
    done = rescuer.complete(new)
    assert done.parts[0].state == J.PART_STATE_SUCCEEDED
    # The zombie's late completion did not overwrite anything.
    assert store.get_json(layout.part_metrics_key(job.job_id, 0))["worker_id"] == "rescuer"


def test_renewals_and_progress_keep_a_lease_alive(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=1)
    job = server.create(book)
    w, other = Worker(server, "steady"), Worker(server, "other")
    claim = w.claim()
    lease = claim.lease
    end = time.monotonic() + 2.5 * server.lease_seconds
    step = 0
    while time.monotonic() < end:  # alternate renewals and progress reports, each within the lease
        time.sleep(server.lease_seconds / 4)
        step += 1
        renewed = w.renew(lease) if step % 2 else w.progress(lease, step=step).lease
        assert renewed.lease_id == lease.lease_id and renewed.expires_at >= lease.expires_at
        lease = renewed
        assert not other.claim().assigned
    part = server.job(job.job_id).parts[0]
    assert part.state == J.PART_STATE_RUNNING and part.attempts == 0 and part.step == step - step % 2
    assert w.complete(claim).state == J.JOB_STATE_SUCCEEDED


def test_failures_retry_up_to_the_limit_then_the_job_fails(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=3)
    job = server.create(book, max_attempts=2)
    w = Worker(server, "w")
    done = w.complete(w.claim())
    assert done.parts[1].state == J.PART_STATE_READY
    failed_total = metric("novelcrafter_coordinator_parts_failed_total", outcome="failed")

    first = w.claim()
    after = w.fail(first.lease, "CUDA out of memory")
    assert after.parts[1].state == J.PART_STATE_READY and after.parts[1].attempts == 1
    assert after.state == J.JOB_STATE_RUNNING
    second = w.claim()
    assert second.assignment.part_index == 1
    after = w.fail(second.lease, "CUDA out of memory again")
    assert after.state == J.JOB_STATE_FAILED
    assert "part 01" in after.error and "CUDA out of memory again" in after.error and "2 of 2" in after.error
    assert [p.state for p in after.parts] == [
        J.PART_STATE_SUCCEEDED,
        J.PART_STATE_FAILED,
        J.PART_STATE_CANCELLED,
    ]
    assert metric("novelcrafter_coordinator_parts_failed_total", outcome="failed") == failed_total + 1
    assert not w.claim().assigned
    assert server.stored_state(job.job_id) == "JOB_STATE_FAILED"

    # A non-retryable failure fails the job at once.
    job2 = server.create(book)
    claim = w.claim()
    assert claim.assignment.job_id == job2.job_id
    after = w.fail(claim.lease, "corrupt training data", retryable=False)
    assert after.state == J.JOB_STATE_FAILED and "not retryable" in after.error


def test_release_gives_the_part_back_without_counting_an_attempt(
    server: CoordinatorServer, store: Store
) -> None:
    book = make_book(store, parts=1)
    job = server.create(book, max_attempts=1)
    w1, w2 = Worker(server, "w1"), Worker(server, "w2")
    claim = w1.claim()
    checkpoint = layout.checkpoint_prefix(job.job_id, 0, 7)
    after = w1.fail(claim.lease, "SIGTERM: shutting down", release=True, checkpoint=checkpoint)
    part = after.parts[0]
    assert part.state == J.PART_STATE_READY and part.attempts == 0 and part.checkpoint_key == checkpoint
    again = w2.claim()
    assert again.assignment.resume_checkpoint_key == checkpoint
    outside = layout.part_prefix(job.job_id, 1)
    with pytest.raises(grpc.RpcError) as err:
        w2.progress(again.lease, step=1, checkpoint=outside + "x")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert w2.complete(again).state == J.JOB_STATE_SUCCEEDED


def test_cancel_stops_the_worker_and_refuses_its_result(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    job = server.create(book)
    w = Worker(server, "w")
    claim = w.claim()
    cancelled = server.stub.CancelJob(J.CancelJobRequest(job_id=job.job_id))
    assert cancelled.state == J.JOB_STATE_CANCELLED
    assert {p.state for p in cancelled.parts} == {J.PART_STATE_CANCELLED}
    assert w.progress(claim.lease, step=3).cancelled
    assert rpc_code(lambda: w.renew(claim.lease)) == grpc.StatusCode.ABORTED
    assert rpc_code(lambda: w.complete(claim)) == grpc.StatusCode.ABORTED
    assert w.fail(claim.lease, "cancelled", release=True).state == J.JOB_STATE_CANCELLED
    assert not w.claim().assigned
    assert server.stub.CancelJob(J.CancelJobRequest(job_id=job.job_id)).state == J.JOB_STATE_CANCELLED
    finished = server.create(make_book(store, parts=1, tag="short"))
    w.complete(w.claim())
    code = rpc_code(lambda: server.stub.CancelJob(J.CancelJobRequest(job_id=finished.job_id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_device_requirement(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=1)
    gpu_job = server.create(book, device="cuda")
    cpu, gpu = Worker(server, "cpu-1", "cpu"), Worker(server, "gpu-1", "cuda:0")
    assert not cpu.claim().assigned
    assert rpc_code(lambda: cpu.claim(gpu_job.job_id)) == grpc.StatusCode.FAILED_PRECONDITION
    any_job = server.create(book)
    claim = cpu.claim()
    assert claim.assignment.job_id == any_job.job_id  # a job with no requirement runs anywhere
    gclaim = gpu.claim()
    assert gclaim.assignment.job_id == gpu_job.job_id
    assert "gpu-1" in server.job(gpu_job.job_id).parts[0].worker_id


def test_restart_recovers_jobs_leases_and_history(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    live_job = server.create(book)
    lost_job = server.create(book)
    live, lost = Worker(server, "live"), Worker(server, "lost")
    live_claim = live.claim()
    checkpoint = layout.checkpoint_prefix(live_job.job_id, 0, 3)
    live.progress(live_claim.lease, step=3, checkpoint=checkpoint)
    lost.claim()  # this worker dies with the coordinator
    before = server.job(live_job.job_id)
    store.put("jobs/j-00000000dead/job.json", b"{not json")  # a damaged record must not stop recovery

    restarted = server.restart()
    try:
        live.server = lost.server = restarted
        after = restarted.job(live_job.job_id)
        assert after.parts[0].state == J.PART_STATE_RUNNING and after.parts[0].checkpoint_key == checkpoint
        assert after.config == before.config and after.created_at == before.created_at
        assert len(restarted.stub.ListJobs(J.ListJobsRequest()).jobs) == 2
        # The live worker's lease survived the restart: it renews and completes.
        renewed = live.renew(live_claim.lease)
        assert renewed.lease_id == live_claim.lease.lease_id
        # The lost worker never renews: its part becomes claimable after one lease period.
        rescuer = Worker(restarted, "rescuer")

        def lost_part_freed() -> bool:
            live.renew(live_claim.lease)  # the live worker keeps heartbeating meanwhile
            return restarted.job(lost_job.job_id).parts[0].state == J.PART_STATE_READY

        wait_until(lost_part_freed, what="the lost worker's lease to expire")
        claim = rescuer.claim()
        assert (claim.assignment.job_id, claim.assignment.part_index) == (lost_job.job_id, 0)
        live.renew(live_claim.lease)
        assert live.complete(live_claim).parts[1].state == J.PART_STATE_READY
        # History replays across the restart, and new events are numbered above the old ones.
        events = _collect(restarted, live_job.job_id, until=lambda e: e.WhichOneof("event") == "metrics")
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "job_state" and "progress" in kinds and "metrics" in kinds
        assert any("job created" in e.message for e in events)
        seqs = [e.sequence for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        restarted.stop()


def _collect(
    srv: CoordinatorServer, job_id: str, *, after: int = 0, until: object = None
) -> list[jobs_pb2.JobEvent]:
    """Read a WatchJob stream until ``until(event)`` or the stream ends."""
    events = []
    stream = srv.stub.WatchJob(J.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=30)
    for event in stream:
        events.append(event)
        if until is not None and until(event):  # type: ignore[operator]
            stream.cancel()
            break
    return events


def test_watch_job_streams_progress_and_states_until_the_end(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    job = server.create(book)
    seen: list[jobs_pb2.JobEvent] = []
    out = io.StringIO()
    result: dict[str, jobs_pb2.Job] = {}
    follower = threading.Thread(
        target=lambda: result.setdefault(
            "job", follow_job(server.channel, job.job_id, tty=False, on_event=seen.append, out=out)
        )
    )
    follower.start()
    w = Worker(server, "w")
    for _ in range(2):
        claim = w.claim()
        for step in (1, 2, 3):
            w.progress(claim.lease, step=step, total=3, loss=3.0 - step / 2)
        w.complete(claim, loss=1.5)
    follower.join(timeout=30)
    assert not follower.is_alive() and result["job"].state == J.JOB_STATE_SUCCEEDED
    kinds = [e.WhichOneof("event") for e in seen]
    assert kinds.count("metrics") == 2 and kinds.count("progress") == 6
    assert seen[-1].job_state == J.JOB_STATE_SUCCEEDED
    progress = [e.progress for e in seen if e.WhichOneof("event") == "progress"]
    assert [p.step for p in progress] == [1, 2, 3, 1, 2, 3] and progress[0].tokens_per_second == 1234.0
    part_states = [(e.part_index, e.part_state) for e in seen if e.WhichOneof("event") == "part_state"]
    assert (0, J.PART_STATE_RUNNING) in part_states and (1, J.PART_STATE_SUCCEEDED) in part_states
    text = out.getvalue()
    assert "part 00 step 3/3 loss 1.5000" in text and "part 01 results: train loss 1.5000" in text
    assert "perplexity base 30.00 → adapter 21.00" in text and "earlier parts p00 21.00" in text
    assert f"job {job.job_id} SUCCEEDED (2/2 parts)" in text
    # Replay after a sequence number gives exactly the later events, and ends (terminal job).
    middle = seen[len(seen) // 2].sequence
    replay = _collect(server, job.job_id, after=middle)
    assert [e.sequence for e in replay] == [e.sequence for e in seen if e.sequence > middle]


def test_watch_streams_end_cleanly_on_client_cancel_and_server_shutdown(store: Store) -> None:
    srv = CoordinatorServer(store, lease_seconds=5.0)
    job = srv.create(make_book(store, parts=1))
    # Client cancel: the stream ends and the server keeps serving.
    first = _collect(srv, job.job_id, until=lambda e: True)
    assert len(first) == 1
    assert srv.job(job.job_id).state == J.JOB_STATE_PENDING
    # An open stream on a running job does not hold the server's graceful stop for its grace period.
    stream = srv.stub.WatchJob(J.WatchJobRequest(job_id=job.job_id))
    next(stream)
    stopper = threading.Thread(target=srv.server.stop, kwargs={"grace": 30})
    stopper.start()
    rest = []
    try:
        rest.extend(stream)
    except grpc.RpcError as exc:  # the server may close the connection first
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    stopper.join(timeout=20)
    assert not stopper.is_alive(), "graceful stop waited on an open WatchJob stream"
    srv.channel.close()


def test_follow_job_survives_a_coordinator_restart(server: CoordinatorServer, store: Store) -> None:
    job = server.create(make_book(store, parts=2))
    w = Worker(server, "w")
    claim = w.claim()
    w.progress(claim.lease, step=1, total=2)
    seen: list[jobs_pb2.JobEvent] = []
    out = io.StringIO()
    result: dict[str, jobs_pb2.Job] = {}
    from novelcrafter.rpc import connect

    channel = connect(server.address, TEST_SETTINGS)
    follower = threading.Thread(
        target=lambda: result.setdefault(
            "job", follow_job(channel, job.job_id, tty=False, on_event=seen.append, out=out)
        )
    )
    follower.start()
    wait_until(lambda: any(e.WhichOneof("event") == "progress" for e in seen), what="first progress")
    restarted = server.restart()
    try:
        w.server = restarted
        w.complete(claim)
        w.complete(w.claim())
        follower.join(timeout=30)
        assert not follower.is_alive() and result["job"].state == J.JOB_STATE_SUCCEEDED
        seqs = [e.sequence for e in seen]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # no duplicates after reconnecting
        assert [e.part_index for e in seen if e.WhichOneof("event") == "metrics"] == [0, 1]
        assert f"job {job.job_id} SUCCEEDED (2/2 parts)" in out.getvalue()
    finally:
        channel.close()
        restarted.stop()
        server.server = restarted.server  # the fixture's stop is then a no-op


def test_a_store_outage_stops_only_what_needs_the_store(s3_settings: dict[str, str], tmp_path: Path) -> None:
    """Job state lives in the database: while the object store is away, claims, renewals,
    progress and failures go on; only what reads or writes the store (a new job reads the
    book's manifest) fails UNAVAILABLE, and a restart sees exactly the state before it."""
    from faultproxy import FaultProxy

    host, port = s3_settings["NOVELCRAFTER_S3_ENDPOINT"].split(":")
    proxy = FaultProxy(int(port), host)
    settings = TEST_SETTINGS.with_overrides(
        s3_endpoint=proxy.address, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    s3 = open_store(f"s3://coord-{uuid.uuid4().hex[:8]}/state", settings, retry_seconds=1.0)
    srv = CoordinatorServer(s3, lease_seconds=30.0, db=f"sqlite:///{tmp_path}/coordinator.sqlite3")
    try:
        job = srv.create(make_book(s3, parts=2))
        w = Worker(srv, "w")
        proxy.cut()
        assert rpc_code(lambda: srv.create(job.book_id)) == grpc.StatusCode.UNAVAILABLE
        claim = w.claim()
        assert claim.assigned and claim.assignment.part_index == 0
        w.renew(claim.lease)
        retried = w.fail(claim.lease, "oops")
        assert retried.parts[0].state == J.PART_STATE_READY and retried.parts[0].attempts == 1
        claim = w.claim()
        proxy.restore()
        assert len(srv.stub.ListJobs(J.ListJobsRequest()).jobs) == 1
        srv = srv.restart()
        w.server = srv
        recovered = srv.job(job.job_id)
        assert recovered.parts[0].state == J.PART_STATE_RUNNING and recovered.parts[0].attempts == 1
        assert w.complete(claim).parts[1].state == J.PART_STATE_READY
    finally:
        srv.stop()
        proxy.close()
