"""Benchmark: one job coordinator process over real gRPC, with a big job table, many workers.

    .venv/bin/python -m bench.coordinator --db sqlite --jobs 10000 --history 100000 --workers 200 --seconds 60
    .venv/bin/python -m bench.coordinator ... --pace 10       # paced workers, see 3. below
    .venv/bin/python -m bench.coordinator --db postgresql://USER:PASSWORD@HOST:PORT/DB ... [--json]
    .venv/bin/python -m bench.coordinator --db store ...        # the baseline (below)
    .venv/bin/python -m bench.coordinator --compare [--pg URL|auto] --jobs ... --max-seed-seconds 600

What one run does, for one coordinator:

1. **Seed** ``--jobs`` live jobs of 10 parts (part 0 READY, as ``create_job`` leaves a new job,
   with its three creation events) and ``--history`` finished jobs (SUCCEEDED, every part
   SUCCEEDED with a published version and its metrics, a 16-point loss curve: real ones hold a
   point per step and are larger; ``--history-events`` events each, 0 by default). Into the
   database with the coordinator's own code: ``Database(url).migrate()``,
   then :func:`novelcrafter.coordinator.core.insert_job` for every job, whose statements are
   collected and written with ``executemany``, thousands of jobs per transaction (the records'
   JSON comes from a template checked against ``JobRecord.to_json``, see :class:`JobFactory`). Part data keys
   are synthetic (``books/<book>/parts/NN/train.jsonl``, valid per ``novelcrafter.layout``);
   no book manifest is written, because nothing reads one at claim time (``_assignment``
   copies the keys from the job record). ``--max-seed-seconds`` caps seeding (live jobs first,
   then history); the output gives the sizes reached.
2. **Start** ``novelcrafter serve coordinator`` as a child process (``NOVELCRAFTER_DB``, an
   empty local store, ``NOVELCRAFTER_LEASE_SECONDS``, ``/metrics`` on a free port,
   ``OMP_NUM_THREADS=1``), and time its start to the first answered ClaimPart.
3. **Load**: ``--workers`` simulated workers (threads of this process, each its own worker id,
   sharing ``--channels`` channels) loop for ``--seconds``: ClaimPart; when assigned,
   ``--renewals`` RenewLease and ``--reports`` ReportProgress, then **FailPart(release=True)**,
   which gives the part back READY without counting an attempt, so the live set stays
   ``--jobs`` jobs for the whole run (CompletePart would need a published adapter per part and
   would drain the queue). Two ways to pace those calls (``pace`` in the output says which):

   - ``--pace 0`` (the default), **saturating**: no think time between calls (``--think-ms``),
     a closed loop that saturates the coordinator, so latencies include its queueing; an empty
     claim waits ``--idle-sleep`` before the next. This shows throughput: the most claims,
     renewals and reports per second the coordinator serves, and its latencies when overloaded.
   - ``--pace SECONDS``, **paced**: each worker calls at the rate of a real trainer. After a
     claim it holds the part for ``max(--renewals, --reports)`` rounds of SECONDS, calling
     RenewLease and ReportProgress once a round each (at fixed times from the claim's answer,
     as the trainer's lease keeper does every ``ttl / 3``, i.e. 10 s at the default 30 s lease),
     then releases it; an empty or failed claim waits SECONDS before the next (the trainer
     polls every ``poll_seconds``, 2 s by default). The workers' first calls are staggered
     uniformly over SECONDS (offsets seeded with ``PACE_SEED``, the same in every run) so they
     do not arrive in lockstep. At the end of ``--seconds`` a held part is released at once
     rather than after its last round. This shows the latency a trainer sees at a realistic
     call rate, which saturation cannot: there, every figure includes the queue the load
     itself builds. Both are reported because they answer different questions.

   Either way the same figures are measured: claim latencies (assigned and empty),
   renewals/s, reports/s, errors by status code, and the CPU seconds the coordinator and this
   process (the workers: they share the machine's cores with it) used during the load.
4. ``rss_mb``: the coordinator process's resident memory (psutil) after the load (the
   database server's, for PostgreSQL, is not included).
5. **Restart**: SIGTERM, wait for the exit, start it again: ``restart_to_first_claim_s`` is
   the time from starting the process to the first answered ClaimPart (the probe retries every
   ~50 ms; page cache warm).

**Baseline** (``--db store``): the coordinator this project ran before it kept its state in a
database, i.e. commit 2e6f384 (the parent of the change that introduced
``services/coordinator``): every job in memory, each change written to the object store as
``jobs/<job_id>/job.json`` (fsync'd; ``events.jsonl`` flushed every 2 s), every job read back
at start, hosted by ``novelcrafter serve ingest``. That commit is installed once, non-editable,
into ``~/.cache/novelcrafter-bench/baseline-2e6f384`` (``git archive`` + ``pip install
--no-deps --target``) and run as ``PYTHONPATH=DIR python -m novelcrafter.cli serve ingest``
from a folder outside the repository; the child prints which ``novelcrafter`` it imported and
the run stops unless that is the cached copy. Its jobs are seeded as ``job.json`` files in its
record format (format 1, ``seq_reserved``; ``events.jsonl`` with the same events), written
directly (no fsync: seeding is not what is measured); its start must log that it recovered
every seeded job. Same worker load, same client code, same machine.

``--compare`` runs the baseline first, then SQLite, then PostgreSQL (``--pg URL``, or ``--pg
auto``: a throwaway server started with the tests' ``pg_support``), all at the sizes the
baseline reached, and prints the figures side by side. A PostgreSQL URL gets a fresh database
of its own (``CREATE DATABASE``, dropped afterwards); without that right it must point at an
empty database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from novelcrafter.coordinator.record import JobRecord, PartData

ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "2e6f384"
BASELINE_WHY = (
    "commit 2e6f384, the coordinator this project ran before its state moved into a database "
    "(jobs in memory, jobs/<job_id>/job.json in the store, hosted by `serve ingest`)"
)
PARTS = 10
BATCH_JOBS = 5000  # jobs per seeding transaction
SEQ_BLOCK = 10_000  # the baseline's event-sequence reservation (its record.py)
PACE_SEED = 0  # --pace: the seed of the workers' random first-call offsets (the same in every run)
LAUNCH = (
    "import runpy, sys\n"
    "import novelcrafter\n"
    "sys.stderr.write('bench.coordinator: novelcrafter from %s\\n' % novelcrafter.__file__)\n"
    "sys.stderr.flush()\n"
    "sys.argv = ['novelcrafter', *sys.argv[1:]]\n"
    "runpy.run_module('novelcrafter.cli', run_name='__main__', alter_sys=True)\n"
)
MODULE_MARK = "bench.coordinator: novelcrafter from "


def say(message: str) -> None:
    print(f"[bench.coordinator] {message}", file=sys.stderr, flush=True)


# --- the machine -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    cpuinfo: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                break  # the first processor's block only
            cpuinfo.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = cpuinfo.get("model name", model)
    if "cpu family" in cpuinfo:
        model += f" (family {cpuinfo['cpu family']} model {cpuinfo.get('model', '?')})"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    import grpc

    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count() or 0,
        "cpu_affinity": affinity,
        "memory_gb": mem_gb,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "sqlite": sqlite3.sqlite_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the jobs ----------------------------------------------------------------------------------


def _book_id(n: int) -> str:
    return f"{0xB0000000 + n // 10:016x}"  # ten jobs per book


def _job_id(n: int) -> str:
    return f"j-{n:012x}"


class JobFactory:
    """JobRecords built the way ``Coordinator.create_job`` builds them (same default config,
    same parts, same creation events), live or finished.

    Every job of a kind differs from the first only in its ids, keys and times, so each record
    is a copy of a template message with those set, and its JSON (``to_json``, what
    ``insert_job`` stores) is the first record's JSON with them replaced: the protobuf-to-JSON
    conversion of ten parts' metrics would otherwise be most of the seeding time. Every
    ``VERIFY_EVERY``-th record checks that JSON against ``JobRecord.to_json`` itself."""

    VERIFY_EVERY = 997

    def __init__(self, history_events: int) -> None:
        from novelcrafter.config import get_settings
        from novelcrafter.train_settings import with_defaults
        from novelcrafter.v1 import common_pb2, jobs_pb2

        self.config = with_defaults(common_pb2.JobConfig(), base_model=get_settings().base_model)
        self.history_events = history_events
        self.base_time = time.time() - 3600.0
        self.made = 0
        self.verified = 0
        self._json: dict[str, str] = {}
        self._checked: set[str] = set()
        live = jobs_pb2.Job(state=jobs_pb2.JOB_STATE_PENDING, config=self.config)
        for i in range(PARTS):
            live.parts.add(
                index=i, state=jobs_pb2.PART_STATE_READY if i == 0 else jobs_pb2.PART_STATE_PENDING
            )
        done = jobs_pb2.Job(state=jobs_pb2.JOB_STATE_SUCCEEDED, config=self.config)
        curve = [round(3.4 - 0.004 * s, 3) for s in range(16)]
        for i in range(PARTS):
            part = done.parts.add(index=i, state=jobs_pb2.PART_STATE_SUCCEEDED, step=120, total_steps=120)
            m = part.metrics
            m.train_loss, m.base_perplexity, m.adapter_perplexity = 2.91, 32.8, 24.6
            m.train_tokens, m.eval_tokens, m.steps = 41_000, 4_100, 120
            m.train_seconds, m.eval_seconds, m.tokens_per_second, m.device = 2950.0, 61.0, 13.9, "cpu"
            m.loss_curve.extend(curve)
        self._messages = {"live": live, "finished": done}

    def _record(self, kind: str, n: int, created_at: float, updated_at: float) -> Any:
        from novelcrafter import layout
        from novelcrafter.v1 import jobs_pb2

        job = jobs_pb2.Job()
        job.CopyFrom(self._messages[kind])
        job.job_id, job.book_id = _job_id(n), _book_id(n)
        job.created_at, job.updated_at = created_at, updated_at
        if kind == "finished":
            for part in job.parts:
                part.adapter_version = layout.adapter_version_id(job.job_id, part.index)
        parts = [
            PartData(layout.part_train_key(job.book_id, i), layout.part_test_key(job.book_id, i))
            for i in range(PARTS)
        ]
        rec = SeedRecord(job=job, part_data=parts, init_adapter_key="")
        rec.template = self._json.get(kind)
        if rec.template is None:  # the first of its kind: JobRecord.to_json itself, and the template
            self._json[kind] = json.dumps(JobRecord.to_json(rec))
        self.made += 1
        first = rec.template is not None and kind not in self._checked
        self._checked.add(kind)
        rec.verify = first or self.made % self.VERIFY_EVERY == 0
        self.verified += rec.verify
        return rec

    def live(self, n: int, index: int) -> tuple[Any, Any]:
        """A new job (part 0 READY) and its creation change, as ``create_job`` makes them."""
        from novelcrafter.coordinator.core import _Change

        from novelcrafter.v1 import jobs_pb2

        created = self.base_time + 1000.0 + index * 1e-3
        rec = self._record("live", n, created, created)
        change = _Change(rec.job_id)
        change.job_state(jobs_pb2.JOB_STATE_PENDING)
        change.message(
            f"job created for book {rec.job.book_id}: {PARTS} parts, base model {self.config.base_model}"
        )
        change.part_state(0, jobs_pb2.PART_STATE_READY)
        return rec, change

    def finished(self, n: int, index: int) -> tuple[Any, list[Any]]:
        """A SUCCEEDED job (every part trained and published) and its ``--history-events`` events."""
        from novelcrafter.v1 import jobs_pb2

        created = self.base_time - 86400.0 + index * 1e-3
        rec = self._record("finished", n, created, created + 30_000.0)
        events = []
        for s in range(1, self.history_events + 1):
            part = min(s // 6, PARTS - 1)
            events.append(
                jobs_pb2.JobEvent(
                    job_id=rec.job_id,
                    sequence=s,
                    time=created + s,
                    part_index=part,
                    message=f"part {part:02d}: event {s}",
                )
            )
        return rec, events


class SeedRecord(JobRecord):
    """A :class:`JobRecord` whose JSON is its kind's template with its own ids, keys and times
    (see :class:`JobFactory`); ``verify`` compares it with ``JobRecord.to_json``."""

    template: str | None = None
    verify: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.template is None:
            return JobRecord.to_json(self)
        data = json.loads(self.template)
        job = data["job"]
        job["job_id"], job["book_id"] = self.job.job_id, self.job.book_id
        job["created_at"], job["updated_at"] = self.job.created_at, self.job.updated_at
        for part, message in zip(job["parts"], self.job.parts, strict=True):
            if message.adapter_version:
                part["adapter_version"] = message.adapter_version
        data["parts"] = [{"train_key": p.train_key, "test_key": p.test_key} for p in self.part_data]
        if self.verify and data != JobRecord.to_json(self):
            raise AssertionError(f"seeded JSON of {self.job_id} differs from JobRecord.to_json")
        return data


@dataclass
class Seeded:
    jobs: int = 0
    history: int = 0
    seconds: float = 0.0
    capped: bool = False


def _plan(jobs: int, history: int) -> Iterator[tuple[str, int, int]]:
    """(kind, job number, index within kind): live jobs first (the load needs them), then history."""
    for i in range(jobs):
        yield "live", 1 + i, i
    for i in range(history):
        yield "finished", 1 + jobs + i, i


class _Batch:
    """A stand-in for :class:`Tx` that ``insert_job`` writes into: its statements are collected
    per SQL text (in first-use order) and run with one ``executemany`` each."""

    def __init__(self) -> None:
        self.statements: dict[str, list[tuple[Any, ...]]] = {}

    def execute(self, sql: str, params: Any = ()) -> None:
        self.statements.setdefault(sql, []).append(tuple(params))

    def executemany(self, sql: str, rows: Any) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self.statements.setdefault(sql, []).extend(rows)

    def one(self, *_: Any) -> Any:
        raise AssertionError("insert_job reads nothing")

    all = one

    def write(self, tx: Any) -> None:
        for sql, rows in self.statements.items():
            tx.executemany(sql, rows)


def seed_database(url: str, jobs: int, history: int, *, history_events: int, max_seconds: float) -> Seeded:
    from novelcrafter.coordinator.core import insert_job
    from novelcrafter.coordinator.db import Database

    factory = JobFactory(history_events)
    db = Database(url)
    started = time.monotonic()
    seeded = Seeded()
    try:
        db.migrate()
        with db.transaction() as tx:
            if tx.one("SELECT COUNT(*) FROM jobs")[0]:
                raise SystemExit(
                    f"{url.split('@')[-1]}: the database already has jobs; the bench needs an empty one"
                )
        plan = _plan(jobs, history)
        done = False
        while not done:
            batch = _Batch()
            counts = {"live": 0, "finished": 0}
            for _ in range(BATCH_JOBS):
                item = next(plan, None)
                if item is None:
                    done = True
                    break
                kind, n, index = item
                if kind == "live":
                    rec, change = factory.live(n, index)
                    insert_job(batch, rec, [], change)
                else:
                    rec, events = factory.finished(n, index)
                    insert_job(batch, rec, events)
                counts[kind] += 1
            with db.transaction() as tx:
                batch.write(tx)
            before = seeded.jobs + seeded.history
            seeded.jobs += counts["live"]
            seeded.history += counts["finished"]
            elapsed = time.monotonic() - started
            if not done and max_seconds and elapsed >= max_seconds:
                seeded.capped = True
                break
            if (seeded.jobs + seeded.history) // 20_000 > before // 20_000:
                say(f"  seeded {seeded.jobs} live + {seeded.history} finished ({elapsed:.0f} s)")
    finally:
        db.close()
    seeded.seconds = time.monotonic() - started
    return seeded


def _baseline_json(rec: Any) -> dict[str, Any]:
    """A record in the baseline's ``job.json`` format (format 1 of its record.py)."""
    data = rec.to_json()
    data.pop("epoch", None)  # the database coordinator's field; the baseline's has seq_reserved
    for lease in data["leases"].values():
        lease.pop("epoch", None)
    return data


