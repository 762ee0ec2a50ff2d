"""The OpenAI-compatible HTTP API of the inference service, beside gRPC in the same process.

Starlette (routing, requests, streaming responses) served by uvicorn on its own thread and
event loop. It is a second front door, not a second engine: every generation goes through
:meth:`InferenceServicer.start` — the same validation, caps and messages, adapter registry
and scheduler as gRPC — so a seeded request gives the same text over either API. The
blocking parts (adapter resolution, waiting for tokens) run on worker threads; a client that
goes away cancels its generation, which frees its slot (or its place in the queue) at the
scheduler's next step.

Bounded under abuse: a body over ``NOVELCRAFTER_HTTP_MAX_BODY_MB`` is 413 (an announced one before
any byte is read); JSON is parsed with its nesting depth and number of values capped, large
bodies on a worker thread, a few at a time; unknown fields are dropped, lists capped.

Model ids: ``base``; ``<book_id>`` (its ``latest``); ``<book_id>:part-N``; ``<book_id>:<version>``.
Every response's ``model`` (and ``system_fingerprint``) is the exact version that produced it,
``<book_id>:<version>`` or ``base``; the extra ``adapter`` object carries its details.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from novelcrafter import layout
from novelcrafter.config import InferenceSettings, Settings
from novelcrafter.errors import (
    InvalidArgument,
    NotFound,
    NovelCrafterError,
    ResourceExhausted,
    Unauthenticated,
)
from novelcrafter.exposure import UNAUTHORIZED, BearerCheck, bind_tcp
from novelcrafter.logs import get_logger

from . import metrics
from .client import build_request
from .registry import BASE, LATEST, LoadedAdapter
from .scheduler import Finished, Generation, Piece
from .service import GenerationSpec, InferenceServicer, Limits, status_of, validate_request

log = get_logger(__name__)

OFF = ("off", "none", "")
OWNER = "novelcrafter"
ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions")
_FINISH = {"length": "length", "stop": "stop", "eos": "stop"}  # ours -> OpenAI's finish_reason
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# Request bodies. Prompts are capped at 4,096 tokens and 200,000 characters, so the default limit
# (2 MB) is ample for any request we would serve.
DEFAULT_MAX_BODY_MB: float = InferenceSettings.model_fields["http_max_body_mb"].default
MAX_JSON_DEPTH = 64  # ours nest 4 deep; the stdlib parser recurses once per level
# Commas and opening brackets, about the number of values: the parser builds a Python object of
# ~50-100 bytes for each, so 2 MB of `[{},{},…]` would cost ~40× its size. A conversation of
# MAX_LIST_ITEMS messages needs ~5 per message.
MAX_JSON_VALUES = 50_000
MAX_LIST_ITEMS = 4096  # messages, and content parts of a message: more than 4,096 tokens can hold
INLINE_PARSE_BYTES = 64 * 1024  # smaller bodies are parsed on the event loop (well under a ms)
PARSERS = 2  # large bodies parsed at once, on worker threads: bounds their transient memory
_CONTENT_LENGTH = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit() accepts "²")
# A JSON string, or an unterminated one up to the end: it always matches from a quote, so a scan
# for them stays linear whatever the input.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


# --- errors: the one mapping from domain errors to HTTP ------------------------------------------


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str


# Keyed by the gRPC status each domain error carries (novelcrafter.errors), so gRPC and HTTP can
# never disagree about what an error is. Statuses follow Google's gRPC-to-HTTP mapping; types and
# codes are OpenAI's where OpenAI has one (invalid_api_key, model_not_found).
ERRORS: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", "invalid_request"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error", "adapter_rejected"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.ABORTED: HttpError(409, "invalid_request_error", "aborted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "server_busy"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "server_error", "timeout"),
}
INTERNAL = HttpError(500, "server_error", "internal_error")
TOO_LARGE = HttpError(413, "invalid_request_error", "request_too_large")


class BadParameter(InvalidArgument):
    """A request field this API refuses; ``param`` names it in the error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLarge(ResourceExhausted):
    """A request body over the HTTP API's limit: 413, not the 429 of a busy server."""

    http = TOO_LARGE


