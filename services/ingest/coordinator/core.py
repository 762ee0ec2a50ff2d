"""The job coordinator: job state, a part queue under leases, progress events.

Concurrency: ONE coordinator process per store. Every state change happens under one
process-wide lock, which makes claims race-free and keeps ``job.json`` writes in order.
Two coordinators on the same store would hand out the same part twice: don't run that.

Durability: a state change is written to the store first (atomically, the whole
``job.json``) and only then committed in memory; when the write finally fails (the
store retries with backoff) the RPC fails UNAVAILABLE and nothing changed. Progress
(step, loss, lease renewals) is not a state change: it is kept in memory and flushed
every few seconds; a reported checkpoint key IS a state change (it is the resume point).

Restart: every job is recovered from the store. A part that was RUNNING keeps its lease
for one more full lease period from the restart, so live workers carry on (their
lease ids are persisted) and a worker that died while the coordinator was down is
detected one lease period later, as usual: the part becomes claimable again.

Attempts: a part's ``attempts`` counts failed attempts: FailPart(retryable) and an
expired lease (a worker that died, e.g. out of memory, must not loop forever) both
count; FailPart(release=True), a worker shutting down cleanly, does not. When attempts
reach ``max_attempts`` the job fails with the reason.
"""

from __future__ import annotations

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
from .events import EventLog
from .record import SEQ_BLOCK, JobRecord, LeaseInfo, PartData

log = get_logger(__name__)

FLUSH_SECONDS = 2.0  # how often in-memory progress and event history reach the store
MAX_ERROR_CHARS = 2000
_WORKER_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces


