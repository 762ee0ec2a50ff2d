"""A coordinator process killed with SIGKILL loses nothing it acknowledged.

The coordinator runs as a real child process hosting JobService the way the ingest
server does (same bootstrap, same close-on-stop hook); the lease time comes from
``NOVELCRAFTER_LEASE_SECONDS``.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from support import Proc, base_env, free_port
from test_coordinator_helpers import TEST_SETTINGS, Worker, make_book

from novelcrafter import layout
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

J = jobs_pb2

HOST = textwrap.dedent(
    """
    import sys
    from novelcrafter.config import get_settings
    from novelcrafter.coordinator import Coordinator, job_service
    from novelcrafter.logs import configure_logging
    from novelcrafter.rpc import start_server
    from novelcrafter.store import open_store

    configure_logging()
    settings = get_settings()
    coordinator = Coordinator(open_store(sys.argv[1], settings), settings)
    server = start_server([job_service(coordinator)], sys.argv[2], settings)
    server.on_stop.append(coordinator.close)
    server.install_signal_handlers()
    server.wait()
    """
)


class _Remote:
    """What the test Worker needs from a server: a stub and the store."""

    def __init__(self, address: str, store: object) -> None:
        self.channel = connect(address, TEST_SETTINGS)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.store = store


def _start(store_dir: Path, address: str, log: Path) -> Proc:
    env = base_env(NOVELCRAFTER_LEASE_SECONDS="3", NOVELCRAFTER_METRICS_LISTEN="off")
    proc = Proc([sys.executable, "-c", HOST, str(store_dir), address], env, log)
    try:
        wait_for_health(address, timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.output())
    return proc


@pytest.mark.timeout(120)
def test_sigkilled_coordinator_recovers_every_acknowledged_change(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir), TEST_SETTINGS)
    book = make_book(store, parts=3)
    address = f"127.0.0.1:{free_port()}"
    proc = _start(store_dir, address, tmp_path / "first.log")
    remote = _Remote(address, store)
    try:
        job = remote.stub.CreateJob(
            J.CreateJobRequest(book_id=book, config=common_pb2.JobConfig(max_attempts=2)), timeout=30
        )
        w = Worker(remote, "survivor")  # type: ignore[arg-type]
        w.complete(w.claim())
        claim = w.claim()
        assert claim.lease.ttl_seconds == 3.0  # from NOVELCRAFTER_LEASE_SECONDS
        checkpoint = layout.checkpoint_prefix(job.job_id, 1, 4)
        w.progress(claim.lease, step=4, total=8, checkpoint=checkpoint)
        seen = max(e.sequence for e in _replay(remote, job.job_id))
        proc.kill()  # no graceful close: only what was written synchronously survives

        proc = _start(store_dir, address, tmp_path / "second.log")
        remote.channel.close()
        remote = _Remote(address, store)
        w.server = remote  # type: ignore[assignment]
        recovered = remote.stub.GetJob(J.GetJobRequest(job_id=job.job_id), timeout=30)
        assert recovered.state == J.JOB_STATE_RUNNING and recovered.config.max_attempts == 2
        assert recovered.parts[0].state == J.PART_STATE_SUCCEEDED
        assert recovered.parts[0].metrics.train_loss == 2.0
        assert recovered.parts[1].state == J.PART_STATE_RUNNING
        assert recovered.parts[1].checkpoint_key == checkpoint
        # The worker's lease survived the crash; its next event is numbered above anything seen.
        assert w.renew(claim.lease).lease_id == claim.lease.lease_id
        w.progress(claim.lease, step=5, total=8)
        after = _replay(remote, job.job_id, after=seen)
        assert after and all(e.sequence > seen for e in after)
        assert after[-1].progress.step == 5
        assert w.complete(claim).parts[2].state == J.PART_STATE_READY
        assert proc.stop() == 0  # graceful SIGTERM
        assert "Traceback" not in proc.output()
    finally:
        remote.channel.close()
        proc.signal(signal.SIGKILL)
        proc.stop()


def _replay(remote: _Remote, job_id: str, after: int = 0) -> list[jobs_pb2.JobEvent]:
    """Every event the coordinator has after ``after`` (the stream is cut once it is drained)."""
    events: list[jobs_pb2.JobEvent] = []
    stream = remote.stub.WatchJob(J.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=1)
    try:
        for event in stream:
            events.append(event)
    except grpc.RpcError as exc:  # a running job's stream stays open: the deadline ends it
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return events
