"""Limits and identifiers, against real server processes.

Upload size, message size, request deadlines, and every identifier a client sends (book,
job, adapter version, part index, checkpoint key): bad ones are INVALID_ARGUMENT on
every RPC that takes one, nothing outside its place in the store is touched, and the
server keeps serving.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from fault_support import (
    Service,
    book_pdf,
    client_settings,
    ingest_book,
    ingest_requests,
    start_inference,
    start_ingest,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support import BOOKS, free_port, require_shared

from novelcrafter import layout
from novelcrafter.rpc import connect
from novelcrafter.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)

pytestmark = pytest.mark.integration
J = jobs_pb2

# Identifiers that try to leave their place: traversal, absolute paths, odd characters.
BAD_BOOK_IDS = [
    "../../etc/passwd",
    "/etc/passwd",
    "0123456789abcde/",
    "0123456789ABCDEF",
    "..",
    "0123456789abcdef/../x",
    "0123456789abcde\x00",
    "0123456789abcdé",
    "0123456789abcdef0",
    " 0123456789abcdef",
    "%2e%2e%2fsecret",
]
BAD_JOB_IDS = [
    "../jobs/j-0123456789ab",
    "/tmp/j-0123456789ab",
    "j-0123456789ab/../../x",
    "j-0123456789AB",
    "j-0123456789ab\n",
    "j-..",
    "j-0123456789ab/job.json",
]
BAD_VERSIONS = [
    "../j-0123456789ab-p00",
    "j-0123456789ab-p00/../../latest",
    "/j-0123456789ab-p00",
    "j-0123456789ab-p0",
    "latest\x00",
]


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _listing(wrong: dict[str, tuple[grpc.StatusCode, str]]) -> str:
    return "accepted or mis-coded:\n" + "\n".join(
        f"  {call}: {code.name} {message[:100]!r}" for call, (code, message) in wrong.items()
    )


def _serving(address: str) -> bool:
    with connect(address, client_settings()) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return status.status == health_pb2.HealthCheckResponse.SERVING


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def limited_ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    """An ingest server with small limits; its store is ``root/store``, a sentinel file sits beside it."""
    root = tmp_path_factory.mktemp("limits")
    (root / "secret").mkdir()
    (root / "secret" / "passwd").write_text("do not touch")
    env = {
        "NOVELCRAFTER_MAX_UPLOAD_MB": "1",
        "NOVELCRAFTER_MAX_MESSAGE_MB": "2",
        "NOVELCRAFTER_LEASE_SECONDS": "30",
    }
    server = start_ingest(str(root / "store"), root, env=env)
    yield server, root
    server.stop()


@pytest.mark.timeout(120)
def test_upload_over_the_size_limit_is_resource_exhausted(limited_ingest: tuple[Service, Path]) -> None:
    server, root = limited_ingest
    big = book_pdf(40) + b"%" + os.urandom(1_200_000)  # a PDF with 1.2 MB of trailing junk
    with connect(server.address, client_settings()) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        # Announced size: refused before any byte is buffered.
        code, message = _code(lambda: stub.IngestBook(ingest_requests(big, size_bytes=len(big)), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "NOVELCRAFTER_MAX_UPLOAD_MB" in message
        # Not announced: refused once the streamed bytes pass the limit.
        code, message = _code(lambda: stub.IngestBook(ingest_requests(big), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 MB" in message, message
    assert not (root / "store" / layout.book_prefix(layout.book_id_for(big))).exists()
    assert _serving(server.address)


@pytest.mark.timeout(120)
def test_message_over_the_size_limit_is_refused(limited_ingest: tuple[Service, Path]) -> None:
    """One gRPC message above NOVELCRAFTER_MAX_MESSAGE_MB (2 here) is refused by the transport."""
    server, _ = limited_ingest
    with connect(server.address, client_settings(max_message_mb=64)) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        def one_huge_message() -> Iterator[ingest_pb2.IngestBookRequest]:
            yield next(ingest_requests(b""))
            yield ingest_pb2.IngestBookRequest(chunk=b"\0" * (3 * 1024 * 1024))

        code, message = _code(lambda: stub.IngestBook(one_huge_message(), timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    assert _serving(server.address)


def _ingest_rpcs(stub: ingest_pb2_grpc.IngestServiceStub, book_id: str) -> dict[str, Callable[[], object]]:
    return {"GetBook": lambda: stub.GetBook(ingest_pb2.GetBookRequest(book_id=book_id), timeout=10)}


def _job_rpcs_by_book(
    stub: jobs_pb2_grpc.JobServiceStub, book_id: str, real_book: str
) -> dict[str, Callable[[], object]]:
    return {
        "CreateJob": lambda: stub.CreateJob(J.CreateJobRequest(book_id=book_id), timeout=10),
        "ListJobs": lambda: stub.ListJobs(J.ListJobsRequest(book_id=book_id), timeout=10),
        "CreateJob.init_adapter": lambda: stub.CreateJob(
            J.CreateJobRequest(
                book_id=real_book, config=common_pb2.JobConfig(init_adapter=f"{book_id}/latest")
            ),
            timeout=10,
        ),
    }


def _job_rpcs_by_job(stub: jobs_pb2_grpc.JobServiceStub, job_id: str) -> dict[str, Callable[[], object]]:
    lease = J.Lease(lease_id="0" * 32, job_id=job_id, part_index=0, worker_id="w")
    return {
        "GetJob": lambda: stub.GetJob(J.GetJobRequest(job_id=job_id), timeout=10),
        "CancelJob": lambda: stub.CancelJob(J.CancelJobRequest(job_id=job_id), timeout=10),
        "WatchJob": lambda: list(stub.WatchJob(J.WatchJobRequest(job_id=job_id), timeout=10)),
        "ClaimPart": lambda: stub.ClaimPart(J.ClaimPartRequest(worker_id="w", job_id=job_id), timeout=10),
        "ClaimPart.worker_id": lambda: stub.ClaimPart(
            J.ClaimPartRequest(worker_id="w\nforged log line"), timeout=10
        ),
        "RenewLease": lambda: stub.RenewLease(J.RenewLeaseRequest(lease=lease), timeout=10),
        "ReportProgress": lambda: stub.ReportProgress(J.ReportProgressRequest(lease=lease), timeout=10),
        "CompletePart": lambda: stub.CompletePart(J.CompletePartRequest(lease=lease), timeout=10),
        "FailPart": lambda: stub.FailPart(J.FailPartRequest(lease=lease, error="x"), timeout=10),
    }


@pytest.mark.timeout(120)
def test_bad_identifiers_are_invalid_argument_on_every_rpc(limited_ingest: tuple[Service, Path]) -> None:
    server, root = limited_ingest
    real_book = ingest_book(server.address, book_pdf(60, seed=23)).manifest.book_id
    before = _snapshot(root / "secret")
    with connect(server.address, client_settings()) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        wrong: dict[str, tuple[grpc.StatusCode, str]] = {}
        for book_id in BAD_BOOK_IDS:
            for name, call in {
                **_ingest_rpcs(ingest, book_id),
                **_job_rpcs_by_book(jobs, book_id, real_book),
            }.items():
                code, message = _code(call)
                if code != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong[f"{name}({book_id!r})"] = (code, message)
        for job_id in BAD_JOB_IDS:
            for name, call in _job_rpcs_by_job(jobs, job_id).items():
                code, message = _code(call)
                if code != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong[f"{name}({job_id!r})"] = (code, message)
        for version in BAD_VERSIONS:
            request = J.CreateJobRequest(
                book_id=real_book, config=common_pb2.JobConfig(init_adapter=f"{real_book}/{version}")
            )
            code, message = _code(lambda request=request: jobs.CreateJob(request, timeout=10))
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                wrong[f"CreateJob(init_adapter=…/{version!r})"] = (code, message)
        for config in (
            common_pb2.JobConfig(lora=common_pb2.LoraConfig(target_modules=["q_proj\n"])),
            common_pb2.JobConfig(lora=common_pb2.LoraConfig(target_modules=["../q_proj"])),
            common_pb2.JobConfig(hub_repo_id="owner/name\n"),
            common_pb2.JobConfig(hub_repo_id="../../owner/name"),
            common_pb2.JobConfig(base_model="smollm2\x00"),
        ):
            request = J.CreateJobRequest(book_id=real_book, config=config)
            code, message = _code(lambda request=request: jobs.CreateJob(request, timeout=10))
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                wrong[f"CreateJob({config})"] = (code, message)
        for part in (-1, layout.MAX_PARTS, 2**31 - 1):
            lease = J.Lease(lease_id="0" * 32, job_id="j-0123456789ab", part_index=part, worker_id="w")
            code, message = _code(lambda lease=lease: jobs.RenewLease(J.RenewLeaseRequest(lease=lease)))
            # The job does not exist either; either answer names the request as wrong, never INTERNAL.
            if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                wrong[f"RenewLease(part={part})"] = (code, message)
    assert not wrong, _listing(wrong)
    assert _snapshot(root / "secret") == before
    # Nothing beside the store, its log and the coordinator's own database (fault_support puts
    # it here: `ingest-coordinator.sqlite3`, with SQLite's -wal and -shm files).
    created = sorted(p.name for p in root.iterdir() if not p.name.startswith("ingest-coordinator.sqlite3"))
    assert created == sorted(["secret", "store", "ingest.log"])
    assert _serving(server.address)


@pytest.mark.timeout(180)
def test_worker_keys_outside_the_part_are_refused(limited_ingest: tuple[Service, Path]) -> None:
    """A leased worker reports a checkpoint key that climbs out of its part, or names another
    part or job: INVALID_ARGUMENT, and the job's resume point is unchanged."""
    server, _ = limited_ingest
    manifest = ingest_book(server.address, book_pdf(60, seed=21)).manifest
    with connect(server.address, client_settings()) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = jobs.CreateJob(J.CreateJobRequest(book_id=manifest.book_id), timeout=30)
        claim = jobs.ClaimPart(J.ClaimPartRequest(worker_id="w-limits", job_id=job.job_id), timeout=30)
        assert claim.assigned
        mine = layout.part_checkpoints_prefix(job.job_id, 0)
        escapes = [
            f"{mine}../../../../books/{manifest.book_id}/manifest.json",
            f"{mine}step-0000001/../../../01/checkpoints/step-0000001/",
            f"{mine}/step-0000001/",
            f"{mine}step-0000001/\x00",
            layout.part_checkpoints_prefix(job.job_id, 1) + "step-0000001/",
            "/" + mine,
            "../" + mine,
        ]
        wrong = {}
        for key in escapes:
            for name in ("ReportProgress", "FailPart"):
                if name == "ReportProgress":
                    request = J.ReportProgressRequest(lease=claim.lease, checkpoint_key=key)
                    call = jobs.ReportProgress
                else:
                    request = J.FailPartRequest(
                        lease=claim.lease, error="x", release=True, checkpoint_key=key
                    )
                    call = jobs.FailPart
                code, message = _code(lambda call=call, request=request: call(request, timeout=10))
                if code != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong[f"{name}({key!r})"] = (code, message)
                if code == grpc.StatusCode.OK and name == "FailPart":  # accepted: the part went back
                    claim = jobs.ClaimPart(
                        J.ClaimPartRequest(worker_id="w-limits", job_id=job.job_id), timeout=30
                    )
        stored = jobs.GetJob(J.GetJobRequest(job_id=job.job_id), timeout=10)
        jobs.CancelJob(J.CancelJobRequest(job_id=job.job_id), timeout=10)
    assert not wrong, _listing(wrong)
    assert stored.parts[0].checkpoint_key == ""