def seed_store(root: Path, jobs: int, history: int, *, history_events: int, max_seconds: float) -> Seeded:
    """``jobs/<job_id>/job.json`` (+ ``events.jsonl``) files as the baseline writes them."""
    from google.protobuf import json_format

    factory = JobFactory(history_events)
    started = time.monotonic()
    seeded = Seeded()
    for count, (kind, n, index) in enumerate(_plan(jobs, history), 1):
        if kind == "live":
            rec, change = factory.live(n, index)
            events = change.events
            for seq, event in enumerate(events, 1):  # what the baseline's _commit numbers them
                event.job_id, event.sequence, event.time = rec.job_id, seq, rec.job.created_at
        else:
            rec, events = factory.finished(n, index)
        data = _baseline_json(rec)
        data["seq_reserved"] = len(events) + SEQ_BLOCK
        folder = root / "jobs" / rec.job_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "job.json").write_text(json.dumps(data, separators=(",", ":")))
        if events:
            (folder / "events.jsonl").write_text(
                "".join(
                    json.dumps(json_format.MessageToDict(e), separators=(",", ":")) + "\n" for e in events
                )
            )
        if kind == "live":
            seeded.jobs += 1
        else:
            seeded.history += 1
        if count % 1000 == 0:
            elapsed = time.monotonic() - started
            if count % 20_000 == 0:
                say(f"  seeded {seeded.jobs} live + {seeded.history} finished ({elapsed:.0f} s)")
            if max_seconds and elapsed >= max_seconds and count < jobs + history:
                seeded.capped = True
                break
    seeded.seconds = time.monotonic() - started
    return seeded


