"""The README's "Using the services" commands, run as written.

Each line of that block is executed as a real CLI process from a scratch directory: `serve
all` starts the three services, `ingest --create-job` uploads a short book and creates its job
with the model-card defaults, `status` lists the job, and once the job has trained `generate`
answers from the book's newest adapter. The only changes to the text: `book.pdf` is a book the
test writes, `BOOK_ID` is the id `ingest --json` printed, and the default ports 50051/50052
(which may be taken on a shared machine) become free ones, passed the documented ways
(`--ingest-listen`/`--inference-listen`, `NOVELCRAFTER_COORDINATOR`/`NOVELCRAFTER_INFERENCE`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from fault_support import book_pdf
from support import NOVELCRAFTER, Proc, base_env, free_port, readme_block

from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_the_using_the_services_block_is_what_the_cli_accepts() -> None:
    commands = readme_block("\n## Using the services\n")
    assert [c[:2] for c in commands] == [
        ["novelcrafter", "serve"],
        ["novelcrafter", "ingest"],
        ["novelcrafter", "status"],
        ["novelcrafter", "generate"],
    ]


@pytest.mark.timeout(900)
def test_using_the_services_commands_work_as_written(tmp_path: Path) -> None:
    serve, ingest, status, generate = readme_block("\n## Using the services\n")
    ingest_at, inference_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = base_env(NOVELCRAFTER_COORDINATOR=ingest_at, NOVELCRAFTER_INFERENCE=inference_at)
    (tmp_path / "book.pdf").write_bytes(book_pdf(220, seed=61))  # 22 chunks: 10 parts of 2-3

    def cli(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [a.replace("127.0.0.1:50051", ingest_at) for a in argv]
        cmd = [NOVELCRAFTER, *argv[1:]]
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    server = Proc(
        [NOVELCRAFTER, *serve[1:], "--ingest-listen", ingest_at, "--inference-listen", inference_at],
        env,
        tmp_path / "serve.log",
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        while "serving:" not in server.output() and time.monotonic() < deadline:
            assert server.popen.poll() is None, server.output()[-3000:]
            time.sleep(0.5)
        assert "serving:" in server.output(), server.output()[-3000:]
        wait_for_health(ingest_at, timeout=30)

        done = cli(ingest)
        assert done.returncode == 0, done.stderr
        book_id = json.loads(done.stdout)["book_id"]
        assert (tmp_path / "data" / "books" / book_id / "manifest.json").exists()  # `--store ./data`

        listing = cli(status)
        assert listing.returncode == 0, listing.stderr
        row = next(line for line in listing.stdout.splitlines() if book_id in line)
        job_id = row.split()[0]

        with connect(ingest_at) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            deadline = time.monotonic() + 780
            while time.monotonic() < deadline:
                job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30)
                if job.state not in (jobs_pb2.JOB_STATE_PENDING, jobs_pb2.JOB_STATE_RUNNING):
                    break
                time.sleep(2)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.error}\n{server.output()[-3000:]}"
        newest = job.parts[-1].adapter_version

        argv = [book_id if a == "BOOK_ID" else a for a in generate]
        deadline = time.monotonic() + 60  # the server picks the new version up on its next store scan
        while True:
            answer = cli(argv)
            assert answer.returncode == 0, answer.stderr
            if newest in answer.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert newest in answer.stderr, answer.stderr  # the answer names the version that wrote it
        assert answer.stdout.strip()
        assert cli(argv).stdout == answer.stdout  # `--seed 7`: the same text again
        assert "Traceback" not in server.output()
    finally:
        code = server.stop(timeout=120)
    assert code == 0, server.output()[-3000:]  # SIGTERM stops all three services cleanly
