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

**Replay** (``replay_fraction`` f in [0, 1), against forgetting): part k trains on its own
training chunks plus ``round(f / (1 - f) * own)`` training chunks of parts 0..k-1 (at most
all of them), so replayed chunks are a share f of the part's mix. They are drawn uniformly
without replacement from the earlier parts' *training* files only (held-out chunks are never
read), by a generator seeded with (part seed, a replay stream id): the same job seed and part
always draw the same chunks. Own chunks are packed first in book order, then the replayed ones
in book order, by the same packing (each chunk whole, its own attention block), so the
sequences and their seeded epoch order are fixed for the part and a resumed part sees exactly
the sequences an uninterrupted one sees. Each sequence counts its replayed chunks and tokens,
so the trained tokens can be reported as own + replayed. f = 0 reads and draws nothing: the
sequences are exactly those of training without replay.
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
REPLAY_STREAM = 0x5245504C  # "REPL": the replay draw's own generator stream (apart from epoch orders)


@dataclass(frozen=True)
class PackedSequence:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]  # IGNORE where a token has no target
    chunks: int
    replayed_chunks: int = 0  # of ``chunks``, replayed from earlier parts
    replay_tokens: int = 0  # of ``tokens``, in replayed chunks

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
    replay_tokens: int = 0  # of ``tokens``, in chunks replayed from earlier parts


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


def _sequence(chunks: Iterable[list[int]], replayed: Iterable[bool] = ()) -> PackedSequence:
    input_ids: list[int] = []
    position_ids: list[int] = []
    labels: list[int] = []
    count = replayed_chunks = replay_tokens = 0
    flags = iter(replayed)
    for ids in chunks:
        input_ids.extend(ids)
        position_ids.extend(range(len(ids)))
        labels.append(IGNORE)  # the chunk's first token: nothing in this chunk predicts it
        labels.extend(ids[1:])
        count += 1
        if next(flags, False):
            replayed_chunks += 1
            replay_tokens += len(ids)
    return PackedSequence(input_ids, position_ids, labels, count, replayed_chunks, replay_tokens)


def pack(
    chunks: Sequence[list[int]], max_length: int, *, replay_from: int | None = None
) -> list[PackedSequence]:
    """Greedy packing in the given order; a chunk is never split across sequences.

    ``chunks[replay_from:]`` are replayed chunks (counted apart in each sequence); None: none.
    """
    start = len(chunks) if replay_from is None else replay_from
    sequences: list[PackedSequence] = []
    current: list[list[int]] = []
    flags: list[bool] = []
    length = 0
    for index, ids in enumerate(chunks):
        if current and length + len(ids) > max_length:
            sequences.append(_sequence(current, flags))
            current, flags, length = [], [], 0
        current.append(ids)
        flags.append(index >= start)
        length += len(ids)
    if current:
        sequences.append(_sequence(current, flags))
    return sequences


def one_per_sequence(chunks: Sequence[list[int]], *, replay_from: int | None = None) -> list[PackedSequence]:
    """No packing: one chunk per sequence (no padding either with batch size 1)."""
    start = len(chunks) if replay_from is None else replay_from
    return [_sequence([ids], [index >= start]) for index, ids in enumerate(chunks)]


def replay_count(fraction: float, own: int, available: int) -> int:
    """Chunks replayed into a part of ``own`` chunks: round(f / (1 - f) * own), at most ``available``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1) (got {fraction})")
    if fraction == 0.0 or own <= 0 or available <= 0:
        return 0
    return min(available, round(fraction / (1.0 - fraction) * own))


def choose_replay(earlier: Sequence[Sequence[str]], own: int, fraction: float, seed: int) -> list[str]:
    """The replayed chunks: a seeded uniform draw without replacement from ``earlier`` (the
    training chunks of parts 0..k-1, one list per part), returned in book order."""
    pool = [text for part in earlier for text in part]
    count = replay_count(fraction, own, len(pool))
    if count == 0:
        return []
    rng = np.random.default_rng([seed, REPLAY_STREAM])
    picked = np.sort(rng.choice(len(pool), size=count, replace=False))
    return [pool[int(i)] for i in picked]


def replay_texts(
    store: Store, earlier_train_keys: Sequence[str], own: int, fraction: float, seed: int
) -> list[str]:
    """:func:`choose_replay` over the earlier parts' training files (nothing is read at f = 0)."""
    if fraction == 0.0 or not earlier_train_keys:
        return []
    return choose_replay([read_chunks(store, key) for key in earlier_train_keys], own, fraction, seed)


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
        replay_tokens=sum(s.replay_tokens for s in sequences),
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
