"""The OpenAI-compatible HTTP API is bounded under abuse: request bodies, JSON, admission.

* Bodies: over ``NOVELCRAFTER_HTTP_MAX_BODY_MB`` (2 MB) is 413 with OpenAI's error body, before
  any byte is read when Content-Length announces it, as soon as the bytes pass the limit when
  it does not; a malformed Content-Length is 400.
* JSON: malformed, not UTF-8, nested too deep or holding too many values is 400 (never a 500);
  unknown fields are dropped, not kept; lists are capped.
* Admission: a request the server has no room for is refused (429 / RESOURCE_EXHAUSTED) before
  its adapter is resolved, so it never downloads, loads or evicts one.
* Memory: a real ``serve inference`` process under 30 concurrent maximal bodies stays within a
  bound derived from the limit.

The body and JSON tests drive the ASGI application directly (raw ASGI messages, so that a
malformed Content-Length reaches it and the bytes it reads can be counted), with a servicer whose
model is not loaded: a request that passes every HTTP check ends in its 503.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import psutil
import pytest
from novelcrafter.inference.adapter_factory import train_lora
from novelcrafter.inference.client import build_request
from novelcrafter.inference.http_api import (
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    MAX_LIST_ITEMS,
    PARSERS,
    CompletionRequest,
    HttpApi,
)
from novelcrafter.inference.server import InferenceConfig, InferenceServer
from novelcrafter.inference.service import InferenceServicer, Limits
from prometheus_client import REGISTRY
from pydantic import ValidationError
from support import NOVELCRAFTER, Proc, base_env, free_port

from novelcrafter.adapters import publish_adapter
from novelcrafter.config import InferenceSettings, Settings, get_settings
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2_grpc

MB = 1024 * 1024
LIMIT = 2 * MB  # the default NOVELCRAFTER_HTTP_MAX_BODY_MB
LOADING = "the inference server is still loading the base model; retry shortly"


# --- the ASGI application, driven with raw messages -----------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    chunks_read: int  # http.request messages the application took from the client


def asgi_post(
    api: HttpApi,
    chunks: Iterator[bytes] | list[bytes],
    *,
    content_length: str | list[str] | None = None,
    path: str = "/v1/completions",
) -> Reply:
    """POST the body ``chunks`` (more_body on every one but the last) to the application."""
    headers = [(b"content-type", b"application/json")]
    lengths = [content_length] if isinstance(content_length, str) else content_length or []
    headers += [(b"content-length", value.encode("utf-8")) for value in lengths]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    api._limiter = api._parsers = None  # made on the event loop: each call runs its own
    source = iter(chunks)
    pending = next(source, b"")
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pending, read
        if pending is None:
            await anyio.sleep(3600)  # the client stays connected, sending nothing more
        chunk, pending = pending, next(source, None)
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": pending is not None}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        with anyio.fail_after(60):
            await api.asgi(scope, receive, send)

    anyio.run(run)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return Reply(start["status"], head, json.loads(body) if body else {}, read)


@pytest.fixture
def api() -> HttpApi:
    """The application with the default limit and no model loaded."""
    return HttpApi(InferenceServicer(Limits()), Settings(), base_model="base", max_requests=8)


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "base", "prompt": "The night was long and", "max_tokens": 2, **extra}


def padded(document: dict[str, Any] | bytes, size: int) -> bytes:
    """``document`` as JSON (UTF-8, unescaped), padded with whitespace to exactly ``size`` bytes."""
    data = document if isinstance(document, bytes) else json.dumps(document, ensure_ascii=False).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))


def in_chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def assert_error(reply: Reply, status: int, code: str, message: str) -> None:
    assert reply.status == status, reply
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code and message in error["message"], error


def test_an_announced_body_over_the_limit_is_413_before_any_byte_is_read(api: HttpApi) -> None:
    body = padded(completion(), LIMIT + 1)
    for announced in (str(LIMIT + 1), str(10**12), "9" * 40):
        reply = asgi_post(api, in_chunks(body), content_length=announced)
        assert_error(reply, 413, "request_too_large", "over the 2 MB limit (NOVELCRAFTER_HTTP_MAX_BODY_MB)")
        assert reply.body["error"]["type"] == "invalid_request_error"
        assert reply.chunks_read == 0, "the body was read"
        assert reply.headers["connection"] == "close"  # the rest is not drained


def test_an_unannounced_body_is_413_as_soon_as_the_bytes_pass_the_limit(api: HttpApi) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:  # 64 KiB chunks, a gigabyte of them: never all read
        nonlocal sent
        for _ in range(16 * 1024):
            sent += 1
            yield b" " * (64 * 1024)

    reply = asgi_post(api, endless())
    assert_error(reply, 413, "request_too_large", "over the 2 MB limit")
    assert reply.chunks_read == LIMIT // (64 * 1024) + 1, reply.chunks_read  # the first one past it
    assert sent <= reply.chunks_read + 1


def test_a_body_of_exactly_the_limit_is_accepted(api: HttpApi) -> None:
    body = padded(completion(), LIMIT)
    for announced in (str(LIMIT), None):  # announced, and streamed
        reply = asgi_post(api, in_chunks(body), content_length=announced)
        assert_error(reply, 503, "service_unavailable", LOADING)  # every HTTP check passed


@pytest.mark.parametrize(
    "announced", ["abc", "-1", "²", "١٢", "1.5", "+5", "0x10", "", " ", "5, 5", "1e3", ["10", "11"]]
)
def test_a_malformed_content_length_is_400_never_500(api: HttpApi, announced: str | list[str]) -> None:
    reply = asgi_post(api, [json.dumps(completion()).encode()], content_length=announced)
    assert_error(reply, 400, "invalid_request", "invalid Content-Length header")
    assert reply.chunks_read == 0


def test_a_malformed_content_length_over_the_wire_is_400(api: HttpApi) -> None:
    """uvicorn's HTTP parser (h11) refuses these itself, before the application: still a 400."""
    from novelcrafter.inference.http_api import HttpServer

    server = HttpServer(api.asgi, "127.0.0.1:0", Settings(grace_seconds=1))
    server.start()
    try:
        for announced in (b"abc", b"-1", "²".encode(), b"1.5"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: " + announced)
                sock.sendall(b"\r\n\r\n{}")
                status = sock.recv(4096).split(b"\r\n", 1)[0]
            assert status == b"HTTP/1.1 400 Bad Request", (announced, status)
    finally:
        server.stop(1)


def _nested(depth: int) -> bytes:
    inner = "[" * (depth - 2) + "]" * (depth - 2)  # in "junk" (depth 2): `depth` levels in all
    return b'{"model": "base", "prompt": "hi", "max_tokens": 2, "junk": [' + inner.encode() + b"]}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"model": "base", "prompt": "hi",}', "not valid JSON"),
        (b'{"model": "base", "prompt": "caf\xe9"}', "not UTF-8"),
        (b"[" * 100_000, "JSON values"),  # RecursionError (a 500) before
        (b"[" * 2000, f"deeper than {MAX_JSON_DEPTH} levels"),
        (b'{"a":' * 2000, f"deeper than {MAX_JSON_DEPTH} levels"),
        (_nested(MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH} levels"),
        (b'["model", "base"]', "must be a JSON object"),
        (b'{"model": "base", "prompt": "hi", "junk": [' + b"{}," * MAX_JSON_VALUES + b"{}]}", "JSON values"),
        (
            b'{"model": "base", "prompt": "hi", "junk": "' + b"x" * 500 + b"}",
            "not valid JSON",
        ),  # unterminated
        (b'{"model": "base", "prompt": "hi", "n": 1' + b"0" * 5000 + b"}", "not valid JSON"),  # 5,000 digits
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_malformed_or_abusive_json_is_400(api: HttpApi, body: bytes, message: str) -> None:
    for announced in (str(len(body)), None):
        reply = asgi_post(api, in_chunks(body), content_length=announced)
        assert_error(reply, 400, "invalid_request", message)


def test_json_at_the_depth_limit_and_strings_that_look_like_structure_pass(api: HttpApi) -> None:
    brackets = "[" * 10_000 + "{" * 10_000 + ',"\\"' * 1000  # inside a string: no structure
    for body in (
        _nested(MAX_JSON_DEPTH),
        json.dumps(completion(junk=brackets)).encode(),
        json.dumps(completion(junk=[{}] * (MAX_JSON_VALUES // 3))).encode(),
    ):
        assert_error(asgi_post(api, in_chunks(body)), 503, "service_unavailable", LOADING)


def test_unknown_fields_are_dropped_not_kept(api: HttpApi) -> None:
    document = completion(user="u-1", metadata={"a": [1, 2]}, junk=[{}] * 1000)
    request = CompletionRequest.model_validate(document)
    assert not request.model_extra, "unknown fields are kept on the request"
    assert "junk" not in request.model_dump()
    # Clients' extra fields (here on messages and content parts too) do not fail the request.
    chat = {
        "model": "base",
        "messages": [{"role": "user", "name": "x", "content": [{"type": "text", "text": "Hi", "cache": 1}]}],
        "parallel_tool_calls": False,
        "store": False,
    }
    for path, body in (("/v1/completions", document), ("/v1/chat/completions", chat)):
        reply = asgi_post(api, [json.dumps(body).encode()], path=path)
        assert_error(reply, 503, "service_unavailable", LOADING)


def test_lists_are_capped_with_a_clear_400(api: HttpApi) -> None:
    message = {"role": "user", "content": "Hi"}
    part = {"type": "text", "text": "Hi"}
    cases = [
        ({"messages": [message] * (MAX_LIST_ITEMS + 1)}, "messages: at most 4096 items are accepted"),
        (
            {"messages": [{"role": "user", "content": [part] * (MAX_LIST_ITEMS + 1)}]},
            "messages.0.content: at most 4096 items are accepted",
        ),
        ({"messages": [message], "stop": ["x"] * 17}, "at most 16 stop sequences, got 17"),
    ]
    for fields, expected in cases:
        body = json.dumps({"model": "base", **fields}).encode()
        reply = asgi_post(api, in_chunks(body), path="/v1/chat/completions")
        assert_error(reply, 400, "invalid_request", expected)
    within = {"model": "base", "messages": [message] * MAX_LIST_ITEMS}
    reply = asgi_post(api, in_chunks(json.dumps(within).encode()), path="/v1/chat/completions")
    assert_error(reply, 503, "service_unavailable", LOADING)


def test_the_limit_is_a_setting_with_bounds() -> None:
    assert InferenceSettings().http_max_body_mb == 2.0
    small = InferenceSettings(http_max_body_mb=0.25)
    api = HttpApi(InferenceServicer(Limits()), small, base_model="base", max_requests=8)
    body = padded(completion(), MB // 4 + 1)
    assert_error(asgi_post(api, in_chunks(body)), 413, "request_too_large", "over the 0.25 MB limit")
    assert asgi_post(api, [body[: MB // 4]]).status == 503  # at the limit: read, and it passes
    for bad in (0, -1, 65, float("nan"), float("inf")):
        with pytest.raises(ValidationError):
            InferenceSettings(http_max_body_mb=bad)


# --- admission before the adapter is loaded -------------------------------------------------------

BOOK = "e150000000000001"
BASE = "smollm2-135m-instruct"
TEXT = "The lighthouse keeper climbed the stairs each night and lit the great lamp above the sea."
HOLD = {"max_new_tokens": 1024, "temperature": 0.0, "repetition_penalty": 1.0}  # greedy: never ends early


@dataclass
class OneSlot:
    server: InferenceServer
    old: str  # a published version of BOOK that is not its latest: not loaded at start
    latest: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def registry(self) -> Any:
        return self.server.runtime.registry

    @property
    def scheduler(self) -> Any:
        return self.server.runtime.scheduler


@pytest.fixture(scope="module")
def one_slot(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneSlot]:
    """An in-process server (gRPC and HTTP) with ONE generation slot and no queue."""
    from novelcrafter.models import load_base_model, load_tokenizer

    model, tok = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    root = tmp_path_factory.mktemp("admission")
    adapter = train_lora(model, tok, [TEXT], root / "lora", steps=1, seed=1, lr=1e-2, max_length=32)
    del model
    store = open_store(str(root / "store"))
    versions = [
        publish_adapter(
            store, adapter, book_id=BOOK, job_id="j-e15000000001", part=part, base_model=BASE
        ).version
        for part in (0, 1)
    ]
    settings = get_settings(store=str(root / "store"), metrics_listen="off")
    config = InferenceConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store=str(root / "store"),
        watch_interval=60.0,
        max_adapters=4,
        max_concurrency=1,
        max_queued=0,
        max_new_tokens_cap=HOLD["max_new_tokens"],
    )
    server = InferenceServer(config, settings)
    server.start()
    server.load()
    try:
        yield OneSlot(server, versions[0], versions[1])
    finally:
        server.stop(5)


def http_post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def loads() -> float:
    return (
        REGISTRY.get_sample_value("novelcrafter_inference_adapter_loads_total", {"result": "loaded"}) or 0.0
    )


def test_a_request_refused_for_want_of_room_never_loads_its_adapter(one_slot: OneSlot) -> None:
    registry, port = one_slot.registry, one_slot.server.http_port
    held, loaded = set(registry.held()), loads()
    assert (BOOK, one_slot.latest) in held and (BOOK, one_slot.old) not in held
    with connect(one_slot.address, Settings()) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        hold = stub.GenerateStream(build_request("Once upon a time", adapter="base", **HOLD), timeout=300)
        try:
            next(hold)  # generating: the one slot is taken, and there is no queue
            assert (one_slot.scheduler.in_flight, one_slot.scheduler.queued) == (1, 0)
            for model in (f"{BOOK}:{one_slot.old}", f"{BOOK}:part-0"):
                for path, body in (
                    ("/v1/completions", {"model": model, "prompt": "The lamp", "max_tokens": 2}),
                    (
                        "/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": "Hi"}]},
                    ),
                ):
                    status, reply = http_post(port, path, body)
                    assert (status, reply["error"]["code"]) == (429, "server_busy"), (model, reply)
                    assert "server busy" in reply["error"]["message"]
            request = build_request("The lamp", book_id=BOOK, adapter=one_slot.old, max_new_tokens=2)
            for call in (
                lambda: stub.Generate(request, timeout=60),
                lambda: list(stub.GenerateStream(request, timeout=60)),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert set(registry.held()) == held and loads() == loaded, "a refused request loaded its adapter"
            state = {row.meta.version: row.state for row in registry.statuses(BOOK)}
            assert state[one_slot.old] == "available"
        finally:
            hold.cancel()
    deadline = time.monotonic() + 30
    while one_slot.scheduler.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    # Requests that fail while holding the place give it back: the one slot is free again ...
    for _ in range(3):
        status, reply = http_post(
            port, "/v1/completions", {"model": f"{BOOK}:j-e15000000009-p00", "prompt": "x"}
        )
        assert status == 404, reply
    # ... and with room, the same request is served, loading the version it names.
    status, reply = http_post(
        port, "/v1/completions", {"model": f"{BOOK}:{one_slot.old}", "prompt": "The lamp", "max_tokens": 2}
    )
    assert status == 200 and reply["model"] == f"{BOOK}:{one_slot.old}", reply
    assert (BOOK, one_slot.old) in registry.held() and loads() == loaded + 1


class _VllmStandIn:
    """Stands in for the vLLM server behind a real VllmScheduler: streams nothing until cancelled."""

    healthy = True
    base_name = "base"

    def __init__(self) -> None:
        self.client = self

    def acquire(self, handle: Any) -> None:
        pass

    def release(self, handle: Any) -> None:
        pass

    def stream(self, body: dict[str, Any], cancelled: Any) -> Iterator[Any]:
        while not cancelled():
            time.sleep(0.01)
        yield from ()


def test_the_vllm_scheduler_admits_before_the_adapter_too(tmp_path: Path) -> None:
    """vLLM's scheduler holds a place for a request being prepared, like the native one: a
    request that finds it full is refused before its adapter is resolved (RESOURCE_EXHAUSTED,
    not the NOT_FOUND that resolving this unknown book gives once there is room), and a place
    held by a request still being prepared counts as taken."""
    from novelcrafter.inference.registry import AdapterRegistry
    from novelcrafter.inference.sampling import SamplingParams
    from novelcrafter.inference.scheduler import Generation
    from novelcrafter.inference.service import Runtime, validate_request
    from novelcrafter.inference.vllm_backend import VllmScheduler

    from novelcrafter.errors import NotFound, ResourceExhausted

    backend: Any = _VllmStandIn()
    scheduler = VllmScheduler(backend, set(), max_concurrency=1, max_queued=0)
    registry = AdapterRegistry(open_store(str(tmp_path)), loader=lambda path, meta: pytest.fail("loaded"))
    servicer = InferenceServicer(Limits())
    tokenizer: Any = None  # never reached: the request is refused, or its book is not found
    servicer.runtime = Runtime(tokenizer, scheduler, registry, context=2048)
    spec = validate_request(build_request("The lamp", book_id="f150000000000001"), servicer.limits)
    running = scheduler.submit(Generation([1, 2, 3], None, SamplingParams(), 4, []))
    try:
        labels = {"book": "unknown", "adapter": "unresolved"}
        with pytest.raises(ResourceExhausted, match="server busy"):
            servicer.start(spec, labels)
        assert labels == {"book": "unknown", "adapter": "unresolved"}  # never resolved
    finally:
        running.cancel()
    running.result()
    deadline = time.monotonic() + 10
    while scheduler.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(NotFound):
        servicer.start(spec, {})
    held = scheduler.admit()  # a request being prepared holds the one place ...
    with pytest.raises(ResourceExhausted, match="server busy"):
        scheduler.admit()
    held.release()  # ... until it gives it back
    scheduler.admit().release()
    scheduler.close(5)


# --- memory under a burst of maximal bodies -------------------------------------------------------

CLIENTS = 30
# Peak RSS growth allowed over the idle baseline. Every client may hold one whole body in memory
# (a bytearray that grows by reallocation, plus the chunk being copied in: up to ~2× the body);
# at most PARSERS bodies are parsed at once, each costing up to ~12× its size (the decoded text
# and its strings at 4 bytes a character when a non-BMP character appears, the parsed strings,
# the structure without strings); plus fixed slack for 30 connections' buffers, worker threads'
# stacks, allocator arenas and the generations the valid requests run.
MEMORY_BOUND = CLIENTS * LIMIT * 2 + PARSERS * LIMIT * 12 + 64 * MB


@dataclass
class Served:
    proc: Proc
    http_port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real ``serve inference`` process with the HTTP API (the default body limit)."""
    grpc_port, http_port = free_port(), free_port()
    root = tmp_path_factory.mktemp("http-memory")
    env = base_env(NOVELCRAFTER_HTTP_LISTEN=f"127.0.0.1:{http_port}", NOVELCRAFTER_METRICS_LISTEN="off")
    argv = [NOVELCRAFTER, "serve", "inference", "--listen", f"127.0.0.1:{grpc_port}"]
    argv += ["--store", str(root / "store"), "--max-new-tokens-cap", "4"]
    proc = Proc(argv, env, root / "inference.log")
    try:
        wait_for_health(f"127.0.0.1:{grpc_port}", timeout=240, settings=Settings())
    except TimeoutError:
        proc.stop(5)
        pytest.fail(f"inference server did not become healthy:\n{proc.output()[-3000:]}")
    try:
        yield Served(proc, http_port)
    finally:
        proc.stop(30)


def _maximal_bodies() -> list[tuple[str, bytes, set[int]]]:
    """(how it is sent, body, acceptable statuses): the worst shapes at (and past) the limit."""
    under = LIMIT - 1024
    emoji = "\U0001f600"  # non-BMP: the decoded text takes 4 bytes a character
    escaped = json.dumps(completion())[:-1].encode() + b', "junk": "'  # the same, as JSON escapes
    shapes: list[tuple[bytes, set[int]]] = [
        (padded(completion(prompt="x" * (under - 200)), under), {400}),  # over the prompt cap
        (padded(completion(junk=emoji * ((under - 200) // 4)), under), {200}),  # dropped field
        (padded(escaped + b"\\ud83d\\ude00" * ((under - 200) // 12) + b'"}', under), {200}),
        (padded(completion(junk=[{}] * (MAX_JSON_VALUES // 2 - 100)), under), {200}),  # values: ~the cap
        (b'{"model": "base", "junk": [' + b"{}," * (under // 3) + b"{}]}", {400}),  # too many values
    ]
    # Far over: 16 MB of tiny values under an unknown key (~40× its size once parsed).
    huge = b'{"model": "base", "prompt": "hi", "junk": [' + b"{}," * (8 * LIMIT // 3) + b"{}]}"
    bodies: list[tuple[str, bytes, set[int]]] = []
    for i in range(CLIENTS):
        if i % 6 < len(shapes):
            body, statuses = shapes[i % 6]
            bodies.append(("length" if i % 2 else "chunked", body, statuses))
        elif i % 12 == 5:
            bodies.append(("expect", huge, {413}))  # announced: refused before it is sent
        else:
            bodies.append(("chunked", padded(completion(), LIMIT + 64 * 1024), {413}))  # just over
    return bodies


def _status(sock: socket.socket, pending: bytes = b"") -> tuple[int, bytes]:
    """The status of the next response on ``sock`` (its head read), and the bytes after its head."""
    while b"\r\n\r\n" not in pending:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("closed")
        pending += data
    head, _, rest = pending.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def _send(port: int, how: str, body: bytes) -> int:
    """One request over its own connection; its status (0: the server closed it mid-upload).
    ``expect``: Content-Length and ``Expect: 100-continue``, the body sent only if the server
    asks for it, as curl does for large uploads."""
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    if how == "chunked":
        head += b"transfer-encoding: chunked\r\n\r\n"
        step = 256 * 1024
        pieces = (body[i : i + step] for i in range(0, len(body), step))
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        head += b"content-length: %d\r\n" % len(body)
        head += b"expect: 100-continue\r\n\r\n" if how == "expect" else b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        try:
            if how == "expect":
                sock.sendall(head)
                status, rest = _status(sock)
                if status != 100:
                    return status
                sock.sendall(body)
                return _status(sock, rest)[0]
            sock.sendall(head + body)
            return _status(sock)[0]
        except (BrokenPipeError, ConnectionResetError):
            return 0  # a 413 (with connection: close) while the client was still sending


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_memory_stays_bounded_under_30_concurrent_maximal_bodies(served: Served) -> None:
    process = psutil.Process(served.proc.pid)
    bodies = _maximal_bodies()
    # Warm up: every path once (lazy imports, first allocations), then the idle baseline.
    for how, body, statuses in bodies[:6]:
        assert _send(served.http_port, how, body) in statuses | {0}
    time.sleep(1.0)
    baseline = 0
    for _ in range(25):
        baseline = max(baseline, process.memory_info().rss)
        time.sleep(0.02)

    peak, stop = baseline, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    start = threading.Barrier(CLIENTS)
    statuses: list[int] = [0] * CLIENTS

    def client(i: int) -> None:
        how, body, _ = bodies[i]
        start.wait()
        statuses[i] = _send(served.http_port, how, body)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    seconds = time.monotonic() - began
    time.sleep(0.5)
    stop.set()
    sampler.join()

    growth = peak - baseline
    print(
        f"\nRSS idle {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB, growth {growth / MB:.1f} MB "
        f"(bound {MEMORY_BOUND / MB:.0f} MB) under {CLIENTS} concurrent bodies of up to "
        f"{LIMIT / MB:.0f} MB, in {seconds:.1f}s; statuses {sorted(statuses)}"
    )
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MB:.0f} MB (bound {MEMORY_BOUND / MB:.0f} MB)"
    for i, (how, _, expected) in enumerate(bodies):
        closed = how == "chunked" and 413 in expected  # refused mid-upload: a reset is fine
        assert statuses[i] in expected or (closed and statuses[i] == 0), (i, how, statuses[i], expected)
    assert statuses.count(413) >= 3 and statuses.count(200) >= 1 and statuses.count(400) >= 1
    assert served.proc.popen.poll() is None, "the server died"
