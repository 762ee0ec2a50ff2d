"""Keeping a part's lease: progress delivered in the background, renewals, a lost lease noticed."""

from __future__ import annotations

import threading
import time

from novelcrafter.errors import Aborted, NovelCrafterError
from novelcrafter.logs import get_logger, kv
from novelcrafter.retry import LEASE_CONFIRM_BACKOFF
from novelcrafter.v1 import jobs_pb2

from . import metrics as trainer_metrics
from .coordinator_client import RPC_TIMEOUT, TRANSIENT, CoordinatorClient
from .reports import Progress

log = get_logger(__name__)


class LeaseLost(Exception):
    """The coordinator no longer considers this worker the owner of the part."""


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
        self._pending: list[tuple[Progress, str]] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def submit(self, update: Progress, checkpoint_key: str = "") -> None:
        trainer_metrics.observe_update(update)
        with self._cond:
            if checkpoint_key:
                self.last_checkpoint_key = checkpoint_key
            plain = update.phase == "train" and not checkpoint_key
            last = self._pending[-1] if self._pending else None
            if plain and last and last[0].phase == "train" and not last[1]:
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

    def _send(self, batch: list[tuple[Progress, str]]) -> int:
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
