"""The compose wiring, proved as processes (issue 7, requirement 5).

docker-compose.yml is read, not rewritten: for the coordinator's replicas (its
``deploy.replicas``), ingest, two trainer replicas and inference the test runs the image's
ENTRYPOINT + the service's ``command`` with the environment compose would give the container
(the image's ENV, ``env_file: .env`` — as ``make env`` writes it — and ``environment``,
interpolated), as local processes on loopback. Only what Docker would provide changes: the
MinIO endpoint becomes moto's S3 server, the ``postgres`` service a local PostgreSQL server
set up from that service's environment (user, password, database), service hostnames become
127.0.0.1, container ports become free local ports, and the image's paths
(/opt/novelcrafter, /tmp) become local folders. A service name with several replicas
resolves, as Docker's DNS spreads clients over them, to one replica per client: the two
trainers each talk to a different coordinator replica. The bucket is created the way the
``minio-init`` container does; each container starts once the services it ``depends_on``
pass their compose health checks. Then two short books go through ingest (two jobs, so that
both trainer replicas train a part; ingest hosts one more coordinator replica, on the same
database) and inference, with the compose auth token on every call, every coordinator
replica reports the same finished jobs, and a generation comes back from the trained adapter.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import NOVELCRAFTER, Proc, base_env, free_port
from test_deploy_support import DOCKERFILES, SAME_IMAGE_AS, dockerfile_stages, load_compose, service_env

from novelcrafter.config import Settings
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

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRAINERS = 2  # `docker compose up --scale trainer=2`, as the README's quickstart
LOCAL_ADDRESS = re.compile(r"(?:0\.0\.0\.0|127\.0\.0\.1|localhost):(?P<port>\d+)")


@dataclass
class Container:
    """One compose container, as a local process."""

    service: str
    replica: int
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    ports: dict[int, int]  # container port -> local port
    proc: Proc | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.replica}"

    def address(self, container_port: int) -> str:
        return f"127.0.0.1:{self.ports[container_port]}"


class Localizer:
    """Maps what Docker provides (service DNS names, container ports, image paths) to loopback."""

    def __init__(self, s3_endpoint: str, home: Path, scratch: Path) -> None:
        self.hosts: dict[str, list[str]] = {"minio:9000": [s3_endpoint]}
        self.paths = {"/opt/novelcrafter": str(home), "/tmp/": f"{scratch}/"}

    def publish(self, service: str, container_port: int, local_port: int) -> None:
        self.hosts[f"{service}:{container_port}"] = [f"127.0.0.1:{local_port}"]

    def resolve(self, service: str, container_port: int, addresses: list[str]) -> None:
        """``service:port`` reaches these replicas: client replica N gets replica N (cyclically)."""
        self.hosts[f"{service}:{container_port}"] = addresses

    def value(self, text: str, ports: dict[int, int], replica: int = 1) -> str:
        """One pass, so that an address already mapped is not mapped again."""
        names = "|".join(re.escape(host) for host in self.hosts)
        pattern = re.compile(rf"\b(?:(?P<name>{names})|{LOCAL_ADDRESS.pattern})\b")

        def local(match: re.Match[str]) -> str:
            if match["name"]:
                addresses = self.hosts[match["name"]]
                return addresses[(replica - 1) % len(addresses)]
            return f"127.0.0.1:{ports.setdefault(int(match['port']), free_port())}"

        text = pattern.sub(local, text)
        for path, local_path in self.paths.items():
            if text.startswith(path):
                text = local_path + text[len(path) :]
        return text


def image_env(service: str) -> dict[str, str]:
    """The runtime image's ENV (PATH aside: the local venv stands in for /opt/venv)."""
    env = dockerfile_stages(DOCKERFILES[SAME_IMAGE_AS.get(service, service)])[-1].env()
    env.pop("PATH", None)
    return env


def replicas(compose: dict[str, Any]) -> dict[str, int]:
    """The services run here, in start order, with their number of containers."""
    coordinators = compose["services"]["coordinator"]["deploy"]["replicas"]
    assert coordinators >= 2, "the point of the coordinator service: replicas on one database"
    return {"coordinator": coordinators, "ingest": 1, "trainer": TRAINERS, "inference": 1}


# A service's gRPC port that its replicas' clients reach by its name (not published to the host).
INTERNAL_PORTS = {"coordinator": 50054}


