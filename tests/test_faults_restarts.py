"""Services restarted under work: the coordinator mid-job, the inference server between versions.

Real processes throughout. The coordinator (``serve ingest``) is stopped with SIGTERM while
a worker trains part 0 and SIGKILLed while it trains part 1; each time it comes back on the
same address, recovers the job from the store, and the same worker (never restarted)
reconnects and finishes the job under its leases. The inference server is SIGKILLed, a new
adapter version is published while it is down, and the restarted server serves that
version as ``latest`` and the older one exactly as before.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    Service,
    book_pdf,
    client_settings,
    create_job,
    get_job,
    ingest_book,
    restart,
    start_inference,
    start_ingest,
    start_trainer,
    tiny_job_config,
    verify_job_outputs,
    wait_for,
    wait_job,
)

from novelcrafter.adapters import publish_adapter
from novelcrafter.rpc import connect
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BASE = "smollm2-135m-instruct"
J = jobs_pb2
UNREACHABLE = "coordinator unreachable"  # the worker's log line when an RPC finds no coordinator


def _down(service: Service, sig: int) -> None:
    service.proc.signal(sig)
    code = service.proc.popen.wait(60)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), service.output()[-3000:]


def _worker_notices_the_outage(trainer: Service, logs: Callable[[], str]) -> None:
    """Keep the coordinator down until the worker has tried to reach it and carried on."""
    seen = trainer.output().count(UNREACHABLE)
    wait_for("the worker to find the coordinator gone", lambda: trainer.output().count(UNREACHABLE) > seen,
             300, logs=logs)  # fmt: skip


@pytest.mark.timeout(900)
def test_coordinator_restarted_mid_job_by_sigterm_and_sigkill(
    base_model: tuple[Any, Any], tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    ingest = start_ingest(store, tmp_path)
    trainer = start_trainer(store, ingest.address, tmp_path)
    coordinators = [ingest]

    def logs() -> str:
        tail = "\n".join(f"--- {c.proc.log_path.name}\n{c.output()[-2500:]}" for c in coordinators)
        return f"{tail}\n--- trainer\n{trainer.output()[-5000:]}"

    def part_running(index: int) -> Callable[[], bool]:
        def probe() -> bool:
            part = get_job(ingest.address, job.job_id).parts[index]
            return part.state == J.PART_STATE_RUNNING and (index > 0 or bool(part.checkpoint_key))

        return probe

    try:
        manifest = ingest_book(ingest.address, book_pdf(80, seed=51), parts=2).manifest
        job = create_job(ingest.address, manifest.book_id, tiny_job_config(steps=2))

        # 1. Graceful stop while part 0 trains (after its first checkpoint), then restart.
        wait_for("part 0 to checkpoint", part_running(0), 600, logs=logs)
        _down(ingest, signal.SIGTERM)
        _worker_notices_the_outage(trainer, logs)
        ingest = restart(ingest)
        coordinators.append(ingest)
        assert get_job(ingest.address, job.job_id).state == J.JOB_STATE_RUNNING

        # 2. Crash while part 1 trains, then restart.
        wait_for("part 1 to start", part_running(1), 600, every=0.1, logs=logs)
        _down(ingest, signal.SIGKILL)
        _worker_notices_the_outage(trainer, logs)
        ingest = restart(ingest)
        coordinators.append(ingest)
        recovered = get_job(ingest.address, job.job_id)
        assert recovered.parts[0].state == J.PART_STATE_SUCCEEDED
        # Still under the worker's lease, or already reported by it: on a fast machine the worker
        # finishes part 1 while the coordinator is down and reports it as soon as it is back.
        assert recovered.parts[1].state in (J.PART_STATE_RUNNING, J.PART_STATE_SUCCEEDED), recovered
        assert recovered.parts[1].worker_id == "trainer", recovered

        done = wait_job(ingest.address, job.job_id, 600, logs=logs)
        assert done.state == J.JOB_STATE_SUCCEEDED, f"{done.error}\n{logs()}"
        assert trainer.alive(), "the worker died instead of waiting for the coordinator"
        # The same worker finished both parts under its leases: no attempt was lost to the restarts.
        assert [(p.state, p.attempts) for p in done.parts] == [(J.PART_STATE_SUCCEEDED, 0)] * 2, logs()
        # Each restart answered from the coordinator's database at once: nothing to recover.
        assert all("coordinator database" in c.output() for c in coordinators[1:]), logs()
    finally:
        trainer.stop()
        ingest.stop()
    counts = verify_job_outputs(open_store(store), done, base_model[0], BASE)
    assert counts["adapters"] == 2, counts


# --- inference ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real LoRAs, trained a few steps on different text (a private copy of the base model)."""
    from novelcrafter.inference.adapter_factory import train_lora

    from novelcrafter.models import load_base_model, load_tokenizer

    model, tokenizer = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    root = tmp_path_factory.mktemp("restart-adapters")
    sea = "The sea rose grey under the storm and the ship rolled hard to port; the captain held the wheel."
    bread = "She kneaded the dough on the floured table, shaped the loaves and slid them into the oven."
    first = train_lora(model, tokenizer, [sea], root / "v1", steps=2, lr=3e-3, seed=1)
    second = train_lora(model, tokenizer, [bread], root / "v2", steps=2, lr=3e-3, seed=2)
    return first, second


def _generate(address: str, **fields: Any) -> inference_pb2.GenerateResponse:
    request = inference_pb2.GenerateRequest(
        prompt="The night was long and", max_new_tokens=12, temperature=0.9, seed=7, **fields
    )
    with connect(address, client_settings()) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=120)


@pytest.mark.timeout(600)
def test_restarted_inference_reloads_the_latest_adapters(
    two_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    book = "1234567890abcdef"
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    v1 = publish_adapter(
        store, two_adapters[0], book_id=book, job_id="j-00000000000a", part=0, base_model=BASE
    )
    env = {"NOVELCRAFTER_WATCH_INTERVAL": "0.5"}
    server = start_inference(str(store_dir), tmp_path, env=env)
    try:
        before = _generate(server.address, book_id=book)
        assert before.adapter.version == v1.version

        _down(server, signal.SIGKILL)
        # Published while the server is down: only a fresh scan of the store can find it.
        v2 = publish_adapter(
            store, two_adapters[1], book_id=book, job_id="j-00000000000b", part=0, base_model=BASE
        )
        server = restart(server)
        latest = _generate(server.address, book_id=book)
        assert latest.adapter.version == v2.version
        again = _generate(server.address, book_id=book, adapter=v1.version)
        assert (again.adapter.version, again.text) == (before.adapter.version, before.text)
        assert latest.text != before.text  # a different adapter really is in use
        with connect(server.address, client_settings()) as channel:
            listing = inference_pb2_grpc.InferenceServiceStub(channel).ListAdapters(
                inference_pb2.ListAdaptersRequest(book_id=book), timeout=30
            )
        states = {a.version.version: (a.state, a.latest) for a in listing.adapters}
        assert states[v2.version] == ("loaded", True) and states[v1.version][1] is False
    finally:
        server.stop()
