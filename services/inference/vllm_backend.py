"""``--engine vllm``: generation runs on a vLLM server; everything else stays ours.

Versions map to vLLM names one to one. The registry validates a version exactly as for the
native engine (checksums, then shapes against the base model's layers), then this backend
writes it to ``adapter_dir`` and loads it with ``/v1/load_lora_adapter`` under a name used for
that one load only (``BOOK:VERSION@INSTANCE``, ``…@INSTANCE.N`` if it is ever loaded again):
never reused, never reloaded in place (vLLM's in-place reload and name reuse are where its
runtime updating breaks). The registry flips ``latest`` only after the loader returned, i.e.
after vLLM accepted the adapter. A version the registry evicts is unloaded once its last
in-flight request ends. A watcher polls vLLM: when it is unreachable or lost our adapters (a
restart), health turns NOT_SERVING until every held version is loaded again.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novelcrafter.errors import DeadlineExceeded, NovelCrafterError, Unavailable
from novelcrafter.logs import get_logger

from .lora import AdapterRejected
from .scheduler import Admission, Finished, Generation, Piece, server_busy
from .vllm_client import StreamDelta, StreamEnd, VllmClient, completion_body

log = get_logger(__name__)

ENGINES = ("native", "vllm")
# What vLLM cannot honour, stated in ListAdapters and /health rather than silently dropped.
VLLM_NOTE = (
    "seeded sampling is reproducible only for the same batch composition: vLLM's kernels are "
    "not batch-invariant, so a seeded request may give other text under concurrent load"
)


@dataclass(eq=False)
class VllmAdapter:
    """A validated version as loaded in vLLM: what the registry's ``LoadedAdapter.weights`` holds."""

    book_id: str
    version: str
    name: str  # the vLLM model name, unique to this load
    path: Path  # where vLLM reads it (must be the same path on vLLM's side)
    rank: int
    target_modules: list[str]
    active: int = 0  # requests using it now
    evicted: bool = False  # the registry dropped it: unload when ``active`` reaches 0
    unloaded: bool = False


class AdapterNames:
    """Name-per-load bookkeeping: ``BOOK:VERSION@INSTANCE`` for a version's first load in this
    process, ``@INSTANCE.N`` for the N-th; the instance token keeps names unique across our
    restarts against a vLLM that kept running."""

    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance or os.urandom(4).hex()
        self._loads: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def next(self, book_id: str, version: str) -> str:
        with self._lock:
            count = self._loads.get((book_id, version), 0) + 1
            self._loads[(book_id, version)] = count
        suffix = "" if count == 1 else f".{count}"
        return f"{book_id}:{version}@{self.instance}{suffix}"

    def ours(self, name: str) -> bool:
        return name.rpartition("@")[2].split(".")[0] == self.instance

    @staticmethod
    def looks_like_ours(name: str) -> bool:
        """A name this backend (any instance) could have made."""
        head, at, _ = name.rpartition("@")
        return bool(at) and ":" in head