def _extraction_workers(server: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in server.children(recursive=True):
        try:
            if "novelcrafter.ingest.extract_sandbox" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def _idle(proc: psutil.Process, window: float = 2.0) -> bool:
    """The process used (almost) no CPU over ``window`` seconds: it is not working on anything."""
    before = sum(proc.cpu_times()[:2])
    time.sleep(window)
    return sum(proc.cpu_times()[:2]) - before < 0.1 * window


@pytest.mark.timeout(300)
def test_ingest_with_a_short_deadline_stops_working_after_it(tmp_path: Path) -> None:
    """A client gives up (deadline): the server stops working on it — its extraction workers end,
    the process goes idle — writes nothing for that book, and serves the next request."""
    require_shared(BOOKS)
    pdf = (BOOKS / "pride-and-prejudice.pdf").read_bytes()  # ~15 s of extraction on one worker
    server = start_ingest(str(tmp_path / "store"), tmp_path, env={"NOVELCRAFTER_EXTRACT_WORKERS": "1"})
    try:
        with connect(server.address, client_settings()) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            code, _ = _code(lambda: stub.IngestBook(ingest_requests(pdf, parts=3), timeout=2))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        server_proc = psutil.Process(server.proc.pid)
        wait_for(
            "the server to stop working on the abandoned ingest",
            lambda: not _extraction_workers(server_proc) and _idle(server_proc),
            180,
            logs=server.output,
        )
        assert not (tmp_path / "store" / layout.book_prefix(layout.book_id_for(pdf))).exists(), (
            "the server finished an ingest its client had abandoned"
        )
        assert ingest_book(server.address, book_pdf(60, seed=31)).manifest.book_id
    finally:
        server.stop()


# --- inference ------------------------------------------------------------------------------------

CAP_NEW_TOKENS = 300
CAP_PROMPT_TOKENS = 32


@dataclass
class Inference:
    service: Service
    root: Path
    metrics_port: int

    def stub(self, channel: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(channel)

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the server's own /metrics endpoint (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


@pytest.fixture(scope="module")
def limited_inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    """An inference server that runs ONE generation at a time with TWO waiting, with small caps."""
    root = tmp_path_factory.mktemp("limits-inference")
    (root / "secret").mkdir()
    (root / "secret" / "adapter_model.safetensors").write_bytes(b"not yours")
    metrics_port = free_port()
    env = {
        "NOVELCRAFTER_MAX_CONCURRENCY": "1",
        "NOVELCRAFTER_MAX_QUEUED": "2",
        "NOVELCRAFTER_MAX_NEW_TOKENS_CAP": str(CAP_NEW_TOKENS),
        "NOVELCRAFTER_MAX_PROMPT_TOKENS": str(CAP_PROMPT_TOKENS),
        "NOVELCRAFTER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    server = start_inference(str(root / "store"), root, env=env)
    yield Inference(server, root, metrics_port)
    assert server.alive(), server.output()[-3000:]
    server.stop()


def _request(prompt: str = "The night was long and", **fields: Any) -> inference_pb2.GenerateRequest:
    fields.setdefault("adapter", "base")
    return inference_pb2.GenerateRequest(prompt=prompt, **fields)


# A generation that holds the slot for all CAP_NEW_TOKENS: greedy without a repetition penalty
# falls into a loop that never samples end-of-sequence, whatever the kernels' rounding. A sampled
# one may draw end-of-sequence early and free the slot under the test.
HOLD = {"max_new_tokens": CAP_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": 1.0}


@pytest.mark.timeout(120)
def test_prompt_length_and_max_new_tokens_caps(limited_inference: Inference) -> None:
    long_prompt = " ".join(["lantern"] * 200)
    with connect(limited_inference.service.address, client_settings()) as channel:
        stub = limited_inference.stub(channel)
        cases = {
            "max_new_tokens over the cap": _request(max_new_tokens=CAP_NEW_TOKENS + 1),
            "negative max_new_tokens": _request(max_new_tokens=-5),
            "prompt over the token cap": _request(long_prompt, max_new_tokens=4),
            "prompt over the character cap": _request("x" * 300_000, max_new_tokens=4),
        }
        for what, request in cases.items():
            for name, call in (
                ("Generate", lambda r=request: stub.Generate(r, timeout=60)),
                ("GenerateStream", lambda r=request: list(stub.GenerateStream(r, timeout=60))),
            ):
                code, message = _code(call)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, name, code, message)
        _, message = _code(lambda: stub.Generate(cases["prompt over the token cap"], timeout=60))
        assert f"the limit is {CAP_PROMPT_TOKENS}" in message
        _, message = _code(lambda: stub.Generate(cases["max_new_tokens over the cap"], timeout=60))
        assert f"cap of {CAP_NEW_TOKENS}" in message
        assert stub.Generate(_request(max_new_tokens=3), timeout=120).completion_tokens >= 1


QUEUE_DEPTH = "novelcrafter_inference_queue_depth"
ACTIVE = "novelcrafter_inference_active_generations"
WAIT = "novelcrafter_inference_queue_wait_seconds"


@pytest.mark.timeout(180)
def test_generations_beyond_the_slot_wait_in_arrival_order_and_a_full_queue_is_refused(
    limited_inference: Inference,
) -> None:
    inf = limited_inference
    waits, waited = inf.metric(f"{WAIT}_count"), inf.metric(f"{WAIT}_sum")
    found_free = inf.metric(f"{WAIT}_bucket", le="0.0")
    with connect(inf.service.address, client_settings()) as channel:
        stub = inf.stub(channel)
        running = stub.GenerateStream(_request(**HOLD), timeout=300)
        next(running)  # the one slot is producing tokens now
        calls = [running]
        try:
            for depth, seed in ((1, 5), (2, 6)):  # one after the other: a known arrival order
                calls.append(stub.GenerateStream(_request(seed=seed, **HOLD), timeout=300))
                wait_for("the request to queue", lambda d=depth: inf.metric(QUEUE_DEPTH) == d, 60)
            first, second = calls[1:]
            code, message = _code(lambda: stub.Generate(_request(max_new_tokens=2), timeout=60))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in message, message
            assert "the queue is full (2 waiting, NOVELCRAFTER_MAX_QUEUED=2)" in message, message
            code, _ = _code(lambda: list(stub.GenerateStream(_request(max_new_tokens=2), timeout=60)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The slot frees: the request that came first takes it, the other keeps waiting.
            running.cancel()
            next(first)  # generating
            assert (inf.metric(QUEUE_DEPTH), inf.metric(ACTIVE)) == (1, 1)
            first.cancel()
            next(second)
            assert inf.metric(QUEUE_DEPTH) == 0
        finally:
            for call in calls:
                call.cancel()
        # Three requests got the slot: one found it free, two waited for it.
        assert inf.metric(f"{WAIT}_count") - waits == 3
        assert inf.metric(f"{WAIT}_bucket", le="0.0") - found_free == 1
        assert inf.metric(f"{WAIT}_sum") > waited
        wait_for("the slot to be free", lambda: stub.Generate(_request(max_new_tokens=2), timeout=60), 120)


@pytest.mark.timeout(180)
def test_a_queued_request_whose_deadline_passes_leaves_the_queue(limited_inference: Inference) -> None:
    """DEADLINE_EXCEEDED (also in the server's own count), out of the queue, and it never took
    the slot: the running generation keeps it."""
    inf = limited_inference
    labels = {"method": "Generate", "status": "DEADLINE_EXCEEDED", "book": "base", "adapter": "base"}
    expired, waits = (
        inf.metric("novelcrafter_inference_requests_total", **labels),
        inf.metric(f"{WAIT}_count"),
    )
    with connect(inf.service.address, client_settings()) as channel:
        stub = inf.stub(channel)
        running = stub.GenerateStream(_request(**HOLD), timeout=300)
        try:
            next(running)
            code, _ = _code(lambda: stub.Generate(_request(max_new_tokens=2), timeout=1.0))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(
                "the server to drop the expired request",
                lambda: (
                    inf.metric("novelcrafter_inference_requests_total", **labels) > expired
                    and inf.metric(QUEUE_DEPTH) == 0
                ),
                60,
                logs=inf.service.output,
            )
            assert inf.metric(ACTIVE) == 1
            next(running)  # still generating
            assert inf.metric(f"{WAIT}_count") - waits == 1  # only the running one got a slot
        finally:
            running.cancel()
        wait_for("the slot to be free", lambda: stub.Generate(_request(max_new_tokens=2), timeout=60), 120)


@pytest.mark.timeout(180)
def test_a_cancelled_queued_request_leaves_the_queue_and_frees_nothing(limited_inference: Inference) -> None:
    inf = limited_inference
    labels = {"method": "GenerateStream", "status": "CANCELLED", "book": "base", "adapter": "base"}
    cancelled = inf.metric("novelcrafter_inference_requests_total", **labels)
    with connect(inf.service.address, client_settings()) as channel:
        stub = inf.stub(channel)
        running = stub.GenerateStream(_request(**HOLD), timeout=300)
        calls = [running]
        try:
            next(running)
            calls.append(stub.GenerateStream(_request(seed=9, max_new_tokens=2), timeout=300))
            wait_for("the request to queue", lambda: inf.metric(QUEUE_DEPTH) == 1, 60)
            calls[1].cancel()
            wait_for(
                "the cancelled request to leave the queue",
                lambda: (
                    inf.metric("novelcrafter_inference_requests_total", **labels) > cancelled
                    and inf.metric(QUEUE_DEPTH) == 0
                ),
                60,
            )
            # It held no slot, so it gave none back: the next request waits as well.
            assert inf.metric(ACTIVE) == 1
            calls.append(stub.GenerateStream(_request(seed=10, max_new_tokens=2), timeout=300))
            wait_for("the next request to queue", lambda: inf.metric(QUEUE_DEPTH) == 1, 60)
            assert inf.metric(ACTIVE) == 1
            next(running)  # still generating
            running.cancel()
            assert [m.finish_reason for m in calls[2]][-1] in ("length", "eos")  # served after all
        finally:
            for call in calls:
                call.cancel()


@pytest.mark.timeout(180)
def test_generate_past_its_deadline_stops_using_the_server(limited_inference: Inference) -> None:
    """The client's deadline passes: the server cancels that generation (its status is CANCELLED,
    not OK after running to the end) and the one slot is free again."""
    inf = limited_inference
    labels = {"method": "Generate", "status": "CANCELLED", "book": "base", "adapter": "base"}
    cancelled = inf.metric("novelcrafter_inference_requests_total", **labels)
    produced = inf.metric("novelcrafter_inference_generated_tokens_total", book="base", adapter="base")
    with connect(inf.service.address, client_settings()) as channel:
        stub = inf.stub(channel)
        code, _ = _code(lambda: stub.Generate(_request(**HOLD), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            "the server to cancel the generation",
            lambda: (
                inf.metric("novelcrafter_inference_requests_total", **labels) > cancelled
                and inf.metric("novelcrafter_inference_active_generations") == 0
            ),
            120,
            logs=inf.service.output,
        )
        tokens = inf.metric("novelcrafter_inference_generated_tokens_total", book="base", adapter="base")
        assert tokens - produced < CAP_NEW_TOKENS
        assert stub.Generate(_request(max_new_tokens=2), timeout=60).completion_tokens >= 1


@pytest.mark.timeout(120)
def test_bad_identifiers_are_invalid_argument_on_inference(limited_inference: Inference) -> None:
    inf = limited_inference
    before = _snapshot(inf.root / "secret")
    # The server strips surrounding whitespace from ids, so those variants are not "bad" there.
    book_ids = [b for b in BAD_BOOK_IDS if b == b.strip()]
    adapters = [*BAD_VERSIONS, "part--1", "part-1/../2", "../latest", "latest/..", "base/../x"]
    wrong: dict[str, tuple[grpc.StatusCode, str]] = {}
    with connect(inf.service.address, client_settings()) as channel:
        stub = inf.stub(channel)
        calls: dict[str, Callable[[], object]] = {}
        for book_id in book_ids:
            for adapter in ("latest", "base", "part-0"):
                request = _request(book_id=book_id, adapter=adapter, max_new_tokens=2)
                calls[f"Generate({book_id!r}, {adapter})"] = lambda r=request: stub.Generate(r, timeout=30)
                calls[f"GenerateStream({book_id!r}, {adapter})"] = lambda r=request: list(
                    stub.GenerateStream(r, timeout=30)
                )
            for name, method, message in (
                ("ListAdapters", stub.ListAdapters, inference_pb2.ListAdaptersRequest),
                ("ReloadAdapters", stub.ReloadAdapters, inference_pb2.ReloadAdaptersRequest),
            ):
                calls[f"{name}({book_id!r})"] = lambda m=method, r=message(book_id=book_id): m(r, timeout=30)
        for adapter in adapters:
            request = _request(book_id="0123456789abcdef", adapter=adapter, max_new_tokens=2)
            calls[f"Generate(adapter={adapter!r})"] = lambda r=request: stub.Generate(r, timeout=30)
        for name, call in calls.items():
            code, message = _code(call)
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                wrong[name] = (code, message)
    assert not wrong, _listing(wrong)
    assert _snapshot(inf.root / "secret") == before
    assert inf.service.alive()
