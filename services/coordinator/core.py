"""The job coordinator: job state, a part queue under leases, progress events — in a database.

State: jobs, their parts and leases, and their events live in the coordinator's database
(:mod:`.db`: SQLite on one machine, PostgreSQL for replicas), one row per job holding its
:class:`JobRecord` plus the columns claims and sweeps search by. Every change is one
transaction that locks the job's row (PostgreSQL ``FOR UPDATE``; SQLite's one write lock), so
any number of coordinator processes may serve the same database: a claim takes the oldest
claimable job with ``FOR UPDATE SKIP LOCKED`` and can never hand a part out twice. The
process keeps no job in memory: the cost of a claim and the memory used do not grow with the
history, and a restart serves its first claim as soon as the database answers. Parts,
checkpoints and adapters stay in the object store.

Durability: a change is committed before the RPC answers; when the database is unreachable
the RPC fails UNAVAILABLE and nothing changed. Lease renewals and progress are written
through, like every other change.

Fencing: every lease carries the job's next epoch, a number that only grows. Renewals,
progress, completion and failure present the lease; a lease that expired or was replaced is
ABORTED. A worker only stages its adapter (in its epoch's own folder); CompletePart publishes
it (files into the version's folder, ``meta.json``, then ``latest``) in the same transaction
as the lease check, so a worker whose lease is gone, or whose job was cancelled, can neither
publish nor move ``latest``.

Attempts: a part's ``attempts`` counts failed attempts: FailPart(retryable) and an
expired lease (a worker that died, e.g. out of memory, must not loop forever) both
count; FailPart(release=True), a worker shutting down cleanly, does not. When attempts
reach ``max_attempts`` the job fails with the reason.

Upgrades: a store whose jobs an older coordinator kept as ``jobs/<id>/job.json`` (and
``events.jsonl``) is imported into the database once, at the first start.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from google.protobuf import json_format

from novelcrafter import adapters, layout
from novelcrafter.config import IngestSettings, Settings, get_settings
from novelcrafter.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
)
from novelcrafter.logs import get_logger, kv
from novelcrafter.progress import job_state_name
from novelcrafter.store import Store, validate_key
from novelcrafter.train_settings import with_defaults
from novelcrafter.v1 import common_pb2, jobs_pb2

from . import job_config
from . import metrics as coordinator_metrics
from .db import Database, Tx, default_url, redact
from .events import EventLog
from .record import TERMINAL_JOB_STATES, JobRecord, LeaseInfo, PartData

log = get_logger(__name__)

MAX_ERROR_CHARS = 2000
EVENT_POLL_SECONDS = 0.5  # how soon a stream here sees an event another replica committed
MAX_WATCHED_LOGS = 10_000  # event logs cached for open streams (finished jobs' go first)
_WORKER_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
IMPORTED_KEY = "imported_store_jobs"


def lease_seconds_from_env(explicit: float | None) -> float:
    """``explicit``, else ``IngestSettings.lease_seconds`` (``NOVELCRAFTER_LEASE_SECONDS``)."""
    value = float(explicit) if explicit is not None else get_settings(IngestSettings).lease_seconds
    if not 0 < value <= 86400:
        raise InvalidArgument(f"lease seconds must be in (0, 86400] (got {value})")
    return value


def database_url(settings: Settings, store: Store) -> str:
    """``NOVELCRAFTER_DB``, else SQLite beside a local store (or in the cache for S3)."""
    return settings.db or default_url(store.url)


class _Change:
    """Events produced by one state change; sequence numbers are assigned at commit."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.events: list[jobs_pb2.JobEvent] = []

    def job_state(self, state: int) -> None:
        self.events.append(jobs_pb2.JobEvent(part_index=-1, job_state=state))

    def part_state(self, part: int, state: int) -> None:
        self.events.append(jobs_pb2.JobEvent(part_index=part, part_state=state))

    def message(self, text: str, part: int = -1) -> None:
        self.events.append(jobs_pb2.JobEvent(part_index=part, message=text))