def plan(compose: dict[str, Any], localizer: Localizer) -> list[Container]:
    """Every container of the deployment, in start order, with its argv, env and health check."""
    containers = []
    published: dict[str, dict[int, int]] = {}  # host ports: known to every container up front
    for service in replicas(compose):
        for mapping in compose["services"][service].get("ports", []):
            container_port = int(str(mapping).rsplit(":", 1)[-1])
            local_port = free_port()
            published.setdefault(service, {})[container_port] = local_port
            localizer.publish(service, container_port, local_port)
    for service, count in replicas(compose).items():
        spec = compose["services"][service]
        image = DOCKERFILES[SAME_IMAGE_AS.get(service, service)]
        assert dockerfile_stages(image)[-1].exec_form("ENTRYPOINT") == ["novelcrafter"]
        for replica in range(1, count + 1):
            ports = dict(published.get(service, {}))
            env = {**image_env(service), **service_env(spec)}
            env = {key: localizer.value(value, ports, replica) for key, value in env.items()}
            argv = [NOVELCRAFTER, *(localizer.value(arg, ports, replica) for arg in spec["command"])]
            test = spec["healthcheck"]["test"]
            assert test[0] == "CMD" and test[1] == "python"
            health = [sys.executable, *(localizer.value(arg, ports, replica) for arg in test[2:])]
            containers.append(Container(service, replica, argv, env, health, ports))
        if service in INTERNAL_PORTS:  # Docker's DNS: the name reaches every replica
            port = INTERNAL_PORTS[service]
            localizer.resolve(service, port, [c.address(port) for c in containers if c.service == service])
    return containers


def book_pdf(path: Path, sentences: int, seed: int) -> bytes:
    """A short book: unique, plain sentences over a few pages (fpdf2)."""
    from fpdf import FPDF

    rng = random.Random(seed)
    names = ["Mara", "Tobin", "Elsie", "the ferryman", "the old miller", "Captain Reed", "the widow"]
    verbs = ["watched", "carried", "mended", "followed", "counted", "painted", "buried", "found"]
    things = ["the lantern", "a broken oar", "the grey nets", "a letter", "the salt barrels", "a wooden box"]
    places = ["by the harbour", "under the bridge", "near the chapel", "on the cliff path", "in the cellar"]
    times = ["at dawn", "before the storm", "after supper", "in the rain", "while the bells rang"]
    pdf = FPDF()
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    text = " ".join(
        f"{rng.choice(names).capitalize()} {rng.choice(verbs)} {rng.choice(things)} "
        f"{rng.choice(places)} {rng.choice(times)}, and line {i + 1} of the tale was told."
        for i in range(sentences)
    )
    pdf.multi_cell(0, 6, text)
    data = bytes(pdf.output())
    path.write_bytes(data)
    return data


def create_bucket(env: dict[str, str], command: str) -> None:
    """What the minio-init container does (`mc mb --ignore-existing local/<bucket>`), via S3."""
    from minio import Minio

    bucket = re.search(r"mc mb --ignore-existing local/([a-z0-9.-]+)", command)[1]
    client = Minio(
        env["NOVELCRAFTER_S3_ENDPOINT"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    assert env["NOVELCRAFTER_STORE"].startswith(f"s3://{bucket}/")


def start(container: Container, logs: Path) -> None:
    container.proc = Proc(container.argv, base_env(**container.env), logs / f"{container.name}.log")


def healthy(container: Container) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        container.healthcheck, env=base_env(**container.env), capture_output=True, text=True, timeout=60
    )


def wait_healthy(container: Container, timeout: float) -> None:
    """Poll the compose health check until it passes (what depends_on: service_healthy waits for)."""
    deadline = time.monotonic() + timeout
    result = None
    while time.monotonic() < deadline:
        proc = container.proc
        assert proc and proc.popen.poll() is None, (
            f"{container.name} exited with {proc.popen.returncode}:\n{proc.output()[-4000:]}"
        )
        result = healthy(container)
        if result.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{container.name} not healthy after {timeout}s: {result and result.stderr}")


POSTGRES_PORT = 5432  # the image's


def start_postgres(compose: dict[str, Any], localizer: Localizer) -> Any:
    """The ``postgres`` service as a local server (tests/pg_support.py), set up the way its image
    does it from the service's environment (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB), and
    healthy once the service's health check (pg_isready) passes against it. Skips without
    PostgreSQL's server programs (fails under CI=true), like the ``postgres`` fixture."""
    from pg_support import PostgresServer, require_binaries

    spec = compose["services"]["postgres"]
    env = spec["environment"]
    server = PostgresServer(require_binaries(), user=env["POSTGRES_USER"], database=env["POSTGRES_DB"])
    server.password = env["POSTGRES_PASSWORD"]  # .env's, which NOVELCRAFTER_DB carries too
    try:
        server.start()
        test = spec["healthcheck"]["test"]
        assert test[:2] == ["CMD", "pg_isready"]
        check = [str(server.bindir / "pg_isready"), "-p", str(server.port), *test[2:]]
        result = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(check)}: {result.stdout}{result.stderr}"
    except BaseException:
        server.close()
        raise
    localizer.publish("postgres", POSTGRES_PORT, server.port)
    return server


