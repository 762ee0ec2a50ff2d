"""The real images and the real docker-compose.yml, end to end (`pytest -m docker`).

The path is the README's compose quickstart: `make images-cpu` (deploy/build-images.sh),
`.env` from `.env.example` with every secret replaced, `docker compose up -d --scale
trainer=2`. The only override (tests/compose/s3-moto.yml) swaps the images that cannot be
pulled everywhere this runs for ones built here: the two MinIO services become moto's S3 server,
and PostgreSQL the novelcrafter/postgres image `make images-cpu` builds from Debian's packages.
Through the published ports, with the token from `.env`: a book is ingested with the CLI, a
small job trains, the trainer holding its part is `docker kill`ed once it has checkpointed
and the other replica finishes the part from that checkpoint; the adapter is served over
gRPC and through the OpenAI HTTP API (official client); the console's pages load behind the
token; `docker compose down -v` removes it all.

It skips, with the reason, only where no Docker engine can run; under CI (CI=true) a missing
engine fails instead, so that CI never passes without having run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from console_support import login
from support import ROOT, base_env, readme_block, run_cli
from test_deploy_compose_processes import book_pdf
from test_deploy_support import load_compose, read_env_file

from novelcrafter.config import Settings
from novelcrafter.rpc import connect
from novelcrafter.v1 import ingest_pb2, ingest_pb2_grpc, jobs_pb2, jobs_pb2_grpc

# The first test builds the images (minutes on two cores): the timeout covers that.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

PROJECT = "novelcrafter-test"
OVERRIDE = ROOT / "tests" / "compose" / "s3-moto.yml"
MOTO_IMAGE = "novelcrafter-test/moto:latest"
CPU_SERVICES = ("ingest", "trainer", "inference", "console")
# What `make images-cpu` builds: those, and the job coordinator's PostgreSQL.
CPU_IMAGES = (*CPU_SERVICES, "postgres")
LONG_RUNNING = ("minio", "postgres", "coordinator", "ingest", "trainer", "inference", "console")


def replicas(service: str) -> int:
    """Containers of a service in the quickstart: `--scale trainer=2`, else its deploy.replicas."""
    if service == "trainer":
        return 2
    return load_compose()["services"][service].get("deploy", {}).get("replicas", 1)


def docker_missing() -> str | None:
    """Why no Docker engine and Compose v2 can run here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker engine answers (docker info failed)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        return "the Docker Compose v2 plugin is not installed"
    return None


