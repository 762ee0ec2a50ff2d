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
# Loopback by default: listening anywhere else needs a token or --allow-unauthenticated
# (novelcrafter/exposure.py). Containers and Kubernetes pass 0.0.0.0 explicitly, with a token.
DEFAULT_INGEST_LISTEN = "127.0.0.1:50051"
DEFAULT_INFERENCE_LISTEN = "127.0.0.1:50052"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8000"  # the inference service's OpenAI-compatible HTTP API
DEFAULT_CONSOLE_LISTEN = "127.0.0.1:8080"
DEFAULT_COORDINATOR_LISTEN = "127.0.0.1:50054"  # `serve coordinator` (ingest hosts it on its own port)
DEFAULT_COORDINATOR = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:50052"
# /metrics binds on its service's host (loopback for a trainer, which has no listener) at this port.
DEFAULT_METRICS_PORTS = {"ingest": 9101, "trainer": 9102, "inference": 9103, "coordinator": 9104}

S = TypeVar("S", bound="Settings")


def setting(default: Any = None, help: str = "", *, flag: str | None = None, **kwargs: Any) -> Any:
    """A declared setting: its default, what it means (``help``) and its CLI flag, if any."""
    extra = {"flag": flag} if flag else None
    if "default_factory" in kwargs:
        return Field(description=help, json_schema_extra=extra, **kwargs)
    return Field(default, description=help, json_schema_extra=extra, **kwargs)