class Coordinator:
    """Job state, part queue with leases, progress events. See the module docstring."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        lease_seconds: float | None = None,
        db: Database | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.lease_seconds = lease_seconds_from_env(lease_seconds)
        self.db = db or Database(database_url(settings, store))
        self.db.migrate()
        self._logs: dict[str, EventLog] = {}  # job id -> events, for this process's open streams
        self._logs_lock = threading.Lock()
        self._poll = threading.Condition()  # a local commit: read new events now
        self._polled = False
        self._closed = threading.Event()
        self._import_store_jobs()
        log.info("coordinator database", extra=kv(db=redact(self.db.url)))
        self._threads = [
            threading.Thread(target=self._background, name="coordinator", daemon=True),
            threading.Thread(target=self._tail_events, name="coordinator-events", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # --- lifecycle ------------------------------------------------------------------------------

    def _import_store_jobs(self) -> None:
        """Jobs an older coordinator kept in the store, imported into the database once."""
        with self.db.transaction() as tx:
            if tx.one("SELECT value FROM coordinator_meta WHERE key = ?", (IMPORTED_KEY,)):
                return
        imported = 0
        for key in self.store.list(layout.JOBS):
            if layout.job_of_job_key(key) is None:
                continue
            try:
                rec = JobRecord.from_json(self.store.get_json(key))
            except (ValueError, KeyError, TypeError, json_format.ParseError, StoreError) as exc:
                log.error("cannot import job, skipping it", extra=kv(key=key, error=str(exc)))
                continue
            try:
                history = EventLog.from_jsonl(self.store.get_text(layout.job_events_key(rec.job_id))).events
            except NotFound:
                history = []
            except (StoreError, UnicodeDecodeError) as exc:  # history is best effort; state is not
                log.error("cannot read job event history", extra=kv(job=rec.job_id, error=str(exc)))
                history = []
            # Live workers keep their leases: one full period from now.
            now = time.time()
            for index, lease in rec.leases.items():
                if rec.job.parts[index].state == jobs_pb2.PART_STATE_RUNNING:
                    lease.expires_at = max(lease.expires_at, now + self.lease_seconds)
                    rec.job.parts[index].lease_expires_at = lease.expires_at
            with self.db.transaction() as tx:
                if tx.one("SELECT 1 FROM jobs WHERE job_id = ?", (rec.job_id,)):
                    continue  # another replica imported it meanwhile
                insert_job(tx, rec, history)
            imported += 1
        with self.db.transaction() as tx:
            if not tx.one("SELECT value FROM coordinator_meta WHERE key = ?", (IMPORTED_KEY,)):
                tx.execute(
                    "INSERT INTO coordinator_meta (key, value) VALUES (?, ?)",
                    (IMPORTED_KEY, str(time.time())),
                )
        if imported:
            log.info("imported jobs from the store into the database", extra=kv(jobs=imported))

    def close(self) -> None:
        """Stop background work, end every WatchJob stream, close the database.

        Call it before the gRPC server's graceful stop (``server.on_stop``), so open
        streams do not hold the shutdown for the whole grace period.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        with self._poll:
            self._poll.notify_all()
        with self._logs_lock:
            logs = list(self._logs.values())
        for history in logs:
            history.wake()
        for thread in self._threads:
            thread.join(timeout=10)
        self.db.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _background(self) -> None:
        sweep_every = min(max(self.lease_seconds / 4, 0.05), 2.0)
        last_gauges = 0.0
        while not self._closed.wait(sweep_every):
            try:
                self._expire_leases()
                if time.monotonic() - last_gauges >= 10.0:
                    self._update_gauges()
                    last_gauges = time.monotonic()
            except Exception:  # the loop must survive anything; the database is retried next time
                log.exception("coordinator background step failed")

    # --- persistence ----------------------------------------------------------------------------

    def _load(self, tx: Tx, job_id: str, *, lock: bool) -> tuple[JobRecord, int]:
        """The job's record and last event sequence (its row locked when ``lock``)."""
        layout.check_job_id(job_id)
        row = tx.one(
            "SELECT record, seq FROM jobs WHERE job_id = ?" + (self.db.for_update if lock else ""), (job_id,)
        )
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return JobRecord.from_json(_json_loads(row[0])), int(row[1])

    def _record(self, job_id: str) -> JobRecord:
        with self.db.transaction() as tx:
            return self._load(tx, job_id, lock=False)[0]

    def _mutate(self, job_id: str, apply: Callable[[JobRecord, _Change], None]) -> JobRecord:
        """Apply a change to one job in one transaction, its row locked throughout."""
        with self.db.transaction() as tx:
            rec, seq = self._load(tx, job_id, lock=True)
            change = _Change(job_id)
            apply(rec, change)
            save_job(tx, rec, change, seq)
        self._committed(change)
        return rec

    def _committed(self, change: _Change) -> None:
        if change.events:
            with self._poll:  # streams of this job here read the new events now
                self._polled = True
                self._poll.notify_all()
        if any(event.WhichOneof("event") == "job_state" for event in change.events):
            try:  # a few times per job; the background loop refreshes them too
                self._update_gauges()
            except Exception as exc:
                log.warning("job gauges not updated", extra=kv(error=str(exc)[:200]))

    def _update_gauges(self) -> None:
        with self.db.transaction() as tx:
            counts = tx.all("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        coordinator_metrics.set_job_state_counts({int(state): int(n) for state, n in counts})

    # --- events ---------------------------------------------------------------------------------

    def event_log(self, job_id: str) -> EventLog:
        """The job's events, which WatchJob streams wait on; kept up to date from the database
        (this process's commits at once, other replicas' within :data:`EVENT_POLL_SECONDS`)."""
        with self._logs_lock:
            history = self._logs.get(job_id)
        if history is not None:  # brought up to date now: a caller that saw the job end sees it all
            with self.db.transaction() as tx:
                rows = tx.all(
                    "SELECT event FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq",
                    (job_id, history.last_sequence),
                )
            history.extend([_event(row[0]) for row in rows])
            return history
        with self.db.transaction() as tx:
            self._load(tx, job_id, lock=False)  # NOT_FOUND / INVALID_ARGUMENT
            rows = tx.all("SELECT event FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,))
        loaded = EventLog([_event(row[0]) for row in rows])
        with self._logs_lock:
            history = self._logs.setdefault(job_id, loaded)
            if len(self._logs) > MAX_WATCHED_LOGS:
                self._logs.pop(next(iter(self._logs)))  # the oldest cached
        return history

    def _tail_events(self) -> None:
        """Feed the cached logs from the database: the one order every stream sees."""
        while not self._closed.is_set():
            with self._poll:
                if not self._polled:
                    self._poll.wait(EVENT_POLL_SECONDS)
                self._polled = False
            with self._logs_lock:
                watched = list(self._logs.items())
            if not watched:
                continue
            try:
                with self.db.transaction() as tx:
                    for job_id, history in watched:
                        rows = tx.all(
                            "SELECT event FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq",
                            (job_id, history.last_sequence),
                        )
                        history.extend([_event(row[0]) for row in rows])
            except Exception as exc:  # the database is away: streams wait, and this retries
                log.warning("cannot read new job events", extra=kv(error=str(exc)[:200]))
                self._closed.wait(1.0)

    def watch_job(
        self, job_id: str, after_sequence: int = 0, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Replay events after ``after_sequence``, then follow live ones until the job is terminal,
        the client goes away (``is_active`` false) or the coordinator closes."""
        if after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be >= 0 (got {after_sequence})")
        history = self.event_log(job_id)
        last = after_sequence
        while True:
            pending = history.wait_after(last, 1.0, lambda: self.closed or not is_active())
            if not pending and (
                self.closed or not is_active() or self.get_job(job_id).state in TERMINAL_JOB_STATES
            ):
                pending = self.event_log(job_id).after(last)  # read through: nothing left behind
                if not pending:
                    return
            for event in pending:
                yield event
                last = event.sequence

    # --- lookups --------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self._record(job_id).job

    def list_jobs(self, book_id: str = "") -> list[jobs_pb2.Job]:
        if book_id:
            layout.check_book_id(book_id)
        with self.db.transaction() as tx:
            if book_id:
                rows = tx.all(
                    "SELECT record FROM jobs WHERE book_id = ? ORDER BY created_at, job_id", (book_id,)
                )
            else:
                rows = tx.all("SELECT record FROM jobs ORDER BY created_at, job_id")
        return [JobRecord.from_json(_json_loads(row[0])).job for row in rows]

    # --- client side ----------------------------------------------------------------------------

    def create_job(self, book_id: str, config: common_pb2.JobConfig | None = None) -> jobs_pb2.Job:
        """Validate the book and config, fill the defaults, persist the job (PENDING, part 0 READY)."""
        layout.check_book_id(book_id)
        full = with_defaults(config or common_pb2.JobConfig(), base_model=self.settings.base_model)
        job_config.validate(full, self.settings)
        parts = self._book_parts(book_id)
        init_key = ""
        if full.init_adapter:
            full.init_adapter, init_key = job_config.resolve_init_adapter(
                self.store, full.init_adapter, full.base_model
            )
        now = time.time()
        job = jobs_pb2.Job(
            job_id=layout.new_job_id(), book_id=book_id, state=jobs_pb2.JOB_STATE_PENDING, config=full
        )
        job.created_at = job.updated_at = now
        for index in range(len(parts)):
            job.parts.add(
                index=index, state=jobs_pb2.PART_STATE_READY if index == 0 else jobs_pb2.PART_STATE_PENDING
            )
        rec = JobRecord(job=job, part_data=parts, init_adapter_key=init_key)
        change = _Change(job.job_id)
        change.job_state(jobs_pb2.JOB_STATE_PENDING)
        start = f" from adapter {full.init_adapter}" if full.init_adapter else ""
        change.message(
            f"job created for book {book_id}: {len(parts)} parts, base model {full.base_model}{start}"
        )
        change.part_state(0, jobs_pb2.PART_STATE_READY)
        with self.db.transaction() as tx:
            insert_job(tx, rec, [], change)
        self._committed(change)
        coordinator_metrics.JOBS_CREATED.inc()
        log.info("job created", extra=kv(job=job.job_id, book=book_id, parts=len(parts)))
        return job

    def _book_parts(self, book_id: str) -> list[PartData]:
        try:
            manifest = self.store.get_json(layout.manifest_key(book_id))
        except NotFound:
            raise NotFound(f"book {book_id} not found: ingest it first")
        entries = manifest.get("parts") if isinstance(manifest, dict) else None
        if not entries or not isinstance(entries, list):
            raise FailedPrecondition(f"book {book_id}: its manifest lists no parts")
        prefix = layout.book_prefix(book_id)
        parts = []
        for position, entry in enumerate(sorted(entries, key=lambda e: int(e.get("index", 0)))):
            index = int(entry.get("index", position))
            train_key = str(entry.get("train_key") or layout.part_train_key(book_id, index))
            test_key = str(entry.get("test_key") or layout.part_test_key(book_id, index))
            if index != position or not train_key.startswith(prefix) or not test_key.startswith(prefix):
                raise FailedPrecondition(
                    f"book {book_id}: its manifest's parts are inconsistent (part {index})"
                )
            parts.append(PartData(train_key, test_key))
        if len(parts) > layout.MAX_PARTS:
            raise FailedPrecondition(f"book {book_id} has {len(parts)} parts; at most {layout.MAX_PARTS}")
        return parts

    def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        def apply(rec: JobRecord, change: _Change) -> None:
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                return
            if rec.terminal:
                raise FailedPrecondition(f"job {job_id} already finished ({job_state_name(rec.job.state)})")
            # Leases stay on record so the worker's next ReportProgress answers cancelled=true.
            for part in rec.job.parts:
                if part.state in (
                    jobs_pb2.PART_STATE_PENDING,
                    jobs_pb2.PART_STATE_READY,
                    jobs_pb2.PART_STATE_RUNNING,
                ):
                    part.state = jobs_pb2.PART_STATE_CANCELLED
                    part.lease_expires_at = 0
                    change.part_state(part.index, jobs_pb2.PART_STATE_CANCELLED)
            rec.job.state = jobs_pb2.JOB_STATE_CANCELLED
            rec.job.error = "cancelled"
            change.message("job cancelled")
            change.job_state(jobs_pb2.JOB_STATE_CANCELLED)

        rec = self._mutate(job_id, apply)
        log.info("job cancelled", extra=kv(job=job_id))
        return rec.job

    # --- worker side ----------------------------------------------------------------------------

    def claim_part(self, worker_id: str, device: str, job_id: str = "") -> jobs_pb2.ClaimPartResponse:
        """The next READY part of the oldest job this worker's device may run, under a new lease."""
        if not _WORKER_RE.fullmatch(worker_id or ""):
            raise InvalidArgument("worker_id must be 1-200 printable characters without spaces")
        kind = (device or "").strip().lower().split(":", 1)[0]
        if kind and kind not in job_config.DEVICES:
            raise InvalidArgument(
                f"device must be one of {', '.join(job_config.DEVICES)} (got {device[:40]!r})"
            )
        self._expire_leases()
        held = self._held_by(worker_id, job_id)
        if held is not None:
            # The worker lost our answer to an earlier claim (a timeout, e.g. during an outage)
            # or restarted under the same id: hand it that lease again rather than stranding
            # the part until the lease expires.
            return held
        if job_id:
            return self._claim_in(job_id, worker_id, kind)
        # The oldest claimable job this device may run; rows another transaction is claiming
        # are skipped (PostgreSQL), so replicas never wait for each other nor grant twice.
        with self.db.transaction() as tx:
            row = tx.one(
                "SELECT job_id FROM jobs WHERE claimable = 1 AND (device = '' OR device = ?) "
                "ORDER BY created_at, job_id LIMIT 1" + self.db.skip_locked,
                (kind,),
            )
            if row is None:
                return jobs_pb2.ClaimPartResponse(assigned=False)
            rec, seq = self._load(tx, row[0], lock=True)
            change = _Change(rec.job_id)
            response = self._grant(rec, change, worker_id, kind)
            save_job(tx, rec, change, seq)
        self._claimed(rec, change, response)
        return response

    def _claim_in(self, job_id: str, worker_id: str, kind: str) -> jobs_pb2.ClaimPartResponse:
        """A claim restricted to one job (``ClaimPart(job_id=…)``)."""
        with self.db.transaction() as tx:
            rec, seq = self._load(tx, job_id, lock=True)
            if rec.terminal:
                state = job_state_name(rec.job.state)
                raise FailedPrecondition(f"job {job_id} is finished ({state}): nothing to claim")
            if rec.job.config.device and rec.job.config.device != kind:
                raise FailedPrecondition(
                    f"job {job_id} requires a {rec.job.config.device} worker; "
                    f"this worker is {kind or 'undeclared'}"
                )
            change = _Change(job_id)
            response = self._grant(rec, change, worker_id, kind)
            if response.assigned:
                save_job(tx, rec, change, seq)
        if response.assigned:
            self._claimed(rec, change, response)
        return response

    def _held_by(self, worker_id: str, job_id: str = "") -> jobs_pb2.ClaimPartResponse | None:
        """A live lease this worker already holds, renewed and handed back; else None."""
        with self.db.transaction() as tx:
            rows = tx.all(
                "SELECT job_id, part FROM leases WHERE worker_id = ? AND expires_at > ? ORDER BY epoch",
                (worker_id, time.time()),
            )
        for held_job, index in rows:
            if job_id and held_job != job_id:
                continue
            response: list[jobs_pb2.ClaimPartResponse] = []

            def apply(
                rec: JobRecord,
                change: _Change,
                index: int = int(index),
                response: list[jobs_pb2.ClaimPartResponse] = response,
            ) -> None:
                lease = rec.leases.get(index)
                part = rec.job.parts[index]
                if (
                    lease is None
                    or lease.worker_id != worker_id
                    or part.state != jobs_pb2.PART_STATE_RUNNING
                    or lease.expires_at <= time.time()
                    or rec.terminal
                ):
                    return
                self._extend(rec, index, lease)
                response.append(
                    jobs_pb2.ClaimPartResponse(
                        assigned=True,
                        lease=self._lease_msg(rec, index, lease),
                        assignment=self._assignment(rec, index),
                    )
                )

            self._mutate(held_job, apply)
            if response:
                return response[0]
        return None

    def _grant(
        self, rec: JobRecord, change: _Change, worker_id: str, device: str
    ) -> jobs_pb2.ClaimPartResponse:
        """Under the job's row lock: lease its first READY part to ``worker_id`` (next epoch)."""
        index = next((p.index for p in rec.job.parts if p.state == jobs_pb2.PART_STATE_READY), None)
        if index is None:
            return jobs_pb2.ClaimPartResponse(assigned=False)
        rec.epoch += 1
        lease = LeaseInfo(uuid.uuid4().hex, worker_id, device, time.time() + self.lease_seconds, rec.epoch)
        part = rec.job.parts[index]
        part.state = jobs_pb2.PART_STATE_RUNNING
        part.worker_id = worker_id
        part.lease_expires_at = lease.expires_at
        rec.leases[index] = lease
        if rec.job.state == jobs_pb2.JOB_STATE_PENDING:
            rec.job.state = jobs_pb2.JOB_STATE_RUNNING
            change.job_state(jobs_pb2.JOB_STATE_RUNNING)
        change.part_state(index, jobs_pb2.PART_STATE_RUNNING)
        resume = f", resuming from {part.checkpoint_key}" if part.checkpoint_key else ""
        who = f"worker {worker_id} ({device or 'any device'}, epoch {lease.epoch})"
        change.message(f"part {index:02d} claimed by {who}{resume}", index)
        return jobs_pb2.ClaimPartResponse(
            assigned=True, lease=self._lease_msg(rec, index, lease), assignment=self._assignment(rec, index)
        )

    def _claimed(self, rec: JobRecord, change: _Change, response: jobs_pb2.ClaimPartResponse) -> None:
        self._committed(change)
        coordinator_metrics.PARTS_CLAIMED.inc()
        lease = response.lease
        log.info(
            "part claimed",
            extra=kv(job=rec.job_id, part=lease.part_index, worker=lease.worker_id, epoch=lease.epoch),
        )

    def _assignment(self, rec: JobRecord, index: int) -> jobs_pb2.PartAssignment:
        job = rec.job
        if index == 0:
            init_key = rec.init_adapter_key
        else:
            previous = job.parts[index - 1]
            init_key = layout.adapter_prefix(job.book_id, previous.adapter_version)
        return jobs_pb2.PartAssignment(
            job_id=job.job_id,
            book_id=job.book_id,
            part_index=index,
            num_parts=len(job.parts),
            train_key=rec.part_data[index].train_key,
            test_key=rec.part_data[index].test_key,
            earlier_test_keys=[p.test_key for p in rec.part_data[:index]],
            earlier_train_keys=[p.train_key for p in rec.part_data[:index]],
            init_adapter_key=init_key,
            resume_checkpoint_key=job.parts[index].checkpoint_key,
            checkpoint_prefix=layout.part_checkpoints_prefix(job.job_id, index),
            adapter_version=layout.adapter_version_id(job.job_id, index),
            config=job.config,
        )

    def _lease_msg(self, rec: JobRecord, index: int, lease: LeaseInfo) -> jobs_pb2.Lease:
        return jobs_pb2.Lease(
            lease_id=lease.lease_id,
            job_id=rec.job_id,
            part_index=index,
            worker_id=lease.worker_id,
            expires_at=lease.expires_at,
            ttl_seconds=self.lease_seconds,
            epoch=lease.epoch,
        )

    def _check_lease(self, rec: JobRecord, lease: jobs_pb2.Lease) -> LeaseInfo:
        """The lease a worker call acts under; ABORTED unless it is the part's current,
        unexpired lease. (Under the job's row lock.)"""
        if lease.part_index >= len(rec.job.parts):
            raise InvalidArgument(
                f"job {lease.job_id} has {len(rec.job.parts)} parts, not part {lease.part_index}"
            )
        held = rec.leases.get(lease.part_index)
        where = f"part {lease.part_index} of job {lease.job_id}"
        if held is None or held.lease_id != lease.lease_id:
            coordinator_metrics.STALE_LEASES.inc()
            raise Aborted(
                f"lease {lease.lease_id[:12]} is not the current lease of {where}: it expired or was replaced"
            )
        if not rec.terminal and held.expires_at <= time.time():
            coordinator_metrics.STALE_LEASES.inc()
            raise Aborted(f"lease {lease.lease_id[:12]} on {where} expired; another worker may take the part")
        return held

    def _leased(
        self, lease: jobs_pb2.Lease, apply: Callable[[JobRecord, LeaseInfo, _Change], None]
    ) -> JobRecord:
        """A worker's change: the lease checked and the change made in one transaction, so a
        lease that expired or was replaced can never act (the fence)."""
        if not lease.lease_id:
            raise InvalidArgument("lease.lease_id is required: pass the lease ClaimPart returned")
        layout.check_part(lease.part_index)

        def checked(rec: JobRecord, change: _Change) -> None:
            apply(rec, self._check_lease(rec, lease), change)

        return self._mutate(lease.job_id, checked)

    def renew_lease(self, lease: jobs_pb2.Lease) -> jobs_pb2.Lease:
        def apply(rec: JobRecord, held: LeaseInfo, change: _Change) -> None:
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                raise Aborted(f"job {rec.job_id} was cancelled: stop and release the part")
            self._extend(rec, lease.part_index, held)

        rec = self._leased(lease, apply)
        return self._lease_msg(rec, lease.part_index, rec.leases[lease.part_index])

    def _extend(self, rec: JobRecord, index: int, held: LeaseInfo) -> None:
        held.expires_at = time.time() + self.lease_seconds
        rec.job.parts[index].lease_expires_at = held.expires_at

    def report_progress(
        self, lease: jobs_pb2.Lease, progress: jobs_pb2.ProgressUpdate, checkpoint_key: str = ""
    ) -> jobs_pb2.ReportProgressResponse:
        index = lease.part_index
        cancelled = False

        def apply(rec: JobRecord, held: LeaseInfo, change: _Change) -> None:
            nonlocal cancelled
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                cancelled = True
                return
            if checkpoint_key:
                self._check_checkpoint_key(rec, index, checkpoint_key)
            if rec.terminal:
                raise Aborted(f"job {rec.job_id} is finished: the part is no longer running")
            part = rec.job.parts[index]
            if checkpoint_key:
                part.checkpoint_key = checkpoint_key  # the resume point: durable before the answer
            _apply_progress(part, progress)
            change.events.append(jobs_pb2.JobEvent(part_index=index, progress=progress))
            self._extend(rec, index, held)

        rec = self._leased(lease, apply)
        return jobs_pb2.ReportProgressResponse(
            cancelled=cancelled, lease=self._lease_msg(rec, index, rec.leases[index])
        )

    def _check_checkpoint_key(self, rec: JobRecord, index: int, key: str) -> None:
        validate_key(key, prefix=key.endswith("/"))  # no "..", empty segment or control character
        if not key.startswith(layout.part_prefix(rec.job_id, index)):
            raise InvalidArgument(
                f"checkpoint key {key[:120]!r} is not under part {index}'s prefix "
                f"{layout.part_checkpoints_prefix(rec.job_id, index)}"
            )

    def complete_part(
        self, lease: jobs_pb2.Lease, metrics: jobs_pb2.PartMetrics, adapter: common_pb2.AdapterVersion
    ) -> jobs_pb2.Job:
        """Publish the part's adapter and mark the part SUCCEEDED, under the worker's live lease.

        The worker staged the version in its lease's folder: ``part_publish_prefix`` of the epoch
        recorded for the lease here (the request names no key to trust). In one transaction, the
        job's row locked: the lease is checked (current, not expired) and the job not cancelled,
        the staged files are checked against the staged meta, the metrics recorded, the version
        committed (files copied into ``adapters/<book>/<version>/``, its meta.json, then
        ``latest``) and the part marked SUCCEEDED. A lease that expired or was replaced, or a
        cancelled job: ABORTED, and nothing is published.

        Idempotent: a retry of a completion that went through (its answer lost) finds the part
        SUCCEEDED by this very lease (its metrics record names it) and gets the job again.
        """
        import hashlib

        index = lease.part_index
        worker = ""
        version = ""
        # Names the completing lease in the part's metrics record (a retry is recognized by it).
        lease_tag = hashlib.sha256(lease.lease_id.encode()).hexdigest()
        staged_prefix = ""

        def apply(new: JobRecord, held: LeaseInfo, change: _Change) -> None:
            nonlocal worker, version, staged_prefix
            worker = held.worker_id
            if new.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                raise Aborted(f"job {new.job_id} was cancelled: the part's result is not published")
            part = new.job.parts[index]
            if new.terminal or part.state != jobs_pb2.PART_STATE_RUNNING:
                raise Aborted(f"part {index} of job {new.job_id} is no longer running: nothing is published")
            expected = layout.adapter_version_id(new.job_id, index)
            if adapter.version != expected:
                raise InvalidArgument(f"adapter.version must be {expected} (got {adapter.version[:80]!r})")
            if adapter.book_id not in ("", new.job.book_id):
                raise InvalidArgument(
                    f"adapter.book_id must be {new.job.book_id} (got {adapter.book_id[:40]!r})"
                )
            prefix = layout.adapter_prefix(new.job.book_id, expected)
            if adapter.key not in ("", prefix):
                raise InvalidArgument(f"adapter.key must be {prefix} (got {adapter.key[:120]!r})")
            staged_prefix = layout.part_publish_prefix(new.job_id, index, held.epoch)
            staged = adapters.read_staged(self.store, staged_prefix)
            if (staged.book_id, staged.version) != (new.job.book_id, expected):
                raise FailedPrecondition(
                    f"the adapter staged at {staged_prefix} is {staged.book_id}/{staged.version}, "
                    f"not {new.job.book_id}/{expected}"
                )
            adapters.verify_staged(self.store, staged_prefix, staged)
            self.store.put_json(
                layout.part_metrics_key(new.job_id, index),
                {
                    "job_id": new.job_id,
                    "book_id": new.job.book_id,
                    "part": index,
                    "adapter_version": expected,
                    "adapter_key": prefix,
                    "worker_id": held.worker_id,
                    "epoch": held.epoch,
                    "lease_sha256": lease_tag,
                    "completed_at": time.time(),
                    "metrics": json_format.MessageToDict(metrics, preserving_proto_field_name=True),
                },
            )
            adapters.commit_adapter(self.store, staged_prefix, staged, verify=False)
            version = expected
            part.state = jobs_pb2.PART_STATE_SUCCEEDED
            part.metrics.CopyFrom(metrics)
            part.adapter_version = expected
            part.lease_expires_at = 0
            part.error = ""
            if metrics.steps:
                part.step = metrics.steps
            new.leases.pop(index, None)
            change.events.append(jobs_pb2.JobEvent(part_index=index, metrics=metrics))
            change.part_state(index, jobs_pb2.PART_STATE_SUCCEEDED)
            change.message(f"part {index:02d} succeeded: published adapter {expected}", index)
            if index + 1 < len(new.job.parts):
                new.job.parts[index + 1].state = jobs_pb2.PART_STATE_READY
                change.part_state(index + 1, jobs_pb2.PART_STATE_READY)
            else:
                new.job.state = jobs_pb2.JOB_STATE_SUCCEEDED
                change.message(f"job succeeded: {len(new.job.parts)} parts trained")
                change.job_state(jobs_pb2.JOB_STATE_SUCCEEDED)

        def completed_by_this_lease() -> jobs_pb2.Job | None:
            try:
                rec = self._record(lease.job_id)
            except NotFound:
                return None
            if index >= len(rec.job.parts):
                return None
            part = rec.job.parts[index]
            if part.state != jobs_pb2.PART_STATE_SUCCEEDED or part.adapter_version != (
                layout.adapter_version_id(rec.job_id, index)
            ):
                return None
            try:
                record = self.store.get_json(layout.part_metrics_key(rec.job_id, index))
            except NotFound:
                return None
            return rec.job if isinstance(record, dict) and record.get("lease_sha256") == lease_tag else None

        try:
            rec = self._leased(lease, apply)
        except Aborted as refused:
            done = completed_by_this_lease()
            if done is None:
                log.warning(
                    "part completion refused: nothing published",
                    extra=kv(job=lease.job_id, part=index, epoch=lease.epoch, why=refused.message[:200]),
                )
                raise
            log.info("part completion repeated", extra=kv(job=lease.job_id, part=index, epoch=lease.epoch))
            return done
        try:  # committed: the staged copy is no longer needed
            self.store.delete_prefix(staged_prefix)
        except Exception as exc:
            log.warning("staged adapter not removed", extra=kv(prefix=staged_prefix, error=str(exc)[:200]))
        coordinator_metrics.PARTS_COMPLETED.inc()
        log.info(
            "part completed",
            extra=kv(job=rec.job_id, part=index, worker=worker, version=version, epoch=lease.epoch),
        )
        return rec.job

    def fail_part(
        self,
        lease: jobs_pb2.Lease,
        error: str,
        *,
        retryable: bool = True,
        release: bool = False,
        checkpoint_key: str = "",
    ) -> jobs_pb2.Job:
        error = (error or "no reason given")[:MAX_ERROR_CHARS]
        index = lease.part_index
        outcome = ""

        def apply(new: JobRecord, held: LeaseInfo, change: _Change) -> None:
            nonlocal outcome
            if new.terminal:  # e.g. cancelled while the worker ran: nothing left to give back
                outcome = "ignored"
                return
            if checkpoint_key:
                self._check_checkpoint_key(new, index, checkpoint_key)
            part = new.job.parts[index]
            new.leases.pop(index, None)
            part.lease_expires_at = 0
            part.worker_id = ""
            if checkpoint_key:
                part.checkpoint_key = checkpoint_key
            if release:
                outcome = "released"
                part.state = jobs_pb2.PART_STATE_READY
                change.part_state(index, jobs_pb2.PART_STATE_READY)
                resume = f"; resumes from {part.checkpoint_key}" if part.checkpoint_key else ""
                change.message(
                    f"part {index:02d} released by worker {held.worker_id}: {error}{resume}", index
                )
                return
            outcome = _count_failure(new, index, error, retryable, change)

        rec = self._leased(lease, apply)
        if outcome != "ignored":
            coordinator_metrics.PARTS_FAILED.labels(outcome).inc()
            log.info("part failed", extra=kv(job=rec.job_id, part=index, outcome=outcome, error=error[:200]))
        return rec.job

    def _expire_leases(self) -> None:
        """Parts whose lease ran out go back to READY (an attempt counted). Each job in its own
        transaction; rows another replica is handling are skipped."""
        now = time.time()
        with self.db.transaction() as tx:
            due = [row[0] for row in tx.all("SELECT job_id FROM jobs WHERE lease_expiry <= ?", (now,))]
        for job_id in due:
            expired: list[tuple[int, str]] = []

            def apply(new: JobRecord, change: _Change, expired: list[tuple[int, str]] = expired) -> None:
                now = time.time()
                for index, lease in list(new.leases.items()):
                    part = new.job.parts[index]
                    if new.terminal or part.state != jobs_pb2.PART_STATE_RUNNING or lease.expires_at > now:
                        continue
                    new.leases.pop(index, None)
                    part.lease_expires_at = 0
                    part.worker_id = ""
                    silent = f"no heartbeat for {self.lease_seconds:g}s"
                    reason = f"lease of worker {lease.worker_id} expired ({silent})"
                    _count_failure(new, index, reason, True, change)
                    expired.append((index, lease.worker_id))

            self._mutate(job_id, apply)
            for index, worker in expired:
                coordinator_metrics.LEASE_EXPIRIES.inc()
                log.warning("lease expired", extra=kv(job=job_id, part=index, worker=worker))


# --- rows ---------------------------------------------------------------------------------------


def _columns(rec: JobRecord) -> tuple[int, int, int, str, float | None]:
    """(state, active, claimable, device, earliest live lease expiry) of a record."""
    active = not rec.terminal
    claimable = active and any(p.state == jobs_pb2.PART_STATE_READY for p in rec.job.parts)
    running = [
        lease.expires_at
        for index, lease in rec.leases.items()
        if rec.job.parts[index].state == jobs_pb2.PART_STATE_RUNNING
    ]
    expiry = min(running) if running and active else None
    return rec.job.state, int(active), int(claimable), rec.job.config.device, expiry


def _sequence(rec: JobRecord, change: _Change | None, seq: int) -> int:
    """Number the change's events after ``seq``; returns the new last sequence."""
    now = time.time()
    rec.job.updated_at = now
    for event in change.events if change else ():
        seq += 1
        event.job_id, event.sequence, event.time = rec.job_id, seq, now
    return seq


def _write_side_tables(tx: Tx, rec: JobRecord, events: list[jobs_pb2.JobEvent]) -> None:
    tx.execute("DELETE FROM leases WHERE job_id = ?", (rec.job_id,))
    tx.executemany(
        "INSERT INTO leases (job_id, part, worker_id, epoch, expires_at) VALUES (?, ?, ?, ?, ?)",
        [
            (rec.job_id, index, lease.worker_id, lease.epoch, lease.expires_at)
            for index, lease in rec.leases.items()
            if rec.job.parts[index].state == jobs_pb2.PART_STATE_RUNNING
        ],
    )
    tx.executemany(
        "INSERT INTO job_events (job_id, seq, event) VALUES (?, ?, ?)",
        [(rec.job_id, event.sequence, event.SerializeToString()) for event in events],
    )


def save_job(tx: Tx, rec: JobRecord, change: _Change, seq: int) -> None:
    """Write a changed record (its row locked by ``tx``), its leases and its new events."""
    seq = _sequence(rec, change, seq)
    state, active, claimable, device, expiry = _columns(rec)
    tx.execute(
        "UPDATE jobs SET state = ?, active = ?, claimable = ?, device = ?, lease_expiry = ?, epoch = ?, "
        "seq = ?, record = ? WHERE job_id = ?",
        (state, active, claimable, device, expiry, rec.epoch, seq, _json_dumps(rec.to_json()), rec.job_id),
    )
    _write_side_tables(tx, rec, change.events)


def insert_job(
    tx: Tx, rec: JobRecord, history: list[jobs_pb2.JobEvent], change: _Change | None = None
) -> None:
    """A new job (or one imported with its ``history``), with its first events."""
    seq = max((event.sequence for event in history), default=0)
    seq = _sequence(rec, change, seq) if change else seq
    state, active, claimable, device, expiry = _columns(rec)
    tx.execute(
        "INSERT INTO jobs (job_id, book_id, created_at, state, active, claimable, device, lease_expiry, "
        "epoch, seq, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            rec.job_id,
            rec.job.book_id,
            rec.job.created_at,
            state,
            active,
            claimable,
            device,
            expiry,
            rec.epoch,
            seq,
            _json_dumps(rec.to_json()),
        ),
    )
    _write_side_tables(tx, rec, [*history, *(change.events if change else ())])


def _json_dumps(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"))


def _json_loads(text: str) -> dict:
    return json.loads(text)


def _event(data: bytes) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent.FromString(bytes(data))


def _count_failure(rec: JobRecord, index: int, error: str, retryable: bool, change: _Change) -> str:
    """Count a failed attempt of a part: back to READY, or the job fails. Returns the outcome."""
    part = rec.job.parts[index]
    part.attempts += 1
    part.error = error
    limit = rec.job.config.max_attempts
    if retryable and part.attempts < limit:
        part.state = jobs_pb2.PART_STATE_READY
        change.part_state(index, jobs_pb2.PART_STATE_READY)
        change.message(
            f"part {index:02d} attempt {part.attempts} of {limit} failed, will retry: {error}", index
        )
        return "retried"
    part.state = jobs_pb2.PART_STATE_FAILED
    change.part_state(index, jobs_pb2.PART_STATE_FAILED)
    why = f"attempt {part.attempts} of {limit}" if retryable else "not retryable"
    rec.job.error = f"part {index:02d} failed ({why}): {error}"
    for later in rec.job.parts[index + 1 :]:
        if later.state == jobs_pb2.PART_STATE_PENDING:
            later.state = jobs_pb2.PART_STATE_CANCELLED
            change.part_state(later.index, jobs_pb2.PART_STATE_CANCELLED)
    rec.job.state = jobs_pb2.JOB_STATE_FAILED
    change.message(f"job failed: {rec.job.error}")
    change.job_state(jobs_pb2.JOB_STATE_FAILED)
    return "failed"


def _apply_progress(part: jobs_pb2.Part, progress: jobs_pb2.ProgressUpdate) -> None:
    if progress.step:
        part.step = progress.step
    if progress.total_steps:
        part.total_steps = progress.total_steps
