"""Trainer RPCs are never starved by long streams: streams have their own bounded capacity.

Every open WatchJob stream (a console job page, ``novelcrafter train --watch``), every slow
IngestBook upload holds a server thread to its end. Short unary calls (the trainers'
ClaimPart, RenewLease, ReportProgress, CompletePart; GetJob) get threads of their own, so
they answer in milliseconds however many streams are open; a stream beyond the cap is
refused at once with RESOURCE_EXHAUSTED instead of queueing.

* the real processes: ``serve ingest`` and ``serve trainer`` train a tiny job while 200
  WatchJob streams and 20 slow uploads stay open; idle streams cost no CPU (slow);
* one in-process server with a small cap: the stream after the cap is refused at once, unary
  calls still answer fast, a cancelled stream frees its slot, a stop is not held by streams;
  ``train --watch`` refused a stream says the job continues;
* the console: every page's stream on its one shared channel, cancelled (not the channel)
  when the page goes away; a bad ``Last-Event-ID`` is a 400, never a 500.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import requests
from console_support import login, start_console
from fault_support import (
    TOKEN,
    book_pdf,
    client_settings,
    create_job,
    ingest_book,
    start_ingest,
    start_trainer,
    tiny_job_config,
    wait_job,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from novelcrafter.console.backends import UploadTooLarge, http_status
from novelcrafter.coordinator import Coordinator, job_service
from prometheus_client import REGISTRY
from support import free_port, run_cli
from test_coordinator_helpers import TEST_SETTINGS, make_book, wait_until

from novelcrafter.errors import ResourceExhausted
from novelcrafter.rpc import connect, start_server
from novelcrafter.store import open_store
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, jobs_pb2, jobs_pb2_grpc

STREAMS = 200
UPLOADS = 20
CHANNELS = 4
LEASE_SECONDS = 9  # short: a renewal starved for a few seconds would let the lease expire
GET_JOB_BUDGET = 5.0
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


@dataclass
class Watch:
    """One WatchJob stream, read on its own thread."""

    call: grpc.Call
    opened: threading.Event = field(default_factory=threading.Event)  # first event received
    ended: threading.Event = field(default_factory=threading.Event)
    events: int = 0
    saw_end: bool = False  # the job's terminal state arrived on this stream
    code: grpc.StatusCode | None = None

    def read(self) -> None:
        try:
            for event in self.call:
                self.events += 1
                self.opened.set()
                if event.HasField("job_state") and event.job_state in TERMINAL:
                    self.saw_end = True
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
        finally:
            self.ended.set()


def _slow_upload(stop: threading.Event, index: int) -> Iterator[ingest_pb2.IngestBookRequest]:
    """Metadata, then a small chunk every half second until told to stop (a slow client)."""
    yield ingest_pb2.IngestBookRequest(
        metadata=ingest_pb2.IngestMetadata(
            filename=f"slow-{index}.pdf", params=common_pb2.IngestParams(chunk_sentences=4, parts=1)
        )
    )
    yield ingest_pb2.IngestBookRequest(chunk=b"%PDF-1.4\n")
    while not stop.wait(0.5):
        yield ingest_pb2.IngestBookRequest(chunk=b"% slow " + str(index).encode() + b"\n")


class Load:
    """Open WatchJob streams and slow uploads from a few channels, and take them down."""

    def __init__(self, address: str, job_id: str) -> None:
        self.job_id = job_id
        # Separate connections, as separate console processes and CLIs would open them.
        self.channels = [
            grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        self.watches: list[Watch] = []
        self.uploads: list[grpc.Future] = []
        self._stop = threading.Event()

    def open_uploads(self, count: int) -> None:
        for i in range(count):
            stub = ingest_pb2_grpc.IngestServiceStub(self.channels[i % CHANNELS])
            self.uploads.append(stub.IngestBook.future(_slow_upload(self._stop, i), timeout=900))

    def open_streams(self, count: int) -> None:
        for i in range(count):
            stub = jobs_pb2_grpc.JobServiceStub(self.channels[i % CHANNELS])
            watch = Watch(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=self.job_id), timeout=900))
            threading.Thread(target=watch.read, name=f"watch-{i}", daemon=True).start()
            self.watches.append(watch)

    def wait_open(self, timeout: float) -> tuple[int, int, int]:
        """(opened, refused or failed, still waiting) once every stream got an event or ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w.opened.is_set() or w.ended.is_set() for w in self.watches):
                break
            time.sleep(0.1)
        opened = sum(w.opened.is_set() for w in self.watches)
        failed = sum(not w.opened.is_set() and w.ended.is_set() for w in self.watches)
        return opened, failed, len(self.watches) - opened - failed

    def close(self) -> None:
        for upload in self.uploads:
            upload.cancel()
        self._stop.set()
        for watch in self.watches:
            watch.call.cancel()
        for channel in self.channels:
            channel.close()