def _number_or_default(default: float) -> BeforeValidator:
    """A number from the environment; unset or empty reads as ``default``. Anything else must be
    a finite number in the setting's range (checked by its declaration): ``nan`` is an error."""

    def parse(value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return default
        return default if value is None else value

    return BeforeValidator(parse)


def bounded(
    lo: float | None = None, hi: float | None = None, *, above: float | None = None
) -> dict[str, Any]:
    """A numeric setting's range (``above``: strictly greater than), always finite."""
    bounds: dict[str, Any] = {"allow_inf_nan": False, "le": hi}
    if above is not None:
        bounds["gt"] = above
    else:
        bounds["ge"] = lo
    return bounds


DEFAULT_LEASE_SECONDS = 60.0


class Settings(BaseSettings):
    """What every service shares, from ``NOVELCRAFTER_*`` (and the standard AWS/HF variables)."""

    model_config = SettingsConfigDict(env_prefix="NOVELCRAFTER_", extra="ignore", populate_by_name=True)

    store: str = setting("./data", "store URL: a path, `file://…`, or `s3://bucket/prefix`", flag="--store")
    store_retry_seconds: float = setting(
        30.0, "how long a store operation is retried while the store is unreachable", **bounded(0, 3600)
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
    db: str | None = setting(
        None,
        "the coordinator's database: `sqlite:///PATH` or `postgresql://USER:PASSWORD@HOST:PORT/DB` "
        "(default: SQLite beside a local store; an S3 store needs it set)",
        repr=False,
    )
    embedded_coordinator: bool = setting(
        True,
        "ingest: host the job coordinator (JobService) in the ingest process; `false`: create jobs "
        "through the coordinator service at NOVELCRAFTER_COORDINATOR (`serve coordinator`)",
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
    allow_unauthenticated: bool = setting(
        False,
        "serve addresses beyond loopback without NOVELCRAFTER_AUTH_TOKEN (logged as a warning)",
        flag="--allow-unauthenticated",
    )
    metrics_listen: str | None = setting(
        None,
        "Prometheus `/metrics` address (`off` disables; default: the service's host, port 9101 ingest, "
        "9102 trainer, 9103 inference); needs the bearer token when one is set",
    )
    model_dirs: str | None = setting(
        None,
        "directories (`:`-separated) under which a job's `base_model` may name a model folder; "
        "a job may name no other path",
    )
    hub_push: bool = setting(
        False, "coordinator: accept jobs that push adapters to the Hugging Face Hub (`hub_repo_id`)"
    )
    hub_namespace: str | None = setting(
        None, "coordinator: with NOVELCRAFTER_HUB_PUSH, the only Hub namespace jobs may push to"
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
        200, "the largest PDF ingest and the console accept, in MB", **bounded(above=0, hi=4096)
    )

    # gRPC transport
    max_message_mb: int = setting(64, "gRPC message size limit", **bounded(1, 2047))
    max_streams: int = setting(
        256,
        "gRPC streaming calls (WatchJob, uploads, downloads, GenerateStream) a server holds open at once, "
        "on threads of their own: one more is RESOURCE_EXHAUSTED, and short calls are never starved",
        **bounded(1, 10_000),
    )
    grace_seconds: float = setting(
        30.0, "on SIGTERM, how long in-flight requests may finish", **bounded(0, 3600)
    )
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
        if not updates:
            return self
        # Validated like the environment: a flag out of range is the same clear error.
        updated = type(self).model_validate({**self.model_dump(), **updates})
        updated.__pydantic_fields_set__ = self.model_fields_set | set(updates)  # what was given
        return updated


class IngestSettings(Settings):
    """The ingest service and its job coordinator."""

    max_concurrent_ingests: int = setting(
        2, "books extracted at once (each uses every core)", **bounded(1, 64)
    )
    max_pages: Annotated[float, _number_or_default(5000)] = setting(
        5000, "pages a PDF may have", **bounded(1, 1_000_000)
    )
    extract_memory_mb: Annotated[float, _number_or_default(512)] = setting(
        512, "memory limit of each extraction worker, in MB", **bounded(64, 1 << 20)
    )
    extract_timeout: Annotated[float, _number_or_default(300.0)] = setting(
        300.0, "seconds an extraction may take per document", **bounded(above=0, hi=86400)
    )
    extract_page_timeout: Annotated[float, _number_or_default(30.0)] = setting(
        30.0, "seconds an extraction may take per page", **bounded(above=0, hi=86400)
    )
    extract_workers: Annotated[float, _number_or_default(0)] = setting(
        0, "extraction worker processes (0 = all cores, at most 32)", **bounded(0, 32)
    )
    lease_seconds: Annotated[float, _number_or_default(DEFAULT_LEASE_SECONDS)] = setting(
        DEFAULT_LEASE_SECONDS,
        "coordinator: how long a trainer holds a part without renewing its lease",
        **bounded(above=0, hi=86400),
    )


class TrainerSettings(Settings):
    """A trainer worker (``device``: :class:`Settings`)."""

    poll_seconds: float = setting(
        2.0,
        "trainer: wait between claims when there is no work",
        flag="--poll-seconds",
        **bounded(above=0, hi=3600),
    )


class InferenceSettings(Settings):
    """The inference service (``device``: :class:`Settings`)."""

    http_listen: str = setting(
        DEFAULT_HTTP_LISTEN,
        "inference's OpenAI-compatible HTTP API address (`off` disables)",
        flag="--http-listen",
    )
    watch_interval: float = setting(
        2.0,
        "inference: seconds between scans of the store for new adapters",
        flag="--watch-interval",
        **bounded(above=0, hi=3600),
    )
    max_adapters: int = setting(
        8, "inference: adapter versions held in memory (LRU)", flag="--max-adapters", **bounded(1, 1024)
    )
    max_concurrency: int = setting(
        8,
        "inference: generations running at once (batched together)",
        flag="--max-concurrency",
        **bounded(1, 1024),
    )
    max_queued: int | None = setting(
        None,
        "inference: requests that wait in arrival order for a busy slot (until their deadline); only "
        "beyond them RESOURCE_EXHAUSTED / HTTP 429; `0`: refuse as soon as every slot is busy "
        "(default 4 × `--max-concurrency`)",
        flag="--max-queued",
        **bounded(0, 1_000_000),
    )
    max_new_tokens_cap: int = setting(
        1024, "inference: largest max_new_tokens accepted", flag="--max-new-tokens-cap", **bounded(1, 131072)
    )
    max_prompt_tokens: int = setting(
        4096,
        "inference: longest prompt accepted, in tokens",
        flag="--max-prompt-tokens",
        **bounded(1, 131072),
    )
    http_max_body_mb: float = setting(
        2.0,
        "inference: largest HTTP request body the OpenAI-compatible API accepts, in MB",
        gt=0,
        le=64,
        allow_inf_nan=False,
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
        600.0,
        "`--engine vllm`: seconds to wait for the vLLM server at start",
        flag="--vllm-wait",
        **bounded(0, 86400),
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
        return settings_class().with_overrides(**overrides)
    except ValidationError as exc:
        fields = settings_class.model_fields

        def variable(loc: tuple[Any, ...]) -> str:
            where = str(loc[0]) if loc else "?"
            if where not in fields:
                return where
            flag = flag_of(settings_class, where)
            return env_names(settings_class, where)[0] + (f" ({flag})" if flag else "")

        problems = "; ".join(f"{variable(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid setting: {problems}") from None
