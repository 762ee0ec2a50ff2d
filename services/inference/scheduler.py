"""Continuous batching: one thread owns the model and steps every active generation together.

Requests are admitted between steps (each prompt is prefilled alone, then joins the batch) and
leave the batch as soon as they finish or are cancelled. At most ``max_concurrency`` hold a
generation slot; a request beyond them waits in a bounded FIFO queue (``max_queued``) until a
slot frees, its deadline passes (DEADLINE_EXCEEDED) or it is cancelled, and only a request
that finds the queue full is refused (RESOURCE_EXHAUSTED). A queued request holds nothing but
its place: no KV cache, no slot. A request takes its place with :meth:`Scheduler.admit` before it
is prepared (its adapter resolved, maybe downloaded and loaded; its prompt tokenized), so a
request the server has no room for is refused before it costs anything.
Each request holds a strong reference to the adapter version it resolved, so a version
swapped out or evicted meanwhile stays alive exactly until its last request finishes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from novelcrafter.errors import DeadlineExceeded, NovelCrafterError, ResourceExhausted, Unavailable
from novelcrafter.logs import get_logger

from .cpu_kernels import Shortlist
from .engine import Engine, KVCache
from .lora import LoraWeights
from .sampling import SamplingParams, TextAssembler, make_generator, next_token, shortlist

log = get_logger(__name__)


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish_reason: str  # length | stop | eos | cancelled
    prompt_tokens: int
    completion_tokens: int
    text: str
    seed: int
    first_token_seconds: float | None
    total_seconds: float


@dataclass(eq=False)
class Generation:
    """One request in the scheduler; iterate it for :class:`Piece` events then one :class:`Finished`."""

    prompt_ids: list[int]
    adapter: Any  # the pinned version object (weights at .weights), or None for the base model
    params: SamplingParams
    max_new_tokens: int
    stop: list[str]
    submitted: float = field(default_factory=time.monotonic)
    # time.monotonic() after which the caller no longer wants an answer (its gRPC deadline):
    # a request still queued then leaves the queue with DEADLINE_EXCEEDED.
    deadline: float | None = None
    admitted: float | None = None  # when it got a generation slot
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self) -> Iterator[Piece | Finished]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    def result(self) -> Finished:
        for event in self.events():
            if isinstance(event, Finished):
                return event
        raise RuntimeError("generation ended without a result")  # pragma: no cover


@dataclass(eq=False)
class _Active:
    gen: Generation
    cache: KVCache
    weights: LoraWeights | None
    rng: torch.Generator
    seed: int
    text: TextAssembler
    seen: torch.Tensor  # int64: the prompt and every token sampled so far, then free room
    last: int = 0
    generated: int = 0
    first_token_at: float | None = None


def server_busy(max_concurrency: int, max_queued: int) -> ResourceExhausted:
    """The refusal of a request that finds every slot and every queue place taken."""
    places = f"the queue is full ({max_queued} waiting, " if max_queued else "queueing is off ("
    return ResourceExhausted(
        f"server busy: all {max_concurrency} generation slots are taken and {places}"
        f"NOVELCRAFTER_MAX_QUEUED={max_queued}); retry shortly"
    )


class Admission:
    """A place held for a request that is being prepared: it counts as taken (a slot, or a place
    in the queue) until :meth:`Scheduler.submit` uses it or :meth:`release` gives it back."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.held = True  # guarded by the scheduler's lock

    def release(self) -> None:
        """Give the place back (the request ended before it was submitted); a no-op once used."""
        self._scheduler._release(self)


