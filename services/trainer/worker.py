"""The trainer worker: claim a part from the coordinator, train it, complete it; repeat.

Stateless: the base model is the only thing kept between parts (LoRA is attached per
part and removed after). Everything needed to continue a part lives in the store, so
any worker can pick up any part.

* A background :class:`LeaseKeeper` delivers progress (which renews the lease) and
  renews the lease when there is nothing to report; it notices a lost lease (ABORTED)
  or a cancelled job and the training loop stops at the next step.
* ``request_stop()`` (SIGTERM): the current optimizer step finishes, a checkpoint is
  written, the part is released with ``FailPart(release=True, checkpoint_key=…)``.
* The coordinator unreachable: claims and completions are retried with backoff; the
  worker never crashes for it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from novelcrafter.trainer import metrics as tm
from novelcrafter.trainer.hub import HubPusher
from novelcrafter.trainer.part import BaseModel, Interrupted, PartHooks, PartJob, PartResult, run_part

from novelcrafter.config import Settings
from novelcrafter.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NovelCrafterError,
    Unavailable,
    from_rpc_error,
)
from novelcrafter.logs import get_logger, kv
from novelcrafter.retry import CLAIM_BACKOFF, LEASE_CONFIRM_BACKOFF, PART_OUTCOME_BACKOFF, retry
from novelcrafter.store import Store
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

log = get_logger(__name__)
T = TypeVar("T")

RPC_TIMEOUT = 10.0
TRANSIENT = (Unavailable, DeadlineExceeded)


class LeaseLost(Exception):
    """The coordinator no longer considers this worker the owner of the part."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class CoordinatorClient:
    """JobService worker calls with deadlines; gRPC errors come back as domain errors."""

    def __init__(self, address: str, settings: Settings, timeout: float = RPC_TIMEOUT) -> None:
        from novelcrafter.rpc import connect

        self.address = address
        self.timeout = timeout
        self.channel = connect(address, settings)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def claim(self, worker_id: str, device: str) -> jobs_pb2.ClaimPartResponse:
        return self._call(self.stub.ClaimPart, jobs_pb2.ClaimPartRequest(worker_id=worker_id, device=device))

    def renew(self, lease: jobs_pb2.Lease) -> jobs_pb2.Lease:
        return self._call(self.stub.RenewLease, jobs_pb2.RenewLeaseRequest(lease=lease))

    def report(
        self, lease: jobs_pb2.Lease, update: dict[str, Any], checkpoint_key: str = ""
    ) -> jobs_pb2.ReportProgressResponse:
        progress = jobs_pb2.ProgressUpdate(
            **{k: v for k, v in update.items() if k in jobs_pb2.ProgressUpdate.DESCRIPTOR.fields_by_name}
        )
        request = jobs_pb2.ReportProgressRequest(
            lease=lease, progress=progress, checkpoint_key=checkpoint_key
        )
        return self._call(self.stub.ReportProgress, request)

    def complete(
        self, lease: jobs_pb2.Lease, metrics: jobs_pb2.PartMetrics, adapter: common_pb2.AdapterVersion
    ) -> jobs_pb2.Job:
        request = jobs_pb2.CompletePartRequest(lease=lease, metrics=metrics, adapter=adapter)
        return self._call(self.stub.CompletePart, request)

    def fail(
        self, lease: jobs_pb2.Lease, error: str, *, retryable: bool, release: bool, checkpoint_key: str = ""
    ) -> jobs_pb2.Job:
        request = jobs_pb2.FailPartRequest(
            lease=lease, error=error, retryable=retryable, release=release, checkpoint_key=checkpoint_key
        )
        return self._call(self.stub.FailPart, request)

    def close(self) -> None:
        self.channel.close()


