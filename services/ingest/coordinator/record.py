"""A job's full coordinator state and its JSON form in the store (``jobs/<job_id>/job.json``).

The public :class:`jobs_pb2.Job` plus what only the coordinator needs: the part data
keys (copied from the book manifest at creation, which is immutable), the store prefix
of the adapter part 0 starts from, the live leases, and the event-sequence reservation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from novelcrafter.v1 import jobs_pb2

FORMAT = 1
# Event sequence numbers are reserved in blocks: job.json always records a number above
# every sequence handed out, so after a crash numbering resumes above anything a client saw.
SEQ_BLOCK = 10_000

TERMINAL_JOB_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


@dataclass
class LeaseInfo:
    lease_id: str
    worker_id: str
    device: str
    expires_at: float  # unix seconds, coordinator clock


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
    seq: int = 0  # last event sequence handed out
    seq_reserved: int = 0  # persisted: every sequence handed out is below it
    dirty: bool = False  # in-memory progress not yet in the store (not a state change)

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
            seq=self.seq,
            seq_reserved=self.seq_reserved,
            dirty=self.dirty,
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
                }
                for i, lease in self.leases.items()
            },
            "seq_reserved": self.seq_reserved,
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
        reserved = int(data.get("seq_reserved", 0))
        return cls(job, parts, str(data.get("init_adapter_key", "")), leases, reserved, reserved)