def run(*argv: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def quickstart() -> list[list[str]]:
    """The README's Docker Compose quickstart, one argv per line."""
    return readme_block("**Docker Compose quickstart**")


def test_the_quickstart_is_the_path_this_test_takes() -> None:
    commands = quickstart()
    assert commands[:3] == [
        ["make", "env"],
        ["make", "images-cpu"],
        ["docker", "compose", "up", "-d", "--scale", "trainer=2"],
    ]
    assert [c[:2] for c in commands[4:]] == [
        ["novelcrafter", "ingest"],
        ["novelcrafter", "status"],
        ["novelcrafter", "generate"],
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert "images-cpu:\n\tdeploy/build-images.sh " + " ".join(CPU_IMAGES) in makefile
    assert "env:\n\tdeploy/make-env.sh\n" in makefile


@pytest.fixture(scope="module")
def images() -> str:
    """`make images-cpu` (the quickstart's second line), and the S3 stand-in on the same base."""
    reason = docker_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the container test, but {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    build = run(*quickstart()[1], timeout=3600, cwd=ROOT)
    print(build.stdout[-3000:])
    print(f"make images-cpu: {time.monotonic() - started:.0f} s")
    base = run(str(ROOT / "deploy" / "build-images.sh"), "--base", cwd=ROOT).stdout.strip()
    run(
        "docker",
        "build",
        "-q",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-t",
        MOTO_IMAGE,
        "-f",
        str(OVERRIDE.parent / "moto.Dockerfile"),
        str(OVERRIDE.parent),
        timeout=900,
    )
    return base


class Stack:
    """One compose project from the repository's docker-compose.yml and the S3 override."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = dict(
            line.split("=", 1)
            for line in (directory / ".env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        self.token = self.env["NOVELCRAFTER_AUTH_TOKEN"]

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            "docker",
            "compose",
            "--project-name",
            PROJECT,
            "--project-directory",
            str(self.directory),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "-f",
            str(OVERRIDE),
            *args,
            timeout=timeout,
            check=check,
        )

    def containers(self) -> list[dict]:
        out = self.compose("ps", "--all", "--format", "json").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [row for item in rows for row in (item if isinstance(item, list) else [item])]

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.containers()
            long_running = [row for row in rows if row["Service"] in LONG_RUNNING]
            if len(long_running) == sum(map(replicas, LONG_RUNNING)) and all(
                row["Health"] == "healthy" for row in long_running
            ):
                return
            for row in rows:
                if (row["State"] == "exited" and row["Service"] != "minio-init") or row[
                    "Health"
                ] == "unhealthy":
                    raise AssertionError(f"{row['Name']} {row['State']} {row['Health']}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy in {timeout:.0f} s: {rows}\n{self.logs()}")
            time.sleep(3)

    def logs(self, service: str = "") -> str:
        args = ["logs", "--no-color", "--tail", "60"] + ([service] if service else [])
        return self.compose(*args, check=False).stdout


@pytest.fixture(scope="module")
def stack(images: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`make env` (deploy/make-env.sh: new secrets); `docker compose up -d --scale trainer=2`."""
    directory = tmp_path_factory.mktemp("compose")
    run(str(ROOT / "deploy" / "make-env.sh"), str(directory / ".env"))
    env = (directory / ".env").read_text()
    assert not [v for v in read_env_file(directory / ".env").values() if v.startswith("change-me")]
    # A short lease, so that the killed trainer's part is claimed again within seconds.
    (directory / ".env").write_text(env + "NOVELCRAFTER_LEASE_SECONDS=15\n")
    deployment = Stack(directory)
    deployment.compose("down", "-v", "--remove-orphans", check=False)
    try:
        up = quickstart()[2]
        deployment.compose(*up[2:], timeout=900)  # `docker compose` + the override and project
        deployment.wait_healthy()
        yield deployment
    finally:
        print(deployment.logs())
        deployment.compose("down", "-v", "--remove-orphans", timeout=300, check=False)


# Size budgets (bytes, as `docker image inspect` counts them): the services without the model
# stack stay small; torch (~560 MB trimmed) and the fp32 base model (538 MB) bound the others.
SIZE_BUDGET = {"ingest": 400e6, "console": 300e6, "trainer": 1.6e9, "inference": 1.6e9}


def test_images_run_as_their_user_fit_their_budget_and_ingest_and_console_carry_no_torch(images: str) -> None:
    for service in CPU_SERVICES:
        image = f"novelcrafter/{service}:latest"
        size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)
        print(f"{image}: {size / 1e6:.0f} MB")
        assert size <= SIZE_BUDGET[service], f"{image} is {size / 1e6:.0f} MB"
        user = run("docker", "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
        assert user == "10001:10001", image
        probe = "import importlib.util as u; print(u.find_spec('torch') is not None)"
        has_torch = run("docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout.strip()
        assert has_torch == str(service in ("trainer", "inference")), image


def test_the_model_images_read_their_baked_model_and_load_the_prebuilt_kernel(images: str) -> None:
    """As uid 10001 with no compiler in the image: the prebuilt kernel, one true log line."""
    code = (
        "from novelcrafter.logs import configure_logging; configure_logging('INFO', 'text');"
        "from novelcrafter.models import check_readable, provision_base_model;"
        "from novelcrafter.inference import cpu_kernels;"
        "check_readable(provision_base_model('smollm2-135m-instruct'));"
        "print(cpu_kernels.load() is not None)"
    )
    for service in ("trainer", "inference"):
        result = run(
            "docker", "run", "--rm", "--entrypoint", "python", f"novelcrafter/{service}:latest", "-c", code
        )
        assert result.stdout.strip() == "True", result.stderr
        assert "CPU kernels on (prebuilt)" in result.stderr, result.stderr
        assert "compiler" not in result.stderr and "building" not in result.stderr, result.stderr


def wait_for(condition, what: str, timeout: float, stack: Stack):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{stack.logs()}")
        time.sleep(1)


def test_compose_ingests_trains_survives_a_killed_trainer_and_serves(stack: Stack, tmp_path: Path) -> None:
    client = Settings(auth_token=stack.token)
    env = {**base_env(), "NOVELCRAFTER_AUTH_TOKEN": stack.token}

    with grpc.insecure_channel("127.0.0.1:50051") as channel, pytest.raises(grpc.RpcError) as denied:
        ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(ingest_pb2.ListBooksRequest(), timeout=30)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The README's commands, from the host, through the published ports.
    pdf = tmp_path / "book.pdf"
    book_pdf(pdf, 240, seed=11)
    ingested = run_cli("ingest", str(pdf), "--server", "127.0.0.1:50051", "--parts", "1", "--json", env=env)
    assert ingested.returncode == 0, ingested.stderr
    book_id = json.loads(ingested.stdout)["book_id"]
    created = run_cli(
        "train",
        book_id,
        "--coordinator",
        "127.0.0.1:50051",
        "--no-watch",
        "--json",
        "--epochs",
        "4",
        "--max-steps-per-part",
        "24",
        "--max-length",
        "64",
        "--grad-accum",
        "1",
        "--checkpoint-every",
        "2",
        "--memorization-prompts",
        "0",
        "--style-prompts",
        "0",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["job_id"]

    with connect("127.0.0.1:50051", client) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)

        def part() -> jobs_pb2.Part:
            return jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30).parts[0]

        # Kill the trainer holding the part once it has checkpointed.
        holding = wait_for(
            lambda: (p := part()).checkpoint_key and p.worker_id and p, "a checkpoint", 900, stack
        )
        trainers = {row["ID"][:12]: row["Name"] for row in stack.containers() if row["Service"] == "trainer"}
        killed = next(name for short_id, name in trainers.items() if holding.worker_id.startswith(short_id))
        run("docker", "kill", killed)
        survivor = next(name for name in trainers.values() if name != killed)

        done = wait_for(
            lambda: (p := part()).state in (jobs_pb2.PART_STATE_SUCCEEDED, jobs_pb2.PART_STATE_FAILED) and p,
            "the part finished",
            900,
            stack,
        )
    assert done.state == jobs_pb2.PART_STATE_SUCCEEDED, done.error
    assert done.worker_id != holding.worker_id and done.step == done.total_steps
    logs = run("docker", "logs", survivor)
    survivor_log = logs.stdout + logs.stderr
    resumed = [json.loads(line) for line in survivor_log.splitlines() if "resumed from checkpoint" in line]
    assert resumed, survivor_log[-3000:]
    assert resumed[-1]["job"] == job_id and resumed[-1]["step"] >= 2, resumed
    version = done.adapter_version

    # Generation from the newest adapter: the CLI over gRPC, then the official OpenAI client.
    def generated() -> str | None:
        result = run_cli(
            "generate",
            "Mara carried the lantern",
            "--book",
            book_id,
            "--server",
            "127.0.0.1:50052",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
            env=env,
        )
        reply = json.loads(result.stdout) if result.returncode == 0 else {}
        return reply if reply.get("adapter", {}).get("version") == version else None

    reply = wait_for(generated, f"inference serving {version}", 180, stack)
    assert reply["text"].strip()
    import openai

    http = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=stack.token, max_retries=0)
    completion = http.completions.create(
        model=book_id, prompt="Mara carried the lantern", max_tokens=8, temperature=0
    )
    assert completion.model == f"{book_id}:{version}"
    assert completion.choices[0].text == reply["text"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="wrong", max_retries=0).models.list()

    # The console, behind the same token.
    session = requests.Session()
    assert session.get("http://127.0.0.1:8080/books", allow_redirects=False, timeout=30).status_code == 303
    login(session, "http://127.0.0.1:8080", stack.token)
    page = session.get(f"http://127.0.0.1:8080/books/{book_id}", timeout=30)
    assert page.status_code == 200 and book_id in page.text, page.text[:2000]
    adapters = session.get("http://127.0.0.1:8080/adapters", timeout=30)  # through inference
    assert adapters.status_code == 200 and f"<code>{version}</code>" in adapters.text, adapters.text[:2000]
