"""The book manifest: the stored JSON dict and its typed gRPC form (``common_pb2.BookManifest``)."""

from __future__ import annotations

import json
from typing import Any

from novelcrafter.v1 import common_pb2

from .params import IngestParams

MANIFEST_VERSION = 1


def to_proto(manifest: dict[str, Any]) -> common_pb2.BookManifest:
    """Typed view of a stored manifest; ``manifest_json`` carries the full dict (a superset)."""
    params = IngestParams.from_dict(manifest.get("params"))
    return common_pb2.BookManifest(
        book_id=manifest["book_id"],
        title=manifest.get("title", ""),
        source_sha256=manifest.get("source_sha256", ""),
        pages=int(manifest.get("pages", 0)),
        sentences=int(manifest.get("sentences", 0)),
        chunks=int(manifest.get("chunks", 0)),
        params=params.to_proto(),
        cleaning={k: int(v) for k, v in (manifest.get("cleaning") or {}).items()},
        parts=[
            common_pb2.PartInfo(
                index=int(p["index"]),
                train_key=p["train_key"],
                test_key=p["test_key"],
                train_chunks=int(p["train_chunks"]),
                test_chunks=int(p["test_chunks"]),
            )
            for p in manifest.get("parts", [])
        ],
        created_at=float(manifest.get("created_at", 0.0)),
        warnings=list(manifest.get("warnings", [])),
        words=int(manifest.get("words", 0)),
        manifest_json=json.dumps(manifest, sort_keys=True),
    )


def from_proto(msg: common_pb2.BookManifest) -> dict[str, Any]:
    """The stored dict back from the typed form (exact when ``manifest_json`` is set)."""
    if msg.manifest_json:
        return json.loads(msg.manifest_json)
    return {
        "book_id": msg.book_id,
        "title": msg.title,
        "source_sha256": msg.source_sha256,
        "pages": msg.pages,
        "sentences": msg.sentences,
        "chunks": msg.chunks,
        "words": msg.words,
        "params": IngestParams.from_proto(msg.params).to_dict(),
        "cleaning": dict(msg.cleaning),
        "parts": [
            {
                "index": p.index,
                "train_key": p.train_key,
                "test_key": p.test_key,
                "train_chunks": p.train_chunks,
                "test_chunks": p.test_chunks,
            }
            for p in msg.parts
        ],
        "created_at": msg.created_at,
        "warnings": list(msg.warnings),
    }
