"""The gRPC face of the coordinator: ``novelcrafter.v1.JobService`` over :class:`Coordinator`.

Validation and errors live in the coordinator (domain errors); the shared error
interceptor turns them into status codes. This layer only unpacks requests, and keeps the
WatchJob streams: each waits on its job's event log (never polling, never on the
coordinator's lock), woken by a new event, by its client leaving, by the server stopping,
or by its keepalive timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from novelcrafter.errors import InvalidArgument
from novelcrafter.rpc import Service
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

from .core import Coordinator
from .events import EventLog

SERVICE_NAME = "novelcrafter.v1.JobService"
# An idle stream wakes this often to re-check its job and the coordinator (a safety net: every
# change that ends a stream also wakes it at once).
WATCH_KEEPALIVE_SECONDS = 15.0
TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._lock = threading.Lock()
        self._watching: dict[threading.Event, EventLog] = {}  # open streams: their stop flag, their log
        self._closed = False

    def close(self) -> None:
        """End every WatchJob stream now (the server is stopping); new ones end at once.
        Runs before the server's grace period, so open streams do not hold the shutdown."""
        with self._lock:
            self._closed = True
            watching = list(self._watching.items())
        for stop, history in watching:
            stop.set()
            history.wake()

    # client side
    def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return self.c.create_job(request.book_id, request.config)

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return self.c.get_job(request.job_id)

    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=self.c.list_jobs(request.book_id))

    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return self.c.cancel_job(request.job_id)

    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Replay events after ``after_sequence``, then follow live ones until the job is
        terminal, the client goes away or the server stops."""
        job_id, last = request.job_id, request.after_sequence
        if last < 0:
            raise InvalidArgument(f"after_sequence must be >= 0 (got {last})")
        ended = self.c.get_job(job_id).state in TERMINAL  # NOT_FOUND before the stream starts
        history = self._history(job_id)
        stop = threading.Event()

        def leave() -> None:  # the client cancelled, or its deadline passed
            stop.set()
            history.wake()  # only this job's streams wake, and re-check

        with self._lock:
            if self._closed or self.c.closed:
                return
            self._watching[stop] = history
        if not context.add_callback(leave):  # the call is already over
            stop.set()
        next_check = time.monotonic() + WATCH_KEEPALIVE_SECONDS
        try:
            while not stop.is_set():
                if ended:
                    pending = history.after(last)
                else:
                    pending = history.wait_after(last, WATCH_KEEPALIVE_SECONDS, stop.is_set)
                for event in pending:
                    yield event
                    last = event.sequence
                    if event.HasField("job_state") and event.job_state in TERMINAL:
                        ended = True
                if pending:
                    continue  # look again before deciding: more may have come meanwhile
                if ended or self.c.closed or not context.is_active():
                    return
                # Keepalive, at most every WATCH_KEEPALIVE_SECONDS (not on every wake-up): the
                # job may have ended without an event on record (a history lost on restart).
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + WATCH_KEEPALIVE_SECONDS
                    ended = self.c.get_job(job_id).state in TERMINAL
                    if ended:  # read through: the last events may come from another replica
                        history = self._history(job_id)
        finally:
            with self._lock:
                self._watching.pop(stop, None)

    def _history(self, job_id: str) -> EventLog:
        # The coordinator publishes every event of a job through its EventLog; streams wait on
        # the log itself, so an event wakes only its own job's streams.
        return self.c.event_log(job_id)

    # worker side
    def ClaimPart(
        self, request: jobs_pb2.ClaimPartRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ClaimPartResponse:
        return self.c.claim_part(request.worker_id, request.device, request.job_id)

    def RenewLease(
        self, request: jobs_pb2.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Lease:
        return self.c.renew_lease(request.lease)

    def ReportProgress(
        self, request: jobs_pb2.ReportProgressRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ReportProgressResponse:
        return self.c.report_progress(request.lease, request.progress, request.checkpoint_key)

    def CompletePart(
        self, request: jobs_pb2.CompletePartRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return self.c.complete_part(request.lease, request.metrics, request.adapter)

    def FailPart(self, request: jobs_pb2.FailPartRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return self.c.fail_part(
            request.lease,
            request.error,
            retryable=request.retryable,
            release=request.release,
            checkpoint_key=request.checkpoint_key,
        )


def job_service(coordinator: Coordinator) -> Service:
    """The JobService to pass to :func:`novelcrafter.rpc.start_server` (its streams end when
    the server stops, before the grace period)."""
    servicer = JobServicer(coordinator)
    return Service(
        SERVICE_NAME, servicer, jobs_pb2_grpc.add_JobServiceServicer_to_server, on_stop=servicer.close
    )