def _get_job_latency(address: str, job_id: str) -> tuple[float, jobs_pb2.Job | str]:
    """Seconds a GetJob on a fresh connection takes, and the job (or the error)."""
    started = time.monotonic()
    with connect(address, client_settings()) as channel:
        try:
            job = jobs_pb2_grpc.JobServiceStub(channel).GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), timeout=10
            )
        except grpc.RpcError as exc:
            return time.monotonic() - started, f"{exc.code().name}: {exc.details()}"
    return time.monotonic() - started, job


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainer_is_not_starved_by_200_watch_streams_and_20_slow_uploads(
    tmp_path: Path, base_model_dir: Path
) -> None:
    store = str(tmp_path / "store")
    ingest = start_ingest(store, tmp_path, env={"NOVELCRAFTER_LEASE_SECONDS": str(LEASE_SECONDS)})
    address = ingest.address
    trainer = None
    load = None
    try:
        manifest = ingest_book(address, book_pdf(40, seed=21), parts=1).manifest
        job = create_job(address, manifest.book_id, tiny_job_config(steps=2))
        load = Load(address, job.job_id)
        load.open_streams(STREAMS)
        opened, failed, waiting = load.wait_open(timeout=30)
        time.sleep(1)
        cpu_before = _cpu_seconds(ingest.proc.pid)
        time.sleep(5)
        idle_cpu = (_cpu_seconds(ingest.proc.pid) - cpu_before) / 5
        load.open_uploads(UPLOADS)
        time.sleep(2)
        latency, answer = _get_job_latency(address, job.job_id)
        uploads_open = sum(not u.done() for u in load.uploads)
        print(
            f"\n{STREAMS} WatchJob streams: {opened} open, {failed} refused, {waiting} waiting; "
            f"ingest process CPU with them idle: {idle_cpu:.1%} of a core; "
            f"{uploads_open}/{UPLOADS} slow uploads open; GetJob answered in {latency * 1000:.0f} ms "
            f"({'ok' if isinstance(answer, jobs_pb2.Job) else answer})"
        )
        assert isinstance(answer, jobs_pb2.Job), answer
        assert latency < GET_JOB_BUDGET
        assert (opened, uploads_open) == (STREAMS, UPLOADS)
        assert idle_cpu < 0.03, "idle streams must not keep the server busy (no polling)"

        trainer = start_trainer(store, address, tmp_path)
        worst = 0.0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # GetJob stays fast the whole time the part trains
            latency, answer = _get_job_latency(address, job.job_id)
            assert isinstance(answer, jobs_pb2.Job), answer
            worst = max(worst, latency)
            if answer.state in TERMINAL:
                break
            assert trainer.alive(), trainer.output()[-4000:]
            time.sleep(1.0)
        done = wait_job(address, job.job_id, 30, logs=trainer.output)
        print(f"worst GetJob latency while the part trained under that load: {worst * 1000:.0f} ms")
        assert worst < GET_JOB_BUDGET
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{done.error}\n{trainer.output()[-4000:]}"
        part = done.parts[0]
        # attempts counts failed attempts: an expired lease would have made it 1.
        assert (part.state, part.attempts) == (jobs_pb2.PART_STATE_SUCCEEDED, 0)
        assert part.adapter_version

        # Every stream saw the end of the job and closed normally; the uploads are still open.
        assert all(w.ended.wait(30) for w in load.watches)
        assert {w.code for w in load.watches} == {grpc.StatusCode.OK}
        assert all(w.saw_end for w in load.watches)
        assert sum(not u.done() for u in load.uploads) == UPLOADS
    finally:
        if load is not None:
            load.close()
        if trainer is not None:
            trainer.stop()
        ingest.stop()
    coordinator_log, trainer_log = ingest.output(), trainer.output() if trainer else ""
    assert "lease expired" not in coordinator_log
    for trouble in (
        "lease lost",
        "coordinator unreachable",
        "progress report refused",
        "coordinator refused",
        "could not ",
        "claim refused",
        "claim failed",
        "part abandoned",
        "part failed",
    ):
        assert trouble not in trainer_log, f"trainer log: {trouble!r}\n{trainer_log[-4000:]}"