@pytest.fixture
def deployment(
    moto_server: dict[str, str], base_model_dir: Path, tmp_path: Path
) -> Iterator[list[Container]]:
    compose = load_compose()
    home = base_model_dir.parent.parent  # $NOVELCRAFTER_HOME/models/<name>: where the images bake it
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    localizer = Localizer(moto_server["NOVELCRAFTER_S3_ENDPOINT"], home, scratch)
    postgres = start_postgres(compose, localizer)
    containers = plan(compose, localizer)
    logs = tmp_path / "logs"
    logs.mkdir()
    create_bucket(one(containers, "ingest").env, " ".join(compose["services"]["minio-init"]["command"]))
    ready: set[str] = {"minio", "minio-init", "postgres"}  # up before the plan

    def wait_service(service: str) -> None:
        if service not in ready:
            for container in containers:
                if container.service == service:
                    wait_healthy(container, 240)
            ready.add(service)

    try:
        # compose's order: each container once the services it depends_on are healthy.
        for container in containers:
            dependencies = compose["services"][container.service].get("depends_on", {})
            assert set(dependencies) <= ready | {c.service for c in containers}, dependencies
            for dependency in dependencies:
                wait_service(dependency)
            start(container, logs)
        for container in containers:
            wait_healthy(container, 240)
        yield containers
    finally:
        for container in reversed(containers):
            if container.proc:
                container.proc.stop(60)
        for container in containers:
            if container.proc:
                proc = container.proc
                print(f"--- {container.name} (exit {proc.popen.returncode})\n{proc.output()[-3000:]}")
        postgres.close()


def one(containers: list[Container], service: str) -> Container:
    return next(c for c in containers if c.service == service)


TRAINING = common_pb2.JobConfig(
    training=common_pb2.TrainingConfig(
        epochs=1, max_length=64, max_steps_per_part=2, grad_accum=1, checkpoint_every=1, eval_max_chunks=1
    )
)
FINISHED = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def ingest_book(address: str, client: Settings, pdf: bytes, parts: int) -> ingest_pb2.IngestBookResponse:
    """IngestBook over gRPC (metadata, then the bytes), creating the job with a tiny training config."""
    metadata = ingest_pb2.IngestMetadata(
        filename="book.pdf",
        params=common_pb2.IngestParams(chunk_sentences=10, parts=parts),
        create_job=True,
        job_config=TRAINING,
        size_bytes=len(pdf),
    )
    requests = [ingest_pb2.IngestBookRequest(metadata=metadata), ingest_pb2.IngestBookRequest(chunk=pdf)]
    with connect(address, client) as channel:
        return ingest_pb2_grpc.IngestServiceStub(channel).IngestBook(iter(requests), timeout=120)


def wait_for_jobs(address: str, client: Settings, job_ids: list[str], trainers: list[Container]) -> list:
    deadline = time.monotonic() + 480
    with connect(address, client) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        while True:
            jobs = [stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30) for job_id in job_ids]
            if all(job.state in FINISHED for job in jobs):
                return jobs
            for trainer in trainers:
                proc = trainer.proc
                assert proc.popen.poll() is None, f"{trainer.name} died:\n{proc.output()[-4000:]}"
            assert time.monotonic() < deadline, f"jobs not finished: {jobs}"
            time.sleep(1)


def generate_with(
    address: str, client: Settings, book_id: str, version: str
) -> inference_pb2.GenerateResponse:
    """Generate from the book's `latest` adapter once inference has hot-loaded ``version``."""
    request = inference_pb2.GenerateRequest(
        prompt="Mara carried the lantern",
        book_id=book_id,
        adapter="latest",
        max_new_tokens=8,
        temperature=0.0,
    )
    deadline = time.monotonic() + 120
    with connect(address, client) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while True:
            try:
                reply = stub.Generate(request, timeout=120)
                if reply.adapter.version == version:
                    return reply
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
            assert time.monotonic() < deadline, f"inference never served {version}"
            time.sleep(1)


