"""The trainer's client of the coordinator's JobService: worker calls with deadlines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from novelcrafter.config import Settings
from novelcrafter.errors import DeadlineExceeded, Unavailable, from_rpc_error
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

from .reports import Progress

T = TypeVar("T")

RPC_TIMEOUT = 10.0
TRANSIENT = (Unavailable, DeadlineExceeded)  # the coordinator unreachable: worth retrying


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
        self, lease: jobs_pb2.Lease, update: Progress, checkpoint_key: str = ""
    ) -> jobs_pb2.ReportProgressResponse:
        request = jobs_pb2.ReportProgressRequest(
            lease=lease, progress=update.to_proto(), checkpoint_key=checkpoint_key
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