# --- the limit itself, on one in-process server with a small cap ------------------------------

CAP = 8
WATCH = "/novelcrafter.v1.JobService/WatchJob"


def _sample(name: str, method: str) -> float:
    return REGISTRY.get_sample_value(name, {"method": method}) or 0.0


@pytest.mark.timeout(120)
def test_a_stream_beyond_the_cap_is_refused_at_once_while_unary_calls_stay_fast(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), TEST_SETTINGS)
    coordinator = Coordinator(store, TEST_SETTINGS, lease_seconds=30.0)
    server = start_server(
        [job_service(coordinator)], "127.0.0.1:0", TEST_SETTINGS, max_workers=4, max_streams=CAP
    )
    server.on_stop.append(coordinator.close)
    address = f"127.0.0.1:{server.port}"
    gauge_before = _sample("novelcrafter_grpc_open_streams", WATCH)
    refused_before = _sample("novelcrafter_grpc_streams_refused_total", WATCH)
    channel = connect(address, TEST_SETTINGS)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    job = stub.CreateJob(jobs_pb2.CreateJobRequest(book_id=make_book(store, parts=1)), timeout=30)
    load = Load(address, job.job_id)
    try:
        load.open_streams(CAP)
        assert load.wait_open(timeout=30) == (CAP, 0, 0)
        assert server.open_streams == CAP
        assert _sample("novelcrafter_grpc_open_streams", WATCH) - gauge_before == CAP

        # One more stream (server-streaming, or reflection's bidi stream) is refused at once.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30))
        assert time.monotonic() - started < 2.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == f"too many open streams ({CAP}); try again later"
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(reflection)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _sample("novelcrafter_grpc_streams_refused_total", WATCH) - refused_before == 1

        # Unary calls have threads of their own: each answers fast, even 5x more at once than
        # there are unary threads (the rest wait briefly for one instead of being refused).
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
            latencies.append(time.monotonic() - started)
        results: list[object] = []

        def get() -> None:
            try:
                results.append(stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=10).job_id)
            except grpc.RpcError as exc:
                results.append(exc.code())

        threads = [threading.Thread(target=get) for _ in range(20)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        burst = time.monotonic() - started
        print(
            f"\n{CAP}/{CAP} streams open: GetJob max {max(latencies) * 1000:.1f} ms, 20 at once {burst:.2f} s"
        )
        assert max(latencies) < 1.0 and burst < 5.0
        assert results == [job.job_id] * 20

        # A stream whose client leaves frees its slot at once (the server's wait is woken).
        load.watches[0].call.cancel()
        wait_until(
            lambda: server.open_streams == CAP - 1, timeout=5, what="the cancelled stream's slot freed"
        )
        again = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30)
        assert next(again).sequence == 1
        again.cancel()
        wait_until(lambda: server.open_streams == CAP - 1, timeout=5, what="the slot freed again")
    finally:
        load.close()
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 30})
        stopper.start()
        stopper.join(15)
        channel.close()
    assert not stopper.is_alive(), "open streams held the graceful stop"
    assert server.open_streams == 0
    assert _sample("novelcrafter_grpc_open_streams", WATCH) == gauge_before


@pytest.mark.timeout(120)
def test_cli_watch_refused_a_stream_says_the_job_continues(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), TEST_SETTINGS)
    coordinator = Coordinator(store, TEST_SETTINGS, lease_seconds=30.0)
    server = start_server([job_service(coordinator)], "127.0.0.1:0", TEST_SETTINGS, max_streams=0)
    server.on_stop.append(coordinator.close)
    try:
        book = make_book(store, parts=1)
        out = run_cli("train", book, "--coordinator", f"127.0.0.1:{server.port}", "--watch", timeout=90)
        job_id = out.stdout.split("created job ", 1)[1].split()[0]
        state = coordinator.get_job(job_id).state
    finally:
        server.stop(grace=5)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"error: cannot follow job {job_id}: too many open streams (0); try again later; the job "
        f"continues (see `novelcrafter status {job_id}`)"
    )
    assert state == jobs_pb2.JOB_STATE_PENDING


