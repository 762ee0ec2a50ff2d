"""Training data: a part's chunks tokenized and packed into sequences, and the batch order.

Packing keeps every chunk whole and in book order: chunks are appended to a sequence
while they fit in ``max_length``; position ids restart at 0 at each chunk, and the
first token of a chunk has no target (nothing before it in its own chunk predicts it).
transformers (5.x) turns restarting position ids into a block-diagonal causal mask
when no 2D attention mask and no cache are given (``masking_utils.find_packed_sequence_indices``),
so a chunk never attends to its neighbour: a packed sequence computes exactly the losses
of its chunks run one by one (``tests/test_trainer_packing.py`` proves it). No compute
goes to padding.

The order of sequences in an epoch is a permutation seeded by (seed, epoch), so the
data cursor of a checkpoint is just the global micro-batch index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from novelcrafter.errors import FailedPrecondition
from novelcrafter.store import Store

IGNORE = -100


@dataclass(frozen=True)
class PackedSequence:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]  # IGNORE where a token has no target
    chunks: int

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class Batch:
    """One micro-batch as tensors; padding (batch > 1 only) is its own masked segment."""

    input_ids: Any
    position_ids: Any
    labels: Any
    tokens: int  # real (non-padding) tokens
    targets: int  # tokens with a target


def read_chunks(store: Store, key: str, limit: int = 0) -> list[str]:
    """The ``{"text": …}`` lines of a part file, in book order (``limit`` > 0 keeps the first ones)."""
    texts: list[str] = []
    for number, line in enumerate(store.get_text(key).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise FailedPrecondition(f"{key} line {number} is not a JSON object with a 'text' field")
        if isinstance(text, str) and text.strip():
            texts.append(text)
        if limit and len(texts) >= limit:
            break
    return texts


def tokenize_chunks(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per chunk, no special tokens added, each cut to ``max_length``."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [ids[:max_length] for ids in encoded if ids]


def _sequence(chunks: Iterable[list[int]]) -> PackedSequence:
    input_ids: list[int] = []
    position_ids: list[int] = []
    labels: list[int] = []
    count = 0
    for ids in chunks:
        input_ids.extend(ids)
        position_ids.extend(range(len(ids)))
        labels.append(IGNORE)  # the chunk's first token: nothing in this chunk predicts it
        labels.extend(ids[1:])
        count += 1
    return PackedSequence(input_ids, position_ids, labels, count)


def pack(chunks: Sequence[list[int]], max_length: int) -> list[PackedSequence]:
    """Greedy packing in book order; a chunk is never split across sequences."""
    sequences: list[PackedSequence] = []
    current: list[list[int]] = []
    length = 0
    for ids in chunks:
        if current and length + len(ids) > max_length:
            sequences.append(_sequence(current))
            current, length = [], 0
        current.append(ids)
        length += len(ids)
    if current:
        sequences.append(_sequence(current))
    return sequences


def one_per_sequence(chunks: Sequence[list[int]]) -> list[PackedSequence]:
    """No packing: one chunk per sequence (no padding either with batch size 1)."""
    return [_sequence([ids]) for ids in chunks]


def collate(sequences: Sequence[PackedSequence], pad_id: int) -> Batch:
    """Stack sequences; a shorter row is filled by a padding segment whose positions restart
    at 0 (so it is its own block of the mask) and whose labels are ignored."""
    import torch

    width = max(s.tokens for s in sequences)
    ids, pos, labels = [], [], []
    for s in sequences:
        pad = width - s.tokens
        ids.append(s.input_ids + [pad_id] * pad)
        pos.append(s.position_ids + list(range(pad)))
        labels.append(s.labels + [IGNORE] * pad)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        tokens=sum(s.tokens for s in sequences),
        targets=sum(s.targets for s in sequences),
    )


class BatchPlan:
    """Which sequences form global micro-batch ``g`` (epochs laid end to end), deterministically."""

    def __init__(self, sequences: Sequence[PackedSequence], batch_size: int, epochs: int, seed: int) -> None:
        if not sequences:
            raise FailedPrecondition("the part has no training text")
        self.sequences = list(sequences)
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.per_epoch = math.ceil(len(self.sequences) / batch_size)
        self._orders: dict[int, list[int]] = {}

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = [int(i) for i in rng.permutation(len(self.sequences))]
        return self._orders[epoch]

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) of global micro-batch ``index``."""
        return divmod(index, self.per_epoch)

    def batch(self, index: int) -> list[PackedSequence]:
        epoch, within = self.position(index)
        picked = self.order(epoch)[within * self.batch_size : (within + 1) * self.batch_size]
        return [self.sequences[i] for i in picked]