class LeaseKeeper:
    """Delivers progress reports in the background and keeps the lease alive.

    Reports are queued, never sent from the training thread (an unreachable coordinator
    must not stall training); consecutive plain step updates are coalesced, checkpoint
    and phase updates are all delivered in order.
    """

    def __init__(self, client: CoordinatorClient, lease: jobs_pb2.Lease) -> None:
        self.client = client
        self.lease = lease
        self.interval = max(0.2, (lease.ttl_seconds or 30.0) / 3)
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self.last_checkpoint_key = ""
        self._pending: list[tuple[dict[str, Any], str]] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def submit(self, update: dict[str, Any], checkpoint_key: str = "") -> None:
        tm.observe_update(update)
        with self._cond:
            if checkpoint_key:
                self.last_checkpoint_key = checkpoint_key
            plain = update.get("phase") == "train" and not checkpoint_key
            last = self._pending[-1] if self._pending else None
            if plain and last and last[0].get("phase") == "train" and not last[1]:
                self._pending[-1] = (update, "")
            else:
                self._pending.append((update, checkpoint_key))
            self._cond.notify()

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.cancelled.is_set()

    def confirm(self) -> None:
        """Synchronously renew the lease (before publishing); raise :class:`LeaseLost` if it is gone."""
        deadline = time.monotonic() + max(self.lease.ttl_seconds, 10.0)
        delays = LEASE_CONFIRM_BACKOFF.delays()
        while True:
            if self.should_stop():
                raise LeaseLost("the lease was lost or the job cancelled")
            try:
                self.lease = self.client.renew(self.lease)
                self._last_contact = time.monotonic()
                return
            except Aborted as exc:
                self.lost.set()
                raise LeaseLost(exc.message)
            except TRANSIENT as exc:
                if time.monotonic() > deadline:
                    raise LeaseLost(f"coordinator unreachable before publishing: {exc.message}")
            time.sleep(next(delays))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=RPC_TIMEOUT + 2)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._stopped:
                    self._cond.wait(timeout=self.interval)
                if self._stopped:
                    return
                batch = list(self._pending)
            try:
                sent = self._send(batch)
                if not batch and time.monotonic() - self._last_contact >= self.interval * 0.9:
                    self.lease = self.client.renew(self.lease)
                    self._last_contact = time.monotonic()
            except Aborted as exc:
                if "cancel" in exc.message:
                    self.cancelled.set()
                else:
                    self.lost.set()
                log.warning(
                    "lease lost", extra=kv(job=self.lease.job_id, part=self.lease.part_index, why=exc.message)
                )
                return
            except TRANSIENT as exc:
                log.warning("coordinator unreachable; training goes on", extra=kv(error=exc.message))
                with self._cond:
                    self._cond.wait(timeout=min(self.interval, 2.0))
                continue
            except NovelCrafterError as exc:
                log.warning("progress report refused", extra=kv(error=exc.message))
                sent = len(batch)
            except Exception:
                log.exception("lease keeper error")
                sent = len(batch)
            with self._cond:
                del self._pending[:sent]

    def _send(self, batch: list[tuple[dict[str, Any], str]]) -> int:
        sent = 0
        for update, key in batch:
            try:
                response = self.client.report(self.lease, update, key)
            except (Aborted, *TRANSIENT):
                with self._cond:
                    del self._pending[:sent]
                raise
            sent += 1
            self._last_contact = time.monotonic()
            self.lease = response.lease if response.lease.lease_id else self.lease
            if response.cancelled:
                self.cancelled.set()
                log.info("job cancelled: stopping", extra=kv(job=self.lease.job_id))
        return sent


def metrics_proto(metrics: dict[str, Any]) -> jobs_pb2.PartMetrics:
    out = jobs_pb2.PartMetrics(
        train_loss=_finite(metrics["train_loss"]),
        base_perplexity=_finite(metrics["base_perplexity"]),
        adapter_perplexity=_finite(metrics["adapter_perplexity"]),
        train_tokens=int(metrics["train_tokens"]),
        eval_tokens=int(metrics["eval_tokens"]),
        train_seconds=float(metrics["train_seconds"]),
        eval_seconds=float(metrics["eval_seconds"]),
        steps=int(metrics["steps"]),
        loss_curve=[float(x) for x in metrics["loss_curve"]],
        tokens_per_second=float(metrics["tokens_per_second"]),
        device=str(metrics["device"]),
        replayed_chunks=int(metrics.get("replayed_chunks", 0)),
        replay_tokens=int(metrics.get("replay_tokens", 0)),
    )
    for part, value in metrics["earlier_perplexity"].items():
        out.earlier_perplexity[int(part)] = _finite(value)
    memorized = metrics.get("memorization")
    if memorized:
        control = memorized.get("control") or {}
        out.memorization.prompts = int(memorized["prompts"])
        out.memorization.control_prompts = int(control.get("prompts", 0))
        for field, source in (
            (out.memorization.base, memorized["base"]),
            (out.memorization.adapter, memorized["adapter"]),
            (out.memorization.control_base, control.get("base")),
            (out.memorization.control_adapter, control.get("adapter")),
        ):
            if source:
                field.extraction_rate = _finite(source["extraction_rate"])
                field.longest_copied_tokens = int(source["longest_copied_tokens"])
    style = metrics.get("style")
    if style:
        out.style.metric = str(style["metric"])
        out.style.base = _finite(style["base"])
        out.style.adapter = _finite(style["adapter"])
        out.style.prompts = int(style["prompts"])
    return out


def _finite(value: float) -> float:
    return float(value) if value == value and abs(value) != float("inf") else 0.0


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
        path = provision_base_model(name, self.settings)
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
        job = PartJob.from_assignment(claim.assignment)
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
                tm.PARTS.labels("lease_lost").inc()
                return
            reason = "job cancelled" if keeper.cancelled.is_set() else "worker shutting down"
            self._fail(keeper.lease, reason, retryable=True, release=True, checkpoint_key=exc.checkpoint_key)
            tm.PARTS.labels("released").inc()
            return
        except LeaseLost as exc:
            keeper.stop()
            log.warning("part abandoned before publishing", extra=kv(**where["fields"], why=str(exc)))
            tm.PARTS.labels("lease_lost").inc()
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
            tm.PARTS.labels("failed").inc()
            return
        keeper.stop()
        try:
            if self._complete(keeper.lease, result):
                self.completed.append(result.adapter.version)
                tm.PARTS.labels("completed").inc()
                if job.hub_repo_id and self.hub is not None:
                    self.hub.push(job.hub_repo_id, job.part, result.adapter_dir)
                elif job.hub_repo_id:
                    log.warning("job asks for a Hub push but HF_TOKEN is not set: not pushing", extra=where)
        finally:
            shutil.rmtree(result.adapter_dir, ignore_errors=True)

    def _complete(self, lease: jobs_pb2.Lease, result: PartResult) -> bool:
        adapter = result.adapter.to_proto()
        metrics = metrics_proto(result.metrics)
        done = self._retry(
            "complete the part", lambda: self.client.complete(lease, metrics, adapter), patience=300.0
        )
        if done:
            log.info(
                "part completed", extra=kv(job=lease.job_id, part=lease.part_index, version=adapter.version)
            )
        return done

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
