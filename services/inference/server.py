"""Assemble and run the inference server: gRPC (and the OpenAI-compatible HTTP API) first,
NOT_SERVING; then the model; then SERVING. Both APIs share one scheduler and registry."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novelcrafter.adapters import AdapterMeta
from novelcrafter.config import DEFAULT_INFERENCE_LISTEN, Settings, get_settings
from novelcrafter.logs import get_logger
from novelcrafter.rpc import GrpcServer, Service, start_server
from novelcrafter.store import open_store
from novelcrafter.v1 import inference_pb2_grpc

from . import metrics
from .registry import AdapterRegistry, RegistryHooks
from .scheduler import Finished, Generation, Scheduler
from .service import InferenceServicer, Limits, LockedTokenizer, Runtime

log = get_logger(__name__)

SERVICE_NAME = "novelcrafter.v1.InferenceService"
QUEUE_PER_SLOT = 4  # the default --max-queued: this many waiting requests per generation slot
_CALIBRATION_TEXTS = (
    "It was a bright cold day in April, and the clocks were striking",
    "Call me",
    "The sea was calm that night; the lighthouse keeper climbed the stairs and",
    "Once upon a time",
)
# Names of end-of-text tokens that end generation besides the tokenizer's eos token.
_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


@dataclass
class InferenceConfig:
    listen: str = DEFAULT_INFERENCE_LISTEN
    # The HTTP API's address. Off unless asked for: the CLI's default is DEFAULT_HTTP_LISTEN, but
    # programs that embed the server (tests, the benchmark) must not grab a fixed port.
    http_listen: str = "off"
    store: str | None = None  # None: settings.store
    base_model: str | None = None  # None: settings.base_model
    watch_interval: float = 2.0
    max_adapters: int = 8
    max_concurrency: int = 8
    max_queued: int | None = None  # None: QUEUE_PER_SLOT x max_concurrency; 0: no queue
    max_new_tokens_cap: int = 1024
    max_prompt_tokens: int = 4096
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "native"  # native | vllm: who runs generation (vllm_backend.py)
    vllm_url: str | None = None  # engine vllm: the vLLM server's OpenAI API
    vllm_adapter_dir: str | None = None  # where validated versions are written for vLLM to read
    vllm_wait: float = 600.0  # seconds to wait for the vLLM server to answer at start
    vllm_model_dir: str | None = None  # copy the base model here for a vLLM server that waits for it


def end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if isinstance(value, int):
            ids.add(value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in _END_TOKENS if name in vocab)
    return ids


class InferenceServer:
    """The inference service: call :meth:`start` (gRPC up, NOT_SERVING), :meth:`load` (model,
    adapters, then SERVING), and :meth:`stop`."""

    def __init__(self, config: InferenceConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.settings = settings or get_settings()
        self.limits = Limits(
            max_new_tokens_cap=config.max_new_tokens_cap, max_prompt_tokens=config.max_prompt_tokens
        )
        self.servicer = InferenceServicer(self.limits)
        self.max_queued = (
            QUEUE_PER_SLOT * config.max_concurrency if config.max_queued is None else config.max_queued
        )
        self.grpc: GrpcServer | None = None
        self.http: Any = None  # http_api.HttpServer when the HTTP API is on
        self.runtime: Runtime | None = None
        self.engine: Any = None

    @property
    def port(self) -> int:
        assert self.grpc is not None
        return self.grpc.port

    @property
    def http_port(self) -> int:
        assert self.http is not None
        return self.http.port

    @property
    def max_requests(self) -> int:
        """Generation requests the server holds at once: running plus queued."""
        return self.config.max_concurrency + self.max_queued

    def start(self) -> GrpcServer:
        # Every running or queued Generate blocks a worker thread: size the pool for all of
        # them, or requests would wait unbounded in the pool instead of in the scheduler.
        workers = max(32, 2 * self.max_requests + 16)
        self.grpc = start_server(
            [Service(SERVICE_NAME, self.servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)],
            self.config.listen,
            self.settings,
            serving=False,
            max_workers=workers,
        )
        if self.config.http_listen.strip().lower() not in ("off", "none", ""):
            try:
                self._start_http()
            except BaseException:
                self.grpc.stop(0)
                raise
        return self.grpc

    def _start_http(self) -> None:
        from .http_api import HttpApi, HttpServer

        api = HttpApi(
            self.servicer,
            self.settings,
            base_model=self.config.base_model or self.settings.base_model,
            max_requests=self.max_requests,
        )
        self.http = HttpServer(api.asgi, self.config.http_listen, self.settings)
        self.http.start()
        assert self.grpc is not None
        self.grpc.on_stop.append(self.http.begin_shutdown)  # both drain at once on SIGTERM

    def load(self) -> None:
        """Load the base model once, calibrate, scan adapters, then report SERVING."""
        if self.config.engine == "vllm":
            from .vllm_runtime import load_vllm

            load_vllm(self)
            return
        from novelcrafter.models import load_base_model, load_tokenizer, pick_device, provision_base_model

        from .engine import Engine, random_lora, resolve_dtype
        from .lora import load_lora

        started = time.monotonic()
        settings, config = self.settings, self.config
        base_name = config.base_model or settings.base_model
        model_dir = provision_base_model(base_name, settings)
        device = pick_device(config.device)
        dtype = resolve_dtype(device, config.dtype)
        model = load_base_model(model_dir, device, dtype)
        tokenizer = load_tokenizer(model_dir)
        engine = Engine(model, device=device, dtype=dtype, max_batch=config.max_concurrency)
        probes = [tokenizer(text)["input_ids"] for text in _CALIBRATION_TEXTS]
        engine.calibrate(
            probes,
            [random_lora(engine, seed=1), random_lora(engine, seed=2)],
            cache_file=Path(settings.home).expanduser() / "inference" / "calibration.json",
        )
        self.engine = engine

        locked = LockedTokenizer(tokenizer)
        scheduler = Scheduler(
            engine,
            locked,
            end_token_ids(tokenizer, model),
            max_concurrency=config.max_concurrency,
            max_queued=self.max_queued,
            on_finish=_observe_finished,
            on_step=metrics.BATCH_SIZE.observe,
            on_slot=metrics.QUEUE_WAIT_SECONDS.observe,
        )

        def load_adapter(path: Path, meta: AdapterMeta) -> Any:
            return load_lora(
                path,
                model,
                dtype=engine.lora_dtype,
                device=device,
                trained_on=meta.base_model,
                base_name=base_name,
            )

        registry = self.make_registry(load_adapter)
        self.activate(Runtime(locked, scheduler, registry, engine.context))
        log.info(
            "inference ready",
            extra={
                "fields": {
                    "model": base_name,
                    "device": device,
                    "dtype": str(dtype).replace("torch.", ""),
                    "store": registry.store.url,
                    "slots": config.max_concurrency,
                    "max_queued": self.max_queued,
                    "seconds": round(time.monotonic() - started, 1),
                }
            },
        )

    def make_registry(self, loader: Any, on_drop: Any = None) -> AdapterRegistry:
        """The adapter registry over the configured store, wired to the metrics."""
        hooks = RegistryHooks(
            on_load=_observe_load,
            on_swap=lambda book: metrics.ADAPTER_SWAPS.labels(book).inc(),
            on_evict=metrics.ADAPTER_EVICTIONS.inc,
            on_held=metrics.VERSIONS_HELD.set,
        )
        if on_drop is not None:
            hooks.on_drop = on_drop
        return AdapterRegistry(
            open_store(self.config.store, self.settings),
            loader,
            max_adapters=self.config.max_adapters,
            watch_interval=self.config.watch_interval,
            hooks=hooks,
        )

    def activate(self, runtime: Runtime) -> None:
        """Scan the adapters, then serve ``runtime`` (health SERVING when its engine is healthy)."""
        scheduler = runtime.scheduler
        metrics.ACTIVE_GENERATIONS.set_function(lambda: scheduler.in_flight)
        metrics.QUEUE_DEPTH.set_function(lambda: scheduler.queued)
        runtime.registry.start()
        self.runtime = runtime
        self.servicer.runtime = runtime
        self.set_serving(runtime.engine.healthy())

    def set_serving(self, serving: bool) -> None:
        if self.grpc is not None:
            self.grpc.set_serving(serving)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting RPCs, let in-flight generations finish, then stop the threads."""
        if self.grpc is not None:
            self.grpc.stop(grace)
        self.stop_http(grace)
        self.close_runtime()

    def stop_http(self, grace: float | None = None) -> None:
        """Wait for the HTTP API's in-flight requests (up to the grace period), then stop it."""
        if self.http is not None:
            self.http.stop(grace)

    def close_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.scheduler.close()
            self.runtime.registry.close()
            for close in self.runtime.on_close:
                close()
            metrics.ACTIVE_GENERATIONS.set_function(lambda: 0)  # drop the reference to the scheduler
            metrics.QUEUE_DEPTH.set_function(lambda: 0)


