"""`novelcrafter train` and `novelcrafter status` as real processes against a real coordinator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import base_env, free_port, run_cli
from test_coordinator_helpers import TEST_SETTINGS, CoordinatorServer, Worker, make_book

from novelcrafter.store import Store, open_store
from novelcrafter.v1 import jobs_pb2

J = jobs_pb2
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "store"), TEST_SETTINGS)


@pytest.fixture
def server(store: Store) -> Iterator[CoordinatorServer]:
    srv = CoordinatorServer(store, lease_seconds=10.0)
    yield srv
    srv.stop()


def _no_traceback(out: object) -> None:
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout  # type: ignore[attr-defined]


def _drive(server: CoordinatorServer, parts: int, *, fail: bool = False) -> threading.Thread:
    """A worker thread that trains (or fails) the next ``parts`` parts as they become claimable."""

    def work() -> None:
        w = Worker(server, "cli-test-worker")
        deadline = time.monotonic() + 60
        done = 0
        while done < parts and time.monotonic() < deadline:
            claim = w.claim()
            if not claim.assigned:
                time.sleep(0.1)
                continue
            for step in (1, 2):
                w.progress(claim.lease, step=step, total=2, loss=2.5 - step / 10)
            if fail:
                w.fail(claim.lease, "simulated trainer crash", retryable=False)
            else:
                w.complete(claim)
            done += 1

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_train_creates_a_job_with_the_given_flags(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    out = run_cli(
        "train", book, "--coordinator", server.address, "--no-watch", "--json",
        "--epochs", "2", "--lr", "1e-4", "--lora-r", "4", "--lora-alpha", "16",
        "--max-steps-per-part", "3", "--max-length", "128", "--device", "cpu",
        "--memorization-prompts", "0", "--style-new-tokens", "32", "--replay-fraction", "0.1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    cfg = job["config"]
    assert cfg["training"]["epochs"] == 2 and cfg["training"]["learning_rate"] == 1e-4
    assert cfg["training"]["max_steps_per_part"] == 3 and cfg["training"]["max_length"] == 128
    assert cfg["lora"]["r"] == 4 and cfg["lora"]["alpha"] == 16 and cfg["lora"]["dropout"] == 0.05
    assert cfg["device"] == "cpu" and cfg["training"]["grad_accum"] == 8
    assert job["state"] == "JOB_STATE_PENDING" and len(job["parts"]) == 2
    assert f"created job {job['job_id']}" in out.stderr
    assert server.job(job["job_id"]).config.training.epochs == 2
    training = server.job(job["job_id"]).config.training  # 0 = memorization off; unset = default
    assert (training.memorization_prompts, training.style_new_tokens, training.style_prompts) == (0, 32, 8)
    assert training.replay_fraction == pytest.approx(0.1) and cfg["training"]["replay_fraction"] == 0.1


def test_train_follows_the_job_with_plain_lines_until_it_succeeds(
    server: CoordinatorServer, store: Store
) -> None:
    book = make_book(store, parts=2)
    worker = _drive(server, parts=2)
    env = base_env(NOVELCRAFTER_COORDINATOR=server.address)  # the address from the environment
    out = run_cli("train", book, "--watch", "--max-steps-per-part", "2", env=env, timeout=90)
    worker.join(30)
    assert out.returncode == 0, out.stderr
    _no_traceback(out)
    lines = out.stdout
    assert "created job" in lines and "part 00 RUNNING" in lines
    assert "part 00 step 2/2 loss 2.3000" in lines
    assert "part 01 results: train loss 2.0000 · perplexity base 30.00 → adapter 21.00" in lines
    assert "SUCCEEDED (2/2 parts)" in lines


def test_train_exits_nonzero_when_the_job_fails(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    worker = _drive(server, parts=1, fail=True)
    out = run_cli("train", book, "--coordinator", server.address, "--watch", "--json", timeout=90)
    worker.join(30)
    assert out.returncode == 1
    _no_traceback(out)
    assert out.stderr.strip().splitlines()[-1].startswith("error: job j-")
    assert "FAILED: part 00 failed (not retryable): simulated trainer crash" in out.stderr
    final = json.loads(out.stdout)  # --json: the final job on stdout, progress on stderr
    assert final["state"] == "JOB_STATE_FAILED" and final["parts"][0]["state"] == "PART_STATE_FAILED"
    assert "part 00 step 2/2" in out.stderr


def test_status_lists_jobs_and_shows_parts_with_metrics(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=2)
    job = server.create(book)
    other = server.create(make_book(store, parts=1, tag="other"))
    w = Worker(server, "w-status")
    w.complete(w.claim())
    running = w.claim()
    w.progress(running.lease, step=4, total=9)

    listing = run_cli("status", "--coordinator", server.address)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job.job_id))
    assert book in row and "RUNNING" in row and "1/2" in row and "part 01 step 4/9" in row
    assert other.job_id in listing.stdout and "PENDING" in listing.stdout

    detail = run_cli("status", job.job_id, "--coordinator", server.address)
    assert detail.returncode == 0, detail.stderr
    part0 = next(line for line in detail.stdout.splitlines() if line.startswith("00 "))
    for value in ("SUCCEEDED", "2.0000", "30.00", "20.00", "1,000", "2.0s", f"{job.job_id}-p00"):
        assert value in part0
    part1 = next(line for line in detail.stdout.splitlines() if line.startswith("01 "))
    assert "RUNNING" in part1 and "4/9" in part1 and "w-status" in part1
    assert "LoRA r=8 alpha=32" in detail.stdout

    as_json = run_cli("status", job.job_id, "--coordinator", server.address, "--json")
    data = json.loads(as_json.stdout)
    assert data["parts"][0]["metrics"]["adapter_perplexity"] == 20.0 and data["parts"][1]["step"] == 4
    filtered = json.loads(run_cli("status", "--book", book, "--json", "--coordinator", server.address).stdout)
    assert [j["job_id"] for j in filtered["jobs"]] == [job.job_id]


def test_cli_errors_are_one_line(server: CoordinatorServer, store: Store) -> None:
    book = make_book(store, parts=1)
    cases = [
        (("train", "0123456789abcdef", "--no-watch"), "error: book 0123456789abcdef not found: ingest it"),
        (("train", book, "--no-watch", "--lr", "-1"), "error: --lr must be > 0"),
        (
            ("train", book, "--no-watch", "--replay-fraction", "1"),
            "error: --replay-fraction must be in [0, 1)",
        ),
        (
            ("train", book, "--no-watch", "--replay-fraction", "-0.5"),
            "error: --replay-fraction must be in [0, 1)",
        ),
        (
            ("train", book, "--no-watch", "--replay-fraction", "nan"),
            "error: --replay-fraction must be in [0, 1)",
        ),
        (("train", book, "--no-watch", "--device", "tpu"), "error: invalid job config: device must be"),
        (("status", "j-000000000000"), "error: job j-000000000000 not found"),
        (("status", "--coordinator", f"127.0.0.1:{free_port()}"), "error: cannot reach the job coordinator"),
    ]
    for args, expected in cases:
        env = base_env(NOVELCRAFTER_COORDINATOR=server.address)
        out = run_cli(*args, env=env)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        _no_traceback(out)
        assert out.stderr.strip().splitlines()[-1].startswith(expected), (args, out.stderr)
    assert not server.stub.ListJobs(J.ListJobsRequest()).jobs
