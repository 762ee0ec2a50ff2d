"""How a book is cut into training data: defaults, validation, and the proto/dict forms."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from novelcrafter.errors import InvalidArgument
from novelcrafter.layout import MAX_PARTS

DEFAULT_CHUNK_SENTENCES = 10
DEFAULT_PARTS = 10
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_SEED = 0
MAX_CHUNK_SENTENCES = 1000


@dataclass(frozen=True)
class IngestParams:
    chunk_sentences: int = DEFAULT_CHUNK_SENTENCES
    parts: int = DEFAULT_PARTS
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    auto_reduce_parts: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_sentences <= MAX_CHUNK_SENTENCES:
            raise InvalidArgument(
                f"chunk_sentences must be between 1 and {MAX_CHUNK_SENTENCES}, got {self.chunk_sentences}"
            )
        if not 1 <= self.parts <= MAX_PARTS:
            raise InvalidArgument(f"parts must be between 1 and {MAX_PARTS}, got {self.parts}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise InvalidArgument(f"test_fraction must be in [0, 1), got {self.test_fraction}")

    @property
    def min_chunks_per_part(self) -> int:
        """A part needs a training chunk, and a held-out chunk when a test split is asked for."""
        return 2 if self.test_fraction > 0 else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IngestParams:
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and data[k] is not None}
        try:
            return cls(
                chunk_sentences=int(known.get("chunk_sentences", DEFAULT_CHUNK_SENTENCES)),
                parts=int(known.get("parts", DEFAULT_PARTS)),
                test_fraction=float(known.get("test_fraction", DEFAULT_TEST_FRACTION)),
                seed=int(known.get("seed", DEFAULT_SEED)),
                auto_reduce_parts=bool(known.get("auto_reduce_parts", False)),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid ingest parameters: {exc}") from exc

    @classmethod
    def from_proto(cls, msg: Any) -> IngestParams:
        """From ``common_pb2.IngestParams``: zero means "the default" (proto3 has no presence)."""
        return cls(
            chunk_sentences=msg.chunk_sentences or DEFAULT_CHUNK_SENTENCES,
            parts=msg.parts or DEFAULT_PARTS,
            test_fraction=msg.test_fraction or DEFAULT_TEST_FRACTION,
            seed=msg.seed,
            auto_reduce_parts=msg.auto_reduce_parts,
        )

    def to_proto(self) -> Any:
        from novelcrafter.v1 import common_pb2

        return common_pb2.IngestParams(
            chunk_sentences=self.chunk_sentences,
            parts=self.parts,
            test_fraction=self.test_fraction,
            seed=self.seed,
            auto_reduce_parts=self.auto_reduce_parts,
        )
