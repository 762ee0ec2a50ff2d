"""The committed stubs match proto/ exactly, and the API surface is complete."""

from __future__ import annotations

import filecmp
from pathlib import Path

from novelcrafter import protogen
from novelcrafter.v1 import inference_pb2, ingest_pb2, jobs_pb2


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = protogen.ROOT / "novelcrafter" / "v1"
    stale = [p.name for p in fresh if not filecmp.cmp(p, committed / p.name, shallow=False)]
    assert not stale, f"stubs out of date with proto/: {stale}; run `make proto` and commit"
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not extra, f"stubs without a .proto file: {sorted(extra)}"


def _methods(module, service: str) -> set[str]:
    return set(module.DESCRIPTOR.services_by_name[service].methods_by_name)


def test_services_are_complete() -> None:
    assert _methods(ingest_pb2, "IngestService") == {
        "IngestBook",
        "GetBook",
        "ListBooks",
        "GetAdapterCard",
        "ExportAdapter",
    }
    assert _methods(jobs_pb2, "JobService") == {
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "ClaimPart",
        "RenewLease",
        "ReportProgress",
        "CompletePart",
        "FailPart",
    }
    assert {"Generate", "GenerateStream", "ListAdapters"} <= _methods(inference_pb2, "InferenceService")
    fields = set(inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {
        "prompt",
        "book_id",
        "adapter",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "repetition_penalty",
        "chat",
    } <= fields
