"""The coordinator as another process sees it: what ingest needs when it does not host it."""

from __future__ import annotations

import grpc

from novelcrafter.config import Settings
from novelcrafter.errors import Unavailable, from_rpc_error
from novelcrafter.rpc import connect
from novelcrafter.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

CREATE_TIMEOUT = 30.0


class RemoteCoordinator:
    """``create_job`` over gRPC on one long-lived channel (``serve ingest`` with
    ``NOVELCRAFTER_EMBEDDED_COORDINATOR=false``: IngestBook's ``create_job``)."""

    def __init__(self, address: str, settings: Settings) -> None:
        self.address = address
        self._channel = connect(address, settings)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def create_job(self, book_id: str, config: common_pb2.JobConfig | None = None) -> jobs_pb2.Job:
        request = jobs_pb2.CreateJobRequest(book_id=book_id, config=config)
        try:
            return self._stub.CreateJob(request, timeout=CREATE_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"the book {book_id} was ingested, but the job coordinator at {self.address} "
                    f"did not answer ({exc.details() or 'unavailable'}); create the job with "
                    "`novelcrafter train`"
                ) from None
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._channel.close()
