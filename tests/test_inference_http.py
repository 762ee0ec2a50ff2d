"""The OpenAI-compatible HTTP API of `novelcrafter serve inference`, driven by the official
`openai` Python client (issue 14).

One real `serve inference` process serves the module, with gRPC and HTTP on one scheduler,
an auth token, two generation slots (sixteen requests may wait for them) and real LoRAs
trained here and published to its store: a burst of clients that waits instead of being
refused, models, completions and chat (streamed or not) from `base` and a book's adapters, seeded
determinism equal to gRPC (alone and under concurrent load), every error status with OpenAI's
error body, auth, a client that disconnects mid-stream, version pinning across a hot swap and
the request counters on /metrics. TLS (mutual) and the 503 of a server still loading use an
in-process server that is started but never loads a model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from certs import make_pki
from novelcrafter.inference.adapter_factory import train_lora
from novelcrafter.inference.client import build_request
from novelcrafter.inference.server import InferenceConfig, InferenceServer
from prometheus_client.parser import text_string_to_metric_families
from support import NOVELCRAFTER, Proc, base_env, free_port, run_cli

from novelcrafter import layout
from novelcrafter.adapters import publish_adapter
from novelcrafter.config import Settings
from novelcrafter.errors import NovelCrafterError
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

BASE = "smollm2-135m-instruct"
BOOK = "d140000000000001"  # parts 0 (sea) and 1 (kitchen): latest is part 1
SWAP = "d140000000000002"  # hot-swapped during a request
BROKEN = "d140000000000003"  # its store objects fail to read
TOKEN = "http-T0ken-for-tests-only-4c1e9b"  # distinctive, so a leak into the log is easy to find
PROMPT = "The night was long and"
CAP = 256
SLOTS, QUEUE = 2, 16  # the server's --max-concurrency and --max-queued

SEA = (
    "The sea rose grey under the storm and the ship rolled hard to port. The captain lashed "
    "himself to the wheel while the crew hauled on the sheets, salt spray in their eyes."
)
KITCHEN = (
    "She whisked the eggs with sugar until pale, folded in the flour, and poured the batter into "
    "the buttered tin. Lemon zest, a pinch of salt, warm butter: the kitchen smelled of cake."
)


@dataclass
class Published:
    store: Path
    adapters: dict[str, Path]
    part0: str  # BOOK's versions
    part1: str
    swap0: str  # SWAP's first version


@dataclass
class Server:
    proc: Proc
    grpc_address: str
    http_port: int
    metrics_port: int
    published: Published

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self, api_key: str = TOKEN) -> openai.OpenAI:
        # No retries: the tests look at each answer (the client retries 429/503 by default).
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def grpc_generate(self, prompt: str = PROMPT, **fields: Any) -> Any:
        with connect(self.grpc_address, Settings(auth_token=TOKEN)) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return stub.Generate(build_request(prompt, **fields), timeout=120)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})  # as Prometheus
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def sample(metrics: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """Two real LoRAs (different texts), published: BOOK parts 0 and 1, SWAP part 0."""
    from novelcrafter.models import load_base_model, load_tokenizer

    model, tok = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    root = tmp_path_factory.mktemp("http")
    fast = {"steps": 2, "lr": 1e-2, "max_length": 32}
    adapters = {
        "sea": train_lora(model, tok, [SEA], root / "sea", seed=1, **fast),
        "kitchen": train_lora(model, tok, [KITCHEN], root / "kitchen", seed=2, **fast),
    }
    store = open_store(str(root / "store"))

    def publish(name: str, book: str, job: str, part: int) -> str:
        return publish_adapter(
            store, adapters[name], book_id=book, job_id=job, part=part, base_model=BASE
        ).version

    part0 = publish("sea", BOOK, "j-d14000000001", 0)
    part1 = publish("kitchen", BOOK, "j-d14000000001", 1)
    swap0 = publish("sea", SWAP, "j-d14000000002", 0)
    return Published(root / "store", adapters, part0, part1, swap0)


@pytest.fixture(scope="module")
def server(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = base_env(
        NOVELCRAFTER_AUTH_TOKEN=TOKEN,
        NOVELCRAFTER_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        NOVELCRAFTER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        NOVELCRAFTER_WATCH_INTERVAL="0.3",
    )
    argv = [NOVELCRAFTER, "serve", "inference", "--listen", f"127.0.0.1:{grpc_port}"]
    argv += ["--store", str(published.store), "--max-concurrency", str(SLOTS), "--max-queued", str(QUEUE)]
    argv += ["--max-new-tokens-cap", str(CAP)]
    proc = Proc(argv, env, tmp_path_factory.mktemp("http-log") / "inference.log")
    try:
        wait_for_health(f"127.0.0.1:{grpc_port}", timeout=240, settings=Settings())
    except TimeoutError:
        proc.stop(5)
        pytest.fail(f"inference server did not become healthy:\n{proc.output()[-3000:]}")
    try:
        yield Server(proc, f"127.0.0.1:{grpc_port}", http_port, metrics_port, published)
    finally:
        proc.stop(30)
        assert TOKEN not in proc.output(), "the auth token was written to the log"


# --- models, completions, chat -----------------------------------------------------------------


def test_health_needs_no_token_and_models_lists_base_books_and_versions(server: Server) -> None:
    with urllib.request.urlopen(f"{server.base_url}/health", timeout=10) as response:
        assert response.status == 200
        engine = {"name": "native", "batch_invariant_seeds": True, "note": ""}  # the backend's properties
        assert json.loads(response.read()) == {"status": "ok", "engine": engine}
    p = server.published
    models = {m.id: m for m in server.client().models.list()}
    assert {"base", BOOK, f"{BOOK}:{p.part0}", f"{BOOK}:{p.part1}", SWAP, f"{SWAP}:{p.swap0}"} <= set(models)
    assert models["base"].owned_by == "novelcrafter" and models["base"].root == BASE
    latest = models[BOOK].adapter  # an extra field: the version the book id means now
    assert (latest["version"], latest["part"], latest["latest"]) == (p.part1, 1, True)
    assert models[f"{BOOK}:{p.part0}"].adapter["latest"] is False
    assert models[f"{BOOK}:{p.part0}"].parent == "base"


def test_completions_from_base_a_book_a_part_and_a_version_equal_grpc(server: Server) -> None:
    p = server.published
    client = server.client()
    cases = [
        ("base", {"adapter": "base"}, "base"),
        (BOOK, {"book_id": BOOK}, f"{BOOK}:{p.part1}"),
        (f"{BOOK}:part-0", {"book_id": BOOK, "adapter": "part-0"}, f"{BOOK}:{p.part0}"),
        (f"{BOOK}:{p.part0}", {"book_id": BOOK, "adapter": p.part0}, f"{BOOK}:{p.part0}"),
    ]
    texts = {}
    for model, selector, exact in cases:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=7)
        grpc_reply = server.grpc_generate(max_new_tokens=6, seed=7, **selector)
        choice = reply.choices[0]
        assert (reply.model, reply.system_fingerprint) == (exact, exact), model  # the exact version
        assert reply.adapter["version"] == grpc_reply.adapter.version
        assert choice.text == grpc_reply.text and choice.text.strip()
        assert choice.finish_reason == {"eos": "stop"}.get(grpc_reply.finish_reason, grpc_reply.finish_reason)
        assert reply.usage.prompt_tokens == grpc_reply.prompt_tokens
        assert reply.usage.completion_tokens == grpc_reply.completion_tokens <= 6
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        texts[exact] = choice.text
    assert len(set(texts.values())) == 3, texts  # base and the two parts' adapters differ

    # stop sequences: the text ends before the stop, finish_reason "stop"
    full = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0)
    words = full.choices[0].text.split()
    cut = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=12, temperature=0, stop=[words[2]]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(words[2])]


def test_chat_uses_the_base_models_chat_template_and_equals_grpc_chat(server: Server) -> None:
    client = server.client()
    question = "Name a colour."
    reply = client.chat.completions.create(
        model=BOOK, messages=[{"role": "user", "content": question}], max_tokens=8, seed=3
    )
    grpc_reply = server.grpc_generate(question, book_id=BOOK, chat=True, max_new_tokens=8, seed=3)
    assert reply.object == "chat.completion" and reply.model == f"{BOOK}:{server.published.part1}"
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content == grpc_reply.text
    assert reply.usage.prompt_tokens == grpc_reply.prompt_tokens
    plain = server.grpc_generate(question, book_id=BOOK, max_new_tokens=1)
    assert reply.usage.prompt_tokens > plain.prompt_tokens  # the template wraps the question

    # A whole conversation goes through the template; text content parts are accepted.
    longer = client.chat.completions.create(
        model="base",
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one."},
        ],
        max_completion_tokens=6,
        seed=3,
    )
    assert longer.usage.prompt_tokens > reply.usage.prompt_tokens and longer.usage.completion_tokens <= 6


def raw_sse(server: Server, path: str, body: dict[str, Any]) -> list[str]:
    """The data lines of a streamed response, as sent."""
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]


def test_streaming_completion_and_chat_equal_the_whole_answer_and_end_with_done(server: Server) -> None:
    client = server.client()
    exact = f"{BOOK}:{server.published.part1}"
    whole = client.completions.create(model=BOOK, prompt=PROMPT, max_tokens=8, seed=21)
    chunks = list(
        client.completions.create(
            model=BOOK,
            prompt=PROMPT,
            max_tokens=8,
            seed=21,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.model == exact for c in chunks)
    assert chunks[0].adapter["version"] == server.published.part1
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # include_usage

    question = [{"role": "user", "content": "Tell me about the sea."}]
    chat = client.chat.completions.create(model="base", messages=question, max_tokens=6, seed=4)
    deltas = list(
        client.chat.completions.create(model="base", messages=question, max_tokens=6, seed=4, stream=True)
    )
    assert deltas[0].object == "chat.completion.chunk" and deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    for path, body in (
        ("/v1/completions", {"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True}),
        ("/v1/chat/completions", {"model": "base", "messages": question, "max_tokens": 3, "stream": True}),
    ):
        events = raw_sse(server, path, body)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        assert all(json.loads(event)["model"] == "base" for event in events[:-1])


def test_seeded_requests_give_grpcs_text_alone_and_under_concurrent_load(server: Server) -> None:
    """The same scheduler answers both APIs: an HTTP request and a gRPC request that run at once
    (batched together) give exactly what each gives alone over gRPC."""
    p = server.published
    client = server.client()
    specs = [  # (gRPC fields, the HTTP model id that means the same)
        ({"book_id": BOOK, "adapter": "part-0", "seed": 1, "temperature": 1.2}, f"{BOOK}:part-0"),
        ({"book_id": BOOK, "adapter": p.part1, "seed": 4, "top_k": 0, "top_p": 0.8}, f"{BOOK}:{p.part1}"),
    ]
    alone = [server.grpc_generate(max_new_tokens=12, **fields).text for fields, _model in specs]

    def over_http(i: int, stream: bool) -> str:
        fields, model = specs[i]
        extra = {k: fields[k] for k in ("top_k",) if k in fields}  # an extension: not in OpenAI's API
        kwargs = {k: fields[k] for k in ("seed", "temperature", "top_p") if k in fields}
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, stream=stream, extra_body=extra, **kwargs
        )
        if stream:
            return "".join(c.choices[0].text for c in reply if c.choices)
        return reply.choices[0].text

    before = server.metrics()
    for i, stream in ((0, True), (1, False)):  # two at a time: the server has two slots
        results: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def run(
            kind: str, i: int = i, stream: bool = stream, results: dict = results, barrier: Any = barrier
        ) -> None:
            barrier.wait()
            other = specs[1 - i][0]
            results[kind] = (
                over_http(i, stream)
                if kind == "http"
                else server.grpc_generate(max_new_tokens=12, **other).text
            )

        threads = [threading.Thread(target=run, args=(kind,)) for kind in ("http", "grpc")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert results == {"http": alone[i], "grpc": alone[1 - i]}, i
    after = server.metrics()
    name = "novelcrafter_inference_batch_size"
    single = sample(after, f"{name}_bucket", le="1.0") - sample(before, f"{name}_bucket", le="1.0")
    steps = sample(after, f"{name}_count") - sample(before, f"{name}_count")
    assert steps > single, "the HTTP and gRPC requests never shared a decode step"


# --- errors ------------------------------------------------------------------------------------


def api_error(call: Any, kind: type[openai.APIStatusError]) -> openai.APIStatusError:
    with pytest.raises(kind) as info:
        call()
    return info.value


def grpc_details(server: Server, **fields: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        server.grpc_generate(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details()


def test_invalid_parameters_are_400_with_the_grpc_caps_and_messages(server: Server) -> None:
    client = server.client()
    same_as_grpc = [
        ({"temperature": 3.0}, {"temperature": 3.0}),
        ({"top_p": 0.0}, {"top_p": 0.0}),
        ({"max_tokens": CAP + 1}, {"max_new_tokens": CAP + 1}),
        ({"extra_body": {"top_k": -5}}, {"top_k": -5}),
        ({"stop": ["x" * 201]}, {"stop": ["x" * 201]}),
        ({"prompt": "   "}, {"prompt": "   "}),
    ]
    for http_fields, grpc_fields in same_as_grpc:
        prompt = http_fields.pop("prompt", PROMPT)
        err = api_error(
            lambda p=prompt, f=http_fields: client.completions.create(model="base", prompt=p, **f),
            openai.BadRequestError,
        )
        expected = grpc_details(
            server, prompt=grpc_fields.pop("prompt", PROMPT), adapter="base", **grpc_fields
        )
        assert err.status_code == 400 and (err.type, err.code) == ("invalid_request_error", "invalid_request")
        assert err.body["message"] == expected, expected
    unsupported = [
        ({"n": 2}, "n", "n must be 1"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"presence_penalty": -1.0}, "presence_penalty", "not supported"),
        ({"logprobs": 2}, "logprobs", "not supported"),
        ({"echo": True}, "echo", "not supported"),
    ]
    for fields, param, message in unsupported:
        err = api_error(
            lambda f=fields: client.completions.create(model="base", prompt=PROMPT, max_tokens=2, **f),
            openai.BadRequestError,
        )
        assert err.param == param and message in err.body["message"]
    # What clients send by default for these passes.
    ok = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=2, n=1, frequency_penalty=0, presence_penalty=0
    )
    assert ok.usage.completion_tokens >= 1
    err = api_error(
        lambda: client.chat.completions.create(model="base", messages=[{"role": "tool", "content": "x"}]),
        openai.BadRequestError,
    )
    assert "role 'tool' is not supported" in err.body["message"]
    err = api_error(lambda: client.chat.completions.create(model="base", messages=[]), openai.BadRequestError)
    assert err.param == "messages"
    err = api_error(
        lambda: client.completions.create(model="base", prompt=[1, 2, 3]),  # token ids
        openai.BadRequestError,
    )
    assert err.param == "prompt"


def test_unknown_models_are_404_model_not_found(server: Server) -> None:
    client = server.client()
    cases = [
        ("gpt-4o", "does not exist"),
        ("0000000000000bad", "has no published adapter yet"),
        (f"{BOOK}:part-7", "no published adapter for part 7"),
        (f"{BOOK}:j-ffffffffffff-p00", "not found"),
        (f"{BOOK}:newest", "does not exist"),
    ]
    for model, message in cases:
        err = api_error(
            lambda m=model: client.completions.create(model=m, prompt=PROMPT, max_tokens=2),
            openai.NotFoundError,
        )
        assert (err.type, err.code) == ("invalid_request_error", "model_not_found"), model
        assert message in err.body["message"], (model, err.body)
    err = api_error(
        lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]),
        openai.NotFoundError,
    )
    assert err.code == "model_not_found"


def test_a_missing_or_wrong_token_is_401(server: Server) -> None:
    for key in ("wrong-token", TOKEN[:-1], TOKEN + "x"):
        err = api_error(lambda k=key: server.client(api_key=k).models.list(), openai.AuthenticationError)
        assert (err.status_code, err.code) == (401, "invalid_api_key")
        assert err.body["message"] == "missing or invalid bearer token (set NOVELCRAFTER_AUTH_TOKEN)"
    request = urllib.request.Request(
        f"{server.base_url}/v1/completions", data=b'{"model": "base", "prompt": "Hi"}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:  # no Authorization header at all
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["code"] == "invalid_api_key"
    assert TOKEN not in server.proc.output()  # compared, never logged


def busy_stream(client: openai.OpenAI, seed: int) -> Any:
    """A long generation holding a slot (seeded: no early end of text), once it has produced text."""
    stream = client.completions.create(
        model="base",
        prompt="Once upon a time",
        max_tokens=CAP,
        temperature=1.0,
        seed=seed,
        stream=True,
        extra_body={"repetition_penalty": 1.0},
    )
    next(iter(stream))
    return stream


def test_a_burst_of_16_clients_waits_for_the_slots_and_only_a_full_queue_is_429(server: Server) -> None:
    """Both slots busy: a waiting client that hangs up leaves the queue; then 16 clients at once
    (gRPC and HTTP, streamed or not) all wait, a 17th is refused (429 / RESOURCE_EXHAUSTED), and
    once the slots free every one of the 16 is served with exactly the text it gets alone."""
    p = server.published
    client = server.client()
    specs = [
        {"book_id": BOOK, "adapter": p.part0, "seed": i} if i % 2 else {"adapter": "base", "seed": i}
        for i in range(QUEUE)
    ]
    alone = [server.grpc_generate(max_new_tokens=4, **fields).text for fields in specs]

    def ask(i: int) -> str:
        fields = specs[i]
        if i % 4 == 0:
            return server.grpc_generate(max_new_tokens=4, **fields).text
        model = f"{BOOK}:{p.part0}" if "book_id" in fields else "base"
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=4, seed=fields["seed"], stream=i % 4 == 1
        )
        if isinstance(reply, openai.Stream):
            return "".join(c.choices[0].text for c in reply if c.choices)
        return reply.choices[0].text

    def depth() -> float:
        return sample(server.metrics(), "novelcrafter_inference_queue_depth")

    before = server.metrics()
    streams = [busy_stream(client, seed) for seed in (1, 2)]
    try:
        waiting = client.completions.create(model="base", prompt=PROMPT, max_tokens=2, stream=True)
        wait_until(lambda: depth() == 1)
        waiting.close()  # hangs up while queued
        wait_until(lambda: depth() == 0)
        assert sample(server.metrics(), "novelcrafter_inference_active_generations") == SLOTS
        with ThreadPoolExecutor(QUEUE) as pool:
            burst = [pool.submit(ask, i) for i in range(QUEUE)]
            wait_until(lambda: depth() == QUEUE)
            for call in (
                lambda: client.completions.create(model="base", prompt=PROMPT, max_tokens=2),
                lambda: client.chat.completions.create(
                    model="base", messages=[{"role": "user", "content": "Hi"}]
                ),
            ):
                err = api_error(call, openai.RateLimitError)
                assert (err.status_code, err.code) == (429, "server_busy")
                assert f"the queue is full ({QUEUE} waiting" in err.body["message"], err.body
                assert err.response.headers["retry-after"] == "1"
            with pytest.raises(grpc.RpcError) as info:
                server.grpc_generate(adapter="base", max_new_tokens=2)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in streams:
                stream.close()  # the slots free: the queue drains
            served = [future.result(timeout=300) for future in burst]
    finally:
        for stream in streams:
            stream.close()
    assert served == alone
    wait_until(lambda: sample(server.metrics(), "novelcrafter_inference_active_generations") == 0)
    after = server.metrics()
    waits = "novelcrafter_inference_queue_wait_seconds_count"
    # A slot went to the two busy streams and the sixteen, never to the one that hung up.
    assert sample(after, waits) - sample(before, waits) == SLOTS + QUEUE
    assert depth() == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server: Server) -> None:
    client = server.client()
    before = server.metrics()
    tokens = ("novelcrafter_inference_generated_tokens_total", {"book": "base", "adapter": "base"})
    stream = busy_stream(client, seed=5)
    stream.close()  # the connection goes away after the first piece
    wait_until(lambda: sample(server.metrics(), "novelcrafter_inference_active_generations") == 0)
    after = server.metrics()
    produced = sample(after, tokens[0], **tokens[1]) - sample(before, tokens[0], **tokens[1])
    assert 1 <= produced < CAP, produced  # stopped long before max_tokens
    closed = {"route": "/v1/completions", "status": "499"}
    assert sample(after, "novelcrafter_inference_http_requests_total", **closed) > sample(
        before, "novelcrafter_inference_http_requests_total", **closed
    )
    cancelled = {"method": "/v1/completions", "status": "CANCELLED", "book": "base", "adapter": "base"}
    assert sample(after, "novelcrafter_inference_requests_total", **cancelled) >= 1

    # Waiting for a whole (non-streamed) answer: hanging up cancels it just the same.
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": CAP, "temperature": 1.0}
    body |= {"seed": 6, "repetition_penalty": 1.0}
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(lambda: sample(server.metrics(), "novelcrafter_inference_active_generations") == 1)
    wait_until(lambda: sample(server.metrics(), "novelcrafter_inference_active_generations") == 0)
    final = server.metrics()
    produced = sample(final, tokens[0], **tokens[1]) - sample(after, tokens[0], **tokens[1])
    assert 0 <= produced < CAP, produced
    assert sample(final, "novelcrafter_inference_requests_total", **cancelled) == (
        sample(after, "novelcrafter_inference_requests_total", **cancelled) + 1
    )


def test_an_unreadable_store_is_503(server: Server) -> None:
    """A book whose objects cannot be read (a symlink loop stands in for a broken disk or
    bucket): the store error is UNAVAILABLE on gRPC and 503 on HTTP, and nothing else breaks."""
    folder = server.published.store / layout.adapter_prefix(BROKEN, "j-d14000000003-p00")
    folder.mkdir(parents=True)
    os.symlink("meta.json", folder / "meta.json")
    try:
        err = api_error(
            lambda: server.client().completions.create(model=BROKEN, prompt=PROMPT, max_tokens=2),
            openai.InternalServerError,
        )
        assert (err.status_code, err.type, err.code) == (503, "server_error", "service_unavailable")
        assert "cannot" in err.body["message"] and err.response.headers["retry-after"] == "1"
    finally:
        shutil.rmtree(server.published.store / "adapters" / BROKEN)
    assert server.client().completions.create(model=BOOK, prompt=PROMPT, max_tokens=2).model.startswith(BOOK)


def test_a_request_keeps_its_version_across_a_hot_swap(server: Server) -> None:
    p = server.published
    client = server.client()
    stream = client.completions.create(model=SWAP, prompt=PROMPT, max_tokens=32, seed=11, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # resolved and generating
    assert first.model == f"{SWAP}:{p.swap0}"
    store = open_store(str(p.store))
    newer = publish_adapter(
        store, p.adapters["kitchen"], book_id=SWAP, job_id="j-d14000000002", part=1, base_model=BASE
    ).version
    with connect(server.grpc_address, Settings(auth_token=TOKEN)) as channel:  # flip the alias now
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stub.ReloadAdapters(inference_pb2.ReloadAdaptersRequest(book_id=SWAP), timeout=60)
    models = {m.id: m for m in client.models.list()}
    assert models[SWAP].adapter["version"] == newer  # the book id means the new version...
    rest = list(chunks)
    assert {c.model for c in rest} == {f"{SWAP}:{p.swap0}"}  # ...this request stays on its own
    text = "".join(c.choices[0].text for c in [first, *rest] if c.choices)
    pinned = server.grpc_generate(book_id=SWAP, adapter=p.swap0, max_new_tokens=32, seed=11)
    assert text == pinned.text
    again = client.completions.create(model=SWAP, prompt=PROMPT, max_tokens=2, seed=11)
    assert again.model == f"{SWAP}:{newer}"


def test_metrics_count_http_requests_by_route_and_status(server: Server) -> None:
    before = server.metrics()
    client = server.client()
    client.models.list()
    client.completions.create(model="base", prompt=PROMPT, max_tokens=2)
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    api_error(lambda: client.completions.create(model="base", prompt=PROMPT, n=3), openai.BadRequestError)
    api_error(lambda: client.completions.create(model="gpt-4o", prompt=PROMPT), openai.NotFoundError)
    api_error(lambda: server.client(api_key="nope").models.list(), openai.AuthenticationError)
    urllib.request.urlopen(f"{server.base_url}/health", timeout=10).close()
    after = server.metrics()
    for route, status in [
        ("/v1/models", "200"),
        ("/v1/completions", "200"),
        ("/v1/chat/completions", "200"),
        ("/v1/completions", "400"),
        ("/v1/completions", "404"),
        ("/v1/models", "401"),
        ("/health", "200"),
    ]:
        labels = {"route": route, "status": status}
        name = "novelcrafter_inference_http_requests_total"
        assert sample(after, name, **labels) - sample(before, name, **labels) == 1, labels
    ok = {"method": "/v1/chat/completions", "status": "OK", "book": "base", "adapter": "base"}
    assert sample(after, "novelcrafter_inference_requests_total", **ok) >= 1


# --- TLS, and a server still loading -------------------------------------------------------------


@pytest.fixture(scope="module")
def loading_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceServer, Any]]:
    """gRPC and HTTP up with mutual TLS, the base model never loaded."""
    pki = make_pki(tmp_path_factory.mktemp("http-pki"))
    settings = Settings(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        metrics_listen="off",
        grace_seconds=1,
        max_message_mb=1,
    )
    config = InferenceConfig(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", store=str(tmp_path_factory.mktemp("s"))
    )
    server = InferenceServer(config, settings)
    server.start()
    try:
        yield server, pki
    finally:
        server.stop(0)


def tls_context(pki: Any, *, client_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def test_tls_with_the_grpc_settings_and_503_while_loading(
    loading_server: tuple[InferenceServer, Any],
) -> None:
    server, pki = loading_server
    url = f"https://localhost:{server.http_port}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/health", timeout=10, context=tls_context(pki))
    assert info.value.code == 503 and json.loads(info.value.read()) == {"status": "loading"}

    client = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",  # no token configured on this server
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=tls_context(pki)),
    )
    for call in (
        lambda: client.models.list(),
        lambda: client.completions.create(model="base", prompt=PROMPT, max_tokens=2),
    ):
        err = api_error(call, openai.InternalServerError)
        assert (err.status_code, err.code) == (503, "service_unavailable")
        assert "still loading the base model" in err.body["message"]
    err = api_error(  # a body over the body limit is refused before it is read
        lambda: client.completions.create(model="base", prompt="x" * (3 << 20)), openai.APIStatusError
    )
    assert err.status_code == 413
    assert "over the 2 MB limit (NOVELCRAFTER_HTTP_MAX_BODY_MB)" in err.body["message"]

    for refused in (
        openai.DefaultHttpxClient(verify=tls_context(pki, client_cert=False)),  # no client certificate
        openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(pki.other_ca))),  # other CA
    ):
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=refused)
        with pytest.raises(openai.APIConnectionError):
            other.models.list()
    plain = openai.OpenAI(base_url=f"http://localhost:{server.http_port}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


# --- the flag ------------------------------------------------------------------------------------


def test_http_listen_errors(tmp_path: Path) -> None:
    """A malformed address is one error line from the CLI; a taken port fails the start (an
    API that callers expect must not go missing silently), with the gRPC server stopped."""
    bad = run_cli("serve", "inference", "--http-listen", "nowhere", "--store", str(tmp_path), timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: --http-listen must be HOST:PORT or off, got 'nowhere'"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = InferenceConfig(listen="127.0.0.1:0", http_listen=f"127.0.0.1:{port}", store=str(tmp_path))
        server = InferenceServer(config, Settings(metrics_listen="off"))
        with pytest.raises(NovelCrafterError, match=rf"cannot listen on 127.0.0.1:{port} \(HTTP API\)"):
            server.start()
    assert server.grpc is not None and server.grpc._stopped.is_set()
