"""``InferenceService`` over gRPC: validation, adapter resolution, generation, listing."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from novelcrafter.errors import InvalidArgument, NovelCrafterError, Unavailable
from novelcrafter.logs import get_logger
from novelcrafter.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from . import metrics
from .registry import AdapterRegistry, LoadedAdapter
from .sampling import SamplingParams
from .scheduler import Finished, Generation, Piece, Scheduler

log = get_logger(__name__)

# Request defaults (as documented in inference.proto).
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50
DEFAULT_REPETITION_PENALTY = 1.1


@dataclass(frozen=True)
class Limits:
    max_new_tokens_cap: int = 1024
    max_prompt_tokens: int = 4096
    max_prompt_chars: int = 200_000
    max_stop_sequences: int = 16
    max_stop_chars: int = 200


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request."""

    prompt: str
    book_id: str
    adapter: str
    max_new_tokens: int
    params: SamplingParams
    stop: list[str]
    chat: bool


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return value


def validate_request(request: inference_pb2.GenerateRequest, limits: Limits) -> GenerationSpec:
    """Check every field against its range and the server caps; readable INVALID_ARGUMENT."""
    prompt = request.prompt
    if not prompt.strip():
        raise InvalidArgument("prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    max_new = request.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens_cap)
    if max_new < 0:
        raise InvalidArgument(f"max_new_tokens must be positive, got {request.max_new_tokens}")
    if max_new > limits.max_new_tokens_cap:
        raise InvalidArgument(
            f"max_new_tokens {max_new} exceeds this server's cap of {limits.max_new_tokens_cap}"
        )
    temperature = request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE
    top_p = request.top_p if request.HasField("top_p") else DEFAULT_TOP_P
    top_k = request.top_k if request.HasField("top_k") else DEFAULT_TOP_K
    penalty = (
        request.repetition_penalty if request.HasField("repetition_penalty") else DEFAULT_REPETITION_PENALTY
    )
    _in_range("temperature", temperature, 0.0, 2.0)
    _in_range("top_p", top_p, 0.0, 1.0, low_open=True)
    _in_range("repetition_penalty", penalty, 0.0, 2.0, low_open=True)
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {top_k}")
    stop = list(request.stop)
    if len(stop) > limits.max_stop_sequences:
        raise InvalidArgument(f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    for item in stop:
        if not item or len(item) > limits.max_stop_chars:
            raise InvalidArgument(f"stop sequences must have 1 to {limits.max_stop_chars} characters")
    seed = request.seed if request.HasField("seed") else None
    return GenerationSpec(
        prompt=prompt,
        book_id=request.book_id.strip(),
        adapter=(request.adapter or "latest").strip(),
        max_new_tokens=max_new,
        params=SamplingParams(float(temperature), float(top_p), int(top_k), float(penalty), seed),
        stop=stop,
        chat=request.chat,
    )


class LockedTokenizer:
    """Serializes tokenizer calls: HF fast tokenizers may reconfigure their Rust backend per
    call (truncation/padding), which fails with 'Already borrowed' under concurrent use."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        with self._lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation through the base model's chat template, ready for the assistant's turn."""
        from jinja2 import TemplateError

        with self._lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except TemplateError as exc:  # e.g. a template that insists on alternating roles
                raise InvalidArgument(f"the base model's chat template rejected the messages: {exc}")
            except ValueError as exc:  # no template at all
                raise InvalidArgument(f"the base model cannot chat: {exc}")
            # The template writes the special tokens itself (BOS included): add none.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass
class Runtime:
    """Everything that exists once the base model is loaded."""

    tokenizer: LockedTokenizer
    scheduler: Scheduler
    registry: AdapterRegistry
    context: int  # model context window in tokens
    engine: EngineInfo = field(default_factory=lambda: EngineInfo(name="native"))
    on_close: tuple[Callable[[], None], ...] = ()  # what closing the runtime also closes


@dataclass(frozen=True)
class EngineInfo:
    """The generation backend, as ListAdapters and /health state it."""

    name: str  # native | vllm
    batch_invariant_seeds: bool = True
    note: str = ""
    healthy: Callable[[], bool] = lambda: True  # False while a remote engine is down or recovering

    def to_proto(self) -> inference_pb2.EngineInfo:
        return inference_pb2.EngineInfo(
            name=self.name, batch_invariant_seeds=self.batch_invariant_seeds, note=self.note
        )


def adapter_version(loaded: LoadedAdapter | None, book_id: str) -> common_pb2.AdapterVersion:
    if loaded is None:
        return common_pb2.AdapterVersion(book_id=book_id, version="base")
    return loaded.meta.to_proto()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.runtime: Runtime | None = None  # set once the model is loaded

    def require_runtime(self) -> Runtime:
        if self.runtime is None:
            raise Unavailable("the inference server is still loading the base model; retry shortly")
        return self.runtime

    # --- generation -----------------------------------------------------------------------------

    def _start(
        self, request: inference_pb2.GenerateRequest, labels: dict[str, str], context: grpc.ServicerContext
    ) -> tuple[Any, ...]:
        now = time.monotonic()  # read first, so that our deadline is never later than gRPC's
        remaining = context.time_remaining()
        deadline = None if remaining is None else now + remaining
        spec = validate_request(request, self.limits)
        loaded, gen = self.start(spec, labels, deadline=deadline)
        return spec, loaded, gen

    def start(
        self,
        spec: GenerationSpec,
        labels: dict[str, str],
        messages: list[dict[str, str]] | None = None,
        deadline: float | None = None,
    ) -> tuple[LoadedAdapter | None, Generation]:
        """Take a place in the scheduler, resolve the adapter, tokenize, check the prompt against
        the limits and submit: what every API (gRPC here, HTTP in ``http_api``) does with a
        validated request. The place comes first, so a request the server has no room for is
        refused (RESOURCE_EXHAUSTED) before its adapter is downloaded, loaded or evicts another.
        ``messages`` (a chat conversation) replaces ``spec.prompt`` when given; ``deadline``
        (``time.monotonic()``) ends a wait in the queue. Fills ``labels`` (book, adapter) for
        the request counters as soon as the version is known."""
        rt = self.require_runtime()
        admission = rt.scheduler.admit()  # a place first: refused requests never load an adapter
        try:
            loaded = rt.registry.resolve(spec.book_id, spec.adapter)
            labels["book"] = loaded.book_id if loaded else "base"
            labels["adapter"] = loaded.version if loaded else "base"
            if messages is not None:
                prompt_ids = rt.tokenizer.encode_messages(messages)
            else:
                prompt_ids = rt.tokenizer.encode(spec.prompt, spec.chat)
            limit = min(self.limits.max_prompt_tokens, rt.context - 1)
            if len(prompt_ids) > limit:
                raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens; the limit is {limit}")
            if len(prompt_ids) + spec.max_new_tokens > rt.context:
                raise InvalidArgument(
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({spec.max_new_tokens}) exceeds "
                    f"the model's context of {rt.context} tokens"
                )
            gen = Generation(
                prompt_ids, loaded, spec.params, spec.max_new_tokens, spec.stop, deadline=deadline
            )
            rt.scheduler.submit(gen, admission)
        finally:
            admission.release()  # a no-op once submit used it
        return loaded, gen

    def Generate(self, request: Any, context: grpc.ServicerContext) -> inference_pb2.GenerateResponse:
        labels = {"book": "unknown", "adapter": "unresolved"}
        status = "OK"
        try:
            spec, loaded, gen = self._start(request, labels, context)
            if not context.add_callback(gen.cancel):  # the call already ended: nobody waits
                gen.cancel()
            done = gen.result()
            if done.finish_reason == "cancelled":
                status = "CANCELLED"
            return inference_pb2.GenerateResponse(
                text=done.text,
                adapter=adapter_version(loaded, spec.book_id),
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                finish_reason=done.finish_reason,
            )
        except Exception as exc:
            status = status_of(exc)
            raise
        finally:
            metrics.REQUESTS.labels("Generate", status, labels["book"], labels["adapter"]).inc()

    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        labels = {"book": "unknown", "adapter": "unresolved"}
        status = "OK"
        gen: Generation | None = None
        try:
            spec, loaded, gen = self._start(request, labels, context)
            if not context.add_callback(gen.cancel):  # the call already ended: nobody waits
                gen.cancel()
            version = adapter_version(loaded, spec.book_id)
            first = True
            for event in gen.events():
                if isinstance(event, Piece):
                    message = inference_pb2.GenerateStreamResponse(text=event.text)
                elif isinstance(event, Finished):
                    if event.finish_reason == "cancelled":
                        status = "CANCELLED"
                        return
                    message = inference_pb2.GenerateStreamResponse(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        finish_reason=event.finish_reason,
                    )
                else:  # pragma: no cover
                    continue
                if first:
                    message.adapter.CopyFrom(version)
                    first = False
                yield message
        except GeneratorExit:  # the client went away mid-stream
            status = "CANCELLED"
            raise
        except Exception as exc:
            status = status_of(exc)
            raise
        finally:
            if gen is not None:
                gen.cancel()  # stops generation if the client cancelled; no-op when finished
            metrics.REQUESTS.labels("GenerateStream", status, labels["book"], labels["adapter"]).inc()

    # --- adapters -------------------------------------------------------------------------------

    def _list(self, book_id: str) -> inference_pb2.ListAdaptersResponse:
        rt = self.require_runtime()
        rows = rt.registry.statuses(book_id.strip() or None)
        response = inference_pb2.ListAdaptersResponse(engine=rt.engine.to_proto())
        for row in rows:
            response.adapters.add(
                version=row.meta.to_proto(),
                loaded=row.state == "loaded",
                latest=row.latest,
                loaded_at=row.loaded_at,
                last_used_at=row.last_used_at,
                rank=row.rank,
                state=row.state,
                error=row.error,
            )
        return response

    def ListAdapters(self, request: Any, context: grpc.ServicerContext) -> inference_pb2.ListAdaptersResponse:
        return self._list(request.book_id)

    def ReloadAdapters(
        self, request: Any, context: grpc.ServicerContext
    ) -> inference_pb2.ListAdaptersResponse:
        self.require_runtime().registry.refresh(request.book_id.strip() or None)
        return self._list(request.book_id)


def status_of(exc: BaseException) -> str:
    if isinstance(exc, NovelCrafterError):
        return exc.code.name
    return "INTERNAL"