def _observe_finished(gen: Generation, done: Finished) -> None:
    book = gen.adapter.book_id if gen.adapter is not None else "base"
    version = gen.adapter.version if gen.adapter is not None else "base"
    metrics.PROMPT_TOKENS.inc(done.prompt_tokens)
    metrics.TOKENS_GENERATED.labels(book, version).inc(done.completion_tokens)
    metrics.REQUEST_SECONDS.observe(done.total_seconds)
    if done.first_token_seconds is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(done.first_token_seconds)
        if done.completion_tokens > 1:
            per_token = (done.total_seconds - done.first_token_seconds) / (done.completion_tokens - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.observe(per_token)


def _observe_load(result: str, seconds: float) -> None:
    metrics.ADAPTER_LOADS.labels(result).inc()
    if result == "loaded":
        metrics.ADAPTER_LOAD_SECONDS.observe(seconds)


def serve(config: InferenceConfig, settings: Settings | None = None) -> None:
    """Run until SIGTERM/SIGINT: the ``novelcrafter serve inference`` command."""
    from novelcrafter.metrics import start_metrics_server

    settings = settings or get_settings()
    server = InferenceServer(config, settings)
    grpc_server = server.start()
    grpc_server.install_signal_handlers()
    start_metrics_server(settings, "inference", config.listen)
    try:
        server.load()
    except BaseException:
        grpc_server.stop(0)
        server.stop_http(0)
        raise
    grpc_server.wait()
    server.stop_http()
    server.close_runtime()