def lease_seconds_from_env(explicit: float | None) -> float:
    """``explicit``, else ``IngestSettings.lease_seconds`` (``NOVELCRAFTER_LEASE_SECONDS``)."""
    value = float(explicit) if explicit is not None else get_settings(IngestSettings).lease_seconds
    if not 0 < value <= 86400:
        raise InvalidArgument(f"lease seconds must be in (0, 86400] (got {value})")
    return value


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
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.store = store
        self.settings = settings
        self.lease_seconds = lease_seconds_from_env(lease_seconds)
        self.flush_seconds = flush_seconds
        self._lock = threading.RLock()
        self._io_lock = threading.Lock()  # orders job.json writes; always taken after _lock, never before
        self._generation = 0
        self._written: dict[str, int] = {}  # job id -> generation of the state last written
        self._changed = threading.Condition(self._lock)  # notified on every commit and on close
        self._jobs: dict[str, JobRecord] = {}
        self._events: dict[str, EventLog] = {}
        self._closed = threading.Event()
        self._recover()
        self._update_gauges()
        self._thread = threading.Thread(target=self._background, name="coordinator", daemon=True)
        self._thread.start()

    # --- lifecycle ------------------------------------------------------------------------------

    def _recover(self) -> None:
        now = time.time()
        for key in self.store.list(layout.JOBS):
            if layout.job_of_job_key(key) is None:
                continue
            try:
                rec = JobRecord.from_json(self.store.get_json(key))
            except (ValueError, KeyError, TypeError, json_format.ParseError, StoreError) as exc:
                log.error("cannot recover job, skipping it", extra=kv(key=key, error=str(exc)))
                continue
            try:
                history = EventLog.from_jsonl(self.store.get_text(layout.job_events_key(rec.job_id)))
            except NotFound:
                history = EventLog()
            except (StoreError, UnicodeDecodeError) as exc:  # history is best effort; state is not
                log.error("cannot read job event history", extra=kv(job=rec.job_id, error=str(exc)))
                history = EventLog()
            rec.seq = rec.seq_reserved = max(rec.seq_reserved, history.last_sequence)
            # Live workers keep their leases: give them one full period from now.
            for index, lease in rec.leases.items():
                if rec.job.parts[index].state == jobs_pb2.PART_STATE_RUNNING:
                    lease.expires_at = max(lease.expires_at, now + self.lease_seconds)
                    rec.job.parts[index].lease_expires_at = lease.expires_at
            self._jobs[rec.job_id] = rec
            self._events[rec.job_id] = history
        if self._jobs:
            log.info("recovered jobs", extra=kv(jobs=len(self._jobs)))

    def close(self) -> None:
        """Stop background work, flush progress and history, and end every WatchJob stream.

        Call it before the gRPC server's graceful stop (``server.on_stop``), so open
        streams do not hold the shutdown for the whole grace period.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=10)
        self._flush()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _background(self) -> None:
        sweep_every = min(max(self.lease_seconds / 4, 0.05), 2.0)
        last_flush = time.monotonic()
        while not self._closed.wait(sweep_every):
            try:
                self._expire_leases()
                if time.monotonic() - last_flush >= self.flush_seconds:
                    self._flush()
                    last_flush = time.monotonic()
            except Exception:  # the loop must survive anything; store errors are retried next time
                log.exception("coordinator background step failed")

    # --- persistence ----------------------------------------------------------------------------

    def _snapshot(self, rec: JobRecord) -> tuple[int, int, dict]:
        """(generation, reserved sequence, JSON) of a record; call under ``_lock``."""
        self._generation += 1
        reserved = rec.seq + SEQ_BLOCK
        data = rec.to_json()
        data["seq_reserved"] = reserved
        return self._generation, reserved, data

    def _put_state(self, job_id: str, generation: int, data: dict) -> bool:
        """Write job.json unless a newer generation is already stored; return whether written.

        ``_io_lock`` orders writes: a background flush (which writes without holding
        ``_lock``) can never overwrite a newer state written by a commit.
        """
        with self._io_lock:
            if self._written.get(job_id, 0) > generation:
                return False
            try:
                self.store.put_json(layout.job_key(job_id), data)
            except StoreError as exc:
                coordinator_metrics.STORE_WRITE_FAILURES.inc()
                raise StoreError(f"cannot save the state of job {job_id}: {exc.message}") from exc
            self._written[job_id] = generation
            return True

    def _write(self, rec: JobRecord) -> None:
        """Durable write of a record's current state (under ``_lock``: callers wait for the store)."""
        generation, reserved, data = self._snapshot(rec)
        self._put_state(rec.job_id, generation, data)
        rec.seq_reserved = reserved
        rec.dirty = False

    def _commit(self, new: JobRecord, change: _Change) -> JobRecord:
        """Write ``new`` to the store, then make it current and publish its events."""
        now = time.time()
        new.job.updated_at = now
        for event in change.events:
            new.seq += 1
            event.job_id = new.job_id
            event.sequence = new.seq
            event.time = now
        self._write(new)
        self._jobs[new.job_id] = new
        self._events.setdefault(new.job_id, EventLog()).extend(change.events)
        self._update_gauges()
        self._changed.notify_all()
        return new

    def _mutate(self, job_id: str, apply: Callable[[JobRecord, _Change], None]) -> JobRecord:
        with self._lock:
            new = self._record(job_id).copy()
            change = _Change(job_id)
            apply(new, change)
            return self._commit(new, change)

    def _flush(self) -> None:
        """Write in-memory progress and event history; failures are retried on the next flush."""
        # Snapshot under the lock, write outside it: while the store is away (and retried),
        # reads, lease renewals and progress reports keep being answered from memory.
        with self._lock:
            dirty_logs = [(jid, ev) for jid, ev in self._events.items() if ev.dirty]
            states = []
            for rec in [rec for rec in self._jobs.values() if rec.dirty]:
                states.append((rec.job_id, *self._snapshot(rec)))
                rec.dirty = False  # a change after this snapshot marks it dirty again
            snapshots = [(jid, ev.to_jsonl()) for jid, ev in dirty_logs]
            for _jid, ev in dirty_logs:
                ev.dirty = False
        for job_id, generation, reserved, data in states:
            try:
                written = self._put_state(job_id, generation, data)
            except StoreError as exc:
                log.warning("progress not saved", extra=kv(job=job_id, error=exc.message))
                with self._lock:
                    if job_id in self._jobs:
                        self._jobs[job_id].dirty = True
                continue
            if written:
                with self._lock:
                    rec = self._jobs.get(job_id)
                    if rec is not None:
                        rec.seq_reserved = max(rec.seq_reserved, reserved)
        for job_id, text in snapshots:  # outside the lock: history is best effort
            try:
                self.store.put(layout.job_events_key(job_id), text)
            except StoreError as exc:
                log.warning("event history not saved", extra=kv(job=job_id, error=exc.message))
                with self._lock:
                    self._events[job_id].dirty = True

    def _update_gauges(self) -> None:
        coordinator_metrics.set_job_states(rec.job.state for rec in self._jobs.values())

    # --- lookups --------------------------------------------------------------------------------

    def _record(self, job_id: str) -> JobRecord:
        layout.check_job_id(job_id)
        rec = self._jobs.get(job_id)
        if rec is None:
            raise NotFound(f"job {job_id} not found")
        return rec

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        with self._lock:
            return _copy(self._record(job_id).job)

    def list_jobs(self, book_id: str = "") -> list[jobs_pb2.Job]:
        if book_id:
            layout.check_book_id(book_id)
        with self._lock:
            recs = sorted(self._jobs.values(), key=lambda r: (r.job.created_at, r.job_id))
            return [_copy(r.job) for r in recs if not book_id or r.job.book_id == book_id]

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
        with self._lock:
            self._commit(rec, change)
        coordinator_metrics.JOBS_CREATED.inc()
        log.info("job created", extra=kv(job=job.job_id, book=book_id, parts=len(parts)))
        return _copy(job)

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
        return _copy(rec.job)

    def watch_job(
        self, job_id: str, after_sequence: int = 0, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Replay events after ``after_sequence``, then follow live ones until the job is terminal,
        the client goes away (``is_active`` false) or the coordinator closes."""
        if after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be >= 0 (got {after_sequence})")
        with self._lock:
            self._record(job_id)  # NOT_FOUND / INVALID_ARGUMENT before the stream starts
        last = after_sequence
        while True:
            with self._changed:
                pending = self._events[job_id].after(last)
                if not pending:
                    if self._jobs[job_id].terminal or self._closed.is_set() or not is_active():
                        return
                    self._changed.wait(timeout=1.0)
                    continue
            for event in pending:
                yield event
                last = event.sequence

    def event_log(self, job_id: str) -> EventLog:
        """The job's events, which WatchJob streams wait on (each job's log wakes only its own)."""
        with self._lock:
            self._record(job_id)  # NOT_FOUND / INVALID_ARGUMENT
            return self._events[job_id]

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
        with self._lock:
            if job_id:
                rec = self._record(job_id)
                if rec.terminal:
                    state = job_state_name(rec.job.state)
                    raise FailedPrecondition(f"job {job_id} is finished ({state}): nothing to claim")
                if rec.job.config.device and rec.job.config.device != kind:
                    raise FailedPrecondition(
                        f"job {job_id} requires a {rec.job.config.device} worker; "
                        f"this worker is {kind or 'undeclared'}"
                    )
                candidates = [rec]
            else:
                candidates = sorted(self._jobs.values(), key=lambda r: (r.job.created_at, r.job_id))
            for rec in candidates:
                if rec.terminal or (rec.job.config.device and rec.job.config.device != kind):
                    continue
                held = self._held_by(rec, worker_id)
                if held is not None:
                    # The worker lost our answer to an earlier claim (a timeout, e.g. during a
                    # store outage) or restarted under the same id: hand it that lease again
                    # rather than stranding the part until the lease expires.
                    index, lease = held
                    self._extend(rec, index, lease)
                    return jobs_pb2.ClaimPartResponse(
                        assigned=True,
                        lease=self._lease_msg(rec, index, lease),
                        assignment=self._assignment(rec, index),
                    )
                ready = next((p.index for p in rec.job.parts if p.state == jobs_pb2.PART_STATE_READY), None)
                if ready is not None:
                    return self._grant(rec.job_id, ready, worker_id, kind)
        return jobs_pb2.ClaimPartResponse(assigned=False)

    def _held_by(self, rec: JobRecord, worker_id: str) -> tuple[int, LeaseInfo] | None:
        """A live lease this worker already holds on a running part of ``rec``, if any."""
        now = time.time()
        for index, lease in rec.leases.items():
            part = rec.job.parts[index]
            if (
                lease.worker_id == worker_id
                and part.state == jobs_pb2.PART_STATE_RUNNING
                and lease.expires_at > now
            ):
                return index, lease
        return None

    def _grant(self, job_id: str, index: int, worker_id: str, device: str) -> jobs_pb2.ClaimPartResponse:
        lease = LeaseInfo(uuid.uuid4().hex, worker_id, device, time.time() + self.lease_seconds)

        def apply(rec: JobRecord, change: _Change) -> None:
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
            change.message(
                f"part {index:02d} claimed by worker {worker_id} ({device or 'any device'}){resume}", index
            )

        rec = self._mutate(job_id, apply)
        coordinator_metrics.PARTS_CLAIMED.inc()
        log.info("part claimed", extra=kv(job=job_id, part=index, worker=worker_id, device=device))
        return jobs_pb2.ClaimPartResponse(
            assigned=True, lease=self._lease_msg(rec, index, lease), assignment=self._assignment(rec, index)
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
        )

    def _check_lease(self, lease: jobs_pb2.Lease) -> tuple[JobRecord, LeaseInfo]:
        """The job and lease a worker call acts under; ABORTED unless it is the part's current,
        unexpired lease. (Caller holds the lock.)"""
        if not lease.lease_id:
            raise InvalidArgument("lease.lease_id is required: pass the lease ClaimPart returned")
        rec = self._record(lease.job_id)
        layout.check_part(lease.part_index)
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
        return rec, held

    def renew_lease(self, lease: jobs_pb2.Lease) -> jobs_pb2.Lease:
        with self._lock:
            rec, held = self._check_lease(lease)
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                raise Aborted(f"job {rec.job_id} was cancelled: stop and release the part")
            self._extend(rec, lease.part_index, held)
            return self._lease_msg(rec, lease.part_index, held)

    def _extend(self, rec: JobRecord, index: int, held: LeaseInfo) -> None:
        held.expires_at = time.time() + self.lease_seconds
        rec.job.parts[index].lease_expires_at = held.expires_at
        rec.dirty = True  # not a state change: flushed later (a restart re-grants a full period)

    def report_progress(
        self, lease: jobs_pb2.Lease, progress: jobs_pb2.ProgressUpdate, checkpoint_key: str = ""
    ) -> jobs_pb2.ReportProgressResponse:
        with self._lock:
            rec, held = self._check_lease(lease)
            index = lease.part_index
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                return jobs_pb2.ReportProgressResponse(
                    cancelled=True, lease=self._lease_msg(rec, index, held)
                )
            if checkpoint_key:
                self._check_checkpoint_key(rec, index, checkpoint_key)
            if rec.terminal:
                raise Aborted(f"job {rec.job_id} is finished: the part is no longer running")
            if checkpoint_key and checkpoint_key != rec.job.parts[index].checkpoint_key:
                # The resume point is durable state: write it before acknowledging.
                def apply(new: JobRecord, change: _Change) -> None:
                    part = new.job.parts[index]
                    part.checkpoint_key = checkpoint_key
                    _apply_progress(part, progress)
                    change.events.append(jobs_pb2.JobEvent(part_index=index, progress=progress))

                rec = self._mutate(rec.job_id, apply)
                held = rec.leases[index]
            else:
                _apply_progress(rec.job.parts[index], progress)
                self._append_live(rec, jobs_pb2.JobEvent(part_index=index, progress=progress))
            self._extend(rec, index, held)
            return jobs_pb2.ReportProgressResponse(cancelled=False, lease=self._lease_msg(rec, index, held))

    def _append_live(self, rec: JobRecord, event: jobs_pb2.JobEvent) -> None:
        """Publish an event that changes no durable state (progress)."""
        if rec.seq + 1 >= rec.seq_reserved:
            self._write(rec)  # reserve the next block of sequence numbers first
        rec.seq += 1
        event.job_id, event.sequence, event.time = rec.job_id, rec.seq, time.time()
        rec.job.updated_at = event.time
        rec.dirty = True
        self._events[rec.job_id].extend([event])
        self._changed.notify_all()

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
        with self._lock:
            rec, held = self._check_lease(lease)
            index = lease.part_index
            if rec.job.state == jobs_pb2.JOB_STATE_CANCELLED:
                raise Aborted(f"job {rec.job_id} was cancelled: the part's result is not recorded")
            expected = layout.adapter_version_id(rec.job_id, index)
            if adapter.version != expected:
                raise InvalidArgument(f"adapter.version must be {expected} (got {adapter.version[:80]!r})")
            if adapter.book_id not in ("", rec.job.book_id):
                raise InvalidArgument(
                    f"adapter.book_id must be {rec.job.book_id} (got {adapter.book_id[:40]!r})"
                )
            prefix = layout.adapter_prefix(rec.job.book_id, expected)
            if adapter.key not in ("", prefix):
                raise InvalidArgument(f"adapter.key must be {prefix} (got {adapter.key[:120]!r})")
            try:
                adapters.read_meta(self.store, rec.job.book_id, expected)
            except NotFound:
                raise FailedPrecondition(
                    f"adapter {expected} is not published (no {prefix}meta.json): publish it, then complete"
                )
            self.store.put_json(
                layout.part_metrics_key(rec.job_id, index),
                {
                    "job_id": rec.job_id,
                    "book_id": rec.job.book_id,
                    "part": index,
                    "adapter_version": expected,
                    "adapter_key": prefix,
                    "worker_id": held.worker_id,
                    "completed_at": time.time(),
                    "metrics": json_format.MessageToDict(metrics, preserving_proto_field_name=True),
                },
            )

            def apply(new: JobRecord, change: _Change) -> None:
                part = new.job.parts[index]
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

            rec = self._mutate(rec.job_id, apply)
        coordinator_metrics.PARTS_COMPLETED.inc()
        log.info("part completed", extra=kv(job=rec.job_id, part=index, worker=held.worker_id))
        return _copy(rec.job)

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
        with self._lock:
            rec, held = self._check_lease(lease)
            index = lease.part_index
            if rec.terminal:  # e.g. cancelled while the worker ran: nothing left to give back
                return _copy(rec.job)
            if checkpoint_key:
                self._check_checkpoint_key(rec, index, checkpoint_key)

            outcome = ""

            def apply(new: JobRecord, change: _Change) -> None:
                nonlocal outcome
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

            rec = self._mutate(rec.job_id, apply)
        coordinator_metrics.PARTS_FAILED.labels(outcome).inc()
        log.info("part failed", extra=kv(job=rec.job_id, part=index, outcome=outcome, error=error[:200]))
        return _copy(rec.job)

    def _expire_leases(self) -> None:
        now = time.time()
        with self._lock:
            expired = [
                (rec.job_id, index, lease)
                for rec in self._jobs.values()
                if not rec.terminal
                for index, lease in rec.leases.items()
                if lease.expires_at <= now and rec.job.parts[index].state == jobs_pb2.PART_STATE_RUNNING
            ]
            for job_id, index, lease in expired:

                def apply(
                    new: JobRecord, change: _Change, index: int = index, lease: LeaseInfo = lease
                ) -> None:
                    part = new.job.parts[index]
                    new.leases.pop(index, None)
                    part.lease_expires_at = 0
                    part.worker_id = ""
                    reason = (
                        f"lease of worker {lease.worker_id} expired "
                        f"(no heartbeat for {self.lease_seconds:g}s)"
                    )
                    _count_failure(new, index, reason, True, change)

                self._mutate(job_id, apply)
                coordinator_metrics.LEASE_EXPIRIES.inc()
                log.warning("lease expired", extra=kv(job=job_id, part=index, worker=lease.worker_id))


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


def _copy(job: jobs_pb2.Job) -> jobs_pb2.Job:
    out = jobs_pb2.Job()
    out.CopyFrom(job)
    return out
