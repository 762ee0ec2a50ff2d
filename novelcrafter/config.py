"""Settings: every setting is an environment variable and a CLI flag; flags win.

Names are the same in the CLI, docker compose and Kubernetes (see README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_INGEST_LISTEN = "0.0.0.0:50051"
DEFAULT_INFERENCE_LISTEN = "0.0.0.0:50052"
DEFAULT_HTTP_LISTEN = "0.0.0.0:8000"  # the inference service's OpenAI-compatible HTTP API
DEFAULT_COORDINATOR = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:50052"
DEFAULT_METRICS = {"ingest": "0.0.0.0:9101", "trainer": "0.0.0.0:9102", "inference": "0.0.0.0:9103"}


class Settings(BaseSettings):
    """Process-wide settings from ``NOVELCRAFTER_*`` (and the standard AWS/HF variables)."""

    model_config = SettingsConfigDict(env_prefix="NOVELCRAFTER_", extra="ignore", populate_by_name=True)

    store: str = "./data"
    s3_endpoint: str | None = None
    s3_secure: bool = False
    s3_region: str | None = None
    s3_ca_file: str | None = None  # CA bundle for an S3 endpoint with a private certificate
    aws_access_key_id: str | None = Field(default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"), repr=False
    )

    listen: str | None = None  # default depends on the service
    coordinator: str = DEFAULT_COORDINATOR
    inference: str = DEFAULT_INFERENCE  # where the CLI reaches InferenceService
    base_model: str = DEFAULT_BASE_MODEL
    auth_token: str | None = Field(default=None, repr=False)  # never logged
    metrics_listen: str | None = None  # default depends on the service; "off" disables
    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "novelcrafter")
    hf_token: str | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "NOVELCRAFTER_HF_TOKEN"), repr=False
    )

    # gRPC transport
    max_message_mb: int = 64
    grace_seconds: float = 30.0
    tls_cert: str | None = None  # server certificate (PEM); enables TLS on the server
    tls_key: str | None = None  # server private key (PEM)
    tls_client_ca: str | None = None  # server: require client certificates signed by this CA
    tls_ca: str | None = None  # client: CA that signed the server certificate; enables TLS on the client
    tls_client_cert: str | None = None  # client certificate for mutual TLS
    tls_client_key: str | None = None

    log_level: str = "INFO"
    log_format: str = "auto"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given (non-None) values: how CLI flags win over the environment."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        return self.model_copy(update=updates)


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment (read now), with flag overrides applied."""
    return Settings().with_overrides(**overrides)
