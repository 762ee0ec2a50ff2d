"""Settings, declared once: every setting of every service, with its variable, flag, default and help.

A setting is a pydantic field: its variable is ``NOVELCRAFTER_<FIELD>`` (or the alias it
declares), its help is the field's ``description`` and its CLI flag, when it has one, is
declared beside it (``flag``). The services read them through :func:`get_settings`; flags
win over the environment. :class:`Settings` holds what every service shares; each service's
own settings extend it (:class:`IngestSettings`, :class:`TrainerSettings`,
:class:`InferenceSettings`, :class:`ConsoleSettings`). The README's configuration table is
tested against these declarations.

Names are the same in the CLI, docker compose and Kubernetes (see README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from novelcrafter.errors import InvalidArgument

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_INGEST_LISTEN = "0.0.0.0:50051"
DEFAULT_INFERENCE_LISTEN = "0.0.0.0:50052"
DEFAULT_HTTP_LISTEN = "0.0.0.0:8000"  # the inference service's OpenAI-compatible HTTP API
DEFAULT_CONSOLE_LISTEN = "0.0.0.0:8080"
DEFAULT_COORDINATOR = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:50052"
DEFAULT_METRICS = {"ingest": "0.0.0.0:9101", "trainer": "0.0.0.0:9102", "inference": "0.0.0.0:9103"}

S = TypeVar("S", bound="Settings")


def setting(default: Any = None, help: str = "", *, flag: str | None = None, **kwargs: Any) -> Any:
    """A declared setting: its default, what it means (``help``) and its CLI flag, if any."""
    extra = {"flag": flag} if flag else None
    if "default_factory" in kwargs:
        return Field(description=help, json_schema_extra=extra, **kwargs)
    return Field(default, description=help, json_schema_extra=extra, **kwargs)


def _number_or_default(default: float) -> BeforeValidator:
    """A number from the environment; unset, empty or not a number reads as ``default``."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value) if value.strip() else default
            except ValueError:
                return default
        return default if value is None else value

    return BeforeValidator(parse)


DEFAULT_LEASE_SECONDS = 60.0


