"""The trainer worker's loop: claim a part from the coordinator, train it, complete it; repeat.

Stateless: the base model is the only thing kept between parts (LoRA is attached per
part and removed after). Everything needed to continue a part lives in the store, so
any worker can pick up any part.

* A background :class:`~novelcrafter.trainer.lease.LeaseKeeper` delivers progress (which renews the lease) and
  renews the lease when there is nothing to report; it notices a lost lease (ABORTED)
  or a cancelled job and the training loop stops at the next step.
* ``request_stop()`` (SIGTERM): the current optimizer step finishes, a checkpoint is
  written, the part is released with ``FailPart(release=True, checkpoint_key=…)``.
* The coordinator unreachable: claims and completions are retried with backoff; the
  worker never crashes for it.
* Publishing is fenced: the part stages its adapter in the lease's own folder and
  CompletePart publishes it, in the transaction that checks the lease is still live. A worker
  whose lease expired (paused, partitioned) or whose job was cancelled is refused (ABORTED) and
  nothing of it is published. CompletePart is idempotent: a retry after a lost answer gets the
  job again.

The coordinator client is :mod:`~novelcrafter.trainer.coordinator_client`, what a part
reports (progress, metrics) is typed in :mod:`~novelcrafter.trainer.reports`.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from novelcrafter import adapters
from novelcrafter.config import Settings
from novelcrafter.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NovelCrafterError,
)
from novelcrafter.logs import get_logger, kv
from novelcrafter.retry import CLAIM_BACKOFF, PART_OUTCOME_BACKOFF, retry
from novelcrafter.store import Store
from novelcrafter.v1 import jobs_pb2

from . import metrics as trainer_metrics
from .coordinator_client import TRANSIENT, CoordinatorClient
from .hub import HubPusher
from .lease import LeaseKeeper, LeaseLost
from .part import BaseModel, Interrupted, PartHooks, PartJob, PartResult, run_part
from .reports import metrics_proto

log = get_logger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """``run()`` claims and trains parts until stopped (or ``max_parts`` parts were handled)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        device: str = "auto",
        worker_id: str | None = None,
        poll_seconds: float = 2.0,
        max_parts: int = 0,
        base: BaseModel | None = None,
    ) -> None:
        from novelcrafter.models import pick_device

        self.settings = settings
        self.store = store
        self.device = pick_device(device)
        self.worker_id = worker_id or default_worker_id()
        self.poll_seconds = poll_seconds
        self.max_parts = max_parts
        self.client = CoordinatorClient(settings.coordinator, settings)
        self.stopping = threading.Event()
        self.hub: HubPusher | None = HubPusher(settings.hf_token) if settings.hf_token else None
        self._base = base
        self.handled = 0
        self.completed: list[str] = []  # adapter versions this worker completed

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): checkpoint after the current step, release the part, return."""
        if not self.stopping.is_set():
            log.info("stop requested: finishing the current step", extra=kv(worker=self.worker_id))
        self.stopping.set()

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        log.info("trainer worker started", extra=kv(worker=self.worker_id, device=self.device))
        try:
            self.base_model(self.settings.base_model)
            while not self.stopping.is_set() and not (self.max_parts and self.handled >= self.max_parts):
                claim = self._claim()
                if claim is None:
                    break
                if not claim.assigned:
                    self.stopping.wait(self.poll_seconds)
                    continue
                self._work(claim)
                self.handled += 1
        finally:
            if self.hub is not None:
                self.hub.close(timeout=30.0)
            self.client.close()
        log.info("trainer worker stopped", extra=kv(worker=self.worker_id, parts=self.handled))
        return 0

    def base_model(self, name: str) -> BaseModel:
        """The cached base model, (re)loaded when a job asks for a different one."""
        if self._base is not None and self._base.name == name:
            return self._base
        from novelcrafter.models import load_base_model, load_tokenizer, provision_base_model

        self._base = None  # free the previous one first
        # A job's base model is checked against NOVELCRAFTER_MODEL_DIRS (our own is trusted).
        path = provision_base_model(name, self.settings, from_job=name != self.settings.base_model)
        started = time.monotonic()
        self._base = BaseModel(load_base_model(path, self.device), load_tokenizer(path), name, self.device)
        log.info("base model loaded", extra=kv(model=name, seconds=round(time.monotonic() - started, 1)))
        return self._base

    def _claim(self) -> jobs_pb2.ClaimPartResponse | None:
        """Ask for work, retrying with backoff while the coordinator is unreachable (None = stopping)."""
        warned = False
        delays = CLAIM_BACKOFF.delays()
        while not self.stopping.is_set():
            try:
                response = self.client.claim(self.worker_id, self.device.split(":")[0])
                if warned:
                    log.info("coordinator reachable again", extra=kv(coordinator=self.client.address))
                return response
            except TRANSIENT as exc:
                if not warned:
                    log.warning(
                        "coordinator unreachable; retrying",
                        extra=kv(coordinator=self.client.address, error=exc.message),
                    )
                    warned = True
            except NovelCrafterError as exc:
                log.error("claim refused", extra=kv(error=exc.message))
            except Exception:
                log.exception("claim failed")
            self.stopping.wait(next(delays))
        return None

    def _work(self, claim: jobs_pb2.ClaimPartResponse) -> None:
        job = PartJob.from_assignment(claim.assignment, epoch=claim.lease.epoch)
        where = kv(job=job.job_id, part=job.part, worker=self.worker_id)
        log.info("part claimed", extra=where)
        keeper = LeaseKeeper(self.client, claim.lease).start()
        hooks = PartHooks(
            report=keeper.submit,
            should_stop=lambda: self.stopping.is_set() or keeper.should_stop(),
            before_publish=keeper.confirm,
            lease_lost=keeper.lost.is_set,
        )
        result: PartResult | None = None
        try:
            base = self.base_model(job.base_model or self.settings.base_model)
            result = run_part(self.store, base, job, hooks)
        except Interrupted as exc:
            keeper.stop()
            if keeper.lost.is_set():
                log.warning("part abandoned: lease lost", extra=where)
                trainer_metrics.PARTS.labels("lease_lost").inc()
                return
            reason = "job cancelled" if keeper.cancelled.is_set() else "worker shutting down"
            self._fail(keeper.lease, reason, retryable=True, release=True, checkpoint_key=exc.checkpoint_key)
            trainer_metrics.PARTS.labels("released").inc()
            return
        except LeaseLost as exc:
            keeper.stop()
            log.warning("part abandoned before publishing", extra=kv(**where["fields"], why=str(exc)))
            trainer_metrics.PARTS.labels("lease_lost").inc()
            return
        except Exception as exc:
            keeper.stop()
            retryable = not isinstance(exc, (InvalidArgument, FailedPrecondition, NotFound))
            message = exc.message if isinstance(exc, NovelCrafterError) else f"{type(exc).__name__}: {exc}"
            log.exception("part failed", extra=kv(**where["fields"], retryable=retryable))
            self._fail(
                keeper.lease,
                message,
                retryable=retryable,
                release=False,
                checkpoint_key=keeper.last_checkpoint_key,
            )
            trainer_metrics.PARTS.labels("failed").inc()
            return
        keeper.stop()
        try:
            published = self._complete(keeper.lease, result)
            if published is not None:
                result.adapter = published
                self.completed.append(result.adapter.version)
                trainer_metrics.PARTS.labels("completed").inc()
                if job.hub_repo_id and self.hub is not None:
                    self.hub.push(job.hub_repo_id, job.part, result.adapter_dir)
                elif job.hub_repo_id:
                    log.warning("job asks for a Hub push but HF_TOKEN is not set: not pushing", extra=where)
        finally:
            shutil.rmtree(result.adapter_dir, ignore_errors=True)

    def _complete(self, lease: jobs_pb2.Lease, result: PartResult) -> adapters.AdapterMeta | None:
        """CompletePart: the coordinator publishes the staged adapter and records the part, if the
        lease is still this worker's. The version as published; None when refused (the lease
        expired or was replaced, the job was cancelled: nothing of this worker is published) or
        when the coordinator could not be reached in time (the lease then runs out and the part
        is trained again)."""
        adapter = result.adapter.to_proto()
        metrics = metrics_proto(result.metrics)
        where = kv(job=lease.job_id, part=lease.part_index, version=adapter.version, epoch=lease.epoch)
        try:
            retry(
                lambda: self.client.complete(lease, metrics, adapter),
                backoff=PART_OUTCOME_BACKOFF,
                retryable=lambda exc: isinstance(exc, TRANSIENT),
                deadline_seconds=300.0,
            )
        except Aborted as exc:
            log.warning(
                "part abandoned: the coordinator refused its completion, nothing published",
                extra=kv(**where["fields"], why=exc.message),
            )
            trainer_metrics.PARTS.labels("lease_lost").inc()
            return None
        except TRANSIENT as exc:
            log.error("could not complete the part: coordinator unreachable", extra=kv(error=exc.message))
            return None
        except NovelCrafterError as exc:
            # E.g. the staged files do not match their checksums: give the part back for another
            # attempt now rather than when the lease runs out.
            log.error("could not complete the part", extra=kv(**where["fields"], error=exc.message))
            self._fail(
                lease, exc.message, retryable=True, release=False, checkpoint_key=result.checkpoint_key
            )
            trainer_metrics.PARTS.labels("failed").inc()
            return None
        log.info("part completed", extra=where)
        if not result.staged_prefix:
            return result.adapter  # published by run_part itself
        try:  # the meta as the coordinator published it (published_at)
            return adapters.read_meta(self.store, result.adapter.book_id, result.adapter.version)
        except NovelCrafterError as exc:
            log.warning("published meta not read back", extra=kv(**where["fields"], error=exc.message))
            return result.adapter

    def _fail(
        self, lease: jobs_pb2.Lease, error: str, *, retryable: bool, release: bool, checkpoint_key: str
    ) -> None:
        self._retry(
            "release the part" if release else "report the failure",
            lambda: self.client.fail(
                lease, error, retryable=retryable, release=release, checkpoint_key=checkpoint_key
            ),
            patience=15.0 if self.stopping.is_set() else 120.0,
        )

    def _retry(self, what: str, call: Callable[[], Any], *, patience: float) -> bool:
        """Retry ``call`` while the coordinator is unreachable; False when refused or out of patience."""
        try:
            retry(
                call,
                backoff=PART_OUTCOME_BACKOFF,
                retryable=lambda exc: isinstance(exc, TRANSIENT),
                deadline_seconds=patience,
            )
            return True
        except Aborted as exc:
            log.warning(f"coordinator refused to {what}", extra=kv(error=exc.message))
            return False
        except TRANSIENT as exc:
            log.error(f"could not {what}: coordinator unreachable", extra=kv(error=exc.message))
            return False
        except NovelCrafterError as exc:
            log.error(f"could not {what}", extra=kv(error=exc.message))
            return False


def serve(settings: Settings, store: Store, **options: Any) -> int:
    """Run a worker in this process until SIGTERM/SIGINT (graceful) or ``max_parts``."""
    import signal

    from novelcrafter.metrics import start_metrics_server

    worker = Worker(settings, store, **options)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received", extra=kv(signal=signal.Signals(signum).name))
        worker.request_stop()
        # A second signal ends the process the default way.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start_metrics_server(settings, "trainer")
    return worker.run()
