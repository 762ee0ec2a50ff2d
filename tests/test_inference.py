"""Inference service with the real base model and real trained adapters, over real gRPC.

One in-process server (real sockets, real threads) serves every test in this module; the
adapters are PEFT LoRAs trained here for a few steps on different text per "book" and
published with the trainers' ``publish_adapter``. Covers issue 5: the API and validation
(1), the adapter registry with validation, hot loading and LRU freeing (2), isolation of
seeded requests under mixed concurrent load (3), metrics and health (4), and hot swap
under load (5); plus the S3 backend picking up new versions.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from novelcrafter.inference.adapter_factory import train_lora
from novelcrafter.inference.client import build_request
from novelcrafter.inference.registry import AdapterRegistry
from novelcrafter.inference.server import InferenceConfig, InferenceServer
from prometheus_client import REGISTRY

from novelcrafter import layout
from novelcrafter.adapters import AdapterMeta, publish_adapter
from novelcrafter.config import get_settings
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2, inference_pb2_grpc

BASE = "smollm2-135m-instruct"
BOOK_A, BOOK_B, BOOK_C = "a000000000000001", "b000000000000002", "c000000000000003"
PROMPT = "The night was long and"

SEA = (
    "The sea rose grey under the storm and the ship rolled hard to port. The captain lashed "
    "himself to the wheel while the crew hauled on the sheets, salt spray in their eyes, and "
    "the mainsail cracked like a cannon. Waves broke over the bow; the harbour lights were lost."
)
KITCHEN = (
    "She whisked the eggs with sugar until pale, folded in the flour, and poured the batter into "
    "the buttered tin. The oven ticked as it warmed. Lemon zest, a pinch of salt, warm butter: "
    "the kitchen smelled of cake, and the kettle began to sing on the stove."
)
FOREST = (
    "Moss covered the old oaks, and the path wound between ferns and fallen birches. An owl "
    "called from the pines. The hunter knelt by the stream to read the tracks of the deer, "
    "while mist crept low among the roots and the forest held its breath."
)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_model(base_model_dir: Path) -> tuple[Any, Any]:
    """A private fp32 copy for training adapters (the shared base_model fixture stays untouched)."""
    from novelcrafter.models import load_base_model, load_tokenizer

    return load_base_model(base_model_dir), load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def adapter_dirs(trainer_model: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real LoRAs: book A parts 0..3 (each trained on top of the previous), books B and C."""
    model, tok = trainer_model
    root = tmp_path_factory.mktemp("adapters")
    fast = {"lr": 1e-2, "max_length": 32}
    dirs = {"A0": train_lora(model, tok, [SEA], root / "A0", steps=2, seed=1, **fast)}
    for part in (1, 2, 3):
        dirs[f"A{part}"] = train_lora(
            model, tok, [SEA], root / f"A{part}", steps=1, seed=part, init_from=dirs[f"A{part - 1}"], **fast
        )
    dirs["B0"] = train_lora(model, tok, [KITCHEN], root / "B0", steps=2, seed=2, **fast)
    dirs["C0"] = train_lora(model, tok, [FOREST], root / "C0", steps=2, seed=3, rank=4, alpha=8, **fast)
    return dirs