def _lease_seconds(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            return DEFAULT_LEASE_SECONDS
        try:
            return float(value)
        except ValueError:
            raise InvalidArgument(f"NOVELCRAFTER_LEASE_SECONDS must be a number of seconds (got {value!r})")
    return value


class Settings(BaseSettings):
    """What every service shares, from ``NOVELCRAFTER_*`` (and the standard AWS/HF variables)."""

    model_config = SettingsConfigDict(env_prefix="NOVELCRAFTER_", extra="ignore", populate_by_name=True)

    store: str = setting("./data", "store URL: a path, `file://…`, or `s3://bucket/prefix`", flag="--store")
    store_retry_seconds: float = setting(
        30.0, "how long a store operation is retried while the store is unreachable"
    )
    s3_endpoint: str | None = setting(None, "S3/MinIO endpoint (HOST:PORT or a URL)")
    s3_secure: bool = setting(False, "HTTPS to the S3 endpoint")
    s3_region: str | None = setting(None, "S3 region")
    s3_ca_file: str | None = setting(None, "CA bundle for an S3 endpoint with a private certificate")
    aws_access_key_id: str | None = setting(
        None, "S3 access key", validation_alias=AliasChoices("AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: str | None = setting(
        None, "S3 secret key", validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"), repr=False
    )

    listen: str | None = setting(
        None, "gRPC address a service binds (default: the service's own)", flag="--listen"
    )
    coordinator: str = setting(
        DEFAULT_COORDINATOR, "where trainers (and the CLI) reach `JobService`", flag="--coordinator"
    )
    inference: str = setting(DEFAULT_INFERENCE, "where the CLI reaches `InferenceService`", flag="--server")
    base_model: str = setting(
        DEFAULT_BASE_MODEL, "base model name, hub id, `store:NAME` or path", flag="--base-model"
    )
    auth_token: str | None = setting(
        None,
        "when set, every RPC and HTTP request except health needs `authorization: Bearer <token>`",
        repr=False,
    )  # never logged
    metrics_listen: str | None = setting(
        None, "Prometheus `/metrics` address (`off` disables; default: the service's own)"
    )
    home: Path = setting(
        help="caches (converted base models)", default_factory=lambda: Path.home() / ".cache" / "novelcrafter"
    )
    hf_token: str | None = setting(
        None,
        "Hugging Face token (trainer: push adapters to the Hub)",
        validation_alias=AliasChoices("HF_TOKEN", "NOVELCRAFTER_HF_TOKEN"),
        repr=False,
    )
    hf_endpoint: str | None = setting(
        None, "Hugging Face Hub endpoint (default: the Hub)", validation_alias=AliasChoices("HF_ENDPOINT")
    )
    device: str | None = setting(
        None, "where a trainer or inference computes: auto | cpu | cuda (default auto)", flag="--device"
    )
    max_upload_mb: Annotated[float, _number_or_default(200)] = setting(
        200, "the largest PDF ingest and the console accept, in MB"
    )

    # gRPC transport
    max_message_mb: int = setting(64, "gRPC message size limit")
    grace_seconds: float = setting(30.0, "on SIGTERM, how long in-flight requests may finish")
    tls_cert: str | None = setting(None, "server certificate (PEM); enables TLS on the server")
    tls_key: str | None = setting(None, "server private key (PEM)")
    tls_client_ca: str | None = setting(None, "server: require client certificates signed by this CA")
    tls_ca: str | None = setting(None, "client: CA that signed the server certificate; enables TLS")
    tls_client_cert: str | None = setting(None, "client certificate for mutual TLS")
    tls_client_key: str | None = setting(None, "client private key for mutual TLS")

    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = setting("auto", "`json`, `text` or `auto` (JSON when not a terminal)")

    def with_overrides(self: S, **overrides: Any) -> S:
        """A copy with the given (non-None) values: how CLI flags win over the environment."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        return self.model_copy(update=updates)


class IngestSettings(Settings):
    """The ingest service and its job coordinator."""

    max_concurrent_ingests: int = setting(2, "books extracted at once (each uses every core)")
    max_pages: Annotated[float, _number_or_default(5000)] = setting(5000, "pages a PDF may have")
    extract_memory_mb: Annotated[float, _number_or_default(512)] = setting(
        512, "memory limit of each extraction worker, in MB"
    )
    extract_timeout: Annotated[float, _number_or_default(300.0)] = setting(
        300.0, "seconds an extraction may take per document"
    )
    extract_page_timeout: Annotated[float, _number_or_default(30.0)] = setting(
        30.0, "seconds an extraction may take per page"
    )
    extract_workers: Annotated[float, _number_or_default(0)] = setting(
        0, "extraction worker processes (0 = all cores, at most 32)"
    )
    lease_seconds: Annotated[float, BeforeValidator(_lease_seconds)] = setting(
        DEFAULT_LEASE_SECONDS, "coordinator: how long a trainer holds a part without renewing its lease"
    )


class TrainerSettings(Settings):
    """A trainer worker (``device``: :class:`Settings`)."""

    poll_seconds: float = setting(
        2.0, "trainer: wait between claims when there is no work", flag="--poll-seconds"
    )


class InferenceSettings(Settings):
    """The inference service (``device``: :class:`Settings`)."""

    http_listen: str = setting(
        DEFAULT_HTTP_LISTEN,
        "inference's OpenAI-compatible HTTP API address (`off` disables)",
        flag="--http-listen",
    )
    watch_interval: float = setting(
        2.0, "inference: seconds between scans of the store for new adapters", flag="--watch-interval"
    )
    max_adapters: int = setting(8, "inference: adapter versions held in memory (LRU)", flag="--max-adapters")
    max_concurrency: int = setting(
        8, "inference: generations running at once (batched together)", flag="--max-concurrency"
    )
    max_queued: int | None = setting(
        None,
        "inference: requests that wait in arrival order for a busy slot (until their deadline); only "
        "beyond them RESOURCE_EXHAUSTED / HTTP 429; `0`: refuse as soon as every slot is busy "
        "(default 4 × `--max-concurrency`)",
        flag="--max-queued",
    )
    max_new_tokens_cap: int = setting(
        1024, "inference: largest max_new_tokens accepted", flag="--max-new-tokens-cap"
    )
    max_prompt_tokens: int = setting(
        4096, "inference: longest prompt accepted, in tokens", flag="--max-prompt-tokens"
    )
    inference_dtype: str = setting(
        "auto",
        "inference: auto (half on CUDA; bf16 on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16",
        flag="--dtype",
    )
    engine: str = setting(
        "native",
        "inference's generation backend: `native` (our continuous-batching engine) or `vllm` (a vLLM "
        "server at `NOVELCRAFTER_VLLM_URL`; adapters, validation and APIs stay ours)",
        flag="--engine",
    )
    vllm_url: str | None = setting(
        None, "`--engine vllm`: the vLLM server, http://HOST:PORT", flag="--vllm-url"
    )
    vllm_adapter_dir: str | None = setting(
        None,
        "`--engine vllm`: where validated versions are written for vLLM to load (the same path must "
        "be readable by the vLLM server; default `$NOVELCRAFTER_HOME/inference/vllm-adapters`)",
        flag="--vllm-adapter-dir",
    )
    vllm_model_dir: str | None = setting(
        None,
        "`--engine vllm`: copy the provisioned base model here, for a vLLM server (sharing the folder) "
        "that starts from it",
        flag="--vllm-model-dir",
    )
    vllm_wait: float = setting(
        600.0, "`--engine vllm`: seconds to wait for the vLLM server at start", flag="--vllm-wait"
    )


class ConsoleSettings(Settings):
    """The web console."""

    console_listen: str = setting(
        DEFAULT_CONSOLE_LISTEN, "the web console's address (`off` disables)", flag="--listen"
    )


SETTINGS_CLASSES: tuple[type[Settings], ...] = (
    Settings,
    IngestSettings,
    TrainerSettings,
    InferenceSettings,
    ConsoleSettings,
)


def env_names(cls: type[Settings], name: str) -> list[str]:
    """The environment variables a setting is read from."""
    info = cls.model_fields[name]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{cls.model_config.get('env_prefix', '')}{name}".upper()]


def declared(cls: type[Settings], name: str) -> FieldInfo:
    return cls.model_fields[name]


def flag_of(cls: type[Settings], name: str) -> str | None:
    extra = declared(cls, name).json_schema_extra
    return extra.get("flag") if isinstance(extra, dict) else None  # type: ignore[return-value]


def help_text(cls: type[Settings], name: str, default: str | None = None) -> str:
    """A flag's help: the setting's meaning, its variable and its default."""
    info = declared(cls, name)
    shown = default if default is not None else info.get_default(call_default_factory=True)
    env = env_names(cls, name)[0]
    return f"{info.description} [env {env}" + (f", default {shown}]" if shown not in (None, "") else "]")


def get_settings(settings_class: type[S] = Settings, /, **overrides: Any) -> S:  # type: ignore[assignment]
    """Settings from the environment (read now), with flag overrides applied.

    A variable that does not parse is one :class:`InvalidArgument` naming it."""
    try:
        settings = settings_class()
    except ValidationError as exc:
        fields = settings_class.model_fields

        def variable(loc: tuple[Any, ...]) -> str:
            where = str(loc[0]) if loc else "?"
            return env_names(settings_class, where)[0] if where in fields else where

        problems = "; ".join(f"{variable(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid setting: {problems}") from None
    return settings.with_overrides(**overrides)