class Scheduler:
    """Owns the engine; all model calls happen on its thread."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        max_concurrency: int,
        max_queued: int = 0,
        on_finish: Callable[[Generation, Finished], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        on_slot: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.on_finish = on_finish
        self.on_step = on_step
        self.on_slot = on_slot  # called with the seconds each request waited for its slot
        self._waiting: deque[Generation] = deque()  # arrival order; no slot yet
        self._pending: list[Generation] = []  # hold a slot, not yet prefilled
        self._active: list[_Active] = []
        self._in_flight = 0
        self._admitted = 0  # places held by requests being prepared, not yet submitted
        self._cond = threading.Condition()
        self._stopping = False
        self.max_batch_seen = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="inference-scheduler", daemon=True)
        self._thread.start()

    # --- API ------------------------------------------------------------------------------------

    def admit(self) -> Admission:
        """Hold a place (a free slot, else a place in the queue) for a request about to be
        prepared; RESOURCE_EXHAUSTED when every slot and queue place is taken or held."""
        with self._cond:
            self._check_room()
            self._admitted += 1
        return Admission(self)

    def submit(self, gen: Generation, admission: Admission | None = None) -> Generation:
        """Give ``gen`` a free slot, or queue it behind the requests already waiting (FIFO), in
        the place ``admission`` holds for it (taken now if none); RESOURCE_EXHAUSTED only
        without an admission, when every place is taken."""
        with self._cond:
            if admission is None:
                self._check_room()
            else:
                if not admission.held:
                    raise RuntimeError("this admission was already used or released")
                admission.held = False
                self._admitted -= 1
                if self._stopping:
                    raise Unavailable("the inference server is shutting down")
            gen.submitted = time.monotonic()  # accepted now: queue wait and latencies count from here
            if self._in_flight < self.max_concurrency and not self._waiting:
                self._grant_slot(gen, gen.submitted)  # a wait of exactly 0
            else:  # a place is ours: a slot freed meanwhile goes to the head of the queue
                self._waiting.append(gen)
            self._cond.notify()
        return gen

    def _check_room(self) -> None:
        """Under the lock: Unavailable when stopping, RESOURCE_EXHAUSTED when every slot and
        queue place is taken, by a generation or by an admitted request being prepared."""
        if self._stopping:
            raise Unavailable("the inference server is shutting down")
        taken = self._in_flight + len(self._waiting) + self._admitted
        if taken >= self.max_concurrency + self.max_queued:
            raise server_busy(self.max_concurrency, self.max_queued)

    def _release(self, admission: Admission) -> None:
        with self._cond:
            if admission.held:
                admission.held = False
                self._admitted -= 1

    @property
    def in_flight(self) -> int:
        """Generations holding a slot (prefilling or decoding)."""
        with self._cond:
            return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, let running generations finish (up to ``timeout``), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._pending or self._active or self._waiting or self._stopping):
                    self._cond.wait()
                # Between steps: queued requests that were cancelled or ran out of time leave
                # the queue, then freed slots go to the oldest waiting ones. While anything
                # waits, every slot is taken, so this loop keeps stepping and keeps checking.
                left = self._drop_from_queue(time.monotonic())
                while self._waiting and self._in_flight < self.max_concurrency:
                    self._grant_slot(self._waiting.popleft(), time.monotonic())
                if self._stopping and not (self._pending or self._active or self._waiting or left):
                    return
                admitted, self._pending = self._pending, []
            for gen, outcome in left:
                self._deliver(gen, outcome, observe=False)  # never ran: nothing to observe
            for gen in admitted:
                self._admit(gen)
            if self._active:
                self._step()

    def _grant_slot(self, gen: Generation, now: float) -> None:
        """Under the lock: ``gen`` holds a slot from now on, until :meth:`_finish`."""
        gen.admitted = now
        self._in_flight += 1
        self._pending.append(gen)
        if self.on_slot is not None:
            self.on_slot(gen.admitted - gen.submitted)

    def _drop_from_queue(self, now: float) -> list[tuple[Generation, Finished | BaseException]]:
        """Under the lock: take the cancelled and the expired requests out of the queue."""
        if not self._waiting:
            return []
        left: list[tuple[Generation, Finished | BaseException]] = []
        kept: deque[Generation] = deque()
        for gen in self._waiting:
            # The deadline first: gRPC also cancels a call when its deadline passes.
            if gen.deadline is not None and now >= gen.deadline:
                waited = now - gen.submitted
                left.append(
                    (
                        gen,
                        DeadlineExceeded(
                            f"the deadline passed after {waited:.1f}s waiting for one of the "
                            f"{self.max_concurrency} generation slots"
                        ),
                    )
                )
            elif gen.cancelled:
                left.append((gen, _cancelled_result(gen)))
            else:
                kept.append(gen)
        self._waiting = kept
        return left

    def _finish(self, active: _Active | None, gen: Generation, outcome: Finished | BaseException) -> None:
        """``gen`` is done and gives its slot back."""
        if active is not None:
            active.cache = None  # type: ignore[assignment]  # free the KV cache now
            active.weights = None
        with self._cond:
            self._in_flight -= 1
        self._deliver(gen, outcome)

    def _deliver(self, gen: Generation, outcome: Finished | BaseException, *, observe: bool = True) -> None:
        if observe and isinstance(outcome, Finished) and self.on_finish is not None:
            try:
                self.on_finish(gen, outcome)
            except Exception:
                log.exception("on_finish hook failed")
        gen.adapter = None  # unpin: gRPC may keep the call (and its callbacks) around for a while
        gen._events.put(outcome)

    def _result(self, active: _Active, reason: str) -> Finished:
        now = time.monotonic()
        return Finished(
            finish_reason=reason,
            prompt_tokens=len(active.gen.prompt_ids),
            completion_tokens=active.generated,
            text=active.text.text,
            seed=active.seed,
            first_token_seconds=(active.first_token_at - active.gen.submitted)
            if active.first_token_at
            else None,
            total_seconds=now - active.gen.submitted,
        )

    def _admit(self, gen: Generation) -> None:
        if gen.cancelled:
            self._finish(None, gen, _cancelled_result(gen))
            return
        try:
            weights = gen.adapter.weights if gen.adapter is not None else None
            rng, seed = make_generator(gen.params.seed)
            cache = self.engine.new_cache(len(gen.prompt_ids) + gen.max_new_tokens)
            seen = torch.empty(len(gen.prompt_ids) + gen.max_new_tokens, dtype=torch.int64)
            seen[: len(gen.prompt_ids)] = torch.tensor(gen.prompt_ids, dtype=torch.int64)
            active = _Active(gen, cache, weights, rng, seed, TextAssembler(self.tokenizer, gen.stop), seen)
            logits = self.engine.prefill(gen.prompt_ids, cache, weights, self._shortlist(active))
        except Exception as exc:
            log.exception("prefill failed")
            self._finish(None, gen, _as_error(exc))
            return
        self._active.append(active)
        self._advance(active, logits)

    def _step(self) -> None:
        batch = [a for a in self._active if not self._drop_if_done(a)]
        self._active = batch
        if not batch:
            return
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        self.steps += 1
        if self.on_step is not None:
            self.on_step(len(batch))
        try:
            logits = self.engine.decode(
                [a.last for a in batch],
                [a.cache for a in batch],
                [a.weights for a in batch],
                [self._shortlist(a) for a in batch],
            )
        except Exception as exc:
            log.exception("decode step failed", extra={"fields": {"batch": len(batch)}})
            for active in batch:
                self._finish(active, active.gen, _as_error(exc))
            self._active = []
            return
        for row, active in enumerate(batch):
            self._advance(active, logits[row])
        self._active = [a for a in self._active if a.cache is not None]

    @staticmethod
    def _seen(active: _Active) -> torch.Tensor:
        return active.seen[: len(active.gen.prompt_ids) + active.generated]

    def _shortlist(self, active: _Active) -> Shortlist | None:
        return shortlist(active.gen.params, self._seen(active))

    def _drop_if_done(self, active: _Active) -> bool:
        if active.cache is None:
            return True
        if active.gen.cancelled:
            self._finish(active, active.gen, self._result(active, "cancelled"))
            return True
        return False

    def _advance(self, active: _Active, logits: torch.Tensor) -> None:
        """Sample one token for ``active`` from its logits row; emit text; finish if done."""
        gen = active.gen
        try:
            token = next_token(logits, gen.params, active.rng, self._seen(active), self.engine.rowgemm)
        except Exception as exc:
            log.exception("sampling failed")
            self._finish(active, gen, _as_error(exc))
            return
        if active.first_token_at is None:
            active.first_token_at = time.monotonic()
        active.generated += 1
        if token in self.eos_ids:
            self._emit(active, active.text.finish())
            self._finish(active, gen, self._result(active, "eos"))
            return
        active.seen[len(gen.prompt_ids) + active.generated - 1] = token
        active.last = token
        self._emit(active, active.text.add(token))
        if active.text.stopped:
            self._finish(active, gen, self._result(active, "stop"))
        elif active.generated >= gen.max_new_tokens:
            self._emit(active, active.text.finish())
            self._finish(active, gen, self._result(active, "length"))

    @staticmethod
    def _emit(active: _Active, piece: str) -> None:
        if piece:
            active.gen._events.put(Piece(piece))


def _cancelled_result(gen: Generation) -> Finished:
    return Finished("cancelled", len(gen.prompt_ids), 0, "", 0, None, time.monotonic() - gen.submitted)


def _as_error(exc: BaseException) -> BaseException:
    return exc if isinstance(exc, NovelCrafterError) else RuntimeError(f"generation failed: {exc}")
