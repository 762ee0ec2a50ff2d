"""Base models kept in the object store: ``novelcrafter model upload`` and ``--base-model store:NAME``.

For deployments whose services cannot reach the Hub (Llama 3.2 on a cluster with MinIO): the
model directory is uploaded once, and every trainer and inference server fetches it into its
cache, checked file by file against the sha256 in ``models/<name>/model.json``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_support import (
    book_pdf,
    create_job,
    ingest_book,
    start_ingest,
    start_trainer,
    tiny_job_config,
    wait_job,
)
from support import NOVELCRAFTER, base_env

from novelcrafter import layout
from novelcrafter.adapters import list_versions
from novelcrafter.config import get_settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument
from novelcrafter.models import load_base_model, provision_base_model, upload_base_model
from novelcrafter.store import file_sha256, open_store
from novelcrafter.v1 import jobs_pb2


def _settings(store: str, home: Path) -> Any:
    return get_settings(store=store, home=str(home))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """A small random Llama model directory, with the real tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((base_model_dir / name).read_bytes())
    return folder


def test_the_real_base_model_round_trips_through_a_local_store(
    base_model_dir: Path, base_model: tuple[Any, Any], tmp_path: Path
) -> None:
    store_url = str(tmp_path / "store")
    manifest = upload_base_model(open_store(store_url), base_model_dir, "smollm2-copy")
    assert "model.safetensors" in manifest["files"] and "model.json" not in manifest["files"]

    settings = _settings(store_url, tmp_path / "home")
    fetched = provision_base_model("store:smollm2-copy", settings)
    assert fetched.parent == tmp_path / "home" / "models"
    for name, meta in manifest["files"].items():
        assert file_sha256(fetched / name) == meta["sha256"] == file_sha256(base_model_dir / name)
    assert provision_base_model("store:smollm2-copy", settings) == fetched  # cached

    model = load_base_model(fetched)
    original = base_model[0]
    ids = torch.tensor([[1, 504, 3520, 314, 2951]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_s3_upload_is_idempotent_immutable_and_verified(
    s3_settings: dict[str, str], tiny_llama: Path, tmp_path: Path
) -> None:
    store_url = "s3://base-models/team"
    store = open_store(store_url, get_settings())
    first = upload_base_model(store, tiny_llama, "tiny")
    assert upload_base_model(store, tiny_llama, "tiny") == first  # the same files again: no-op
    assert store.get_json(layout.model_manifest_key("tiny")) == first

    other = tmp_path / "other"
    other.mkdir()
    for path in tiny_llama.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    (other / "config.json").write_text(
        json.dumps({**json.loads((other / "config.json").read_text()), "x": 1})
    )
    with pytest.raises(FailedPrecondition, match="already in the store with other files"):
        upload_base_model(store, other, "tiny")

    fetched = provision_base_model("store:tiny", _settings(store_url, tmp_path / "home"))
    assert load_base_model(fetched).config.hidden_size == 32

    # A damaged object is caught by its checksum; nothing half-fetched is left in the cache.
    store.put(layout.model_prefix("tiny") + "model.safetensors", b"not the weights")
    fresh_home = tmp_path / "home2"
    with pytest.raises(FailedPrecondition, match=r"model\.safetensors does not match its checksum"):
        provision_base_model("store:tiny", _settings(store_url, fresh_home))
    assert [p.name for p in (fresh_home / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_bad_uploads_and_names_are_clear_errors(tiny_llama: Path, tmp_path: Path) -> None:
    store_url = str(tmp_path / "store")
    store = open_store(store_url)
    settings = _settings(store_url, tmp_path / "home")
    with pytest.raises(InvalidArgument, match=r"has no config\.json"):
        upload_base_model(store, tmp_path, "empty")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match=r"no \*\.safetensors weights"):
        upload_base_model(store, weightless, "weightless")
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(InvalidArgument, match="invalid model name"):
            upload_base_model(store, tiny_llama, bad)
        with pytest.raises(InvalidArgument):
            provision_base_model(f"store:{bad}", settings)
    with pytest.raises(FailedPrecondition, match="novelcrafter model upload MODEL_DIR --name missing"):
        provision_base_model("store:missing", settings)
    store.put_json(layout.model_manifest_key("broken"), {"files": {"../x.json": {"size": 1, "sha256": "0"}}})
    with pytest.raises(FailedPrecondition, match="malformed"):
        provision_base_model("store:broken", settings)
    assert store.list("models/") == [layout.model_manifest_key("broken")]  # failed uploads wrote nothing


def test_cli_upload_then_provision_in_another_process(tiny_llama: Path, tmp_path: Path) -> None:
    env = base_env(NOVELCRAFTER_STORE=str(tmp_path / "store"), NOVELCRAFTER_HOME=str(tmp_path / "home"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NOVELCRAFTER, "model", *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    uploaded = cli("upload", str(tiny_llama), "--name", "tiny-1")
    assert uploaded.returncode == 0, uploaded.stderr
    assert "use it with --base-model store:tiny-1" in uploaded.stdout
    provisioned = cli("provision", "--base-model", "store:tiny-1")
    assert provisioned.returncode == 0, provisioned.stderr
    assert (Path(provisioned.stdout.strip()) / "model.safetensors").exists()

    wrong = cli("upload", str(tmp_path), "--name", "tiny-2")
    assert wrong.returncode == 1
    assert (
        wrong.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path} is not a model directory: it has no config.json"
    )
    assert "Traceback" not in wrong.stderr


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_inference_server_starts_on_a_base_model_from_the_store(tiny_llama: Path, tmp_path: Path) -> None:
    """`serve inference` with NOVELCRAFTER_BASE_MODEL=store:NAME: fetched at startup, then served."""
    from support import Proc, free_port

    from novelcrafter.rpc import connect, wait_for_health
    from novelcrafter.v1 import inference_pb2, inference_pb2_grpc

    store = tmp_path / "store"
    upload_base_model(open_store(str(store)), tiny_llama, "tiny-served")
    address = f"127.0.0.1:{free_port()}"
    env = base_env(
        NOVELCRAFTER_BASE_MODEL="store:tiny-served",
        NOVELCRAFTER_HOME=str(tmp_path / "home"),
        NOVELCRAFTER_METRICS_LISTEN="off",
    )
    proc = Proc(
        [NOVELCRAFTER, "serve", "inference", "--listen", address, "--store", str(store)],
        env,
        tmp_path / "inference.log",
    )
    try:
        wait_for_health(address, timeout=240)
        request = inference_pb2.GenerateRequest(prompt="The sea", adapter="base", max_new_tokens=4, seed=1)
        with connect(address) as channel:
            reply = inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=60)
        assert reply.adapter.version == "base" and reply.completion_tokens > 0
        assert "downloading base model from the store" in proc.output()
    finally:
        assert proc.stop(30) == 0, proc.output()[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_job_trains_on_a_base_model_from_the_store(tiny_llama: Path, tmp_path: Path) -> None:
    """A job naming `store:NAME` as its base model: the worker fetches it and trains every part."""
    store = str(tmp_path / "store")
    upload_base_model(open_store(store), tiny_llama, "tiny-trained")
    env = {"NOVELCRAFTER_HOME": str(tmp_path / "home")}
    ingest = start_ingest(store, tmp_path)
    trainer = start_trainer(store, ingest.address, tmp_path, env=env)
    try:
        book = ingest_book(ingest.address, book_pdf(60, seed=71), parts=2).manifest.book_id
        config = tiny_job_config(steps=1)
        config.base_model = "store:tiny-trained"
        job = create_job(ingest.address, book, config)
        done = wait_job(ingest.address, job.job_id, 500, logs=trainer.output)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{done.error}\n{trainer.output()[-3000:]}"
    finally:
        trainer.stop()
        ingest.stop()
    versions = list_versions(open_store(store), book)
    assert [(v.part, v.base_model) for v in versions] == [
        (0, "store:tiny-trained"),
        (1, "store:tiny-trained"),
    ]
    cached = list((tmp_path / "home" / "models").glob("store--tiny-trained--*"))
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