@pytest.fixture(scope="module")
def other_model_adapter(tmp_path_factory: pytest.TempPathFactory, trainer_model: tuple[Any, Any]) -> Path:
    """A real LoRA trained on a different (tiny) Llama: its shapes cannot fit our base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(config)
    return train_lora(tiny, trainer_model[1], [SEA], tmp_path_factory.mktemp("tiny") / "tiny", steps=1)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("store")
    store = open_store(str(root))
    publish(store, adapter_dirs["A0"], BOOK_A, "j-a00000000001", 0)
    publish(store, adapter_dirs["B0"], BOOK_B, "j-b00000000001", 0)
    publish(store, adapter_dirs["C0"], BOOK_C, "j-c00000000001", 0)
    return root


class Served:
    def __init__(self, server: InferenceServer, store_dir: Path, health_before_load: int) -> None:
        self.server = server
        self.store_dir = store_dir
        self.store = open_store(str(store_dir))
        self.address = f"127.0.0.1:{server.port}"
        self.health_before_load = health_before_load
        self.channel = connect(self.address, get_settings())
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def scheduler(self) -> Any:
        return self.server.runtime.scheduler

    @property
    def registry(self) -> AdapterRegistry:
        return self.server.runtime.registry

    def generate(self, prompt: str = PROMPT, **fields: Any) -> inference_pb2.GenerateResponse:
        fields.setdefault("max_new_tokens", 10)
        return self.stub.Generate(build_request(prompt, **fields), timeout=120)

    def stream(self, prompt: str = PROMPT, **fields: Any) -> Any:
        fields.setdefault("max_new_tokens", 10)
        return self.stub.GenerateStream(build_request(prompt, **fields), timeout=120)

    def reload(self, book_id: str = "") -> inference_pb2.ListAdaptersResponse:
        return self.stub.ReloadAdapters(inference_pb2.ReloadAdaptersRequest(book_id=book_id), timeout=60)


@pytest.fixture(scope="module")
def served(store_dir: Path) -> Iterator[Served]:
    settings = get_settings(store=str(store_dir), metrics_listen="off")
    config = InferenceConfig(
        listen="127.0.0.1:0",
        store=str(store_dir),
        base_model=BASE,
        watch_interval=0.3,
        max_adapters=3,
        max_concurrency=8,
        max_queued=2,
        max_new_tokens_cap=256,
        max_prompt_tokens=200,
    )
    server = InferenceServer(config, settings)
    server.start()
    with connect(f"127.0.0.1:{server.port}", settings) as channel:
        before = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    server.load()
    try:
        yield Served(server, store_dir, before)
    finally:
        server.stop(5)


def publish(store: Any, local: Path, book: str, job: str, part: int, base_model: str = BASE) -> AdapterMeta:
    return publish_adapter(store, local, book_id=book, job_id=job, part=part, base_model=base_model)


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- API, health, adapters ---------------------------------------------------------------------


def test_health_reports_serving_only_after_the_model_is_loaded(served: Served) -> None:
    assert served.health_before_load == health_pb2.HealthCheckResponse.NOT_SERVING
    wait_for_health(served.address, timeout=10)


def test_response_names_the_exact_version_and_token_counts(served: Served) -> None:
    reply = served.generate(book_id=BOOK_A, seed=1, max_new_tokens=7, stop=[])
    assert reply.adapter.book_id == BOOK_A
    assert reply.adapter.version == "j-a00000000001-p00"
    assert (reply.adapter.job_id, reply.adapter.part) == ("j-a00000000001", 0)
    assert reply.adapter.key == layout.adapter_prefix(BOOK_A, "j-a00000000001-p00")
    tokenizer = served.server.runtime.tokenizer
    assert reply.prompt_tokens == len(tokenizer.encode(PROMPT, chat=False))
    assert 1 <= reply.completion_tokens <= 7
    assert reply.finish_reason in ("length", "eos")
    assert reply.text.strip()


def test_each_adapter_changes_the_output(served: Served) -> None:
    """Greedy continuations of one prompt differ between base and the books: the weights apply."""
    texts = {
        name: served.generate(book_id=book, adapter=adapter, temperature=0.0, max_new_tokens=16).text
        for name, book, adapter in [
            ("base", "", "base"),
            ("A", BOOK_A, "latest"),
            ("B", BOOK_B, "latest"),
            ("C", BOOK_C, "latest"),
        ]
    }
    assert len(set(texts.values())) == 4, texts


def test_adapter_selectors_and_not_found(served: Served) -> None:
    version = "j-a00000000001-p00"
    assert served.generate(book_id=BOOK_A, adapter="part-0").adapter.version == version
    assert served.generate(book_id=BOOK_A, adapter=version).adapter.version == version
    base = served.generate(adapter="base")
    assert (base.adapter.version, base.adapter.book_id) == ("base", "")
    cases = [
        (
            {"book_id": BOOK_A, "adapter": "part-7"},
            grpc.StatusCode.NOT_FOUND,
            "no published adapter for part 7",
        ),
        ({"book_id": BOOK_A, "adapter": "j-ffffffffffff-p00"}, grpc.StatusCode.NOT_FOUND, "not found"),
        ({"book_id": "dddddddddddddddd"}, grpc.StatusCode.NOT_FOUND, "has no published adapter yet"),
        ({"book_id": BOOK_A, "adapter": "newest"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid adapter"),
        ({"book_id": "../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid book id"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "book_id is required unless adapter is 'base'"),
    ]
    for fields, code, message in cases:
        err = rpc_error(lambda fields=fields: served.generate(**fields))
        assert err.code() == code, (fields, err.details())
        assert message in err.details(), (fields, err.details())


def test_invalid_parameters_are_rejected_with_readable_messages(served: Served) -> None:
    cases = [
        ({"temperature": 3.0}, "temperature must be in [0, 2]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": -5}, "top_k must be >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2]"),
        ({"max_new_tokens": 5000}, "exceeds this server's cap of 256"),
        ({"prompt": "word " * 400}, "the limit is 200"),
        ({"prompt": ""}, "prompt is empty"),
    ]
    for fields, message in cases:
        prompt = fields.pop("prompt", PROMPT)
        err = rpc_error(lambda p=prompt, f=fields: served.generate(p, book_id=BOOK_A, **f))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()
    assert served.generate(book_id=BOOK_A, max_new_tokens=2).completion_tokens <= 2  # still serving


def test_stop_sequence_ends_the_text_before_it(served: Served) -> None:
    full = served.generate(adapter="base", temperature=0.0, max_new_tokens=24).text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    cut = served.generate(adapter="base", temperature=0.0, max_new_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_chat_applies_the_template(served: Served) -> None:
    plain = served.generate("Name a colour.", adapter="base", max_new_tokens=8, seed=3)
    chat = served.generate("Name a colour.", adapter="base", max_new_tokens=8, seed=3, chat=True)
    template = served.server.runtime.tokenizer.encode("Name a colour.", chat=True)
    assert chat.prompt_tokens == len(template) > plain.prompt_tokens
    assert chat.text.strip()


def test_stream_matches_unary_and_cancel_stops_generation(served: Served) -> None:
    request = {"book_id": BOOK_B, "seed": 21, "max_new_tokens": 12}
    unary = served.generate(**request)
    messages = list(served.stream(**request))
    assert messages[0].adapter.version == unary.adapter.version
    assert "".join(m.text for m in messages) == unary.text
    last = messages[-1]
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == (
        unary.finish_reason,
        unary.completion_tokens,
        unary.prompt_tokens,
    )
    # Cancel after the first pieces of a long generation: the server stops generating.
    version = unary.adapter.version
    before = metric("novelcrafter_inference_generated_tokens_total", book=BOOK_B, adapter=version)
    call = served.stream(book_id=BOOK_B, max_new_tokens=250, temperature=1.0, repetition_penalty=1.0, seed=5)
    next(call)
    next(call)
    call.cancel()
    wait_until(lambda: served.scheduler.in_flight == 0, timeout=30)
    produced = metric("novelcrafter_inference_generated_tokens_total", book=BOOK_B, adapter=version) - before
    assert 2 <= produced < 250


def test_beyond_the_slots_requests_wait_and_only_a_full_queue_is_refused(served: Served) -> None:
    """All 8 slots busy: two more requests wait (max_queued=2) instead of failing, the next one is
    RESOURCE_EXHAUSTED, and once the slots free the waiting ones get their seeded text."""
    waiting = [{"adapter": "base", "max_new_tokens": 4, "seed": 30 + i} for i in range(2)]
    alone = [served.generate(**fields).text for fields in waiting]
    streams = [
        served.stream(adapter="base", max_new_tokens=250, temperature=1.0, repetition_penalty=1.0, seed=i)
        for i in range(8)
    ]
    queued: list[Any] = []
    try:
        for call in streams:
            next(call)  # all eight are generating now
        queued = [served.stream(**fields) for fields in waiting]
        wait_until(lambda: served.scheduler.queued == 2)
        err = rpc_error(lambda: served.generate(adapter="base", max_new_tokens=2))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in err.details() and "the queue is full (2 waiting" in err.details()
        assert (served.scheduler.in_flight, served.scheduler.queued) == (8, 2)
    finally:
        for call in streams:
            call.cancel()
    assert ["".join(m.text for m in call) for call in queued] == alone
    wait_until(lambda: served.scheduler.in_flight == 0 and served.scheduler.queued == 0, timeout=30)
    assert served.generate(adapter="base", max_new_tokens=2).completion_tokens >= 1


# --- requirement 3: isolation under concurrency ------------------------------------------------


def test_seeded_requests_give_the_same_text_alone_and_under_mixed_concurrent_load(served: Served) -> None:
    requests = [
        {"book_id": BOOK_A, "seed": 1},
        {"book_id": BOOK_B, "seed": 1},
        {"book_id": BOOK_C, "seed": 2},
        {"adapter": "base", "seed": 1},
        {"book_id": BOOK_A, "adapter": "j-a00000000001-p00", "seed": 7, "temperature": 1.2},
        {"book_id": BOOK_B, "seed": 3, "top_k": 0, "top_p": 0.8},
        {"book_id": BOOK_C, "adapter": "part-0", "temperature": 0.0},
        {"book_id": BOOK_A, "seed": 9, "stream": True},
    ]

    def run(spec: dict) -> tuple[str, str]:
        fields = {k: v for k, v in spec.items() if k != "stream"}
        fields["max_new_tokens"] = 12
        if spec.get("stream"):
            messages = list(served.stream(**fields))
            return "".join(m.text for m in messages), messages[0].adapter.version
        reply = served.generate(**fields)
        return reply.text, reply.adapter.version

    alone = [run(spec) for spec in requests]
    served.scheduler.max_batch_seen = 0
    for _round in range(2):
        barrier = threading.Barrier(len(requests))

        def together(spec: dict, barrier: threading.Barrier = barrier) -> tuple[str, str]:
            barrier.wait()
            return run(spec)

        with ThreadPoolExecutor(len(requests)) as pool:
            mixed = list(pool.map(together, requests))
        assert mixed == alone
    assert served.scheduler.max_batch_seen >= 3, "the concurrent requests were never batched together"


# --- requirement 2: registry, validation, freeing ----------------------------------------------


def test_corrupted_or_mismatched_adapters_are_rejected_and_the_previous_version_keeps_serving(
    served: Served, adapter_dirs: dict[str, Path], other_model_adapter: Path, tmp_path: Path, caplog: Any
) -> None:
    good = "j-b00000000001-p00"
    before = served.generate(book_id=BOOK_B, seed=4)
    assert before.adapter.version == good

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_bytes((adapter_dirs["B0"] / "adapter_config.json").read_bytes())
    data = (adapter_dirs["B0"] / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    cases = [
        (truncated, BASE, "j-b00000000002", "unreadable"),
        (other_model_adapter, BASE, "j-b00000000003", "do not fit the base layer"),
        (adapter_dirs["B0"], "meta-llama/Llama-3.2-1B-Instruct", "j-b00000000004", "trained for base model"),
    ]
    caplog.set_level(logging.WARNING, logger="novelcrafter.inference.registry")
    for local, base_model, job, reason in cases:
        version = publish(served.store, local, BOOK_B, job, 1, base_model=base_model).version
        listing = {a.version.version: a for a in served.reload(BOOK_B).adapters}
        assert listing[version].state == "rejected"
        assert reason in listing[version].error
        assert listing[good].latest and not listing[version].latest
        assert any(reason in str(getattr(r, "fields", {}).get("reason", "")) for r in caplog.records)
        after = served.generate(book_id=BOOK_B, seed=4)
        assert (after.adapter.version, after.text) == (good, before.text)
        err = rpc_error(lambda v=version: served.generate(book_id=BOOK_B, adapter=v))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "was rejected" in err.details()

    # An unreadable meta.json (written by hand, pointer moved to it) is rejected too.
    broken = "j-b00000000007-p01"
    served.store.put(layout.adapter_prefix(BOOK_B, broken) + "meta.json", b"{not json")
    served.store.put_json(layout.latest_key(BOOK_B), {"version": broken})
    listing = {a.version.version: a for a in served.reload(BOOK_B).adapters}
    assert listing[broken].state == "rejected" and "meta.json is unreadable" in listing[broken].error
    assert served.generate(book_id=BOOK_B, seed=4).adapter.version == good

    # A file changed after publication fails its checksum.
    tampered = publish(served.store, adapter_dirs["C0"], BOOK_B, "j-b00000000005", 1)
    key = tampered.prefix + "adapter_model.safetensors"
    served.store.put(key, served.store.get(key)[:-8] + b"\0" * 8)
    listing = {a.version.version: a for a in served.reload(BOOK_B).adapters}
    assert "checksum" in listing[tampered.version].error

    # A good version published next is served again.
    fresh = publish(served.store, adapter_dirs["B0"], BOOK_B, "j-b00000000006", 2).version
    served.reload(BOOK_B)
    assert served.generate(book_id=BOOK_B, seed=4).adapter.version == fresh


def test_evicted_versions_are_freed_and_in_flight_requests_keep_theirs(
    served: Served, adapter_dirs: dict[str, Path]
) -> None:
    registry = served.registry
    assert registry.max_adapters == 3
    store = served.store
    versions = [publish(store, adapter_dirs["C0"], BOOK_C, "j-c00000000100", i).version for i in range(1, 5)]
    served.reload(BOOK_C)

    pinned = registry.resolve(BOOK_C, versions[0])  # what an in-flight request holds
    ref = weakref.ref(pinned)
    tensor_ref = weakref.ref(pinned.weights.layers[0]["self_attn.q_proj"].a)
    reply = served.generate(book_id=BOOK_C, adapter=versions[0], seed=2)
    assert reply.adapter.version == versions[0]
    for version in versions[1:]:  # three more versions: the first is least recently used
        served.generate(book_id=BOOK_C, adapter=version, max_new_tokens=2)
    assert (BOOK_C, versions[0]) not in registry.held()
    assert len(registry.held()) <= 3
    gc.collect()
    assert ref() is pinned  # evicted, but still alive for its holder
    del pinned
    gc.collect()
    assert ref() is None and tensor_ref() is None, "an evicted adapter was not freed"
    assert metric("novelcrafter_inference_adapter_versions_held") <= 3
    assert metric("novelcrafter_inference_adapter_evictions_total") >= 1
    # Reloaded on demand, same weights, same text.
    again = served.generate(book_id=BOOK_C, adapter=versions[0], seed=2)
    assert again.text == reply.text


def test_list_adapters_reports_state_and_reload_picks_up_new_versions_at_once(
    served: Served, adapter_dirs: dict[str, Path]
) -> None:
    version = publish(served.store, adapter_dirs["A0"], BOOK_A, "j-a00000000099", 9).version
    listing = served.reload(BOOK_A)
    rows = {a.version.version: a for a in listing.adapters}
    assert rows[version].latest and rows[version].state == "loaded" and rows[version].rank == 8
    assert rows[version].loaded_at > 0
    assert all(a.version.book_id == BOOK_A for a in listing.adapters)
    everything = served.stub.ListAdapters(inference_pb2.ListAdaptersRequest(), timeout=30)
    assert {a.version.book_id for a in everything.adapters} >= {BOOK_A, BOOK_B, BOOK_C}
    assert served.generate(book_id=BOOK_A).adapter.version == version


# --- requirement 5: hot swap under load --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hot_swap_under_load(served: Served, adapter_dirs: dict[str, Path]) -> None:
    """Client threads generate continuously while new versions of a book are published."""
    book = "e000000000000005"
    store = served.store
    published: dict[str, float] = {}
    meta = publish(store, adapter_dirs["A0"], book, "j-e00000000000", 0)
    published[meta.version] = meta.published_at
    served.reload(book)

    results: list[tuple[float, float, str, int, str]] = []  # start, end, version, seed, text
    failures: list[BaseException] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        while not stop.is_set():
            started = time.time()
            try:
                reply = served.generate(book_id=book, seed=seed, max_new_tokens=8)
            except BaseException as exc:
                failures.append(exc)
                return
            results.append((started, time.time(), reply.adapter.version, seed, reply.text))

    threads = [threading.Thread(target=client, args=(seed % 2,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    latencies = {}
    try:
        for part in (1, 2, 3):
            time.sleep(0.5)
            meta = publish(store, adapter_dirs[f"A{part}"], book, "j-e00000000000", part)
            published[meta.version] = meta.published_at

            def served_new(version: str = meta.version) -> float | None:
                return next((end for _s, end, v, *_ in results if v == version), None)

            latencies[meta.version] = wait_until(served_new, timeout=60) - meta.published_at
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    print(f"publish -> served latencies: { {v: round(s, 2) for v, s in latencies.items()} }")
    assert not failures, failures
    assert len(results) >= 8
    for started, _end, version, _seed, _text in results:
        assert version in published and published[version] <= started, (version, started)
    # Each response's text is exactly what its version produces for that seed alone: no stale
    # or mixed weights across the swaps.
    reference = {}
    for _s, _e, version, seed, text in results:
        if (version, seed) not in reference:
            reference[version, seed] = served.generate(
                book_id=book, adapter=version, seed=seed, max_new_tokens=8
            ).text
        assert text == reference[version, seed], version
    assert len({version for version, _seed in reference}) == 4


# --- requirement 4: metrics --------------------------------------------------------------------


def test_metrics_cover_requests_latency_tokens_and_adapters(served: Served) -> None:
    served.generate(book_id=BOOK_A, max_new_tokens=4)
    rpc_error(lambda: served.generate(book_id=BOOK_A, temperature=9.0))
    version = served.registry.alias(BOOK_A)
    assert (
        metric(
            "novelcrafter_inference_requests_total",
            method="Generate",
            status="OK",
            book=BOOK_A,
            adapter=version,
        )
        >= 1
    )
    assert (
        metric(
            "novelcrafter_inference_requests_total",
            method="Generate",
            status="INVALID_ARGUMENT",
            book="unknown",
            adapter="unresolved",
        )
        >= 1
    )
    assert metric("novelcrafter_inference_time_to_first_token_seconds_count") >= 1
    assert metric("novelcrafter_inference_time_per_output_token_seconds_count") >= 1
    assert metric("novelcrafter_inference_generated_tokens_total", book=BOOK_A, adapter=version) >= 1
    assert metric("novelcrafter_inference_adapter_loads_total", result="loaded") >= 3
    assert metric("novelcrafter_inference_adapter_load_seconds_count") >= 3
    assert metric("novelcrafter_inference_adapter_versions_held") >= 1
    assert metric("novelcrafter_inference_batch_size_count") >= 1


# --- S3 ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_store_new_versions_are_picked_up(s3_settings: dict, adapter_dirs: dict[str, Path]) -> None:
    url = "s3://nc-inference/store"
    settings = get_settings(store=url, metrics_listen="off")
    store = open_store(url, settings)
    book = "f000000000000006"
    first = publish(store, adapter_dirs["A0"], book, "j-f00000000001", 0).version
    server = InferenceServer(
        InferenceConfig(listen="127.0.0.1:0", store=url, base_model=BASE, watch_interval=0.3),
        settings,
    )
    server.start()
    try:
        server.load()
        with connect(f"127.0.0.1:{server.port}", settings) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def latest() -> str:
                request = build_request(PROMPT, book_id=book, max_new_tokens=3, seed=1)
                return stub.Generate(request, timeout=60).adapter.version

            assert latest() == first
            for part in (1, 2):  # again and again: not a one-time pick-up
                version = publish(store, adapter_dirs[f"A{part}"], book, "j-f00000000001", part).version
                wait_until(lambda v=version: latest() == v, timeout=60, interval=0.2)
    finally:
        server.stop(5)


# --- the engine against PEFT -------------------------------------------------------------------


def test_engine_matches_peft_for_a_trained_adapter(
    trainer_model: tuple[Any, Any], adapter_dirs: dict[str, Path]
) -> None:
    """Our per-row LoRA forward computes what PEFT computes (fp32: logits and greedy tokens)."""
    from novelcrafter.inference.engine import Engine
    from novelcrafter.inference.lora import load_lora
    from peft import PeftModel

    model, tok = trainer_model
    engine = Engine(model, device="cpu", dtype=torch.float32, max_batch=2)
    weights = load_lora(adapter_dirs["B0"], model, dtype=torch.float32)
    ids = tok(PROMPT)["input_ids"]
    cache = engine.new_cache(len(ids) + 8)
    logits = [engine.prefill(ids, cache, weights)]
    tokens = [int(logits[0].argmax())]
    for _ in range(6):
        logits.append(engine.decode([tokens[-1]], [cache], [weights])[0])
        tokens.append(int(logits[-1].argmax()))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs["B0"])).eval()
    try:
        with torch.no_grad():
            full = torch.tensor([ids + tokens[:-1]])
            reference = peft_model(input_ids=full).logits[0, len(ids) - 1 :].float()
            generated = peft_model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=7,
                do_sample=False,
            )[0, len(ids) :].tolist()
    finally:
        peft_model.unload()
    torch.testing.assert_close(torch.stack(logits), reference, atol=2e-3, rtol=1e-4)
    assert tokens == generated
    # And the adapter matters: the base model alone gives other logits.
    base_logits = engine.prefill(ids, engine.new_cache(len(ids)), None)
    assert not torch.allclose(base_logits, logits[0], atol=1e-2)
