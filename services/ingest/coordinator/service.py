"""The gRPC face of the coordinator: ``novelcrafter.v1.JobService`` over :class:`Coordinator`.

Validation and errors live in the coordinator (domain errors); the shared error
interceptor turns them into status codes. This layer only unpacks requests.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from novelcrafter.rpc import Service
from novelcrafter.v1 import jobs_pb2, jobs_pb2_grpc

from .core import Coordinator

SERVICE_NAME = "novelcrafter.v1.JobService"


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

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
        # A client that cancels wakes the stream at once instead of at its next poll.
        context.add_callback(self.c.wake_watchers)
        yield from self.c.watch_job(request.job_id, request.after_sequence, context.is_active)

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
    """The JobService to pass to :func:`novelcrafter.rpc.start_server`."""
    return Service(SERVICE_NAME, JobServicer(coordinator), jobs_pb2_grpc.add_JobServiceServicer_to_server)