class VllmBackend:
    """Adapter loads/unloads on a vLLM server, request pinning, and restart recovery."""

    def __init__(
        self,
        client: VllmClient,
        adapter_dir: Path,
        validate: Callable[[Path, Any], Any],
        *,
        probe_interval: float = 1.0,
        set_serving: Callable[[bool], None] = lambda serving: None,
    ) -> None:
        self.client = client
        self.adapter_dir = Path(adapter_dir)
        self.validate = validate  # the native validation: (dir, meta) -> LoraWeights or AdapterRejected
        self.names = AdapterNames()
        self.probe_interval = probe_interval
        self.set_serving = set_serving
        self.base_name = ""  # vLLM's name for the base model
        self.context = 0  # vLLM's --max-model-len
        self.healthy = False
        self.recoveries = 0
        self._live: dict[str, VllmAdapter] = {}  # name -> loaded in vLLM (as far as we know)
        self._epoch = 0  # bumped by every change to _live: a probe's snapshot must not straddle one
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- start ----------------------------------------------------------------------------------

    def connect(self, wait_seconds: float) -> None:
        """Wait for vLLM to answer (it starts slowly), learn the base model and its context, and
        unload adapters an earlier instance of ours left there."""
        deadline = time.monotonic() + wait_seconds
        logged = False
        while True:
            try:
                models = self.client.models()
                break
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"{exc.message} (waited {wait_seconds:g}s)") from None
                if not logged:
                    log.info("waiting for the vLLM server", extra={"fields": {"url": self.client.url}})
                    logged = True
                time.sleep(min(1.0, self.probe_interval))
        bases = [m for m in models if not m.get("parent")]
        if not bases:
            raise Unavailable(f"the vLLM server at {self.client.url} serves no base model")
        self.base_name = str(bases[0]["id"])
        self.context = int(bases[0].get("max_model_len") or 0)
        for model in models:
            name = str(model["id"])
            if model.get("parent") and AdapterNames.looks_like_ours(name):
                self.client.unload_lora(name)  # stale: from an earlier process of ours
        self.healthy = True
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale_dirs()

    def _clear_stale_dirs(self) -> None:
        """Remove the versions an earlier process of ours wrote (only folders named as ours)."""
        for child in self.adapter_dir.iterdir():
            name = child.name.replace("--", ":", 1)
            if child.is_dir() and AdapterNames.looks_like_ours(name) and not self.names.ours(name):
                shutil.rmtree(child, ignore_errors=True)

    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="vllm-watcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # --- adapters (the registry's loader and drop hook) ----------------------------------------

    def load(self, path: Path, meta: Any) -> VllmAdapter:
        """Validate (as the native engine does), copy where vLLM reads it, load it in vLLM."""
        weights = self.validate(path, meta)
        name = self.names.next(meta.book_id, meta.version)
        handle = VllmAdapter(
            meta.book_id, meta.version, name, self._dir_for(name), weights.rank, list(weights.target_modules)
        )
        del weights  # only the shapes were needed: vLLM holds the tensors
        shutil.copytree(path, handle.path)
        try:
            self.client.load_lora(name, str(handle.path))
            with self._lock:
                self._live[name] = handle
                self._epoch += 1
        except BaseException:
            shutil.rmtree(handle.path, ignore_errors=True)
            raise
        log.info("adapter loaded in vLLM", extra={"fields": {"name": name, "rank": handle.rank}})
        return handle

    def _dir_for(self, name: str) -> Path:
        return self.adapter_dir / name.replace(":", "--", 1)

    def dropped(self, loaded: Any) -> None:
        """The registry evicted ``loaded``: unload it now or when its last request ends."""
        handle = loaded.weights
        if not isinstance(handle, VllmAdapter):
            return
        with self._lock:
            handle.evicted = True
            idle = handle.active == 0
        if idle:
            self._unload(handle)

    def acquire(self, handle: VllmAdapter | None) -> None:
        if handle is None:
            return
        with self._lock:
            if handle.unloaded:  # evicted and unloaded between resolve and submit: load it again
                # (still evicted: unloaded again when this request ends)
                self._reload(handle, self.names.next(handle.book_id, handle.version))
            handle.active += 1

    def release(self, handle: VllmAdapter | None) -> None:
        if handle is None:
            return
        with self._lock:
            handle.active -= 1
            idle = handle.evicted and handle.active == 0
        if idle:
            self._unload(handle)

    def _reload(self, handle: VllmAdapter, name: str) -> None:
        """Under the lock: load ``handle``'s files again (after a vLLM restart, or on demand)."""
        if name != handle.name:  # a new name gets its own folder: vLLM may cache by path
            new_path = self._dir_for(name)
            shutil.copytree(handle.path, new_path)
            handle.path = new_path
        self.client.load_lora(name, str(handle.path))
        self._live.pop(handle.name, None)
        handle.name, handle.unloaded = name, False
        self._live[name] = handle
        self._epoch += 1

    def _unload(self, handle: VllmAdapter) -> None:
        with self._lock:
            if handle.unloaded or handle.active:
                return
            handle.unloaded = True
            self._live.pop(handle.name, None)
            self._epoch += 1
        try:
            self.client.unload_lora(handle.name)
            log.info("adapter unloaded from vLLM", extra={"fields": {"name": handle.name}})
        except Unavailable as exc:  # vLLM is down: it lost the adapter anyway
            log.warning("adapter unload failed", extra={"fields": {"name": handle.name, "error": str(exc)}})
        # The files stay until the next start: a request that re-acquires it copies from them.

    def live_names(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    # --- restart recovery -----------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.probe_interval):
            try:
                self.check()
            except Exception as exc:  # the watcher must outlive any vLLM outage
                log.warning("vLLM check failed", extra={"fields": {"error": str(exc)}})

    def check(self) -> bool:
        """Probe vLLM once; reload whatever it lost; health follows. True when healthy."""
        try:
            with self._lock:
                epoch = self._epoch
            present = {str(m["id"]) for m in self.client.models()}
            with self._lock:
                if epoch != self._epoch:  # a load or unload raced with the snapshot: ask again
                    return self.healthy
                missing = [h for name, h in self._live.items() if name not in present]
                if missing:
                    self._mark(False, f"vLLM lost {len(missing)} adapter(s): restarted; reloading")
                    for handle in missing:
                        self._reload(handle, handle.name)  # same files, same name: vLLM forgot it
                    self.recoveries += 1
                    log.info("vLLM recovered", extra={"fields": {"reloaded": len(missing)}})
        except (Unavailable, AdapterRejected) as exc:
            self._mark(False, str(exc))
            return False
        self._mark(True, "")
        return True

    def _mark(self, healthy: bool, why: str) -> None:
        if healthy != self.healthy:
            level = log.info if healthy else log.warning
            level("vLLM backend " + ("serving" if healthy else "not serving"), extra={"fields": {"why": why}})
        self.healthy = healthy
        self.set_serving(healthy)


class VllmScheduler:
    """The native scheduler's contract (slots, FIFO queue, deadlines, cancellation, events),
    with each admitted request streamed from vLLM on its own thread; vLLM does the batching."""

    def __init__(
        self,
        backend: VllmBackend,
        end_ids: set[int],
        *,
        max_concurrency: int,
        max_queued: int = 0,
        on_finish: Callable[[Generation, Finished], None] | None = None,
        on_slot: Callable[[float], None] | None = None,
    ) -> None:
        self.backend = backend
        self.end_ids = end_ids
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.on_finish = on_finish
        self.on_slot = on_slot
        self._waiting: deque[Generation] = deque()
        self._in_flight = 0
        self._admitted = 0  # places held by requests being prepared, not yet submitted
        self._workers: set[threading.Thread] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vllm-dispatch", daemon=True)
        self._thread.start()

    def admit(self) -> Admission:
        """Hold a place (a slot, else a queue place) for a request about to be prepared, as the
        native scheduler does: a request refused for want of room never loads its adapter."""
        with self._cond:
            self._check_room()
            self._admitted += 1
        return Admission(self)

    def submit(self, gen: Generation, admission: Admission | None = None) -> Generation:
        """Pin the adapter in vLLM (an evicted one stays loaded while a request holds it), then
        take a free slot or a place in the queue (the one ``admission`` holds, if given);
        RESOURCE_EXHAUSTED when both are full."""
        if not self.backend.healthy:
            raise Unavailable("the vLLM server is unavailable or reloading adapters; retry shortly")
        handle = _handle(gen)
        self.backend.acquire(handle)
        try:
            self._enqueue(gen, admission)
        except BaseException:
            self.backend.release(handle)
            raise
        return gen

    def _check_room(self) -> None:
        if self._stopping:
            raise Unavailable("the inference server is shutting down")
        if self._in_flight + len(self._waiting) + self._admitted >= self.max_concurrency + self.max_queued:
            raise server_busy(self.max_concurrency, self.max_queued)

    def _release(self, admission: Admission) -> None:
        with self._cond:
            if admission.held:
                admission.held = False
                self._admitted -= 1

    def _enqueue(self, gen: Generation, admission: Admission | None) -> None:
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
            gen.submitted = time.monotonic()
            if self._in_flight < self.max_concurrency and not self._waiting:
                self._admit(gen)
            else:  # a place is ours: a slot freed meanwhile goes to the head of the queue
                self._waiting.append(gen)
            self._cond.notify()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- dispatch -------------------------------------------------------------------------------

    def _admit(self, gen: Generation) -> None:
        """Under the lock: give ``gen`` a slot and start streaming it."""
        self._in_flight += 1
        gen.admitted = time.monotonic()
        if self.on_slot is not None:
            self.on_slot(gen.admitted - gen.submitted)
        worker = threading.Thread(target=self._run, args=(gen,), name="vllm-request", daemon=True)
        self._workers.add(worker)
        worker.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                # Wake at least every 50 ms while requests wait: their deadlines and cancels.
                self._cond.wait(0.05 if self._waiting else None)
                now = time.monotonic()
                kept: deque[Generation] = deque()
                left: list[tuple[Generation, Finished | BaseException]] = []
                for gen in self._waiting:
                    if gen.deadline is not None and now >= gen.deadline:
                        waited = now - gen.submitted
                        error = DeadlineExceeded(
                            f"the deadline passed after {waited:.1f}s waiting for one of "
                            f"the {self.max_concurrency} generation slots"
                        )
                        left.append((gen, error))
                    elif gen.cancelled:
                        left.append((gen, _result(gen, "cancelled", 0, "", None)))
                    else:
                        kept.append(gen)
                self._waiting = kept
                while self._waiting and self._in_flight < self.max_concurrency:
                    self._admit(self._waiting.popleft())
                stop = self._stopping and not self._waiting and not self._in_flight
            for gen, outcome in left:  # they held no slot, only their adapter pin
                self.backend.release(_handle(gen))
                gen.adapter = None
                gen._events.put(outcome)
            if stop:
                return

    def _run(self, gen: Generation) -> None:
        handle = _handle(gen)
        outcome: Finished | BaseException
        try:
            outcome = self._stream(gen, handle)
        except NovelCrafterError as exc:
            outcome = _result(gen, "cancelled", 0, "", None) if gen.cancelled else exc
        except Exception as exc:
            outcome = _result(gen, "cancelled", 0, "", None) if gen.cancelled else Unavailable(str(exc))
        self._done(gen, outcome, handle)

    def _stream(self, gen: Generation, handle: VllmAdapter | None) -> Finished:
        model = handle.name if handle is not None else self.backend.base_name
        body = completion_body(model, gen.prompt_ids, gen.params, gen.max_new_tokens, gen.stop, self.end_ids)
        text: list[str] = []
        first: float | None = None
        for event in self.backend.client.stream(body, lambda: gen.cancelled):
            if isinstance(event, StreamDelta):
                if first is None:
                    first = time.monotonic() - gen.submitted
                text.append(event.text)
                gen._events.put(Piece(event.text))
            elif isinstance(event, StreamEnd):
                return _result(gen, event.finish_reason, event.completion_tokens, "".join(text), first)
        return _result(gen, "cancelled", 0, "".join(text), first)

    def _done(self, gen: Generation, outcome: Finished | BaseException, handle: VllmAdapter | None) -> None:
        if handle is not None:
            self.backend.release(handle)
        if isinstance(outcome, Finished) and outcome.finish_reason != "cancelled" and self.on_finish:
            try:
                self.on_finish(gen, outcome)
            except Exception:
                log.exception("on_finish hook failed")
        gen.adapter = None  # unpin: gRPC may keep the call around for a while
        gen._events.put(outcome)
        with self._cond:
            self._in_flight -= 1
            self._workers.discard(threading.current_thread())
            self._cond.notify()


def _handle(gen: Generation) -> VllmAdapter | None:
    return gen.adapter.weights if gen.adapter is not None else None


def _result(gen: Generation, reason: str, completion: int, text: str, first: float | None) -> Finished:
    seed = gen.params.seed if gen.params.seed is not None else 0  # unseeded: vLLM draws its own
    return Finished(
        finish_reason=reason,
        prompt_tokens=len(gen.prompt_ids),
        completion_tokens=completion,
        text=text,
        seed=seed,
        first_token_seconds=first,
        total_seconds=time.monotonic() - gen.submitted,
    )


@dataclass
class BackendInfo:
    """The serving backend as ListAdapters and /health report it."""

    engine: str = "native"
    batch_invariant_seeds: bool = True
    note: str = ""
    url: str = ""
    healthy: Callable[[], bool] = field(default=lambda: True)
