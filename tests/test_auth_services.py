"""Bearer-token auth against each real service process, and the clients that send the token.

With ``NOVELCRAFTER_AUTH_TOKEN`` set on a service, every RPC but health needs
``authorization: Bearer <token>``: without it (or with a wrong one) the call is
UNAUTHENTICATED; with it, it succeeds. Health stays open (probes carry no token). The
CLI and the trainer worker send the token from the same variable. The token never
appears in any log or output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from certs import make_pki
from fault_support import (
    TOKEN,
    Service,
    book_pdf,
    client_settings,
    create_job,
    get_job,
    ingest_book,
    ingest_requests,
    start_inference,
    start_ingest,
    start_trainer,
    tiny_job_config,
    wait_for,
    wait_job,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import base_env, run_cli

from novelcrafter import layout
from novelcrafter.rpc import connect
from novelcrafter.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)

pytestmark = pytest.mark.integration
WRONG = "wrong-token-that-must-not-leak-4d2c"


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text, "the auth token leaked into a log or output"
        assert WRONG not in text, "a supplied (wrong) token leaked into a log or output"


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _health(address: str) -> int:
    with connect(address, client_settings()) as channel:  # no token
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@pytest.fixture(scope="module")
def ingest_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("auth-ingest")
    server = start_ingest(str(tmp / "store"), tmp, env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN})
    yield server
    server.stop()
    _assert_no_token(server.output())


def _reflection(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    return [s.name for answer in answers for s in answer.list_services_response.service]


def _ingest_calls(channel: grpc.Channel) -> dict[str, Callable[[], object]]:
    """One call of every kind (unary, client stream, server stream) on the ingest process."""
    ingest = ingest_pb2_grpc.IngestServiceStub(channel)
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    book, job = "0123456789abcdef", "j-0123456789ab"
    return {
        "ListBooks": lambda: ingest.ListBooks(ingest_pb2.ListBooksRequest(), timeout=10),
        "GetBook": lambda: ingest.GetBook(ingest_pb2.GetBookRequest(book_id=book), timeout=10),
        "IngestBook": lambda: ingest.IngestBook(ingest_requests(book_pdf(20)), timeout=30),
        "ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10),
        "CreateJob": lambda: jobs.CreateJob(jobs_pb2.CreateJobRequest(book_id=book), timeout=10),
        "ClaimPart": lambda: jobs.ClaimPart(jobs_pb2.ClaimPartRequest(worker_id="intruder"), timeout=10),
        "WatchJob": lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job), timeout=10)),
        "reflection": lambda: _reflection(channel),
    }


@pytest.mark.timeout(120)
def test_ingest_and_coordinator_refuse_calls_without_the_token(ingest_with_auth: Service) -> None:
    address = ingest_with_auth.address
    for token in (None, WRONG):
        with connect(address, client_settings(token)) as channel:
            calls = _ingest_calls(channel)
            codes = {name: _code(call) for name, call in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.UNAUTHENTICATED), (token, codes)
    # Nothing got in: the refused upload wrote no book.
    store = Path(ingest_with_auth.argv[-1])
    assert not (store / layout.book_prefix(layout.book_id_for(book_pdf(20)))).exists()
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(180)
def test_ingest_and_coordinator_accept_calls_with_the_token(ingest_with_auth: Service) -> None:
    address = ingest_with_auth.address
    with connect(address, client_settings(TOKEN)) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        manifest = ingest.IngestBook(ingest_requests(book_pdf(40, seed=3)), timeout=120).manifest
        assert manifest.book_id in [b.book_id for b in ingest.ListBooks(ingest_pb2.ListBooksRequest()).books]
        job = jobs.CreateJob(jobs_pb2.CreateJobRequest(book_id=manifest.book_id), timeout=30)
        assert jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=10).book_id == manifest.book_id
        # Cancelled: the slow test below must find only its own job in the queue.
        cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), timeout=10)
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
        services = _reflection(channel)
        assert {"novelcrafter.v1.IngestService", "novelcrafter.v1.JobService"} <= set(services)


@pytest.mark.timeout(180)
def test_cli_sends_the_token_from_the_environment(ingest_with_auth: Service, tmp_path: Path) -> None:
    address = ingest_with_auth.address
    pdf = tmp_path / "book.pdf"
    pdf.write_bytes(book_pdf(40, seed=5))
    common = {"NOVELCRAFTER_COORDINATOR": address}

    denied = run_cli("status", env=base_env(**common), timeout=60)
    assert denied.returncode == 1 and denied.stderr.startswith("error: ")
    assert "bearer token" in denied.stderr and "Traceback" not in denied.stderr
    denied = run_cli(
        "ingest", str(pdf), "--server", address, "--parts", "2", "--chunk-sentences", "4",
        env=base_env(NOVELCRAFTER_AUTH_TOKEN=WRONG, **common),
        timeout=60,
    )  # fmt: skip
    assert denied.returncode == 1 and "bearer token" in denied.stderr, denied.stderr

    with_token = base_env(NOVELCRAFTER_AUTH_TOKEN=TOKEN, **common)
    ok = run_cli(
        "ingest", str(pdf), "--server", address, "--parts", "2", "--chunk-sentences", "4", "--json",
        env=with_token,
        timeout=180,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert '"book_id"' in ok.stdout
    status = run_cli("status", env=with_token, timeout=60)
    assert status.returncode == 0, status.stderr
    _assert_no_token(denied.stdout, denied.stderr, ok.stdout, ok.stderr, status.stdout, status.stderr)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_trainer_worker_authenticates_to_the_coordinator(ingest_with_auth: Service, tmp_path: Path) -> None:
    """A worker with a wrong token cannot claim work; one with the right token trains the job."""
    address, store = ingest_with_auth.address, ingest_with_auth.argv[-1]
    manifest = ingest_book(address, book_pdf(40, seed=8), token=TOKEN, parts=1).manifest
    job = create_job(address, manifest.book_id, tiny_job_config(steps=1), token=TOKEN)

    intruder = start_trainer(
        store, address, tmp_path, name="intruder", env={"NOVELCRAFTER_AUTH_TOKEN": WRONG}
    )
    try:
        wait_for("the intruder's claim to be refused", lambda: "claim refused" in intruder.output(), 180,
                 logs=intruder.output)  # fmt: skip
        assert "bearer token" in intruder.output()
        part = get_job(address, job.job_id, token=TOKEN).parts[0]
        assert (part.state, part.worker_id, part.attempts) == (jobs_pb2.PART_STATE_READY, "", 0)
    finally:
        assert intruder.stop() == 0
    worker = start_trainer(store, address, tmp_path, name="worker", env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN})
    try:
        done = wait_job(address, job.job_id, 360, token=TOKEN, logs=worker.output)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.parts[0].worker_id in ("", "worker") and done.parts[0].adapter_version
    finally:
        worker.stop()
    _assert_no_token(intruder.output(), worker.output())


@pytest.fixture(scope="module")
def inference_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("auth-inference")
    server = start_inference(str(tmp / "store"), tmp, env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN})
    yield server
    server.stop()
    _assert_no_token(server.output())


def _inference_calls(channel: grpc.Channel) -> dict[str, Callable[[], object]]:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.GenerateRequest(prompt="Once upon a time", adapter="base", max_new_tokens=3)
    return {
        "Generate": lambda: stub.Generate(request, timeout=60),
        "GenerateStream": lambda: list(stub.GenerateStream(request, timeout=60)),
        "ListAdapters": lambda: stub.ListAdapters(inference_pb2.ListAdaptersRequest(), timeout=10),
        "ReloadAdapters": lambda: stub.ReloadAdapters(inference_pb2.ReloadAdaptersRequest(), timeout=30),
        "reflection": lambda: _reflection(channel),
    }


@pytest.mark.timeout(180)
def test_inference_refuses_calls_without_the_token_and_serves_with_it(inference_with_auth: Service) -> None:
    address = inference_with_auth.address
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    for token in (None, WRONG):
        with connect(address, client_settings(token)) as channel:
            calls = _inference_calls(channel)
            codes = {name: _code(call) for name, call in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.UNAUTHENTICATED), (token, codes)
    with connect(address, client_settings(TOKEN)) as channel:
        calls = _inference_calls(channel)
        codes = {name: _code(call) for name, call in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.OK), codes
        assert "novelcrafter.v1.InferenceService" in _reflection(channel)


@pytest.mark.timeout(180)
def test_generate_cli_sends_the_token_from_the_environment(inference_with_auth: Service) -> None:
    args = ("generate", "Once upon a time", "--adapter", "base", "--max-new-tokens", "3")
    common = {"NOVELCRAFTER_INFERENCE": inference_with_auth.address}
    denied = run_cli(*args, env=base_env(**common), timeout=120)
    assert denied.returncode == 1 and denied.stderr.startswith("error: ") and "bearer token" in denied.stderr
    ok = run_cli(*args, env=base_env(NOVELCRAFTER_AUTH_TOKEN=TOKEN, **common), timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "base" in ok.stderr
    _assert_no_token(denied.stdout, denied.stderr, ok.stdout, ok.stderr)


@pytest.mark.timeout(180)
def test_ingest_over_mutual_tls_with_auth_and_the_cli(tmp_path: Path) -> None:
    """The real ingest process with a server certificate, client-certificate verification and a
    token; certificates generated here. The CLI reaches it with the CA, its client certificate
    and the token from the environment; without the client certificate, or in plaintext, it
    cannot."""
    pki = make_pki(tmp_path / "pki")
    tls = {
        "tls_ca": str(pki.ca),
        "tls_client_cert": str(pki.client_cert),
        "tls_client_key": str(pki.client_key),
    }
    server = start_ingest(
        str(tmp_path / "store"),
        tmp_path,
        env={
            "NOVELCRAFTER_TLS_CERT": str(pki.server_cert),
            "NOVELCRAFTER_TLS_KEY": str(pki.server_key),
            "NOVELCRAFTER_TLS_CLIENT_CA": str(pki.ca),
            "NOVELCRAFTER_AUTH_TOKEN": TOKEN,
        },
        health_settings=client_settings(**tls),
    )
    try:
        with connect(server.address, client_settings(TOKEN, **tls)) as channel:
            jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
        env = {
            "NOVELCRAFTER_COORDINATOR": server.address,
            "NOVELCRAFTER_AUTH_TOKEN": TOKEN,
            "NOVELCRAFTER_TLS_CA": str(pki.ca),
        }
        client_cert = {
            "NOVELCRAFTER_TLS_CLIENT_CERT": str(pki.client_cert),
            "NOVELCRAFTER_TLS_CLIENT_KEY": str(pki.client_key),
        }
        ok = run_cli("status", env=base_env(**env, **client_cert), timeout=60)
        assert ok.returncode == 0, ok.stderr
        no_client_cert = run_cli("status", env=base_env(**env), timeout=60)
        assert no_client_cert.returncode == 1 and no_client_cert.stderr.startswith("error: ")
        plaintext = run_cli("status", env=base_env(NOVELCRAFTER_COORDINATOR=server.address), timeout=60)
        assert plaintext.returncode == 1 and plaintext.stderr.startswith("error: ")
        for result in (ok, no_client_cert, plaintext):
            assert "Traceback" not in result.stderr
            _assert_no_token(result.stdout, result.stderr)
    finally:
        server.stop()
    _assert_no_token(server.output())