def error_body(message: str, kind: HttpError, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def describe_error(exc: BaseException, route: str) -> tuple[HttpError, dict[str, Any]]:
    """The status and OpenAI error body for ``exc``; unexpected errors are logged with an incident id."""
    if isinstance(exc, NovelCrafterError):
        kind = getattr(exc, "http", None) or ERRORS.get(exc.code, INTERNAL)
        log.info(
            "http error", extra={"fields": {"route": route, "status": kind.status, "error": exc.message}}
        )
        return kind, error_body(exc.message, kind, getattr(exc, "param", None))
    incident = uuid.uuid4().hex[:8]
    log.error(
        "unhandled error in http request",
        exc_info=exc,
        extra={"fields": {"route": route, "incident": incident}},
    )
    return INTERNAL, error_body(f"internal error (incident {incident}; see the server log)", INTERNAL)


def error_response(exc: BaseException, route: str) -> JSONResponse:
    kind, body = describe_error(exc, route)
    # 429 and 503 are worth retrying: OpenAI clients honour Retry-After.
    headers = {"retry-after": "1"} if kind.status in (429, 503) else None
    if kind.status == 413:  # the rest of the body is not read: end the connection, not drain it
        headers = {"connection": "close"}
    return JSONResponse(body, kind.status, headers=headers)


# --- requests ------------------------------------------------------------------------------------


class _Params(BaseModel):
    """Fields shared by completions and chat. Unknown fields are dropped (clients send many):
    ignored, not kept, so junk under an unknown key costs nothing after parsing."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names): sampling knobs of the gRPC API that OpenAI's API lacks.
    top_k: int | None = None
    repetition_penalty: float | None = None


class CompletionRequest(_Params):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | Annotated[list[_ContentPart], Field(max_length=MAX_LIST_ITEMS)] | None = None


class ChatRequest(_Params):
    messages: Annotated[list[_Message], Field(max_length=MAX_LIST_ITEMS)]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def parse_model(model: str) -> tuple[str, str]:
    """(book_id, adapter selector) of a model id; NotFound for anything that is not one."""
    name = model.strip()
    if name == BASE:
        return "", BASE
    book, sep, selector = name.partition(":")
    selector_ok = (
        not sep
        or selector == LATEST
        or layout.PART_ALIAS_RE.match(selector)
        or layout.VERSION_RE.match(selector)
    )
    if not layout.BOOK_ID_RE.match(book) or not selector_ok:
        raise NotFound(
            f"model {name[:100]!r} does not exist: use 'base', '<book_id>', '<book_id>:part-N' or "
            "'<book_id>:<version>' (GET /v1/models lists them)"
        )
    return book, selector or LATEST


def model_id(loaded: LoadedAdapter | None) -> str:
    """The exact model id of a resolved version."""
    return BASE if loaded is None else f"{loaded.book_id}:{loaded.version}"


def adapter_info(loaded: LoadedAdapter | None) -> dict[str, Any]:
    """The version as gRPC's AdapterVersion names it (``version: base`` for the base model)."""
    if loaded is None:
        return {"book_id": "", "version": BASE}
    meta = loaded.meta
    return {
        "book_id": meta.book_id,
        "version": meta.version,
        "job_id": meta.job_id,
        "part": meta.part,
        "key": meta.prefix,
        "published_at": meta.published_at,
    }


def _refuse_unsupported(req: _Params) -> None:
    """400 for features we do not implement, rather than silently ignoring them. Values that
    mean "off" (n=1, penalties 0, ...) pass, since many clients send them by default."""
    if req.n not in (None, 1):
        raise BadParameter("n must be 1: this server returns one choice per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise BadParameter(f"{name} is not supported; use repetition_penalty (an extension)", name)
    if req.logprobs not in (None, False, 0):
        raise BadParameter("logprobs are not supported", "logprobs")
    if req.logit_bias:
        raise BadParameter("logit_bias is not supported", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise BadParameter("echo is not supported", "echo")
        if req.suffix:
            raise BadParameter("suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise BadParameter("best_of must be 1", "best_of")
    if isinstance(req, ChatRequest):
        if req.tools or req.functions or req.tool_choice not in (None, "none"):
            raise BadParameter("tools and functions are not supported", "tools")
        if req.top_logprobs:
            raise BadParameter("logprobs are not supported", "top_logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise BadParameter("only response_format type 'text' is supported", "response_format")


def _prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise BadParameter("prompt must be one string: this server returns one choice per request", "prompt")
    return req.prompt[0]


def _messages(req: ChatRequest) -> list[dict[str, str]]:
    """The conversation for the chat template: system/user/assistant turns of text."""
    if not req.messages:
        raise BadParameter("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise BadParameter(
                f"messages[{i}].role {message.role!r} is not supported: use system, user or assistant",
                "messages",
            )
        content = message.content
        if content is None:
            raise BadParameter(f"messages[{i}].content is required", "messages")
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise BadParameter(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(part.text or "" for part in content)
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise BadParameter("the messages hold no text", "messages")
    return out


def _proto(req: _Params, book: str, adapter: str, prompt: str, chat: bool, max_tokens: int | None) -> Any:
    """The gRPC request this HTTP request means: from here on, both APIs share every rule."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return build_request(
            prompt,
            book_id=book,
            adapter=adapter,
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=stop,
            chat=chat,
        )
    except (ValueError, TypeError) as exc:  # e.g. an integer beyond the field's 32/64 bits
        raise BadParameter(f"a parameter is out of range: {exc}")


def read_json(body: bytes | bytearray) -> Any:
    """The JSON document in ``body`` (UTF-8). Its nesting depth and number of values are checked
    first, by a scan that costs about a pass over the text: the stdlib parser would recurse once
    per level (RecursionError) and build an object per value before anything could refuse it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter("the request body is not valid JSON: it is not UTF-8")
    skeleton = _JSON_STRING.sub("", text)  # strings cannot nest: what is left is the structure
    opening, closing = skeleton.count("[") + skeleton.count("{"), skeleton.count("]") + skeleton.count("}")
    if max(opening + skeleton.count(","), closing) > MAX_JSON_VALUES:
        raise BadParameter(f"the request body holds more than {MAX_JSON_VALUES} JSON values")
    depth = 0
    for bracket in _BRACKETS.findall(skeleton):  # at most 2 × MAX_JSON_VALUES of them
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise BadParameter(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    del skeleton
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadParameter(f"the request body is not valid JSON: {exc}")


def _field_error(exc: ValidationError) -> BadParameter:
    """One readable 400 for a pydantic error; a list too long wins over the other branches of a union."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "too_long"), errors[0])
    where = ".".join(str(p) for p in first["loc"] if p not in ("str", "list[_ContentPart]"))
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "too_long":
        return BadParameter(f"{where}: at most {first['ctx']['max_length']} items are accepted", param)
    return BadParameter(f"{where}: {first['msg']}", param)


@dataclass(frozen=True)
class Prepared:
    """A request body, validated: all that outlives its JSON (whose size is the client's choice)."""

    spec: GenerationSpec
    messages: list[dict[str, str]] | None
    stream: bool
    include_usage: bool


def prepare(body: bytes | bytearray, chat: bool, limits: Limits) -> Prepared:
    """Parse and validate a completions (or chat) request body, up to what needs the runtime
    (the adapter, the tokens): the same checks, caps and messages as gRPC."""
    document = read_json(body)
    if not isinstance(document, dict):
        raise BadParameter("the request body must be a JSON object")
    try:
        kind: type[_Params] = ChatRequest if chat else CompletionRequest
        req = kind.model_validate(document)
    except ValidationError as exc:
        raise _field_error(exc)
    del document  # unknown fields (dropped by the model) are freed here
    book, adapter = parse_model(req.model)
    _refuse_unsupported(req)
    messages = None
    if isinstance(req, ChatRequest):
        messages = _messages(req)
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        prompt = "\n".join(m["content"] for m in messages)  # what the prompt caps measure
    else:
        max_tokens, prompt = req.max_tokens, _prompt(req)
    spec = validate_request(_proto(req, book, adapter, prompt, chat, max_tokens), limits)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return Prepared(spec, messages, req.stream, include_usage)


# --- one generation ------------------------------------------------------------------------------


@dataclass
class _Job:
    """A submitted generation and what its response chunks repeat."""

    gen: Generation
    loaded: LoadedAdapter | None
    chat: bool
    stream: bool
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, object_name: str) -> dict[str, Any]:
        name = model_id(self.loaded)
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": name,
            "system_fingerprint": name,
        }

    @staticmethod
    def _usage(done: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    def response(self, done: Finished) -> dict[str, Any]:
        finish = _FINISH.get(done.finish_reason, done.finish_reason)
        if self.chat:
            body = self._envelope("chat.completion")
            message = {"role": "assistant", "content": done.text}
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": done.text, "logprobs": None, "finish_reason": finish}]
        body["usage"] = self._usage(done)
        body["adapter"] = adapter_info(self.loaded)
        return body

    def chunk(self, text: str | None = None, done: Finished | None = None, first: bool = False) -> bytes:
        finish = _FINISH.get(done.finish_reason, done.finish_reason) if done else None
        if self.chat:
            body = self._envelope("chat.completion.chunk")
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        if first:
            body["adapter"] = adapter_info(self.loaded)
        return sse(body)

    def usage_chunk(self, done: Finished) -> bytes:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = self._usage(done)
        return sse(body)


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their generation however the response ends, even when
    the client left before the first byte (and the event generator never started)."""

    def __init__(self, gen: Generation, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gen.cancel()  # a no-op once finished


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


# --- the application -----------------------------------------------------------------------------


class HttpApi:
    """The ASGI application (:attr:`asgi`): bearer auth, request counting, the endpoints."""

    def __init__(
        self, servicer: InferenceServicer, settings: Settings, *, base_model: str, max_requests: int
    ) -> None:
        self.servicer = servicer
        self.base_model = base_model
        self.created = int(time.time())
        self._matches = BearerCheck(settings.auth_token) if settings.auth_token else None
        # InferenceSettings' (NOVELCRAFTER_HTTP_MAX_BODY_MB); programs that embed the server may
        # pass plain Settings, which get its default.
        self._max_body_mb = float(getattr(settings, "http_max_body_mb", DEFAULT_MAX_BODY_MB))
        self._max_body = int(self._max_body_mb * 1024 * 1024)
        self._parsers: anyio.CapacityLimiter | None = None
        # Threads that wait on generations, running or queued (max_requests of them at once);
        # sized like the gRPC worker pool.
        self._threads = max(40, 2 * max_requests + 16)
        self._limiter: anyio.CapacityLimiter | None = None
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # --- middleware: auth and counting, outside everything ------------------------------------

    async def asgi(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        sent: dict[str, Any] = {"status": None, "complete": False}

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        try:
            if route != "/health" and not self._authorized(scope):
                await error_response(Unauthenticated(UNAUTHORIZED), route)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            status = sent["status"]
            label = "500" if status is None else str(status) if sent["complete"] else "499"
            metrics.HTTP_REQUESTS.labels(route, label).inc()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if self._matches is None:
            return True
        return self._matches(next((v for k, v in scope["headers"] if k == b"authorization"), b""))

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = HttpError(exc.status_code, "invalid_request_error", "not_found")
        if exc.status_code == 405:
            kind = HttpError(405, "invalid_request_error", "method_not_allowed")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), exc.status_code, headers=exc.headers)

    # --- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """200 once the base model is loaded (probes use it; no token needed), 503 before."""
        rt = self.servicer.runtime
        if rt is None:
            return JSONResponse({"status": "loading"}, 503)
        engine = {
            "name": rt.engine.name,
            "batch_invariant_seeds": rt.engine.batch_invariant_seeds,
            "note": rt.engine.note,
        }
        if not rt.engine.healthy():  # e.g. the vLLM server is down or reloading our adapters
            return JSONResponse({"status": "unavailable", "engine": engine}, 503)
        return JSONResponse({"status": "ok", "engine": engine})

    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse({"object": "list", "data": self._model_list()})
        except Exception as exc:
            return error_response(exc, "/v1/models")

    def _model_list(self) -> list[dict[str, Any]]:
        """``base``, then per book with a served version: ``<book_id>`` (its latest) and each
        ``<book_id>:<version>`` that is not rejected."""
        rt = self.servicer.require_runtime()
        data: list[dict[str, Any]] = [
            {
                "id": BASE,
                "object": "model",
                "created": self.created,
                "owned_by": OWNER,
                "root": self.base_model,
                "parent": None,
            }
        ]
        books: dict[str, list[Any]] = {}
        for row in rt.registry.statuses():
            if row.state != "rejected":
                books.setdefault(row.meta.book_id, []).append(row)
        for book, rows in books.items():
            latest = [r for r in rows if r.latest]
            for name, row in [(book, r) for r in latest] + [(f"{book}:{r.meta.version}", r) for r in rows]:
                meta = row.meta
                info = {
                    "book_id": meta.book_id,
                    "version": meta.version,
                    "job_id": meta.job_id,
                    "part": meta.part,
                    "key": meta.prefix,
                    "published_at": meta.published_at,
                    "latest": row.latest,
                    "state": row.state,
                }
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": int(meta.published_at),
                        "owned_by": OWNER,
                        "root": f"{book}:{meta.version}",
                        "parent": BASE,
                        "adapter": info,
                    }
                )
        return data

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, "/v1/chat/completions", chat=True)

    # --- generation ---------------------------------------------------------------------------

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # created on the server's event loop
            self._limiter = anyio.CapacityLimiter(self._threads)
        return self._limiter

    async def _thread(self, fn: Callable[..., Any], *args: Any, abandon: bool = False) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon, limiter=self.limiter)

    async def _body(self, request: Request) -> bytearray:
        """The request body, refused (413) past the limit: before any byte is read when its
        announced length is over, else as soon as the bytes received pass it."""
        announced = request.headers.getlist("content-length")
        if announced:
            self._check_length(announced)
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > self._max_body:
                raise self._too_large()
            body += chunk
        return body

    def _check_length(self, announced: list[str]) -> None:
        """400 for a Content-Length that is not one number of bytes, 413 for one over the limit."""
        values = set(announced)
        value = values.pop()
        if values or not _CONTENT_LENGTH.fullmatch(value):
            raise BadParameter(f"invalid Content-Length header {value[:40]!r}: it must be a number of bytes")
        if len(value) > 18 or int(value) > self._max_body:  # 18 digits: beyond any limit already
            raise self._too_large()

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body is over the {self._max_body_mb:g} MB limit (NOVELCRAFTER_HTTP_MAX_BODY_MB)"
        )

    async def _submit(self, request: Request, chat: bool, labels: dict[str, str]) -> _Job:
        body = await self._body(request)
        limits = self.servicer.limits
        if len(body) <= INLINE_PARSE_BYTES:
            prepared = prepare(body, chat, limits)
        else:  # off the event loop, and a few at a time: parsing costs several times the body
            if self._parsers is None:  # created on the server's event loop
                self._parsers = anyio.CapacityLimiter(PARSERS)
            prepared = await anyio.to_thread.run_sync(prepare, body, chat, limits, limiter=self._parsers)
        del body
        loaded, gen = await self._thread(self.servicer.start, prepared.spec, labels, prepared.messages)
        return _Job(gen, loaded, chat=chat, stream=prepared.stream, include_usage=prepared.include_usage)

    async def _generation(self, request: Request, route: str, chat: bool) -> Response:
        labels = {"book": "unknown", "adapter": "unresolved"}
        try:
            job = await self._submit(request, chat, labels)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            metrics.REQUESTS.labels(route, "CANCELLED", labels["book"], labels["adapter"]).inc()
            return Response(status_code=499)
        except Exception as exc:
            metrics.REQUESTS.labels(route, status_of(exc), labels["book"], labels["adapter"]).inc()
            return error_response(exc, route)
        if job.stream:
            return _EventStream(job.gen, self._events(job, route, labels))
        status = "OK"
        try:
            done = await self._result(request, job.gen)
            if done.finish_reason == "cancelled":  # the client went away
                status = "CANCELLED"
                return Response(status_code=499)
            return JSONResponse(job.response(done))
        except Exception as exc:
            status = status_of(exc)
            return error_response(exc, route)
        finally:
            job.gen.cancel()  # no-op once finished; stops it if we were interrupted
            metrics.REQUESTS.labels(route, status, labels["book"], labels["adapter"]).inc()

    async def _result(self, request: Request, gen: Generation) -> Finished:
        """Wait for the whole generation; a client that disconnects meanwhile cancels it."""

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gen.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch_disconnect)
            try:
                return await self._thread(gen.result, abandon=True)
            finally:
                group.cancel_scope.cancel()

    async def _events(self, job: _Job, route: str, labels: dict[str, str]) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per text piece, the finish_reason, usage if asked, [DONE].
        Starlette cancels this when the client disconnects; ``finally`` then cancels the
        generation, which leaves the batch at the next step."""
        status = "OK"
        events = job.gen.events()
        try:
            first = True
            while True:
                event = await self._thread(next, events, None, abandon=True)
                if isinstance(event, Piece):
                    yield job.chunk(text=event.text, first=first)
                    first = False
                elif isinstance(event, Finished):
                    if event.finish_reason == "cancelled":
                        status = "CANCELLED"
                        return
                    yield job.chunk(done=event, first=first)
                    if job.include_usage:
                        yield job.usage_chunk(event)
                    break
                else:  # pragma: no cover - events() always ends with Finished
                    break
            yield DONE
        except anyio.get_cancelled_exc_class():
            status = "CANCELLED"
            raise
        except Exception as exc:  # after the 200 went out: the error travels as an event
            status = status_of(exc)
            _kind, body = describe_error(exc, route)
            yield sse(body)
        finally:
            job.gen.cancel()
            metrics.REQUESTS.labels(route, status, labels["book"], labels["adapter"]).inc()


# --- the server ----------------------------------------------------------------------------------


class HttpServer:
    """uvicorn on its own thread and event loop, with the gRPC server's TLS settings."""

    def __init__(self, app: Callable[..., Awaitable[None]], listen: str, settings: Settings) -> None:
        import uvicorn

        tls: dict[str, Any] = {}
        if settings.tls_cert and settings.tls_key:
            tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
            if settings.tls_client_ca:  # mutual TLS, as on gRPC
                tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.tls = bool(tls)
        self.listen = listen
        self.grace = float(settings.grace_seconds)
        config = uvicorn.Config(
            app,
            interface="asgi3",
            lifespan="off",
            http="h11",
            ws="none",
            loop="asyncio",
            log_config=None,  # our logging is already configured
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=self.grace,  # type: ignore[arg-type]
            **tls,
        )
        try:
            config.load()  # here, so that a bad certificate fails the start
        except (OSError, ssl.SSLError) as exc:
            raise NovelCrafterError(f"HTTP API: cannot load the TLS certificate or key: {exc}") from exc
        self._sock = bind_tcp(listen, "HTTP API", settings, backlog=2048)
        self.port: int = self._sock.getsockname()[1]
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="http-api", daemon=True
        )

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise NovelCrafterError(f"the HTTP API on {self.listen} did not start (see the log above)")
            time.sleep(0.01)
        log.info(
            "http api listening",
            extra={"fields": {"listen": self.listen, "port": self.port, "tls": self.tls}},
        )

    def begin_shutdown(self) -> None:
        """Stop accepting connections; requests in flight get the grace period to finish."""
        self.server.should_exit = True

    def stop(self, grace: float | None = None) -> None:
        self.begin_shutdown()
        self._thread.join((self.grace if grace is None else grace) + 2.0)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(5.0)