# --- the baseline's install --------------------------------------------------------------------


def baseline_dir() -> Path:
    return Path.home() / ".cache" / "novelcrafter-bench" / f"baseline-{BASELINE_COMMIT}"


def ensure_baseline(repo: Path) -> Path:
    """Commit 2e6f384 installed once, non-editable, outside the repository; its folder."""
    target = baseline_dir()
    stamp = target / ".bench-installed"
    if stamp.exists():
        return target
    full = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{BASELINE_COMMIT}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    say(f"installing the baseline {full[:12]} into {target} (once)")
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="nc-bench-baseline-src-") as src:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", full], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                src,
            ],
            check=True,
        )
    stamp.write_text(full + "\n")
    return target


# --- PostgreSQL --------------------------------------------------------------------------------


class PgDatabase:
    """A fresh database for one run on the server of ``url`` (dropped at the end)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.admin_url = url
        self.name = f"ncbench_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        self.created = False
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.created = True
            parts = urlsplit(url)
            self.url = urlunsplit(parts._replace(path="/" + self.name))
        except psycopg.errors.InsufficientPrivilege:
            say("no right to CREATE DATABASE: using the given database, which must be empty")
            self.url = url

    def drop(self) -> None:
        if not self.created:
            return
        import psycopg

        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.Error as exc:
            say(f"could not drop database {self.name}: {exc}")

    def server_version(self) -> str:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=10) as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])


def start_throwaway_pg() -> Any:
    """A PostgreSQL server in a temporary folder (the tests' pg_support); ``.url``, ``.close()``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pg_support

    bindir = pg_support.find_binaries()
    if bindir is None:
        raise SystemExit("--pg auto: PostgreSQL's server programs are not installed")
    server = pg_support.PostgresServer(bindir)
    server.start()
    return server


# --- the coordinator process -------------------------------------------------------------------


@dataclass
class Target:
    kind: str  # sqlite | postgresql | store
    db_url: str  # "" for the store baseline
    store: Path
    work: Path
    lease_seconds: float
    baseline: Path | None = None  # PYTHONPATH of the baseline install
    log_no: int = 0
    module: str = ""

    @property
    def coordinator(self) -> str:
        return f"baseline {BASELINE_COMMIT} (serve ingest)" if self.baseline else "ours (serve coordinator)"

    def spawn(self, address: str) -> tuple[subprocess.Popen[bytes], Path]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVELCRAFTER_") and k != "PYTHONPATH"}
        env.update(
            NOVELCRAFTER_LEASE_SECONDS=f"{self.lease_seconds:g}",
            NOVELCRAFTER_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
            NOVELCRAFTER_HOME=str(self.work / "home"),
            NOVELCRAFTER_GRACE_SECONDS="10",
            NOVELCRAFTER_LOG_FORMAT="json",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        if self.baseline:
            env["PYTHONPATH"] = str(self.baseline)
            service = "ingest"
        else:
            env["NOVELCRAFTER_DB"] = self.db_url
            service = "coordinator"
        self.log_no += 1
        log = self.work / f"{self.kind}-{self.log_no}.log"
        out = open(log, "wb")
        # -P and a cwd outside the repository: `novelcrafter` comes from PYTHONPATH (the baseline)
        # or the installed package (ours), never from a source folder in the current directory.
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-c",
                LAUNCH,
                "serve",
                service,
                "--listen",
                address,
                "--store",
                str(self.store),
            ],
            env=env,
            cwd=self.work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        return proc, log


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _channel(address: str) -> Any:
    import grpc

    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 50),
        ],
    )


