"""The job coordinator (JobService): ``novelcrafter serve coordinator``, or hosted by the ingest process.

CONTRACT (used by the ingest server and the CLI)::

    coordinator = Coordinator(store, settings)          # recovers every job from the store
    job = coordinator.create_job(book_id, job_config)   # -> jobs_pb2.Job (defaults filled in)
    service = job_service(coordinator)                  # -> novelcrafter.rpc.Service
    server = start_server([..., service], listen, settings)
    server.on_stop.append(coordinator.close)            # ends WatchJob streams before the grace wait
    ...
    coordinator.close()                                 # idempotent

``Coordinator(store, settings, lease_seconds=None)``: the lease time comes from the
argument, else ``NOVELCRAFTER_LEASE_SECONDS``, else 60 s.

Any number of coordinator processes may share one database (``NOVELCRAFTER_DB``: SQLite by
default, PostgreSQL for replicas): claims are made race-free by the database's row locks. See
:mod:`.core` for durability, fencing and attempt rules, :mod:`.db` for the database.

Names are imported lazily so that importing the package stays cheap. Its client commands
(``train``, ``status``) are :mod:`novelcrafter.coordinator.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from novelcrafter.config import DEFAULT_LEASE_SECONDS

    from .core import Coordinator
    from .service import SERVICE_NAME, JobServicer, job_service

__all__ = ["DEFAULT_LEASE_SECONDS", "SERVICE_NAME", "Coordinator", "JobServicer", "job_service"]
_WHERE = {
    "DEFAULT_LEASE_SECONDS": "novelcrafter.config",
    "Coordinator": ".core",
    "SERVICE_NAME": ".service",
    "JobServicer": ".service",
    "job_service": ".service",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
