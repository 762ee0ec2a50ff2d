"""``novelcrafter serve inference`` and ``novelcrafter generate``.

Module-level imports stay light (no torch): heavy modules load inside the commands.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from novelcrafter.cli import AllowUnauthenticatedOpt, BaseModelOpt, StoreOpt, setting_option
from novelcrafter.config import DEFAULT_INFERENCE_LISTEN, InferenceSettings, Settings


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    app.command("generate")(generate)
    serve_app.command("inference")(serve_inference)


def serve_inference(
    listen: Annotated[
        str | None, setting_option(Settings, "listen", default=DEFAULT_INFERENCE_LISTEN)
    ] = None,
    http_listen: Annotated[str | None, setting_option(InferenceSettings, "http_listen")] = None,
    store: StoreOpt = None,
    base_model: BaseModelOpt = None,
    watch_interval: Annotated[float | None, setting_option(InferenceSettings, "watch_interval")] = None,
    max_adapters: Annotated[int | None, setting_option(InferenceSettings, "max_adapters")] = None,
    max_concurrency: Annotated[int | None, setting_option(InferenceSettings, "max_concurrency")] = None,
    max_queued: Annotated[int | None, setting_option(InferenceSettings, "max_queued")] = None,
    max_new_tokens_cap: Annotated[int | None, setting_option(InferenceSettings, "max_new_tokens_cap")] = None,
    max_prompt_tokens: Annotated[int | None, setting_option(InferenceSettings, "max_prompt_tokens")] = None,
    device: Annotated[str | None, setting_option(Settings, "device")] = None,
    dtype: Annotated[str | None, setting_option(InferenceSettings, "inference_dtype")] = None,
    engine: Annotated[str | None, setting_option(InferenceSettings, "engine")] = None,
    vllm_url: Annotated[str | None, setting_option(InferenceSettings, "vllm_url")] = None,
    vllm_adapter_dir: Annotated[str | None, setting_option(InferenceSettings, "vllm_adapter_dir")] = None,
    vllm_model_dir: Annotated[str | None, setting_option(InferenceSettings, "vllm_model_dir")] = None,
    vllm_wait: Annotated[float | None, setting_option(InferenceSettings, "vllm_wait")] = None,
    allow_unauthenticated: AllowUnauthenticatedOpt = None,
) -> None:
    """Serve generation over gRPC (and an OpenAI-compatible HTTP API) with hot-loaded per-book adapters."""
    from novelcrafter.config import get_settings
    from novelcrafter.errors import InvalidArgument
    from novelcrafter.exposure import check_secrets
    from novelcrafter.logs import configure_logging

    configure_logging()
    settings = get_settings(
        InferenceSettings,
        store=store,
        base_model=base_model,
        listen=listen,
        http_listen=http_listen,
        watch_interval=watch_interval,
        max_adapters=max_adapters,
        max_concurrency=max_concurrency,
        max_queued=max_queued,
        max_new_tokens_cap=max_new_tokens_cap,
        max_prompt_tokens=max_prompt_tokens,
        device=device,
        inference_dtype=dtype,
        engine=engine,
        vllm_url=vllm_url,
        vllm_adapter_dir=vllm_adapter_dir,
        vllm_model_dir=vllm_model_dir,
        vllm_wait=vllm_wait,
        allow_unauthenticated=allow_unauthenticated,
    )
    check_secrets(settings)
    max_adapters, max_concurrency, max_queued = (
        settings.max_adapters,
        settings.max_concurrency,
        settings.max_queued,
    )
    max_new_tokens_cap, max_prompt_tokens = settings.max_new_tokens_cap, settings.max_prompt_tokens
    watch_interval, engine, vllm_url, vllm_wait = (
        settings.watch_interval,
        settings.engine,
        settings.vllm_url,
        settings.vllm_wait,
    )
    http_listen = settings.http_listen
    for name, value in (("--max-adapters", max_adapters), ("--max-concurrency", max_concurrency)):
        if value < 1:
            raise InvalidArgument(f"{name} must be at least 1")
    if max_queued is not None and max_queued < 0:
        raise InvalidArgument("--max-queued must be 0 (no queue) or more")
    if max_new_tokens_cap < 1 or max_prompt_tokens < 1:
        raise InvalidArgument("--max-new-tokens-cap and --max-prompt-tokens must be at least 1")
    if not watch_interval > 0:
        raise InvalidArgument("--watch-interval must be positive")
    engine = engine.strip().lower()
    if engine not in ("native", "vllm"):
        raise InvalidArgument(f"--engine must be native or vllm, got {engine[:40]!r}")
    if engine == "vllm" and not (vllm_url or "").strip():
        raise InvalidArgument(
            "--engine vllm needs the vLLM server's URL: --vllm-url or NOVELCRAFTER_VLLM_URL"
        )
    if not vllm_wait >= 0:
        raise InvalidArgument("--vllm-wait must be 0 or more seconds")
    http_listen = http_listen.strip()
    if http_listen.lower() in ("off", "none", ""):
        http_listen = "off"
    elif not _is_address(http_listen):
        raise InvalidArgument(f"--http-listen must be HOST:PORT or off, got {http_listen[:80]!r}")
    from .server import InferenceConfig, serve  # heavy (torch): after the checks of the flags

    config = InferenceConfig(
        listen=settings.listen or DEFAULT_INFERENCE_LISTEN,
        http_listen=http_listen,
        store=settings.store,
        base_model=settings.base_model,
        watch_interval=watch_interval,
        max_adapters=max_adapters,
        max_concurrency=max_concurrency,
        max_queued=max_queued,
        max_new_tokens_cap=max_new_tokens_cap,
        max_prompt_tokens=max_prompt_tokens,
        device=settings.device or "auto",
        dtype=settings.inference_dtype,
        engine=engine,
        vllm_url=(vllm_url or "").strip() or None,
        vllm_adapter_dir=settings.vllm_adapter_dir,
        vllm_wait=vllm_wait,
        vllm_model_dir=settings.vllm_model_dir,
    )
    serve(config, settings)


def _is_address(listen: str) -> bool:
    host, sep, port = listen.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) < 65536)


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (continued as prose unless --chat).")],
    book: Annotated[
        str | None,
        typer.Option("--book", help="Book id whose adapter to use (not needed with --adapter base)."),
    ] = None,
    adapter: Annotated[
        str, typer.Option(help="latest | base | part-N | an exact version id (j-…-pNN)")
    ] = "latest",
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate (server default 128).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default 0.8).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default 0.95).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling, 0 = off (default 50).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Default 1.1; 1 = off.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop sequence (repeatable); not included in the text.")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is generated.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole response as JSON.")] = False,
    server: Annotated[str | None, setting_option(Settings, "inference", "--server")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 600.0,
) -> None:
    """Generate text from a book's adapter (or the base model) on a running inference server."""
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging

    from .client import build_request, generate_once, generate_stream

    configure_logging(default_level="WARNING")
    settings = get_settings(inference=server)
    request = build_request(
        prompt,
        book_id=book or "",
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop or [],
        chat=chat,
    )
    if stream:
        final = None
        for message in generate_stream(settings.inference, request, settings, timeout=timeout):
            if as_json:
                print(json.dumps(_to_dict(message)), flush=True)
            else:
                sys.stdout.write(message.text)
                sys.stdout.flush()
            final = message
        if not as_json:
            sys.stdout.write("\n")
            if final is not None:
                print(f"[{final.finish_reason}, {final.completion_tokens} tokens]", file=sys.stderr)
        return
    response = generate_once(settings.inference, request, settings, timeout=timeout)
    if as_json:
        print(json.dumps(_to_dict(response), indent=1))
    else:
        print(response.text)
        version = response.adapter.version
        print(
            f"[{response.adapter.book_id or '-'} {version}, {response.finish_reason}, "
            f"{response.prompt_tokens}+{response.completion_tokens} tokens]",
            file=sys.stderr,
        )


def _to_dict(message: object) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