def start_to_first_claim(
    target: Target, address: str, timeout: float
) -> tuple[subprocess.Popen[bytes], Path, float]:
    """Start the coordinator; seconds from the process start to its first answered ClaimPart
    (the part that answer assigns, if any, is released at once)."""
    import grpc

    from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

    started = time.perf_counter()
    proc, log = target.spawn(address)
    channel = _channel(address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the coordinator exited with {proc.returncode}:\n{_log_tail(log)}")
            if time.perf_counter() - started > timeout:
                proc.kill()
                raise SystemExit(f"no ClaimPart answered within {timeout:.0f} s:\n{_log_tail(log)}")
            try:
                resp = stub.ClaimPart(
                    jobs_pb2.ClaimPartRequest(worker_id="bench-probe", device="cpu"),
                    timeout=1.0,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                raise
            seconds = time.perf_counter() - started
            break
        if resp.assigned:
            stub.FailPart(
                jobs_pb2.FailPartRequest(lease=resp.lease, error="bench probe", release=True), timeout=60
            )
    finally:
        channel.close()
    module = next(
        (
            ln.split(MODULE_MARK, 1)[1].strip()
            for ln in _log_tail(log, 10**6).splitlines()
            if MODULE_MARK in ln
        ),
        "",
    )
    target.module = module
    if target.baseline and not Path(module).resolve().is_relative_to(target.baseline.resolve()):
        proc.kill()
        raise SystemExit(f"the baseline process imported novelcrafter from {module!r}, not {target.baseline}")
    return proc, log, seconds


def stop(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> float:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Samples:
    claim_assigned: list[float] = field(default_factory=list)
    claim_empty: list[float] = field(default_factory=list)
    renew: list[float] = field(default_factory=list)
    report: list[float] = field(default_factory=list)
    release: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, method: str, exc: Any) -> None:
        key = f"{method}:{exc.code().name}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def merge(self, other: Samples) -> None:
        for name in ("claim_assigned", "claim_empty", "renew", "report", "release"):
            getattr(self, name).extend(getattr(other, name))
        for key, n in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + n


def quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return round((ordered[low] + (ordered[high] - ordered[low]) * (pos - low)) * 1000, 3)


def run_load(address: str, args: argparse.Namespace, tag: str) -> tuple[Samples, float]:
    import grpc

    from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

    J = jobs_pb2
    channels = [_channel(address) for _ in range(max(1, args.channels))]
    stubs = [jobs_pb2_grpc.JobServiceStub(ch) for ch in channels]
    think = args.think_ms / 1000.0
    barrier = threading.Barrier(args.workers + 1)
    per_worker = [Samples() for _ in range(args.workers)]
    window: dict[str, float] = {}

    def renew(stub: Any, rec: Samples, lease: Any) -> Any:
        t = time.perf_counter()
        lease = stub.RenewLease(J.RenewLeaseRequest(lease=lease), timeout=args.rpc_timeout)
        rec.renew.append(time.perf_counter() - t)
        return lease

    def report(stub: Any, rec: Samples, lease: Any, step: int) -> Any:
        progress = J.ProgressUpdate(
            step=step, total_steps=args.reports, loss=3.0 - 0.01 * step, phase="train"
        )
        t = time.perf_counter()
        answer = stub.ReportProgress(
            J.ReportProgressRequest(lease=lease, progress=progress), timeout=args.rpc_timeout
        )
        rec.report.append(time.perf_counter() - t)
        return answer.lease if answer.HasField("lease") else lease

    def release(stub: Any, rec: Samples, lease: Any) -> None:
        t = time.perf_counter()
        try:
            stub.FailPart(
                J.FailPartRequest(lease=lease, error="bench: released", release=True),
                timeout=args.rpc_timeout,
            )
            rec.release.append(time.perf_counter() - t)
        except grpc.RpcError as exc:
            rec.error("FailPart", exc)

    def claim(stub: Any, rec: Samples, worker_id: str) -> Any:
        """The claim's answer (its latency recorded), or None when the call failed."""
        t = time.perf_counter()
        try:
            resp = stub.ClaimPart(
                J.ClaimPartRequest(worker_id=worker_id, device="cpu"), timeout=args.rpc_timeout
            )
        except grpc.RpcError as exc:
            rec.error("ClaimPart", exc)
            return None
        (rec.claim_assigned if resp.assigned else rec.claim_empty).append(time.perf_counter() - t)
        return resp

    def saturating(index: int) -> None:
        stub, rec = stubs[index % len(stubs)], per_worker[index]
        worker_id = f"bench-{tag}-w{index:04d}"
        barrier.wait()
        deadline = window["deadline"]
        while time.perf_counter() < deadline:
            resp = claim(stub, rec, worker_id)
            if resp is None or not resp.assigned:
                time.sleep(args.idle_sleep)
                continue
            lease, method = resp.lease, "RenewLease"
            try:
                for _ in range(args.renewals):
                    time.sleep(think)
                    lease = renew(stub, rec, lease)
                method = "ReportProgress"
                for step in range(1, args.reports + 1):
                    time.sleep(think)
                    lease = report(stub, rec, lease, step)
            except grpc.RpcError as exc:
                rec.error(method, exc)
            time.sleep(think)
            release(stub, rec, lease)

    def wait_until(when: float, deadline: float) -> bool:
        """Sleep until ``when`` (at most until the deadline); False when ``when`` is past it."""
        pause = min(when, deadline) - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        return when < deadline

    def paced(index: int) -> None:
        stub, rec = stubs[index % len(stubs)], per_worker[index]
        worker_id = f"bench-{tag}-w{index:04d}"
        barrier.wait()
        deadline = window["deadline"]
        if not wait_until(window["start"] + offsets[index], deadline):
            return
        while time.perf_counter() < deadline:
            resp = claim(stub, rec, worker_id)
            if resp is None or not resp.assigned:
                wait_until(time.perf_counter() + args.pace, deadline)
                continue
            held = time.perf_counter()
            lease, method = resp.lease, "RenewLease"
            try:
                for n in range(1, max(args.renewals, args.reports) + 1):
                    if not wait_until(held + n * args.pace, deadline):
                        break  # the load is over: give the part back now
                    if n <= args.renewals:
                        method = "RenewLease"
                        lease = renew(stub, rec, lease)
                    if n <= args.reports:
                        method = "ReportProgress"
                        lease = report(stub, rec, lease, n)
            except grpc.RpcError as exc:
                rec.error(method, exc)
            release(stub, rec, lease)

    worker = paced if args.pace > 0 else saturating
    stagger = random.Random(PACE_SEED)
    offsets = [stagger.uniform(0.0, args.pace) for _ in range(args.workers)]

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-w{i}", daemon=True)
        for i in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    window["start"] = time.perf_counter()
    window["deadline"] = window["start"] + args.seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - window["start"]
    for ch in channels:
        ch.close()
    total = Samples()
    for rec in per_worker:
        total.merge(rec)
    return total, elapsed


# --- one run -----------------------------------------------------------------------------------


def run_one(kind: str, db_url: str, args: argparse.Namespace, jobs: int, history: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"nc-bench-coord-{kind}-", dir=args.work_dir))
    pg: PgDatabase | None = None
    result: dict[str, Any] = {}
    try:
        store = work / "store"
        store.mkdir()
        baseline = None
        db_version = None
        if kind == "store":
            baseline = ensure_baseline(args.baseline_repo)
            say(
                f"seeding {jobs} live + {history} finished jobs as job.json files "
                f"(baseline {BASELINE_COMMIT})"
            )
            seeded = seed_store(
                store, jobs, history, history_events=args.history_events, max_seconds=args.max_seed_seconds
            )
        else:
            if kind == "postgresql":
                pg = PgDatabase(db_url)
                db_url = pg.url
                db_version = pg.server_version()
            else:
                db_version = sqlite3.sqlite_version
            say(f"seeding {jobs} live + {history} finished jobs into {kind}")
            seeded = seed_database(
                db_url, jobs, history, history_events=args.history_events, max_seconds=args.max_seed_seconds
            )
        say(
            f"seeded {seeded.jobs} live + {seeded.history} finished in {seeded.seconds:.1f} s"
            + (" (capped by --max-seed-seconds)" if seeded.capped else "")
        )
        target = Target(kind, db_url, store, work, args.lease_seconds, baseline)
        address = f"127.0.0.1:{free_port()}"
        say(f"starting {target.coordinator} on {address}")
        proc, log, first_start = start_to_first_claim(target, address, args.start_timeout)
        say(
            f"first ClaimPart answered {first_start:.2f} s after the start "
            f"(novelcrafter from {target.module})"
        )
        try:
            recovered = _recovered(log) if baseline else None
            if baseline and recovered != seeded.jobs + seeded.history:
                raise SystemExit(
                    f"the baseline recovered {recovered} jobs, {seeded.jobs + seeded.history} were seeded"
                )
            rss_idle = rss_mb(proc.pid)
            say(f"load: {args.workers} workers for {args.seconds:g} s")
            load_before = round(os.getloadavg()[0], 2)  # a shared machine: say how busy it was
            server_cpu, client_cpu = cpu_seconds(proc.pid), cpu_seconds(os.getpid())
            samples, elapsed = run_load(address, args, kind[:2])
            server_cpu = cpu_seconds(proc.pid) - server_cpu
            client_cpu = cpu_seconds(os.getpid()) - client_cpu
            rss_load = rss_mb(proc.pid)
            stop_seconds = stop(proc)
            say(f"stopped in {stop_seconds:.2f} s; restarting")
            proc, log, restart = start_to_first_claim(target, address, args.start_timeout)
            rss_restart = rss_mb(proc.pid)
            say(f"restart: first ClaimPart answered {restart:.2f} s after the start")
        finally:
            if proc.poll() is None:
                stop(proc)
        claims = samples.claim_assigned + samples.claim_empty
        result = {
            "coordinator": target.coordinator,
            "baseline": BASELINE_WHY if baseline else None,
            "db": kind,
            "db_version": db_version,
            "server_module": target.module,
            "jobs": seeded.jobs,
            "history": seeded.history,
            "jobs_requested": jobs,
            "history_requested": history,
            "history_events": args.history_events,
            "seed_capped": seeded.capped,
            "seed_seconds": round(seeded.seconds, 2),
            "workers": args.workers,
            "channels": max(1, args.channels),
            "seconds": args.seconds,
            "elapsed_s": round(elapsed, 2),
            "lease_seconds": args.lease_seconds,
            "renewals_per_claim": args.renewals,
            "reports_per_claim": args.reports,
            "think_ms": args.think_ms,
            "pace": args.pace,
            "claims": len(claims),
            "claims_assigned": len(samples.claim_assigned),
            "claims_empty": len(samples.claim_empty),
            "claims_per_s": round(len(claims) / elapsed, 2),
            "claim_p50_ms": quantile_ms(claims, 0.5),
            "claim_p99_ms": quantile_ms(claims, 0.99),
            "claim_max_ms": quantile_ms(claims, 1.0),
            "claim_assigned_p50_ms": quantile_ms(samples.claim_assigned, 0.5),
            "claim_assigned_p99_ms": quantile_ms(samples.claim_assigned, 0.99),
            "claim_empty_p50_ms": quantile_ms(samples.claim_empty, 0.5),
            "claim_empty_p99_ms": quantile_ms(samples.claim_empty, 0.99),
            "renew_p50_ms": quantile_ms(samples.renew, 0.5),
            "renew_p99_ms": quantile_ms(samples.renew, 0.99),
            "report_p50_ms": quantile_ms(samples.report, 0.5),
            "report_p99_ms": quantile_ms(samples.report, 0.99),
            "release_p50_ms": quantile_ms(samples.release, 0.5),
            "release_p99_ms": quantile_ms(samples.release, 0.99),
            "renewals_per_s": round(len(samples.renew) / elapsed, 2),
            "reports_per_s": round(len(samples.report) / elapsed, 2),
            "releases_per_s": round(len(samples.release) / elapsed, 2),
            "errors": dict(sorted(samples.errors.items())),
            "start_to_first_claim_s": round(first_start, 3),
            "restart_to_first_claim_s": round(restart, 3),
            "stop_s": round(stop_seconds, 2),
            "load_average_1m_before_load": load_before,
            "server_cpu_s": round(server_cpu, 2),
            "client_cpu_s": round(client_cpu, 2),
            "rss_idle_mb": rss_idle,
            "rss_mb": rss_load,
            "rss_after_restart_mb": rss_restart,
        }
    finally:
        if pg is not None:
            pg.drop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _recovered(log: Path) -> int | None:
    """How many jobs the baseline says it recovered (0 when it logs nothing: no jobs)."""
    for line in log.read_text(errors="replace").splitlines():
        if "recovered jobs" in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            for key in ("jobs",):
                if key in data:
                    return int(data[key])
                if isinstance(data.get("fields"), dict) and key in data["fields"]:
                    return int(data["fields"][key])
    return 0


def sqlite_url(spec: str, work_dir: str | None) -> tuple[str, Path]:
    """An absolute ``sqlite:////PATH`` for ``--db sqlite`` (a file in a temporary folder) or
    ``sqlite:///PATH`` (relative to here, as the coordinator reads it); the path must not exist."""
    if spec == "sqlite":
        path = Path(tempfile.mkdtemp(prefix="nc-bench-sqlite-", dir=work_dir)) / "coordinator.sqlite3"
    else:
        rest = spec.split("://", 1)[1]
        path = Path(rest[1:] if rest.startswith("/") else rest).resolve()
        if path.exists():
            raise SystemExit(f"{path} exists: the bench seeds a fresh database (pass a new path)")
    return f"sqlite:///{path}", path


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# --- output ------------------------------------------------------------------------------------

COLUMNS = [
    ("coordinator", "coordinator", "{}"),
    ("state", "state", "{}"),
    ("jobs", "live jobs", "{:,}"),
    ("history", "finished jobs", "{:,}"),
    ("claims_per_s", "claims/s", "{:.1f}"),
    ("claim_p50_ms", "claim p50 ms", "{:.1f}"),
    ("claim_p99_ms", "claim p99 ms", "{:.1f}"),
    ("claims_empty", "empty claims", "{}"),
    ("renewals_per_s", "renewals/s", "{:.1f}"),
    ("reports_per_s", "reports/s", "{:.1f}"),
    ("server_cpu_s", "coordinator CPU s", "{:.1f}"),
    ("start_to_first_claim_s", "start → 1st claim s", "{:.2f}"),
    ("restart_to_first_claim_s", "restart → 1st claim s", "{:.2f}"),
    ("rss_mb", "RSS after load MB", "{:.0f}"),
    ("rss_after_restart_mb", "RSS after restart MB", "{:.0f}"),
    ("seed_seconds", "seeding s", "{:.1f}"),
]


def table(runs: list[dict[str, Any]]) -> str:
    def cell(run: dict[str, Any], key: str, fmt: str) -> str:
        if key == "state":
            return run["db"] + (f" {run['db_version']}" if run.get("db_version") else "")
        value = run.get(key)
        if value is None:
            return "–"
        text = fmt.format(value)
        if key in ("jobs", "history") and run.get("seed_capped"):
            text += "*"
        return text

    lines = [
        "| " + " | ".join(head for _, head, _ in COLUMNS) + " | errors |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for run in runs:
        errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "none"
        lines.append("| " + " | ".join(cell(run, key, fmt) for key, _, fmt in COLUMNS) + f" | {errors} |")
    return "\n".join(lines)


def header(info: dict[str, Any], args: argparse.Namespace) -> str:
    if args.pace > 0:
        load = (
            f"pace {args.pace:g} s (paced: after a claim, one RenewLease + one ReportProgress every "
            f"{args.pace:g} s, {args.renewals} + {args.reports} in all, then FailPart(release); "
            f"{args.pace:g} s after an empty claim; first calls staggered over {args.pace:g} s)"
        )
    else:
        load = (
            f"pace 0 (saturating: per claim {args.renewals} RenewLease + {args.reports} ReportProgress + "
            f"FailPart(release); think {args.think_ms:g} ms; idle sleep {args.idle_sleep:g} s)"
        )
    return (
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores ({info['cpu_affinity']} usable), "
        f"{info['memory_gb']} GiB, load average {info['load_average_1m']} at the start; "
        f"Python {info['python']}, "
        f"grpcio {info['grpcio']}, SQLite {info['sqlite']}; {info['date']}.\n"
        f"Load: {args.workers} worker threads on {max(1, args.channels)} channels in this process, "
        f"{args.seconds:g} s; {load}; lease {args.lease_seconds:g} s. "
        "Coordinator: one process, OMP_NUM_THREADS=1, gRPC's 32 unary threads "
        "(the product's default, the same in both). The workers are threads of this process and share the "
        "machine's cores with the coordinator (its CPU and theirs during the load are in the JSON)."
    )


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coordinator", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--db", default="sqlite", help="sqlite | sqlite:///PATH | postgresql://… | store (the baseline)"
    )
    parser.add_argument("--jobs", type=int, default=10_000, help="live jobs (10 parts, part 0 READY)")
    parser.add_argument("--history", type=int, default=100_000, help="finished jobs (SUCCEEDED)")
    parser.add_argument("--history-events", type=int, default=0, help="events kept per finished job")
    parser.add_argument("--workers", type=int, default=200, help="simulated workers (threads)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels the workers share")
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration")
    parser.add_argument("--renewals", type=int, default=3, help="RenewLease calls per claimed part")
    parser.add_argument("--reports", type=int, default=3, help="ReportProgress calls per claimed part")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause before each call after a claim")
    parser.add_argument("--idle-sleep", type=float, default=0.1, help="pause after an empty claim (s)")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="paced workers: one RenewLease + ReportProgress every SECONDS while holding a part, "
        "SECONDS after an empty claim, first calls staggered over SECONDS (0: saturating, no pause)",
    )
    parser.add_argument("--rpc-timeout", type=float, default=60.0, help="deadline of each worker call (s)")
    parser.add_argument("--lease-seconds", type=float, default=30.0, help="NOVELCRAFTER_LEASE_SECONDS")
    parser.add_argument("--max-seed-seconds", type=float, default=0.0, help="cap on seeding (0: none)")
    parser.add_argument(
        "--start-timeout", type=float, default=1800.0, help="longest wait for a first claim (s)"
    )
    parser.add_argument("--compare", action="store_true", help="baseline, SQLite and PostgreSQL in one run")
    parser.add_argument(
        "--pg", default="", help="with --compare: postgresql://… or `auto` (a throwaway server)"
    )
    parser.add_argument("--baseline-repo", type=Path, default=ROOT, help="git repository holding 2e6f384")
    parser.add_argument("--work-dir", default=None, help="where temporary folders go (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the stores, databases and logs")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (progress on stderr)"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.history < 0 or args.workers < 1 or args.seconds <= 0:
        parser.error("--jobs and --workers must be >= 1, --history >= 0, --seconds > 0")
    if args.pace < 0:
        parser.error("--pace must be >= 0")
    if args.pace > 0 and args.think_ms > 0:
        parser.error("--pace sets the time between calls: leave --think-ms at 0")

    info = machine()
    runs: list[dict[str, Any]] = []
    pg_server = None
    try:
        if args.compare:
            runs.append(run_one("store", "", args, args.jobs, args.history))
            jobs, history = runs[0]["jobs"], runs[0]["history"]
            if (jobs, history) != (args.jobs, args.history):
                say(f"the baseline reached {jobs} + {history}: the databases run at the same sizes")
            url, path = sqlite_url("sqlite", args.work_dir)
            try:
                runs.append(run_one("sqlite", url, args, jobs, history))
            finally:
                _remove_sqlite(path)
                shutil.rmtree(path.parent, ignore_errors=True)
            if args.pg:
                if args.pg == "auto":
                    pg_server = start_throwaway_pg()
                    pg_url = pg_server.url
                else:
                    pg_url = args.pg
                runs.append(run_one("postgresql", pg_url, args, jobs, history))
            else:
                say("no --pg: PostgreSQL not measured")
        elif args.db == "store":
            runs.append(run_one("store", "", args, args.jobs, args.history))
        elif args.db.startswith("sqlite"):
            url, path = sqlite_url(args.db, args.work_dir)
            try:
                runs.append(run_one("sqlite", url, args, args.jobs, args.history))
            finally:
                if not args.keep:
                    _remove_sqlite(path)
                    if args.db == "sqlite":
                        shutil.rmtree(path.parent, ignore_errors=True)
        elif args.db.startswith(("postgresql", "postgres")):
            runs.append(run_one("postgresql", args.db, args, args.jobs, args.history))
        else:
            parser.error("--db must be sqlite, sqlite:///PATH, postgresql://… or store")
    finally:
        if pg_server is not None:
            pg_server.close()

    doc = {**info, "baseline": BASELINE_WHY, "runs": runs} if args.compare else {**info, **runs[0]}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(header(info, args))
    print()
    print(table(runs))
    if any(run["seed_capped"] for run in runs):
        print("\n* seeding stopped at --max-seed-seconds: the size reached is shown.")
    print(f"\nBaseline: {BASELINE_WHY}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
