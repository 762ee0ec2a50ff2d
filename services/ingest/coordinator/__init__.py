"""The job coordinator (JobService), hosted by the ingest process.

CONTRACT (used by the ingest server and the CLI; the implementation fills it in):

    coordinator = Coordinator(store, settings)          # recovers state from the store
    job = coordinator.create_job(book_id, job_config)   # -> jobs_pb2.Job
    service = job_service(coordinator)                  # -> novelcrafter.rpc.Service
    coordinator.close()
"""

from __future__ import annotations

from typing import Any

from novelcrafter.config import Settings
from novelcrafter.errors import FailedPrecondition
from novelcrafter.rpc import Service
from novelcrafter.store import Store


class Coordinator:
    """Job state, part queue with leases, progress events. (Skeleton: being implemented.)"""

    def __init__(self, store: Store, settings: Settings, *, lease_seconds: float = 60.0) -> None:
        self.store = store
        self.settings = settings
        self.lease_seconds = lease_seconds

    def create_job(self, book_id: str, config: Any) -> Any:
        raise FailedPrecondition("the job coordinator is not implemented yet")

    def close(self) -> None:
        pass


def job_service(coordinator: Coordinator) -> Service:
    from novelcrafter.v1 import jobs_pb2_grpc

    return Service("novelcrafter.v1.JobService", jobs_pb2_grpc.JobServiceServicer(), jobs_pb2_grpc.add_JobServiceServicer_to_server)
