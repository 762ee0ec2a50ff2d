"""`novelcrafter serve inference` as a real process, driven by `novelcrafter generate`."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from novelcrafter.inference.adapter_factory import train_lora
from support import Proc, base_env, free_port, run_cli

from novelcrafter.adapters import publish_adapter
from novelcrafter.rpc import wait_for_health
from novelcrafter.store import open_store

BOOK = "c1100000000000aa"
TEXT = (
    "The train crossed the frozen plain at dawn. Frost covered the windows, and the passengers "
    "wrapped themselves in grey blankets while the stove in the corner glowed red."
)


@pytest.fixture(scope="module")
def store_with_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from novelcrafter.models import load_base_model, load_tokenizer

    model, tok = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    root = tmp_path_factory.mktemp("cli")
    adapter = train_lora(model, tok, [TEXT], root / "adapter", steps=1, lr=1e-2, max_length=32)
    store = root / "store"
    meta = publish_adapter(
        open_store(str(store)),
        adapter,
        book_id=BOOK,
        job_id="j-c11000000001",
        part=0,
        base_model="smollm2-135m-instruct",
    )
    return store, meta.version


@pytest.fixture(scope="module")
def server(store_with_adapter: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    store, _version = store_with_adapter
    port, metrics_port = free_port(), free_port()
    env = base_env(NOVELCRAFTER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}", NOVELCRAFTER_WATCH_INTERVAL="0.5")
    proc = Proc(
        [
            str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "novelcrafter"),
            "serve",
            "inference",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            str(store),
            "--max-new-tokens-cap",
            "64",
        ],
        env,
        tmp_path_factory.mktemp("cli-log") / "inference.log",
    )
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=240)
    except TimeoutError:
        proc.stop(5)
        pytest.fail(f"inference server did not become healthy:\n{proc.output()[-3000:]}")
    proc.address = f"127.0.0.1:{port}"
    proc.metrics_port = metrics_port
    try:
        yield proc
    finally:
        proc.stop(30)


def cli(server: Any, *args: str) -> Any:
    return run_cli("generate", *args, "--server", server.address, env=base_env(), timeout=120)


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_generate_command_against_a_served_process(server: Any, store_with_adapter: tuple[Path, str]) -> None:
    _store, version = store_with_adapter
    args = ("It was cold and", "--book", BOOK, "--max-new-tokens", "6", "--seed", "3")
    done = cli(server, *args, "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["adapter"]["version"] == version and reply["adapter"]["book_id"] == BOOK
    assert reply["completion_tokens"] >= 1 and reply["text"]

    plain = cli(server, *args)
    assert plain.returncode == 0 and plain.stdout.rstrip("\n") == reply["text"]
    assert version in plain.stderr

    streamed = cli(
        server, "It was cold and", "--book", BOOK, "--max-new-tokens", "6", "--seed", "3", "--stream"
    )
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == reply["text"]

    base = cli(server, "Hello", "--adapter", "base", "--chat", "--max-new-tokens", "4", "--json")
    assert json.loads(base.stdout)["adapter"]["version"] == "base"


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_user_errors_are_one_line_and_metrics_are_served(server: Any) -> None:
    unknown = cli(server, "Hi", "--book", "0000000000000bad")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        "error: book 0000000000000bad has no published adapter yet; train it first, or ask for adapter 'base'"
    ]
    hot = cli(server, "Hi", "--adapter", "base", "--temperature", "7")
    assert hot.returncode == 1 and hot.stderr.startswith("error: temperature must be in [0, 2]")
    capped = cli(server, "Hi", "--adapter", "base", "--max-new-tokens", "100")
    assert capped.returncode == 1 and "cap of 64" in capped.stderr
    assert "Traceback" not in unknown.stderr + hot.stderr + capped.stderr

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert (
        'novelcrafter_inference_requests_total{adapter="unresolved",book="unknown",method="Generate",status="NOT_FOUND"}'
        in text
    )
    assert "novelcrafter_inference_time_to_first_token_seconds_bucket" in text
    assert "novelcrafter_inference_adapter_versions_held 1.0" in text


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_sigterm_drains_and_exits_cleanly(server: Any) -> None:
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.popen.wait(60) == 0, server.output()[-3000:]
    assert time.monotonic() - started < 60
    assert "shutting down" in server.output()
