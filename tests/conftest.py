"""Session-wide fixtures: the real base model (loaded once), a real S3 server (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import base_env, free_port, wait_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The provisioned default base model (SmolLM2-135M-Instruct, converted once by make setup)."""
    from novelcrafter.models import provision_base_model

    return provision_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def base_model(base_model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded once per test session. Do not train it in place."""
    from novelcrafter.models import load_base_model, load_tokenizer

    return load_base_model(base_model_dir), load_tokenizer(base_model_dir)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3 server process (moto standalone) on 127.0.0.1; yields the env to reach it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    try:
        wait_port(port, 60, proc)
        yield {
            "NOVELCRAFTER_S3_ENDPOINT": f"127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "moto-test-secret-6b1f0c93d2a4",  # services refuse short ones
        }
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def s3_settings(moto_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test process's settings at the moto server."""
    for key, value in moto_server.items():
        monkeypatch.setenv(key, value)
    return moto_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the session (tests/pg_support.py's PostgresServer):
    ``.url`` (``postgresql://…@127.0.0.1:PORT/novelcrafter``), ``.stop()`` and ``.start()``
    (an outage: same port, same data), ``.create_database()`` (a fresh one, its URL). Skips
    without PostgreSQL's server programs; fails instead under CI=true. A test that stops it
    starts it again before it ends (try/finally)."""
    from pg_support import PostgresServer, require_binaries

    server = PostgresServer(require_binaries())
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres: Any) -> str:
    """The URL of the session's PostgreSQL database (the ``postgres`` fixture)."""
    return postgres.url
