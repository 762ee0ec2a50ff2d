"""`novelcrafter run` end to end: the CLI as a subprocess, the real services, the real model.

The same command path as `make run`, at a small scale (2 parts, a few optimizer steps,
short sequences): the sample story is typeset, ingested over gRPC, trained by a real
trainer worker, evaluated, and continued by the base model and the tuned adapter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import NOVELCRAFTER, ROOT, base_env

SMALL = [
    "--quiet",
    "--parts",
    "2",
    "--max-steps-per-part",
    "6",
    "--max-length",
    "128",
    "--max-new-tokens",
    "16",
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _service_pids(run_dir: Path) -> list[int]:
    services = json.loads((run_dir / "services.json").read_text())
    assert set(services) == {"ingest", "trainer", "inference"}
    return [int(s["pid"]) for s in services.values()]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_run_small_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [NOVELCRAFTER, "run", *SMALL, "--run-dir", str(run_dir)],
        env=base_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    # (a) the per-part table, with a book line
    header = next(line for line in out.splitlines() if line.startswith("part  "))
    assert header.split()[:8] == ["part", "steps", "train", "loss", "ppl", "base", "ppl", "adapter"]
    rows = [line.split() for line in out.splitlines() if re.match(r"^0[01]\s+\d+\s+\d+\.\d+", line)]
    assert [r[0] for r in rows] == ["00", "01"]
    assert all(int(r[1]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert any(line.startswith("book ") for line in out.splitlines())
    # (b) both continuations, side by side, named by the version that wrote them
    assert re.search(r"base model \[base\]\s+\| tuned adapter \[j-[0-9a-f]{12}-p01\]", out)

    # The report files
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    report = (run_dir / "report.md").read_text()
    assert "](report.png)" in report and "| 01 |" in report
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["job_state"] == "SUCCEEDED"
    assert [p["index"] for p in metrics["parts"]] == [0, 1]
    assert all(p["steps"] == 6 for p in metrics["parts"])
    tuned = metrics["continuations"][1]
    assert tuned["version"] == metrics["parts"][-1]["adapter_version"]
    assert tuned["text"].strip() and metrics["continuations"][0]["text"].strip()

    # The adapter learned the book: held-out perplexity below the base model's.
    ppl = metrics["book_perplexity"]
    assert ppl["adapter"] < ppl["base"], ppl
    assert "the adapter is below the base model" in out

    # Services were stopped: no process left, logs kept in the run directory.
    assert _wait_gone(_service_pids(run_dir), timeout=5) == []
    for name in ("ingest", "trainer", "inference"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
    assert (run_dir / "book.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_run_interrupted_stops_services_and_cancels(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) while the job runs: the job is cancelled, every service stops, exit 130."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.out"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [NOVELCRAFTER, "run", *SMALL, "--max-steps-per-part", "200", "--run-dir", str(run_dir)],
            env=base_env(),
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A suite started in the background (`make test &`) inherits SIGINT ignored, and so
            # would the child: Ctrl-C is what this test sends, so give it the default back.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 480
        while "job j-" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "job j-" in log.read_text(), log.read_text()[-3000:]
        pids = _service_pids(run_dir)
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "interrupted" in text and "Traceback" not in text
    assert _wait_gone(pids, timeout=10) == []
    assert re.search(r"job j-[0-9a-f]{12} cancelled", text), text[-3000:]  # the coordinator's answer


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_serve_all_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`serve all`: the real services and the console on loopback, answering; SIGTERM stops them all."""
    from support import free_port

    from novelcrafter.rpc import connect
    from novelcrafter.v1 import (
        inference_pb2,
        inference_pb2_grpc,
        ingest_pb2,
        ingest_pb2_grpc,
        jobs_pb2,
        jobs_pb2_grpc,
    )

    ingest, inference = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    console = f"127.0.0.1:{free_port()}"
    log = tmp_path / "serve.out"
    args = ["serve", "all", "--store", str(tmp_path / "store"), "--log-dir", str(tmp_path / "logs")]
    args += ["--ingest-listen", ingest, "--inference-listen", inference, "--console-listen", console]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [NOVELCRAFTER, *args], env=base_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 480
        while "serving:" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        assert "serving:" in text, text[-3000:]
        pids = [int(p) for p in re.findall(r"ready \(pid (\d+)", text)]
        assert len(pids) == 4 and all(_alive(p) for p in pids)
        assert f"console: open http://{console}/ in a browser" in text
        import requests

        books = requests.get(f"http://{console}/books", timeout=30)  # no token set: no login
        assert books.status_code == 200 and "No books yet" in books.text
        with connect(ingest) as channel:
            assert (
                list(
                    ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(ingest_pb2.ListBooksRequest()).books
                )
                == []
            )
            jobs = jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest())
            assert list(jobs.jobs) == []
        with connect(inference) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            reply = stub.Generate(
                inference_pb2.GenerateRequest(prompt="The sea", adapter="base", max_new_tokens=4, seed=1)
            )
            assert reply.adapter.version == "base" and reply.completion_tokens > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _wait_gone(pids, timeout=10) == []
    assert "stopped" in log.read_text()
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {
        "ingest.log",
        "trainer.log",
        "inference.log",
        "console.log",
    }