# --- the console: one shared channel, a page's stream cancelled with the page -----------------


def _open_watch_streams(metrics_port: int) -> float:
    """``novelcrafter_grpc_open_streams`` for WatchJob, from the ingest process's /metrics."""
    text = requests.get(
        f"http://127.0.0.1:{metrics_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).text
    for line in text.splitlines():
        if line.startswith(f'novelcrafter_grpc_open_streams{{method="{WATCH}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_streams(metrics_port: int, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _open_watch_streams(metrics_port)) != expected:
        assert time.monotonic() < deadline, f"{seen} WatchJob streams open on ingest, expected {expected}"
        time.sleep(0.1)


def _first_event_id(lines: Iterator[str]) -> int:
    """The id of the next event of an SSE stream's ``iter_lines``. Keep the iterator while the
    page should stay open: dropping it closes the connection (the browser went away)."""
    for line in lines:
        if line.startswith("id: "):
            return int(line[4:])
    raise AssertionError("the stream ended without an event")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_console_job_events_share_one_channel_cancel_with_the_page_and_check_last_event_id(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    ingest = start_ingest(
        str(tmp_path / "store"),
        tmp_path,
        env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN, "NOVELCRAFTER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
    )
    console = None
    try:
        manifest = ingest_book(ingest.address, book_pdf(40, seed=31), token=TOKEN, parts=1).manifest
        job = create_job(
            ingest.address, manifest.book_id, tiny_job_config(), token=TOKEN
        )  # no trainer: stays
        console = start_console(
            tmp_path, ingest.address, f"127.0.0.1:{free_port()}", env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN}
        )
        session = requests.Session()
        login(session, console.url, TOKEN)
        url = f"{console.url}/jobs/{job.job_id}/events"

        # Last-Event-ID: a sequence number we wrote, or nothing; anything else is a 400, never a 500.
        for bad in ("\u00b2", "-1", "99999999999999999999", "abc", "1e3", "0x10", "+5", "4 2"):
            answer = session.get(url, headers={"Last-Event-ID": bad}, timeout=30)
            assert answer.status_code == 400, (bad, answer.status_code, answer.text[:200])
            assert "Last-Event-ID" in answer.json()["error"]
        for header, first in (("", 1), ("0", 1), ("2", 3)):
            with session.get(url, headers={"Last-Event-ID": header}, stream=True, timeout=30) as events:
                assert events.status_code == 200
                assert _first_event_id(events.iter_lines(decode_unicode=True)) == first

        # Five open pages: five streams on the console's one connection to ingest.
        _wait_streams(metrics_port, 0, timeout=10)
        pages = [session.get(url, stream=True, timeout=30) for _ in range(5)]
        readers = [page.iter_lines(decode_unicode=True) for page in pages]
        assert [_first_event_id(lines) for lines in readers] == [1] * 5
        _wait_streams(metrics_port, 5, timeout=10)
        ingest_port = int(ingest.address.rsplit(":", 1)[1])
        links = [
            c
            for c in psutil.Process(console.proc.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == ingest_port and c.status == psutil.CONN_ESTABLISHED
        ]
        assert len(links) == 1, links
        # The browser goes away: each page's call is cancelled, the ingest server's streams end.
        for page in pages:
            page.close()
        _wait_streams(metrics_port, 0, timeout=15)
        # The shared channel is still fine for everyone else.
        assert session.get(f"{console.url}/jobs/{job.job_id}", timeout=30).status_code == 200
        with session.get(url, stream=True, timeout=30) as events:
            assert _first_event_id(events.iter_lines(decode_unicode=True)) == 1
    finally:
        if console is not None:
            console.stop()
        ingest.stop()


def test_the_console_answers_503_to_a_refused_stream_and_413_to_a_large_upload() -> None:
    assert http_status(ResourceExhausted(f"too many open streams ({CAP}); try again later")) == 503
    assert http_status(UploadTooLarge("upload too large")) == 413