@pytest.mark.timeout(900)
def test_compose_wiring_trains_books_on_both_trainers_and_serves_the_adapter(
    deployment: list[Container], tmp_path: Path
) -> None:
    ingest, inference = one(deployment, "ingest"), one(deployment, "inference")
    trainers = [c for c in deployment if c.service == "trainer"]
    coordinators = [c for c in deployment if c.service == "coordinator"]
    assert len(trainers) == TRAINERS and len(coordinators) >= 2
    coordinator_addresses = [c.address(50054) for c in coordinators]
    # Replicas differ only in the port each one's metrics got on this host, and (Docker's DNS
    # spreading them) in the coordinator replica each trainer reaches.
    varying = {"NOVELCRAFTER_METRICS_LISTEN": "", "NOVELCRAFTER_COORDINATOR": ""}
    assert {**trainers[0].env, **varying} == {**trainers[1].env, **varying}
    assert {**coordinators[0].env, **varying} == {**coordinators[1].env, **varying}
    reached = [t.env["NOVELCRAFTER_COORDINATOR"] for t in trainers]
    assert reached == coordinator_addresses[: len(trainers)], reached
    assert [t.argv[t.argv.index("--coordinator") + 1] for t in trainers] == reached
    # One database for every coordinator replica, ingest's included: the local PostgreSQL server.
    database = ingest.env["NOVELCRAFTER_DB"]
    assert database.startswith("postgresql://") and "@127.0.0.1:" in database
    assert all(c.env["NOVELCRAFTER_DB"] == database for c in coordinators)
    token = ingest.env["NOVELCRAFTER_AUTH_TOKEN"]
    assert token and all(c.env["NOVELCRAFTER_AUTH_TOKEN"] == token for c in deployment)
    client = Settings(auth_token=token)
    ingest_address, inference_address = ingest.address(50051), inference.address(50052)

    # The token is required: what compose wires in is what the servers enforce.
    for address, call in (
        (
            ingest_address,
            lambda ch: ingest_pb2_grpc.IngestServiceStub(ch).ListBooks(ingest_pb2.ListBooksRequest()),
        ),
        *(
            (address, lambda ch: jobs_pb2_grpc.JobServiceStub(ch).ListJobs(jobs_pb2.ListJobsRequest()))
            for address in coordinator_addresses
        ),
        (
            inference_address,
            lambda ch: inference_pb2_grpc.InferenceServiceStub(ch).ListAdapters(
                inference_pb2.ListAdaptersRequest()
            ),
        ),
    ):
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as denied:
            call(channel)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED, address

    # Two books, so that both replicas train at once (parts of one job are sequential).
    novel = ingest_book(ingest_address, client, book_pdf(tmp_path / "a.pdf", 240, seed=7), parts=2)
    story = ingest_book(ingest_address, client, book_pdf(tmp_path / "b.pdf", 120, seed=8), parts=1)
    assert len(novel.manifest.parts) == 2 and len(story.manifest.parts) == 1
    jobs = wait_for_jobs(ingest_address, client, [novel.job.job_id, story.job.job_id], trainers)
    for job in jobs:
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.error}\n{job}"
        assert all(p.state == jobs_pb2.PART_STATE_SUCCEEDED and p.metrics.steps > 0 for p in job.parts)
    workers = {part.worker_id for job in jobs for part in job.parts}
    assert len(workers) == 2, f"both trainer replicas should have trained a part: {workers}"
    # The jobs were created through ingest's replica and trained through the coordinator's two:
    # each replica answers for them alike, from the one database.
    for address in coordinator_addresses:
        with connect(address, client) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            seen = [stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=30) for job in jobs]
        assert seen == jobs, address

    # Inference hot-loads the published adapter (no restart) and generates with it.
    latest = jobs[0].parts[-1].adapter_version
    reply = generate_with(inference_address, client, novel.manifest.book_id, latest)
    assert reply.adapter.book_id == novel.manifest.book_id
    assert reply.completion_tokens > 0 and reply.text.strip()
    # The OpenAI-compatible HTTP API on its published port, behind the same token.
    import openai

    http = openai.OpenAI(base_url=f"http://{inference.address(8000)}/v1", api_key=token, max_retries=0)
    completion = http.completions.create(
        model=novel.manifest.book_id, prompt="Mara carried the lantern", max_tokens=8, temperature=0
    )
    assert completion.model == f"{novel.manifest.book_id}:{latest}"
    assert completion.choices[0].text == reply.text  # the same scheduler and adapter as gRPC
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://{inference.address(8000)}/v1", api_key="x", max_retries=0
        ).models.list()

    # Every process shuts down cleanly on SIGTERM, as `docker compose down` asks.
    for container in reversed(deployment):
        assert container.proc.stop(60) == 0, f"{container.name}:\n{container.proc.output()[-3000:]}"
