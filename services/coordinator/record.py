"""A job's full coordinator state and its JSON form: the ``record`` column of the ``jobs`` table
(and, format 1, the ``jobs/<job_id>/job.json`` an older coordinator kept in the store, which is
imported once).

The public :class:`jobs_pb2.Job` plus what only the coordinator needs: the part data
keys (copied from the book manifest at creation, which is immutable), the store prefix
of the adapter part 0 starts from, the live leases and the last fencing epoch handed out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from novelcrafter.v1 import jobs_pb2

FORMAT = 1

TERMINAL_JOB_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


@dataclass
class LeaseInfo:
    lease_id: str
    worker_id: str
    device: str
    expires_at: float  # unix seconds, coordinator clock
    # The fencing token: every grant of any part of the job takes the next number, so a lease
    # granted later always carries a larger one (0: a lease from before epochs existed).
    epoch: int = 0


@dataclass
class PartData:
    train_key: str
    test_key: str


@dataclass
class JobRecord:
    job: jobs_pb2.Job
    part_data: list[PartData]
    init_adapter_key: str = ""
    leases: dict[int, LeaseInfo] = field(default_factory=dict)
    epoch: int = 0  # the last fencing epoch handed out for this job

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def terminal(self) -> bool:
        return self.job.state in TERMINAL_JOB_STATES

    def copy(self) -> JobRecord:
        job = jobs_pb2.Job()
        job.CopyFrom(self.job)
        return JobRecord(
            job=job,
            part_data=list(self.part_data),
            init_adapter_key=self.init_adapter_key,
            leases=copy.deepcopy(self.leases),
            epoch=self.epoch,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "job": json_format.MessageToDict(self.job, preserving_proto_field_name=True),
            "parts": [{"train_key": p.train_key, "test_key": p.test_key} for p in self.part_data],
            "init_adapter_key": self.init_adapter_key,
            "leases": {
                str(i): {
                    "lease_id": lease.lease_id,
                    "worker_id": lease.worker_id,
                    "device": lease.device,
                    "expires_at": lease.expires_at,
                    "epoch": lease.epoch,
                }
                for i, lease in self.leases.items()
            },
            "epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown job record format {data.get('format')!r}")
        job = json_format.ParseDict(data["job"], jobs_pb2.Job(), ignore_unknown_fields=True)
        parts = [PartData(p["train_key"], p["test_key"]) for p in data["parts"]]
        if len(parts) != len(job.parts):
            raise ValueError("part data does not match the job's parts")
        leases = {int(i): LeaseInfo(**lease) for i, lease in data.get("leases", {}).items()}
        if any(not 0 <= i < len(parts) for i in leases):
            raise ValueError("a lease names a part the job does not have")
        epoch = max([int(data.get("epoch", 0)), *(lease.epoch for lease in leases.values())])
        return cls(job, parts, str(data.get("init_adapter_key", "")), leases, epoch)
